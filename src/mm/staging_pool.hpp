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
// Two lanes share the reservation:
//   * the small lane (MADV_NOHUGEPAGE) hands out runs of 4 KiB slots; touching
//     one slot populates that slot alone, so the pool's books stay right;
//   * the huge lane (MADV_HUGEPAGE) hands out whole 2 MiB-aligned blocks only.
//     A huge page moved out of a managed range lands in an empty block as one
//     entry, a block populated whole is one huge page, and moving it into an
//     aligned managed block keeps it huge: copies run between huge pages
//     (on a VM, ~40 % faster than through 4 KiB pages) and a move costs one
//     TLB flush instead of 512.  Parts of a block may come back separately;
//     the block returns to its free list once all of it is back.
//
// Concurrency: thread safe; one mutex (rank kStaging) guards the free lists.
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
  /// A whole 2 MiB-aligned block from the huge lane: empty (a MOVE
  /// destination that can take a huge page whole) or, with `ready`,
  /// populated (a huge page when the kernel has one).  ENOMEM when none.
  Status take_block(bool ready, VirtAddr* block);
  /// The slots hold no page any more.
  void give_back_empty(VirtAddr start, std::size_t pages);
  /// The slots hold pages nobody uses.
  void give_back_ready(VirtAddr start, std::size_t pages);
  /// The taken huge-lane block holding `addr` is populated with 4 KiB pages
  /// (a 2 MiB unit that left the CPU split), not with one huge page.  When
  /// it comes back populated, its pages go rather than stay ready: reused,
  /// they would bring the next unit back split, and that unit would leave
  /// split in turn, for good.  A block populated afresh is a huge page.
  void note_split_block(VirtAddr addr);

  bool contains(VirtAddr addr) const { return addr >= base_ && addr < base_ + reserve_bytes_; }
  std::size_t ready_pages() const;
  std::size_t taken_pages() const;

 private:
  using RunMap = std::map<std::uintptr_t, std::size_t>;  // start address -> pages
  static void insert_run(RunMap& runs, std::uintptr_t start, std::size_t pages);
  static std::size_t take_from(RunMap& runs, std::size_t pages, std::vector<SlotRun>& out);
  std::size_t take_fresh(std::size_t pages, std::vector<SlotRun>& out) UHMM_REQUIRES(mutex_);
  bool in_huge_lane(VirtAddr a) const { return a >= huge_base_ && a < huge_base_ + huge_bytes_; }
  void give_back_huge(VirtAddr start, std::size_t pages, bool ready);
  void give_back_to_block(VirtAddr start, std::size_t pages, bool ready);

  platform::Uffd uffd_;
  VirtAddr base_;  // the whole reservation: huge lane first, then small lane
  std::size_t reserve_bytes_ = 0;
  VirtAddr huge_base_;
  std::size_t huge_bytes_ = 0;
  VirtAddr small_base_;
  std::size_t keep_pages_ = 0;

  mutable Mutex mutex_{LockRank::kStaging};
  std::uintptr_t fresh_ UHMM_GUARDED_BY(mutex_) = 0;  // below: used at least once
  RunMap empty_ UHMM_GUARDED_BY(mutex_);
  RunMap ready_ UHMM_GUARDED_BY(mutex_);
  std::size_t ready_pages_ UHMM_GUARDED_BY(mutex_) = 0;
  std::size_t taken_pages_ UHMM_GUARDED_BY(mutex_) = 0;
  // Huge lane.
  std::uintptr_t fresh_huge_ UHMM_GUARDED_BY(mutex_) = 0;
  std::vector<std::uintptr_t> huge_empty_ UHMM_GUARDED_BY(mutex_);
  std::vector<std::uintptr_t> huge_ready_ UHMM_GUARDED_BY(mutex_);
  struct BlockReturn {
    std::size_t empty = 0;
    std::size_t ready = 0;
    bool split = false;  // note_split_block
  };
  // Blocks handed out, with what has come back of them so far.
  std::map<std::uintptr_t, BlockReturn> huge_out_ UHMM_GUARDED_BY(mutex_);
};

}  // namespace uhmm::mm
