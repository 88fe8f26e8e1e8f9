#include "mm/staging_pool.hpp"

#include <sys/mman.h>

#include <algorithm>

#include "core/assert.hpp"

namespace uhmm::mm {

StagingPool::~StagingPool() {
  if (reserve_bytes_ != 0) (void)platform::unmap(base_, reserve_bytes_);
}

Status StagingPool::init(std::size_t reserve_bytes, std::size_t keep_bytes) {
  auto uffd = platform::Uffd::open(platform::kFeatureMove, /*nonblocking=*/true);
  if (!uffd) return uffd.status();
  uffd_ = std::move(*uffd);
  reserve_bytes = (reserve_bytes + kHugePageSize - 1) & ~(kHugePageSize - 1);
  auto base = platform::map_anonymous_aligned(reserve_bytes, kHugePageSize, PROT_READ | PROT_WRITE, true);
  if (!base) return base.status();
  base_ = *base;
  reserve_bytes_ = reserve_bytes;
  keep_pages_ = keep_bytes / kPageSize;
  huge_base_ = base_;
  huge_bytes_ = (reserve_bytes_ / 2) & ~(kHugePageSize - 1);
  small_base_ = base_ + huge_bytes_;
  (void)platform::advise(huge_base_, huge_bytes_, MADV_HUGEPAGE);
  (void)platform::advise(small_base_, reserve_bytes_ - huge_bytes_, MADV_NOHUGEPAGE);
  UHMM_TRY(uffd_.register_range(base_, reserve_bytes_, UFFDIO_REGISTER_MODE_WP));
  MutexLock lock(mutex_);
  fresh_ = small_base_.value;
  fresh_huge_ = huge_base_.value;
  return Status::ok();
}

void StagingPool::insert_run(RunMap& runs, std::uintptr_t start, std::size_t pages) {
  // Coalesce with neighbours so that later batches find long runs.
  auto next = runs.lower_bound(start);
  if (next != runs.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second * kPageSize == start) {
      start = prev->first;
      pages += prev->second;
      runs.erase(prev);
    }
  }
  next = runs.lower_bound(start);
  if (next != runs.end() && start + pages * kPageSize == next->first) {
    pages += next->second;
    runs.erase(next);
  }
  runs.emplace(start, pages);
}

std::size_t StagingPool::take_from(RunMap& runs, std::size_t pages, std::vector<SlotRun>& out) {
  std::size_t got = 0;
  // Whole 2 MiB blocks first, aligned: a huge page then moves as one entry
  // and stays huge at its destination.
  while (pages - got >= kPagesPerHugePage) {
    auto it = std::find_if(runs.begin(), runs.end(), [](const auto& r) {
      const std::uintptr_t aligned = (r.first + kHugePageSize - 1) & ~(kHugePageSize - 1);
      return aligned + kHugePageSize <= r.first + r.second * kPageSize;
    });
    if (it == runs.end()) break;
    const std::uintptr_t start = it->first;
    const std::uintptr_t end = start + it->second * kPageSize;
    const std::uintptr_t aligned = (start + kHugePageSize - 1) & ~(kHugePageSize - 1);
    const std::size_t blocks = std::min((pages - got) / kPagesPerHugePage, (end - aligned) / kHugePageSize);
    const std::uintptr_t taken_end = aligned + blocks * kHugePageSize;
    runs.erase(it);
    if (aligned > start) runs.emplace(start, (aligned - start) / kPageSize);
    if (end > taken_end) runs.emplace(taken_end, (end - taken_end) / kPageSize);
    out.push_back(SlotRun{VirtAddr{aligned}, blocks * kPagesPerHugePage});
    got += blocks * kPagesPerHugePage;
  }
  // Then one run that fits the rest whole (fewer MOVE calls, contiguous
  // copies), then anything.
  auto fit = std::find_if(runs.begin(), runs.end(), [&](const auto& r) { return r.second >= pages - got; });
  while (got < pages && !runs.empty()) {
    auto it = fit != runs.end() ? fit : runs.begin();
    fit = runs.end();
    const std::size_t n = std::min(pages - got, it->second);
    out.push_back(SlotRun{VirtAddr{it->first}, n});
    const std::uintptr_t start = it->first;
    const std::size_t left = it->second - n;
    runs.erase(it);
    if (left > 0) runs.emplace(start + n * kPageSize, left);
    got += n;
  }
  return got;
}

