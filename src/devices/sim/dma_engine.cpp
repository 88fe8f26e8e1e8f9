#include "devices/sim/dma_engine.hpp"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <latch>

#include "platform/copy.hpp"
#include "platform/threads.hpp"

namespace uhmm::sim {

DmaEngine::DmaEngine(unsigned threads, LinkModel link, std::size_t inline_bytes, FaultInjection& faults)
    : link_(link), inline_bytes_(inline_bytes), faults_(faults) {
  for (unsigned i = 0; i < threads; ++i) {
    threads_.emplace_back([this, i] {
      platform::name_this_thread("dma", i);
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

void DmaEngine::apply_link_model(std::size_t bytes, std::chrono::steady_clock::time_point started) {
  auto budget = link_.setup_latency;
  if (link_.bytes_per_second > 0)
    budget += std::chrono::nanoseconds(static_cast<std::int64_t>(static_cast<double>(bytes) * 1e9 /
                                                                 link_.bytes_per_second));
  if (budget.count() == 0) return;
  const auto until = started + budget;
  while (std::chrono::steady_clock::now() < until) {
    const auto left = until - std::chrono::steady_clock::now();
    if (left > std::chrono::microseconds(100)) std::this_thread::sleep_for(left / 2);
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
    std::chrono::steady_clock::time_point started;
  };
  auto transfer = std::make_shared<Transfer>();
  transfer->shares_left.store(shares, std::memory_order_relaxed);
  transfer->started = std::chrono::steady_clock::now();
  std::future<void> result = transfer->done.get_future();
  // The last share to finish completes the transfer: the link model counts
  // it as one.
  auto copy_share = [this, transfer, bytes = ops.size() * kPageSize](std::span<CopyOp> share) {
    copy_range(share);
    if (transfer->shares_left.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
    apply_link_model(bytes, transfer->started);
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
  const auto started = std::chrono::steady_clock::now();
  const std::size_t bytes = ops.size() * kPageSize;
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
  apply_link_model(bytes, started);
}

}  // namespace uhmm::sim
