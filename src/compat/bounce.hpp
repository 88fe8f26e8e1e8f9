// compat: the buffers the library copies the program's and the device's
// memory through (docs/adr/0005-dmirror-emulation.md, "Bounce buffers").
//
// Why an arena: the device reaches a managed system page at its virtual
// address.  From the kernel's munmap of a managed range until uhmm reads its
// UNMAP event, uhmm still manages the range and a mirror may still map its
// pages, so whatever is mapped into the hole meanwhile is read and written
// as the program's range.  A buffer the library mapped where the kernel
// chose could be that: a READ racing munmap returned its own zeroed bounce
// buffer as the data (issue 4).  The arena is reserved once, before any of
// the program's memory is managed, and never given back, so no address in it
// is ever the program's.
//
// Concurrency: take() and give() may be called from any thread; the free
// list has its own leaf lock, never held across a syscall.
#pragma once

#include <cstddef>
#include <memory>
#include <utility>

#include "core/run_set.hpp"
#include "core/sync.hpp"
#include "core/thread_annotations.hpp"
#include "uhmm/status.hpp"

namespace uhmm::compat {

class BounceArena {
 public:
  /// Reserves `bytes` (rounded up to pages) of address space: inaccessible,
  /// unbacked, and not inherited by a forked child.
  static Result<std::unique_ptr<BounceArena>> reserve(std::size_t bytes);
  ~BounceArena();
  BounceArena(const BounceArena&) = delete;
  BounceArena& operator=(const BounceArena&) = delete;

  /// `bytes` (rounded up to pages, at least one) of zeroed read-write
  /// memory; ENOMEM when no free piece is large enough.
  Result<std::byte*> take(std::size_t bytes);
  /// Gives back what take() returned, with the size it was asked for; its
  /// pages are dropped.
  void give(std::byte* p, std::size_t bytes);

  bool contains(const void* p) const {
    const auto* b = static_cast<const std::byte*>(p);
    return b >= base_ && b < base_ + size_;
  }

 private:
  BounceArena(std::byte* base, std::size_t size);

  std::byte* const base_;
  const std::size_t size_;
  Mutex mutex_{LockRank::kLeaf};
  RunSet free_ UHMM_GUARDED_BY(mutex_);  // byte offsets
};

/// One buffer of the arena for the time of a command.
class Bounce {
 public:
  static Result<Bounce> make(BounceArena& arena, std::size_t bytes) {
    Bounce b;
    if (bytes == 0) return b;
    auto p = arena.take(bytes);
    if (!p) return p.status();
    b.arena_ = &arena;
    b.data_ = *p;
    b.size_ = bytes;
    return b;
  }
  Bounce() = default;
  Bounce(Bounce&& o) noexcept
      : arena_(std::exchange(o.arena_, nullptr)),
        data_(std::exchange(o.data_, nullptr)),
        size_(std::exchange(o.size_, 0)) {}
  Bounce& operator=(Bounce&&) = delete;
  ~Bounce() {
    if (data_ != nullptr) arena_->give(data_, size_);
  }
  std::byte* data() const { return data_; }
  std::size_t size() const { return size_; }

 private:
  BounceArena* arena_ = nullptr;
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace uhmm::compat
