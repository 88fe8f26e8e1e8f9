#include "devices/sim/dma_engine.hpp"

#include <sys/prctl.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <latch>
#include <thread>

#include "platform/copy.hpp"
#include "platform/threads.hpp"

namespace uhmm::sim {

DmaEngine::DmaEngine(unsigned threads, LinkModel link, std::size_t inline_bytes, FaultInjection& faults)
    : link_(link), inline_bytes_(inline_bytes), faults_(faults) {
  for (unsigned i = 0; i < threads; ++i) {
    threads_.emplace_back([this, i] {
      platform::name_this_thread("dma", i);
      // Link waits end on time (the default slack, 50 us, is most of a
      // 2 MiB transfer on a fast link).
      (void)::prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
      worker();
    });
  }
}

DmaEngine::~DmaEngine() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
}

void DmaEngine::worker() {
  for (;;) {
    std::function<void()> job;
    {
      std::unique_lock lock(mutex_);
      cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;
      job = std::move(queue_.front());
      queue_.pop_front();
    }
    job();  // jobs never throw: copy_range only copies memory
  }
}

void DmaEngine::copy_range(std::span<CopyOp> ops) {
  for (CopyOp& op : ops) op.ok = !faults_.should_fail_copy();
  std::size_t i = 0;
  while (i < ops.size()) {
    if (!ops[i].ok) {
      ++i;
      continue;
    }
    // Coalesce a run of contiguous sources and destinations into one copy.
    std::size_t n = 1;
    while (i + n < ops.size() && ops[i + n].ok && ops[i + n].dst == ops[i].dst + n * kPageSize &&
           ((ops[i].src == nullptr && ops[i + n].src == nullptr) ||
            (ops[i].src != nullptr && ops[i + n].src == ops[i].src + n * kPageSize)))
      ++n;
    if (ops[i].src == nullptr) {
      std::memset(ops[i].dst, 0, n * kPageSize);
    } else if (n * kPageSize >= kStreamingCopyBytes) {
      platform::copy_streaming(ops[i].dst, ops[i].src, n * kPageSize);
    } else {
      std::memcpy(ops[i].dst, ops[i].src, n * kPageSize);
    }
    i += n;
  }
}

std::chrono::steady_clock::time_point DmaEngine::reserve_link(std::size_t bytes,
                                                              std::chrono::steady_clock::time_point started) {
  if (link_.bytes_per_second <= 0 && link_.setup_latency.count() == 0) return started;
  const auto on_link = std::chrono::nanoseconds(
      link_.bytes_per_second > 0
          ? static_cast<std::int64_t>(static_cast<double>(bytes) * 1e9 / link_.bytes_per_second)
          : 0);
  std::lock_guard lock(link_mutex_);
  const auto begins = std::max(started, link_free_);
  link_free_ = begins + on_link;
  return link_free_ + link_.setup_latency;
}

void DmaEngine::wait_until(std::chrono::steady_clock::time_point until, std::chrono::microseconds spin) {
  const auto now = std::chrono::steady_clock::now();
  if (until - now > spin) std::this_thread::sleep_until(until - spin);
  while (std::chrono::steady_clock::now() < until) {
  }
}

std::future<void> DmaEngine::start(std::span<CopyOp> ops) {
  // One share per worker, each of kPagesPerShare pages at least: a share
  // smaller than that costs more to hand over than it saves.
  const std::size_t shares =
      threads_.empty() ? 1 : std::clamp<std::size_t>(ops.size() / kPagesPerShare, 1, threads_.size());
  struct Transfer {
    std::promise<void> done;
    std::atomic<std::size_t> shares_left;
    std::chrono::steady_clock::time_point until;  // when the link has carried it
  };
  auto transfer = std::make_shared<Transfer>();
  transfer->shares_left.store(shares, std::memory_order_relaxed);
  transfer->until = reserve_link(ops.size() * kPageSize, std::chrono::steady_clock::now());
  std::future<void> result = transfer->done.get_future();
  // The last share to finish completes the transfer: the link model counts
  // it as one.
  auto copy_share = [this, transfer](std::span<CopyOp> share) {
    copy_range(share);
    if (transfer->shares_left.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
    wait_until(transfer->until, threads_.empty() ? kCallerSpin : kWorkerSpin);
    transfer->done.set_value();
  };
  if (threads_.empty()) {
    copy_share(ops);
    return result;
  }
  const std::size_t per = (ops.size() + shares - 1) / shares;
  {
    std::lock_guard lock(mutex_);
    for (std::size_t off = 0; off < ops.size(); off += per)
      queue_.push_back([copy_share, share = ops.subspan(off, std::min(per, ops.size() - off))] { copy_share(share); });
  }
  if (shares == 1) {
    cv_.notify_one();
  } else {
    cv_.notify_all();
  }
  return result;
}

void DmaEngine::copy(std::span<CopyOp> ops) {
  if (ops.empty()) return;
  const std::size_t bytes = ops.size() * kPageSize;
  const auto until = reserve_link(bytes, std::chrono::steady_clock::now());
  if (threads_.empty() || bytes <= inline_bytes_) {
    copy_range(ops);
  } else {
    // Split into one slice per worker plus one for the caller.
    const std::size_t parts = threads_.size() + 1;
    const std::size_t per = (ops.size() + parts - 1) / parts;
    std::vector<std::span<CopyOp>> slices;
    for (std::size_t off = 0; off < ops.size(); off += per)
      slices.push_back(ops.subspan(off, std::min(per, ops.size() - off)));
    std::latch done(static_cast<std::ptrdiff_t>(slices.size() - 1));
    {
      std::lock_guard lock(mutex_);
      for (std::size_t s = 1; s < slices.size(); ++s) {
        queue_.push_back([this, slice = slices[s], &done] {
          copy_range(slice);
          done.count_down();
        });
      }
    }
    cv_.notify_all();
    copy_range(slices[0]);
    done.wait();
  }
  wait_until(until, kCallerSpin);
}

}  // namespace uhmm::sim
