// devices/sim/dma_engine.hpp: the simulated device's copy engine.
//
// A batch of page copies is coalesced into contiguous runs and spread over
// worker threads; small batches are copied by the caller (a hand-off costs
// more than it saves).  Runs of kStreamingCopyBytes or more bypass the CPU
// caches (platform::copy_streaming), as a device's DMA does: twice glibc's
// memcpy here, and no eviction of the application's working set.  Shorter
// runs, a one-page fault's above all, go through the cache, where the
// faulting thread reads them next.  An optional link model (LinkModel)
// stands for the bus between host and device: the copies themselves run at
// memory speed, and a transfer completes when the link would have carried
// it.  Transfers share the link, one after another in the order they were
// started, each occupying it for its bytes at the link's bandwidth; a
// transfer's set-up latency delays its own completion only (transfers are
// pipelined, as a device's DMA queue is).  The wait is a sleep, so that a
// slow link leaves the host's CPUs to the application, as a device's DMA
// does.  Worker threads only touch staging pages and device memory, never
// managed memory.
//
// Concurrency: copy() may be called from many threads at once.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <future>
#include <mutex>
#include <span>
#include <thread>
#include <vector>

#include "uhmm/sim_device.hpp"

namespace uhmm::sim {

inline constexpr std::size_t kStreamingCopyBytes = std::size_t{64} << 10;
/// The least a worker takes of a started batch (1 MiB).
inline constexpr std::size_t kPagesPerShare = 256;

struct CopyOp {
  const std::byte* src = nullptr;  // nullptr: fill the destination with zeros
  std::byte* dst = nullptr;
  bool ok = true;  // out: false if the copy failed (fault injection)
};

class DmaEngine {
 public:
  DmaEngine(unsigned threads, LinkModel link, std::size_t inline_bytes, FaultInjection& faults);
  ~DmaEngine();
  DmaEngine(const DmaEngine&) = delete;
  DmaEngine& operator=(const DmaEngine&) = delete;

  /// Copies every op (one page each); returns when all are done.  Failed
  /// pages have ok == false and their destination is left unspecified.
  void copy(std::span<CopyOp> ops);
  /// Starts copying on the workers and returns at once; the ops must stay
  /// put until the future is ready.  A batch of 2 x kPagesPerShare pages or
  /// more is shared among the workers, so that one migration batch uses
  /// every copy channel.  Without workers, copies before returning.
  std::future<void> start(std::span<CopyOp> ops);

 private:
  void worker();
  void copy_range(std::span<CopyOp> ops);
  /// When a transfer of `bytes` started at `started` completes on the link
  /// (the link's next free moment moves past it); `started` itself without
  /// a link model.
  std::chrono::steady_clock::time_point reserve_link(std::size_t bytes, std::chrono::steady_clock::time_point started);
  /// Sleeps until `until`, spinning its last `spin` (what the thread's timer
  /// slack may add to a sleep).
  static void wait_until(std::chrono::steady_clock::time_point until, std::chrono::microseconds spin);
  static constexpr std::chrono::microseconds kWorkerSpin{10};  // workers' slack: 1 us
  static constexpr std::chrono::microseconds kCallerSpin{60};  // the default slack: 50 us

  LinkModel link_;
  std::mutex link_mutex_;
  std::chrono::steady_clock::time_point link_free_;  // guarded by link_mutex_
  std::size_t inline_bytes_;
  FaultInjection& faults_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;  // guarded by mutex_
  bool stopping_ = false;                    // guarded by mutex_
  std::vector<std::thread> threads_;
};

}  // namespace uhmm::sim
