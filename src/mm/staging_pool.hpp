// mm/staging_pool.hpp: system pages in transit.
//
// A migration to a device first moves each page out of the managed range
// (UFFDIO_MOVE) into a staging slot, where the DMA engine reads it; a
// migration back fills a populated staging slot and moves it into place.
// Slots are 4 KiB pieces of one big reserved mapping, registered (write-
// protect mode only, so touching it never blocks) with a userfaultfd of its
// own that requests no events: UFFDIO_MOVE needs its destination registered
// with the uffd it is issued on, and madvise on staging must never wait for
// an event reader.
//
// Each slot is empty (no page: a MOVE destination) or ready (a populated,
// unused page: a copy destination for data coming back).  Taken slots belong
// to the migration that took them until given back.  Ready pages beyond the
// keep limit are returned to the kernel.
//
// Concurrency: thread safe; one mutex (rank kStaging) guards the free runs.
#pragma once

#include <cstddef>
#include <map>
#include <vector>

#include "core/sync.hpp"
#include "platform/uffd.hpp"
#include "uhmm/status.hpp"
#include "uhmm/types.hpp"

namespace uhmm::mm {

struct SlotRun {
  VirtAddr start;
  std::size_t pages = 0;
};

class StagingPool {
 public:
  StagingPool() = default;
  ~StagingPool();
  StagingPool(const StagingPool&) = delete;
  StagingPool& operator=(const StagingPool&) = delete;

  Status init(std::size_t reserve_bytes, std::size_t keep_bytes);
  platform::Uffd& uffd() { return uffd_; }

  /// Appends runs totalling `pages` empty slots to `out`.  ENOMEM if the
  /// reservation is exhausted (nothing is taken then).
  Status take_empty(std::size_t pages, std::vector<SlotRun>& out);
  /// Appends runs totalling `pages` populated slots (contents undefined).
  Status take_ready(std::size_t pages, std::vector<SlotRun>& out);
  /// The slots hold no page any more.
  void give_back_empty(VirtAddr start, std::size_t pages);
  /// The slots hold pages nobody uses.
  void give_back_ready(VirtAddr start, std::size_t pages);

  bool contains(VirtAddr addr) const { return addr >= base_ && addr < base_ + reserve_bytes_; }
  std::size_t ready_pages() const;
  std::size_t taken_pages() const;

 private:
  using RunMap = std::map<std::uintptr_t, std::size_t>;  // start address -> pages
  static void insert_run(RunMap& runs, std::uintptr_t start, std::size_t pages);
  static std::size_t take_from(RunMap& runs, std::size_t pages, std::vector<SlotRun>& out);
  std::size_t take_fresh(std::size_t pages, std::vector<SlotRun>& out) UHMM_REQUIRES(mutex_);

  platform::Uffd uffd_;
  VirtAddr base_;
  std::size_t reserve_bytes_ = 0;
  std::size_t keep_pages_ = 0;

  mutable Mutex mutex_{LockRank::kStaging};
  std::uintptr_t fresh_ UHMM_GUARDED_BY(mutex_) = 0;  // below: used at least once
  RunMap empty_ UHMM_GUARDED_BY(mutex_);
  RunMap ready_ UHMM_GUARDED_BY(mutex_);
  std::size_t ready_pages_ UHMM_GUARDED_BY(mutex_) = 0;
  std::size_t taken_pages_ UHMM_GUARDED_BY(mutex_) = 0;
};

}  // namespace uhmm::mm