std::size_t StagingPool::take_fresh(std::size_t pages, std::vector<SlotRun>& out) {
  const std::uintptr_t limit = base_.value + reserve_bytes_;  // the small lane's end
  const std::size_t avail = (limit - fresh_) / kPageSize;
  const std::size_t n = std::min(avail, pages);
  if (n == 0) return 0;
  out.push_back(SlotRun{VirtAddr{fresh_}, n});
  fresh_ += n * kPageSize;
  return n;
}

Status StagingPool::take_empty(std::size_t pages, std::vector<SlotRun>& out) {
  if (pages == 0) return Status::ok();
  MutexLock lock(mutex_);
  const std::size_t mark = out.size();
  std::size_t got = take_from(empty_, pages, out);
  if (got < pages && pages - got >= kPagesPerHugePage) {
    // Fresh space for whole blocks starts on a 2 MiB boundary.
    const std::uintptr_t aligned = (fresh_ + kHugePageSize - 1) & ~(kHugePageSize - 1);
    if (aligned > fresh_ && aligned <= base_.value + reserve_bytes_) {
      insert_run(empty_, fresh_, (aligned - fresh_) / kPageSize);
      fresh_ = aligned;
    }
  }
  if (got < pages) got += take_fresh(pages - got, out);
  if (got < pages) got += take_from(empty_, pages - got, out);
  if (got < pages) {
    for (std::size_t i = mark; i < out.size(); ++i) insert_run(empty_, out[i].start.value, out[i].pages);
    out.resize(mark);
    return Status::error(ENOMEM, "staging reservation exhausted");
  }
  taken_pages_ += pages;
  return Status::ok();
}

Status StagingPool::take_ready(std::size_t pages, std::vector<SlotRun>& out) {
  if (pages == 0) return Status::ok();
  std::vector<SlotRun> populate;
  {
    MutexLock lock(mutex_);
    const std::size_t mark = out.size();
    std::size_t got = take_from(ready_, pages, out);
    ready_pages_ -= got;
    const std::size_t first_empty = out.size();  // runs from here on need populating
    if (got < pages) got += take_from(empty_, pages - got, out);
    if (got < pages) got += take_fresh(pages - got, out);
    if (got < pages) {
      for (std::size_t i = mark; i < out.size(); ++i) {
        if (i < first_empty) {
          insert_run(ready_, out[i].start.value, out[i].pages);
          ready_pages_ += out[i].pages;
        } else {
          insert_run(empty_, out[i].start.value, out[i].pages);
        }
      }
      out.resize(mark);
      return Status::error(ENOMEM, "staging reservation exhausted");
    }
    populate.assign(out.begin() + static_cast<std::ptrdiff_t>(first_empty), out.end());
    taken_pages_ += pages;
  }
  // Populate outside the lock: the kernel allocates (and zeroes) the pages.
  for (const SlotRun& r : populate) {
    if (Status s = platform::advise(r.start, r.pages * kPageSize, MADV_POPULATE_WRITE); !s) {
      // Fall back to touching each page from this thread (staging never blocks).
      for (std::size_t i = 0; i < r.pages; ++i) *(r.start + i * kPageSize).as<volatile char>() = 0;
    }
  }
  return Status::ok();
}

Status StagingPool::take_block(bool ready, VirtAddr* block) {
  bool populate = false;
  {
    MutexLock lock(mutex_);
    std::uintptr_t b = 0;
    if (ready && !huge_ready_.empty()) {
      b = huge_ready_.back();
      huge_ready_.pop_back();
      ready_pages_ -= kPagesPerHugePage;
    } else if (!huge_empty_.empty()) {
      b = huge_empty_.back();
      huge_empty_.pop_back();
      populate = ready;
    } else if (fresh_huge_ + kHugePageSize <= huge_base_.value + huge_bytes_) {
      b = fresh_huge_;
      fresh_huge_ += kHugePageSize;
      populate = ready;
    } else {
      return Status::error(ENOMEM, "no free staging block");
    }
    huge_out_[b] = BlockReturn{};
    taken_pages_ += kPagesPerHugePage;
    *block = VirtAddr{b};
  }
  if (populate) {
    if (Status s = platform::advise(*block, kHugePageSize, MADV_POPULATE_WRITE); !s) {
      for (std::size_t i = 0; i < kPagesPerHugePage; ++i) *(*block + i * kPageSize).as<volatile char>() = 0;
    }
  }
  return Status::ok();
}

