// devices/sim/prefetch_stream.hpp: the readahead ramp of one address space's
// stream of CPU faults (SimDeviceOptions::prefetch_blocks).
//
// Pure bookkeeping, no locking and no memory access: the prefetcher holds
// its lock around every call, and decides which of the proposed blocks can
// actually be queued (device-resident, still managed) on its own.
//
// A fault continues the stream when it hits the block right after the last
// one served or queued, or when it lands inside the window queued since the
// stream's last in-order fault: the reader overtook the prefetcher (whose
// thread may not have run yet on a busy machine), which shows the reader is
// at least as fast as the prefetch, not that the stream ended.  Either way
// the window doubles up to the cap and what is queued reaches `window`
// blocks past the faulting one.  Any other fault starts over.
#pragma once

#include <algorithm>
#include <cstddef>
#include <optional>

#include "uhmm/types.hpp"

namespace uhmm::sim {

class PrefetchStream {
 public:
  /// Blocks to queue, `from` through `until` inclusive (2 MiB aligned).
  struct Window {
    VirtAddr from;
    VirtAddr until;
  };

  PrefetchStream(std::size_t initial_blocks, std::size_t max_blocks)
      : initial_(initial_blocks), max_(std::max(initial_blocks, max_blocks)) {}

  /// A fault served `block` (aligned).  Returns the blocks to queue, if
  /// any; they count as queued at once, so that a concurrent fault asks for
  /// what follows them.  Report what was really queued with queued().
  std::optional<Window> on_fault(VirtAddr block) {
    if (initial_ == 0) return std::nullopt;
    const bool in_order = last_.value != 0 && block == last_ + kHugePageSize;
    const bool overtook = first_.value != 0 && block >= first_ && block <= last_;
    if (!in_order && !overtook) {
      last_ = block;
      first_ = VirtAddr{};
      window_ = 0;
      return std::nullopt;
    }
    window_ = window_ == 0 ? initial_ : std::min(window_ * 2, max_);
    if (in_order) first_ = block + kHugePageSize;
    const Window w{std::max(last_, block) + kHugePageSize, block + window_ * kHugePageSize};
    if (w.until < w.from) return std::nullopt;  // queued far enough already
    last_ = w.until;
    return w;
  }

  /// Of the window `w` on_fault returned, the blocks up to `last_queued`
  /// were queued (none: nullopt).  The stream continues after them, unless
  /// a later fault has moved it on meanwhile.
  void queued(const Window& w, std::optional<VirtAddr> last_queued) {
    if (last_ != w.until) return;
    last_ = last_queued ? *last_queued : VirtAddr{w.from.value - kHugePageSize};
  }

  std::size_t window() const { return window_; }

 private:
  std::size_t initial_;
  std::size_t max_;
  VirtAddr last_;           // the last block served or queued
  VirtAddr first_;          // the first block queued since the last in-order fault
  std::size_t window_ = 0;  // the current window in blocks; 0: no stream yet
};

}  // namespace uhmm::sim