void StagingPool::give_back_huge(VirtAddr start, std::size_t pages, bool ready) {
  // A run may span blocks handed out next to each other: account per block.
  while (pages > 0) {
    const VirtAddr block_end = start.huge_down() + kHugePageSize;
    const std::size_t here = std::min(pages, (block_end - start) / kPageSize);
    give_back_to_block(start, here, ready);
    start = start + here * kPageSize;
    pages -= here;
  }
}

void StagingPool::give_back_to_block(VirtAddr start, std::size_t pages, bool ready) {
  const std::uintptr_t b = start.huge_down().value;
  bool drop = false;
  {
    MutexLock lock(mutex_);
    auto it = huge_out_.find(b);
    UHMM_CHECK(it != huge_out_.end(), "staging block given back but not taken");
    (ready ? it->second.ready : it->second.empty) += pages;
    UHMM_DCHECK(taken_pages_ >= pages, "staging accounting");
    taken_pages_ -= pages;
    const BlockReturn back = it->second;
    if (back.empty + back.ready < kPagesPerHugePage) return;
    huge_out_.erase(it);
    if (back.ready == kPagesPerHugePage && !back.split && ready_pages_ + kPagesPerHugePage <= keep_pages_) {
      huge_ready_.push_back(b);
      ready_pages_ += kPagesPerHugePage;
      return;
    }
    // Empty, mixed, split, or over the keep limit: the whole block becomes
    // empty.  Emptied by moves of 4 KiB pages, it keeps their page table,
    // and a huge page moving in later would be split: the zap drops it (on
    // Linux >= 6.14, CONFIG_PT_RECLAIM).  One that held a huge page has
    // none, and its zap finds nothing.
    drop = true;
  }
  if (drop) (void)platform::advise(VirtAddr{b}, kHugePageSize, MADV_DONTNEED);
  MutexLock lock(mutex_);
  huge_empty_.push_back(b);
}

void StagingPool::note_split_block(VirtAddr addr) {
  if (!in_huge_lane(addr)) return;
  MutexLock lock(mutex_);
  if (auto it = huge_out_.find(addr.huge_down().value); it != huge_out_.end()) it->second.split = true;
}

void StagingPool::give_back_empty(VirtAddr start, std::size_t pages) {
  if (pages == 0) return;
  if (in_huge_lane(start)) return give_back_huge(start, pages, false);
  MutexLock lock(mutex_);
  UHMM_DCHECK(taken_pages_ >= pages, "staging accounting");
  taken_pages_ -= pages;
  insert_run(empty_, start.value, pages);
}

void StagingPool::give_back_ready(VirtAddr start, std::size_t pages) {
  if (pages == 0) return;
  if (in_huge_lane(start)) return give_back_huge(start, pages, true);
  bool drop = false;
  {
    MutexLock lock(mutex_);
    UHMM_DCHECK(taken_pages_ >= pages, "staging accounting");
    taken_pages_ -= pages;
    drop = ready_pages_ + pages > keep_pages_;
    if (!drop) {
      insert_run(ready_, start.value, pages);
      ready_pages_ += pages;
      return;
    }
  }
  // Over the keep limit: hand the memory back to the kernel, then the slots
  // are empty.  (No events are registered on the staging uffd, so madvise
  // never waits for a reader.)
  (void)platform::advise(start, pages * kPageSize, MADV_DONTNEED);
  MutexLock lock(mutex_);
  insert_run(empty_, start.value, pages);
}

std::size_t StagingPool::ready_pages() const {
  MutexLock lock(mutex_);
  return ready_pages_;
}

std::size_t StagingPool::taken_pages() const {
  MutexLock lock(mutex_);
  return taken_pages_;
}

}  // namespace uhmm::mm
