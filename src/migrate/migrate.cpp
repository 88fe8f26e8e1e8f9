// migrate: migrate_vma_* and migrate_device_*.  The phases, and who owns
// what between them, are described once in docs/migration.md.
#include "uhmm/migrate.hpp"

#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "core/assert.hpp"
#include "mm/address_space_impl.hpp"
#include "platform/threads.hpp"
#include "platform/uffd.hpp"

namespace uhmm {

using mm::PageEntry;
using mm::PageState;

namespace {

bool entry_valid(std::uint64_t e) { return e & MIGRATE_PFN_VALID; }
bool entry_migrating(std::uint64_t e) { return e & MIGRATE_PFN_MIGRATE; }
VirtAddr system_page_address(std::uint64_t e) { return VirtAddr{migrate_pfn_to_pfn(e) << kPageShift}; }
bool is_system_entry(std::uint64_t e) { return entry_valid(e) && !is_device_pfn(migrate_pfn_to_pfn(e)); }
bool is_device_entry(std::uint64_t e) { return entry_valid(e) && is_device_pfn(migrate_pfn_to_pfn(e)); }

// Runs shorter than this are installed with UFFDIO_COPY instead of MOVE.
constexpr std::size_t kCopyInstallPages = 16;

// Where a page being installed comes from.
enum class Source {
  kStaging,  // a staging slot (system data)
  kHoleFill, // a staging slot filling what was a hole: nothing to carry
             // along if the range moved (its new place holds the real data)
  kHome,     // a coherent device page's home slot: its frame moves in, and
             // must not be copied unless the kernel refuses the move
};

// Installs pages into managed memory, moving staging slots (and coherent
// pages' home slots) in runs: one UFFDIO_MOVE per run of consecutive slots
// and consecutive addresses.
//
// The application may have discarded, unmapped or moved a page's address
// while the page was in transit: its zap found nothing there (the kernel's
// would remove its migration entry).  Every page therefore goes in inside
// the install window, checked against the changes read so far: a page
// whose address was discarded or unmapped is not put back (run's `gone`),
// one whose range moved goes where it went; a change read later applies to
// the installed page by itself (docs/address-space-events.md, case 3).
class Installer {
 public:
  explicit Installer(AddressSpace::Impl& as) : as_(as) {}
  /// `entry` is the destination's (locked) page-table entry: a poisoned one
  /// still has a SIGBUS marker in the kernel's table, cleared here first.
  void add(VirtAddr slot, VirtAddr managed, const mm::EntrySlot& entry, Source source = Source::kStaging) {
    if (PageEntry{entry.load(std::memory_order_acquire)}.poisoned()) as_.clear_poison(managed);
    const bool home = source == Source::kHome;
    const bool hole = source == Source::kHoleFill;
    if (!runs_.empty()) {
      Run& r = runs_.back();
      if (r.home == home && r.hole == hole && r.slot + r.pages * kPageSize == slot &&
          r.origin + r.pages * kPageSize == managed) {
        ++r.pages;
        return;
      }
    }
    runs_.push_back(Run{slot, managed, 1, home, hole});
  }

  // Installs everything without waking anyone; falls back to copying for
  // pages MOVE refuses, so the data always lands.  The slots end up empty
  // (moved) or are given back ready (copied, or not installed).  `gone(addr)`
  // hears of each page not installed because the application discarded or
  // unmapped its address, after the window has closed.  Call wake() once
  // the entries are settled: an access must not resume before its entry is
  // unlocked.
  template <typename Gone>
  void run(Gone&& gone) {
    if (runs_.empty()) return;
    empty_blocks();
    std::vector<VirtAddr> gone_pages;
    for (;;) {
      as_.open_install_window();
      const std::vector<struct uffd_msg> changes = as_.queued_changes();
      const Stop stop = install_all(changes, gone_pages);
      as_.close_install_window();
      if (stop.kind == Stop::kDone) break;
      if (stop.kind == Stop::kInTheWay) {
        // A zap waits for its own event to be read: never inside the window.
        as_.clear_poison(stop.where);
      } else {
        as_.drain_events();  // the unread change that holds the kernel back
        std::this_thread::yield();
      }
    }
    for (VirtAddr a : gone_pages) gone(a);
  }

  void wake() {
    for (const Placed& p : placed_) as_.wake(p.at, p.pages);
    placed_.clear();
  }

 private:
  struct Run {
    VirtAddr slot;
    VirtAddr origin;  // the address the page left (entries stay keyed by it)
    std::size_t pages;
    bool home = false;
    bool hole = false;
    std::size_t done = 0;              // pages installed or gone
    std::size_t cleared = SIZE_MAX;    // the page whose obstacle was zapped
  };
  struct Placed {
    VirtAddr at;
    std::size_t pages;
  };
  struct Stop {
    enum Kind { kDone, kBusy, kInTheWay } kind = kDone;
    VirtAddr where;  // kInTheWay: the address to clear
  };
  // How far one install call got: pages installed, then why it stopped.
  struct Step {
    std::size_t pages = 0;
    enum Kind { kAll, kBusy, kInTheWay, kGone } kind = kAll;
  };

  // Whole aligned blocks of staging runs: every page of them is absent and
  // locked by this migration, so their page tables can go (a zap, before
  // the window) and huge pages move in whole.  Not where a change queued
  // touches the run: the addresses may belong to someone else by now.
  // Where the page table is known gone already (PageTable::
  // note_no_kernel_table), the zap is skipped; every block the runs touch
  // is then no longer known to be without one, as pages go in.
  //
  // A reader that caught up with the migration faults on its first block
  // while the copy runs, and the kernel builds that block a table before
  // it queues the fault.  The fault's reading says so (read_messages), so
  // what the userfaultfd holds is read first: the service threads, short
  // of a CPU while the copy runs, read it up to hundreds of microseconds
  // later, and a huge page moved in meanwhile would be split
  // (docs/migration.md, "A unit can still come back split").
  void empty_blocks() {
    for (const Run& r : runs_) {
      empty_blocks_of(r);
      as_.table.note_kernel_table_maybe(r.origin.vpn(), r.pages);
    }
  }
  void empty_blocks_of(const Run& r) {
    if (r.home || r.pages < kPagesPerHugePage ||
        (r.origin.value & (kHugePageSize - 1)) != (r.slot.value & (kHugePageSize - 1)))
      return;
    const VirtAddr end = r.origin + r.pages * kPageSize;
    if (!as_.huge_pages_at(r.origin)) return;  // the pages go in as 4 KiB pages anyway
    if (!std::exchange(drained_, true)) as_.drain_events();
    if (!as_.pending_event_ranges(r.origin, end).empty()) return;
    for (VirtAddr b{(r.origin.value + kHugePageSize - 1) & ~(kHugePageSize - 1)}; b + kHugePageSize <= end;
         b = b + kHugePageSize)
      if (!as_.table.take_no_kernel_table(b.vpn())) as_.as_empty_block(b);
  }

  // One pass inside the window, from where the last one stopped.
  Stop install_all(const std::vector<struct uffd_msg>& changes, std::vector<VirtAddr>& gone_pages) {
    for (; next_ < runs_.size(); ++next_) {
      Run& r = runs_[next_];
      while (r.done < r.pages) {
        // The longest stretch from here whose pages share a fate.
        const VirtAddr first = r.origin + r.done * kPageSize;
        const std::optional<VirtAddr> to = changes.empty() ? first : AddressSpace::Impl::after_changes(changes, first);
        std::size_t len = 1;
        if (changes.empty()) {
          len = r.pages - r.done;
        } else {
          while (r.done + len < r.pages) {
            const auto next = AddressSpace::Impl::after_changes(changes, first + len * kPageSize);
            if (to ? next != *to + len * kPageSize : next.has_value()) break;
            ++len;
          }
        }
        if (!to || (r.hole && *to != first)) {
          drop(r, len, gone_pages);
          continue;
        }
        const Step step = r.home ? install_home(r, *to, len) : install_staging(r, *to, len);
        if (step.pages > 0) {
          placed_.push_back(Placed{*to, step.pages});
          unmapped_looks_ = 0;
        }
        r.done += step.pages;
        switch (step.kind) {
          case Step::kAll:
            break;
          case Step::kGone:
            // No mapping there (ENOENT).  The kernel looks for the mapping
            // before it looks for an unread change, so the range may have
            // moved or gone with its event still unread: read, look again.
            // Gone for good once looks after reading explain nothing.
            if (++unmapped_looks_ <= kUnmappedLooks) return Stop{Stop::kBusy, {}};
            unmapped_looks_ = 0;
            drop(r, 1, gone_pages);
            break;
          case Step::kBusy:
            return Stop{Stop::kBusy, {}};
          case Step::kInTheWay:
            r.cleared = r.done;
            return Stop{Stop::kInTheWay, *to + step.pages * kPageSize};
        }
      }
    }
    return Stop{};
  }

  // Pages not put back: their slots' data goes (a coherent frame stays home).
  void drop(Run& r, std::size_t len, std::vector<VirtAddr>& gone_pages) {
    if (!r.home) as_.staging.give_back_ready(r.slot + r.done * kPageSize, len);
    for (std::size_t k = 0; k < len; ++k) gone_pages.push_back(r.origin + (r.done + k) * kPageSize);
    r.done += len;
  }

  static Step::Kind step_for(int error) {
    if (error == EAGAIN) return Step::kBusy;
    if (error == ENOENT) return Step::kGone;
    return Step::kInTheWay;
  }

  Step install_staging(Run& r, VirtAddr to, std::size_t len) {
    const VirtAddr slot = r.slot + r.done * kPageSize;
    Step step;
    // A short run is copied in: installing a page where none was needs no
    // TLB flush, while moving one out of staging flushes it, which costs
    // an interrupt to every other CPU the process ran on (~10-20 us on a
    // VM, more than copying a few pages).  The slot stays populated and
    // goes back to the pool warm.  A range that is not read-write refuses
    // UFFDIO_MOVE (the protections of both sides must match): copy.  So
    // does a page whose obstacle was cleared and still refuses to move.
    const bool cleared = r.cleared == r.done;
    if (cleared) len = 1;
    // Where the application wants no huge pages, a whole aligned block's
    // first page is copied in on its own: the kernel then has a page table
    // there, and the move of the rest splits the staging block's huge page
    // rather than map it whole.
    const bool split_here = !cleared && to.huge_aligned() && len >= kPagesPerHugePage && !as_.huge_pages_at(to);
    if (split_here) len = 1;
    if (len < kCopyInstallPages || !as_.read_write_at(to)) {
      if (cleared && as_.move_in(slot, to, 1, /*wake=*/false).error == 0) {
        as_.staging.give_back_empty(slot, 1);
        return Step{1, Step::kAll};
      }
      const platform::PartialResult c = as_.uffd.copy(to, slot.ptr(), len * kPageSize, false);
      step.pages = c.bytes_done / kPageSize;
      if (step.pages > 0) as_.staging.give_back_ready(slot, step.pages);
      if (c.error == 0) return step;
      if (c.error == EAGAIN || c.error == ENOENT) return Step{step.pages, step_for(c.error)};
      UHMM_CHECK(!cleared, "cannot install a page in managed memory");
      // Something in the way (EEXIST): the move below tells.
    }
    const VirtAddr rest_slot = slot + step.pages * kPageSize;
    const VirtAddr rest_to = to + step.pages * kPageSize;
    const platform::PartialResult res = as_.move_in(rest_slot, rest_to, len - step.pages, /*wake=*/false);
    const std::size_t moved = res.bytes_done / kPageSize;
    as_.staging.give_back_empty(rest_slot, moved);
    step.pages += moved;
    if (res.error == 0) return step;
    // EAGAIN: a change waits to be read.  ENOENT: the destination is no
    // longer mapped (its change is read, or about to be: the page goes with
    // the range).  Otherwise the kernel refused a page (move_in already
    // verified that it really did not move: the slot still holds the data);
    // the locked entry makes our data the page's content, so whatever is in
    // the way goes, then the page is tried once more (moved, else copied).
    if (res.error != EAGAIN && res.error != ENOENT)
      std::fprintf(stderr, "uhmm: UFFDIO_MOVE into %#lx failed (%s); clearing it\n",
                   static_cast<unsigned long>(rest_to.value + moved * kPageSize), platform::errno_text(res.error).c_str());
    step.kind = step_for(res.error);
    return step;
  }

  // Coherent frames move in (zero copy: the frame is the device memory the
  // CPU now maps).  Where the kernel refuses (a range that is not
  // read-write, a frame shared with a forked child) the data is copied and
  // the home slot's stale copy discarded, so a frame is only ever in one
  // place.
  Step install_home(Run& r, VirtAddr to, std::size_t len) {
    const VirtAddr slot = r.slot + r.done * kPageSize;
    const bool cleared = r.cleared == r.done;
    if (cleared || !as_.read_write_at(to)) {
      if (cleared) len = 1;
      Step step;
      for (; step.pages < len; ++step.pages) {
        const VirtAddr from = slot + step.pages * kPageSize, at = to + step.pages * kPageSize;
        if (cleared && as_.move_in(from, at, 1, /*wake=*/false).error == 0) continue;
        const platform::PartialResult c = as_.uffd.copy(at, from.ptr(), kPageSize, /*wake=*/false);
        if (c.error == 0) {
          (void)platform::advise(from, kPageSize, MADV_DONTNEED);
          continue;
        }
        if (c.error == EAGAIN || c.error == ENOENT) return Step{step.pages, step_for(c.error)};
        UHMM_CHECK(!cleared, "cannot install a coherent page in managed memory");
        step.kind = Step::kInTheWay;  // a stale page in the way (EEXIST): the locked entry says it goes
        return step;
      }
      return step;
    }
    const platform::PartialResult res = as_.move_in(slot, to, len, /*wake=*/false);
    Step step{res.bytes_done / kPageSize, Step::kAll};
    if (res.error != 0) step.kind = step_for(res.error);
    return step;
  }

  static constexpr int kUnmappedLooks = 3;

  AddressSpace::Impl& as_;
  std::vector<Run> runs_;
  std::size_t next_ = 0;  // the first run not completely done
  int unmapped_looks_ = 0;  // looks in a row that found no mapping
  bool drained_ = false;    // empty_blocks read the userfaultfd already
  std::vector<Placed> placed_;
};

// Gives back a destination the migration did not use.
void release_unused_dst(AddressSpace::Impl* as, std::uint64_t d) {
  if (!entry_valid(d)) return;
  if (is_device_entry(d)) {
    if (DevicePage* page = migrate_pfn_to_device_page(d); page != nullptr) {
      page->unlock();
      page->put();
    }
  } else if (as != nullptr && as->staging.contains(system_page_address(d))) {
    as->staging.give_back_ready(system_page_address(d), 1);
  }
}

// Installs a driver's device page at a locked entry (value kept locked).
// A coherent page's frame is queued on `installer` to move in from its home
// slot, where the driver copied the data.
void install_device_page(AddressSpace::Impl& as, Installer& installer, mm::EntrySlot& slot, VirtAddr addr,
                         std::uint64_t d) {
  DevicePage* page = migrate_pfn_to_device_page(d);
  UHMM_CHECK(page != nullptr, "destination device pfn has no page map");
  page->set_mapping(as.self, addr);
  if (page->pagemap().type() == PagemapType::kCoherent) {
    installer.add(page->pagemap().home_address(*page), addr, slot, Source::kHome);
    mm::update_locked_entry(slot, PageEntry::device_coherent(page, d & MIGRATE_PFN_WRITE));
  } else {
    mm::update_locked_entry(slot, PageEntry::device_private(page, d & MIGRATE_PFN_WRITE));
  }
  page->unlock();  // the entry keeps the reference zone_device_page_init took
}

bool is_coherent(const DevicePage* page) { return page->pagemap().type() == PagemapType::kCoherent; }

// A coherent page that did not migrate: its frame, taken home, is queued on
// `installer` to go back to `addr`; one left in place is there already,
// and the copy goes.
void restore_coherent_frame(Installer& installer, DevicePage& page, VirtAddr addr, const mm::EntrySlot& slot) {
  DevicePagemap& map = page.pagemap();
  if (map.frame_left_in_place(page)) {
    map.drop_home_copy(page);
  } else {
    installer.add(map.home_address(page), addr, slot, Source::kHome);
  }
}

// A collected coherent page whose frame stayed mapped (a range that is not
// read-write: copy_frame_home).  It migrates to system memory only: the
// frame is the system page, and the driver's destination goes unused.  To
// another device's memory it does not migrate: the frame would have to
// leave the address, which only a zap could do, and uhmm's zaps wait for
// their event to be read, so never inside the install window that makes a
// move exact (docs/differences.md).
bool frame_left_in_place(std::uint64_t src) {
  const DevicePage* page = migrate_pfn_to_device_page(src);
  return page != nullptr && is_coherent(page) && page->pagemap().frame_left_in_place(*page);
}

// Finalize of such a page that migrated: the frame at the address is the
// system page now, so the driver's destination and the copy go.  Should
// the application have discarded or moved the range meanwhile, the frame
// went with it, and the change's event settles the entry.
void finish_frame_left_in_place(AddressSpace::Impl& as, DevicePage& page, std::uint64_t dst) {
  release_unused_dst(&as, dst);
  page.pagemap().drop_home_copy(page);
}

// Inside the install window, takes a collected coherent page's frame at
// `addr` from the CPU (docs/migration.md): into its home slot by way of the
// transit, so that it only leaves an address the queued changes describe;
// in a range that is not read-write, which the kernel will not move a frame
// out of, the frame stays as the system page the migration leaves, and the
// driver reads a copy (copy_frame_home).  0, or the errno that left it:
// EAGAIN (a change unread), ENOENT (changed), EBUSY (shared with a forked
// child).
int take_coherent_frame(AddressSpace::Impl& as, DevicePage& page, VirtAddr addr) {
  const int err = as.move_to_transit(addr);
  if (err == EINVAL) {  // the protections of the two sides differ
    (void)page.pagemap().copy_frame_home(page, addr);
    return 0;
  }
  if (err == 0 && (as.take_injected_refusal() || page.pagemap().move_frame_home(page, as.transit) != 0)) {
    // Refused, as the second hop of a system page rarely is
    // (AddressSpace::Impl::move_transit_to_staging): the frame goes home as
    // a copy.
    page.pagemap().copy_into_home(page, as.transit);
    as.stats.add(Counter::transit_copies);
    as.clear_transit(as.transit, 0, kPageSize);
  }
  return err;
}

// Inside the install window, moves the whole aligned 2 MiB unit at `addr`
// out to the staging block `block`.  A huge page that moves out through a
// transit without a page table takes the one the kernel keeps deposited
// beside it: none is left behind.  (Through the shared transit, which has a
// page table, it would be split on its way out and leave one here.)
// `huge_fault_window`: the epoch open_huge_fault_window gave for its region.
platform::PartialResult move_unit_out(AddressSpace::Impl& as, VirtAddr addr, VirtAddr block,
                                      std::uint64_t huge_fault_window) {
  const std::optional<VirtAddr> via =
      as.huge_transit.value != 0 ? std::optional<VirtAddr>(as.huge_transit) : std::nullopt;
  Result<bool> huge = via ? platform::huge_mapped(addr, kHugePageSize) : Result<bool>(false);
  const platform::PartialResult r = as.move_out_in_window(addr, block, kPagesPerHugePage, via);
  if (r.bytes_done == 0) return r;
  const bool left_whole = r.bytes_done == kHugePageSize && huge.is_ok() && *huge;
  if (left_whole) as.table.note_no_kernel_table(addr.vpn(), huge_fault_window);
  // Both moves kept it one entry only if it arrived whole (part of a unit
  // cannot have).  Otherwise the transit got a page table, which would
  // split the next unit, and the staging block holds 4 KiB pages.
  Result<bool> arrived = r.bytes_done < kHugePageSize ? Result<bool>(false)
                         : left_whole                 ? platform::huge_mapped(block, kHugePageSize)
                                                      : huge;
  const bool known_whole = arrived.is_ok() && *arrived;
  if (via && !known_whole) as.renew_huge_transit();
  if (arrived.is_ok() && !known_whole) {  // known split (unknown: no PAGEMAP_SCAN here)
    as.staging.note_split_block(block);
    as.stats.add(Counter::thp_split_staged);
  }
  return r;
}

// Takes the CPU's frame of a coherent page that the caller has collected
// (its entry at `addr` locked, it was `seen`; the page locked and
// referenced) for an eviction, as migrate_vma_setup's pass 1b does
// (take_coherent_frame).  True when taken.  Otherwise the entry and the page are unlocked again (the
// caller keeps its reference, to drop): the address changed just now, or
// the frame is shared copy-on-write with a forked child (EBUSY; the write
// fault that would make it private may wait for the fault service, and so
// for changes of the range, which wait for the entries the caller holds:
// callers un-share first, holding nothing, and skip what a fork shared
// again since).
bool collect_coherent_frame(AddressSpace::Impl& as, mm::EntrySlot& slot, VirtAddr addr, PageEntry seen,
                            DevicePage& page) {
  constexpr int kLooks = 3;
  as.open_install_window();
  int err = 0;
  for (int look = 0;; ++look) {
    err = as.event_pending_at(addr) ? ENOENT : take_coherent_frame(as, page, addr);
    if (err != EAGAIN || look == kLooks) break;
    as.read_events_in_window();
  }
  as.close_install_window();
  if (err == 0) return true;
  page.unlock();
  as.unlock_and_wake(slot, seen.settled(), addr);
  return false;
}

// Write faults (MADV_POPULATE_WRITE) that un-share the frames of `runs`.
// A run that fails part way (an ENOMEM, a page the application just
// discarded) is retried page by page, so one page does not leave the rest
// shared; what stays shared is skipped later.  Stops between runs once
// `abandoned` is set.
void populate_for_write(const std::vector<std::pair<VirtAddr, std::size_t>>& runs,
                        const std::atomic<bool>& abandoned) {
  for (const auto& [at, pages] : runs) {
    if (abandoned.load(std::memory_order_acquire)) return;
    if (platform::advise(at, pages * kPageSize, MADV_POPULATE_WRITE)) continue;
    for (std::size_t i = 0; i < pages; ++i) (void)platform::advise(at + i * kPageSize, kPageSize, MADV_POPULATE_WRITE);
  }
}

// A driver may pipeline its batches, setting one up while it still holds
// the entries of the one before.  With service threads, a write fault on a
// page the application has just moved away waits until uhmm has processed
// the move, and processing it waits for those entries: the thread would
// wait for itself.  So the faults run on a helper thread, and setup stops
// waiting for them once a change of the range is queued (the pages it
// covers are skipped anyway; what stays shared is skipped as shared).  The
// helper finishes its current run once the change is processed, which
// amounts to a write access that changes no data.
void populate_for_write_off_thread(AddressSpace::Impl& as, VirtAddr start, VirtAddr end,
                                   std::vector<std::pair<VirtAddr, std::size_t>> runs) {
  struct Shared {
    std::mutex mutex;
    std::condition_variable done_cv;
    bool done = false;
    std::atomic<bool> abandoned{false};
  };
  auto shared = std::make_shared<Shared>();
  std::thread([shared, runs = std::move(runs)] {
    platform::name_this_thread("populate");
    populate_for_write(runs, shared->abandoned);
    {
      std::lock_guard<std::mutex> lock(shared->mutex);
      shared->done = true;
    }
    shared->done_cv.notify_all();
  }).detach();
  std::unique_lock<std::mutex> lock(shared->mutex);
  while (!shared->done_cv.wait_for(lock, std::chrono::microseconds(200), [&] { return shared->done; })) {
    lock.unlock();
    as.await_read_in_progress();
    const bool changing = !as.pending_event_ranges(start, end).empty();
    lock.lock();
    if (changing) {
      shared->abandoned.store(true, std::memory_order_release);
      return;
    }
  }
}

// Makes private the frames of `[start, start + n)` that a fork shared
// copy-on-write, so that they can move.  Called holding no entry of the
// range; `is_candidate(i)` says which pages to un-share: present pages only
// (a hole would be populated).
template <typename IsCandidate>
void unshare_frames(AddressSpace::Impl& as, VirtAddr start, std::uint64_t n, IsCandidate is_candidate) {
  std::vector<std::pair<VirtAddr, std::size_t>> runs;
  std::uint64_t run = 0;
  for (std::uint64_t i = 0; i <= n; ++i) {
    if (i < n && is_candidate(i)) continue;
    if (i > run) runs.emplace_back(start + run * kPageSize, i - run);
    run = i + 1;
  }
  if (runs.empty()) return;
  const bool holds_an_earlier_batch = AddressSpace::Impl::migrations_held_by_this_thread() > 1;  // this one counts too
  if (holds_an_earlier_batch && as.options.fault_mode == FaultMode::kServiceThreads) {
    populate_for_write_off_thread(as, start, start + n * kPageSize, std::move(runs));
    return;
  }
  const std::atomic<bool> never{false};
  populate_for_write(runs, never);
}

// Releases a device page that left its entry: the migration's reference and
// the entry's reference go; page_free runs when nobody else holds it.
void release_old_device_page(DevicePage* page, DevicePage* fault_page) {
  page->clear_mapping();
  if (page != fault_page) page->unlock();
  page->put();  // the migration's reference (setup)
  page->put();  // the entry's reference
}

}  // namespace

DevicePage* migrate_pfn_to_device_page(std::uint64_t entry) {
  if (!is_device_entry(entry)) return nullptr;
  return DevicePagemap::page_from_pfn(DevicePfn{migrate_pfn_to_pfn(entry)});
}

void* migrate_pfn_to_host(std::uint64_t entry) {
  if (!is_system_entry(entry)) return nullptr;
  return system_page_address(entry).ptr();
}

Status alloc_system_pages(AddressSpace& as, std::span<std::uint64_t> pfns_out) {
  std::size_t i = 0;
  // Whole 2 MiB blocks first: copies into huge pages are faster, and a block
  // that lands on an aligned managed block moves in as one entry.
  VirtAddr block;
  while (pfns_out.size() - i >= kPagesPerHugePage && as.impl().staging.take_block(true, &block).is_ok()) {
    for (std::size_t k = 0; k < kPagesPerHugePage; ++k) pfns_out[i++] = (block + k * kPageSize).value >> kPageShift;
  }
  std::vector<mm::SlotRun> runs;
  if (Status s = as.impl().staging.take_ready(pfns_out.size() - i, runs); !s) {
    free_system_pages(as, pfns_out.first(i));
    return s;
  }
  for (const mm::SlotRun& r : runs)
    for (std::size_t k = 0; k < r.pages; ++k) pfns_out[i++] = (r.start + k * kPageSize).value >> kPageShift;
  return Status::ok();
}

Status alloc_system_huge_page(AddressSpace& as, std::uint64_t* pfn_out) {
  VirtAddr block;
  if (Status s = as.impl().staging.take_block(true, &block); !s) return s;
  *pfn_out = block.value >> kPageShift;
  return Status::ok();
}

void free_system_pages(AddressSpace& as, std::span<const std::uint64_t> pfns) {
  for (std::uint64_t pfn : pfns) {
    const VirtAddr a{pfn << kPageShift};
    if (as.impl().staging.contains(a)) as.impl().staging.give_back_ready(a, 1);
  }
}

// ---- migrate_vma -----------------------------------------------------------

namespace {
// What setup hands on to pages and finalize (MigrateVma::internal_pin).
struct MigrateState {
  mm::RegionPin pin;
  // SELECT_COMPOUND: the caller's arrays hold one entry per whole 2 MiB
  // unit, as the kernel's do (docs/migration.md, "Large pages"); pages and
  // finalize work on these copies, one entry a page.  Empty when setup made
  // no COMPOUND entry.  `dst` is filled by expand_destinations.
  std::vector<std::uint64_t> src, dst;
  std::vector<std::uint64_t> units;  // index of each COMPOUND entry
  std::vector<bool> split;           // per unit: its destinations are base pages
};

MigrateState& state_of(const MigrateVma& m) { return *static_cast<MigrateState*>(m.internal_pin); }

void hand_on(MigrateVma& m, mm::RegionPin pin) { m.internal_pin = new MigrateState{std::move(pin), {}, {}, {}, {}}; }

void end_state(MigrateVma& m) {
  delete static_cast<MigrateState*>(m.internal_pin);
  m.internal_pin = nullptr;
}

// Entry k of the 2 MiB unit a COMPOUND entry stands for.
std::uint64_t unit_entry(std::uint64_t compound, std::uint64_t k) {
  const std::uint64_t base = compound & ~MIGRATE_PFN_COMPOUND;
  return entry_valid(base) ? base + (k << MIGRATE_PFN_SHIFT) : base;
}

// Whether the 512 pages a large entry (source or destination) names are one
// large page: the pfn a multiple of 512, and all of them in one place (the
// staging pool, or one device page map).
bool names_large_page(AddressSpace::Impl& as, std::uint64_t e) {
  if (!entry_valid(e)) return false;
  const std::uint64_t pfn = migrate_pfn_to_pfn(e);
  if (pfn % kPagesPerHugePage != 0) return false;
  if (!is_device_pfn(pfn)) {
    const VirtAddr first{pfn << kPageShift};
    return as.staging.contains(first) && as.staging.contains(first + (kHugePageSize - kPageSize));
  }
  const DevicePage* head = DevicePagemap::page_from_pfn(DevicePfn{pfn});
  const DevicePage* last = DevicePagemap::page_from_pfn(DevicePfn{pfn + kPagesPerHugePage - 1});
  return head != nullptr && last != nullptr && &head->pagemap() == &last->pagemap() &&
         head->pagemap().type() == PagemapType::kPrivate;
}

// SELECT_COMPOUND: every whole aligned 2 MiB unit of the range that setup
// collected as one piece becomes one COMPOUND entry, the rest of its
// entries 0: 512 holes, the 512 pages of one 2 MiB staging block (where a
// huge page moves whole; 512 small pages that moved together too), or the
// 512 pages of one large device-private page.  The per-page entries stay
// in the state.
void make_compound_entries(MigrateVma& m, AddressSpace::Impl& as, MigrateState& st) {
  const std::uint64_t n = m.npages;
  for (std::uint64_t i = 0; i + kPagesPerHugePage <= n; ++i) {
    const VirtAddr addr = m.start + i * kPageSize;
    if (!addr.huge_aligned()) {
      i += (addr.huge_down() + kHugePageSize - addr) / kPageSize - 1;
      continue;
    }
    const std::uint64_t first = m.src[i];
    bool whole = entry_migrating(first) && (!entry_valid(first) || names_large_page(as, first));
    for (std::uint64_t k = 1; whole && k < kPagesPerHugePage; ++k) whole = m.src[i + k] == unit_entry(first, k);
    if (whole) {
      if (st.src.empty()) st.src.assign(m.src, m.src + n);
      st.units.push_back(i);
      m.src[i] = first | MIGRATE_PFN_COMPOUND;
      std::fill_n(m.src + i + 1, kPagesPerHugePage - 1, 0);
    }
    i += kPagesPerHugePage - 1;
  }
  st.split.assign(st.units.size(), false);
}

// The destinations of the units, one entry a page, from what the driver
// wrote: a COMPOUND destination in dst[i] gives each page its page of the
// large page; base pages (in any of dst[i .. i + 511]) split the unit, and
// the caller's src[] gets the unit's entries back, as the kernel splits a
// large source for small destinations; all 0 leaves the whole unit.
// Entries outside the units are the caller's.
void expand_destinations(MigrateVma& m, AddressSpace::Impl& as, MigrateState& st) {
  st.dst.assign(m.dst, m.dst + m.npages);
  for (std::size_t u = 0; u < st.units.size(); ++u) {
    const std::uint64_t i = st.units[u];
    const std::uint64_t d = m.dst[i];
    if (!(d & MIGRATE_PFN_COMPOUND) &&
        std::any_of(m.dst + i, m.dst + i + kPagesPerHugePage, [](std::uint64_t e) { return entry_valid(e); })) {
      st.split[u] = true;
      for (std::uint64_t k = 0; k < kPagesPerHugePage; ++k) m.src[i + k] = st.src[i + k];
      as.stats.add(Counter::thp_migration_split);
      continue;
    }
    const bool large = (d & MIGRATE_PFN_COMPOUND) && names_large_page(as, d);
    if (!large) release_unused_dst(&as, d & ~MIGRATE_PFN_COMPOUND);
    // Base pages written after a COMPOUND destination are not used: back.
    for (std::uint64_t k = 1; k < kPagesPerHugePage; ++k) release_unused_dst(&as, m.dst[i + k]);
    for (std::uint64_t k = 0; k < kPagesPerHugePage; ++k) st.dst[i + k] = large ? unit_entry(d, k) : 0;
  }
}

// A shared or file-backed range: its pages belong to the object, whose
// backend collects and places them (docs/adr/0006-file-cache.md, "Device
// pages").  Mirrors of this mapping hear of the migration here; the
// backend tells those of the object's other mappings.
Status setup_backed(MigrateVma& m, AddressSpace::Impl& as, mm::RegionPin pin) {
  const std::uint64_t n = (m.end - m.start) / kPageSize;
  m.npages = n;
  m.cpages = 0;
  std::fill_n(m.src, n, 0);
  std::fill_n(m.dst, n, 0);
  if (pin->closing.load()) {
    hand_on(m, std::move(pin));
    as.migration_begin(/*for_fault=*/false);
    return Status::ok();
  }
  mm::ScopedInvalidation invalidation(as.notifiers, NotifyRange{m.start, m.end, NotifyEvent::kMigrate, m.pgmap_owner});
  if (!invalidation.ok()) return invalidation.status();
  as.migration_begin(/*for_fault=*/false);
  const std::uint64_t offset = pin->backend_offset + (m.start - pin->info.start);
  m.cpages = pin->backend->migrate_collect(as, m, offset, pin->info.prot);
  hand_on(m, std::move(pin));
  return Status::ok();
}

void finalize_backed(MigrateVma& m, AddressSpace::Impl& as, mm::Region& region) {
  mm::RegionBackend::Moved moved;
  region.backend->migrate_finish(as, m, region.backend_offset + (m.start - region.info.start), moved);
  as.stats.add(Counter::pgmigrate_success, moved.success);
  as.stats.add(Counter::pgmigrate_fail, moved.fail);
  as.stats.add(Counter::pgmigrate_to_device, moved.to_device);
  as.stats.add(Counter::pgmigrate_to_ram, moved.to_ram);
}
}  // namespace

Status migrate_vma_setup(MigrateVma& m) {
  if (m.address_space == nullptr) return Status::error(EINVAL, "no address space");
  if (m.src == nullptr || m.dst == nullptr) return Status::error(EINVAL, "src and dst arrays are required");
  if (!m.start.page_aligned() || !m.end.page_aligned()) return Status::error(EINVAL, "range not page aligned");
  if (m.end <= m.start) return Status::error(EINVAL, "empty range");
  constexpr std::uint32_t kSelectAny =
      MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_DEVICE_PRIVATE | MIGRATE_VMA_SELECT_DEVICE_COHERENT;
  if ((m.flags & kSelectAny) == 0) return Status::error(EINVAL, "no selection flag");
  if (m.fault_page != nullptr &&
      (!m.fault_page->is_locked() || m.fault_page->pagemap().type() != PagemapType::kPrivate))
    return Status::error(EINVAL, "fault_page must be a locked device-private page");
  if (m.internal_pin != nullptr) return Status::error(EINVAL, "setup called twice without finalize");

  AddressSpace::Impl& as = m.address_space->impl();
  // The application's changes of the range that have returned are
  // processed first, or setup would refuse a range just moved here, or
  // skip its pages.  Not for a fault: processing a change may wait for the
  // entry it holds.  (Nothing is read here: faults read on the service
  // threads' behalf are served late, and a late fault raced the
  // application's next mremap of the range; MigrationsRacingMremapKeepEveryByte
  // failed 1 run in 3.)
  if (m.fault_page == nullptr) as.await_returned_changes(m.start, m.end);
  mm::RegionPin pin = as.pin_region(m.start, m.end);
  if (!pin) return Status::error(EINVAL, "range not inside one managed range");
  if (pin->backend) return setup_backed(m, as, std::move(pin));
  const bool want_system = (m.flags & MIGRATE_VMA_SELECT_SYSTEM) && !pin->closing.load();
  const bool want_private = m.flags & MIGRATE_VMA_SELECT_DEVICE_PRIVATE;
  const bool want_coherent = m.flags & MIGRATE_VMA_SELECT_DEVICE_COHERENT;
  const bool writable = pin->info.prot & PROT_WRITE;

  const std::uint64_t n = (m.end - m.start) / kPageSize;
  m.npages = n;
  m.cpages = 0;
  std::fill_n(m.src, n, 0);
  std::fill_n(m.dst, n, 0);

  // Mirrors of the range drop it before any page is collected (a driver
  // skips the MIGRATE events that carry its own owner; docs/notifiers.md).
  mm::ScopedInvalidation invalidation(as.notifiers, NotifyRange{m.start, m.end, NotifyEvent::kMigrate, m.pgmap_owner});
  if (!invalidation.ok()) return invalidation.status();
  // No page is in transit while the process forks (mm/fork.cpp).
  as.migration_begin(/*for_fault=*/m.fault_page != nullptr);
  // A change the application made that uhmm has not processed yet (say
  // MADV_DONTNEED of part of the range) must not be undone by bringing its
  // pages back or moving them on: such pages are skipped.
  as.await_read_in_progress();
  std::vector<std::pair<VirtAddr, VirtAddr>> changing = as.pending_event_ranges(m.start, m.end);
  auto is_changing = [&](VirtAddr a) {
    for (const auto& [lo, hi] : changing)
      if (a >= lo && a < hi) return true;
    return false;
  };

  // Pass 0: a frame shared copy-on-write with a forked child cannot move
  // (UFFDIO_MOVE: EBUSY), where the kernel's migrate_vma would migrate it.
  // Make private now, before any entry is held (the write fault that
  // un-shares one may wait for the fault service, and so for changes of the
  // range, which wait for held entries; entries of an earlier batch this
  // thread still holds: see unshare_frames): the coherent frames of this owner,
  // and the system pages a fork marked.  Not in a read-only range: the write
  // fault fails there (EFAULT), and its pages cannot move out anyway (the
  // two sides of a move must have the same protection; coherent frames
  // stay in place there, pass 1b).  A page whose
  // change is pending is left alone: its address may be a hole by now.
  if (writable && (want_coherent || want_system)) {
    unshare_frames(as, m.start, n, [&](std::uint64_t i) {
      const VirtAddr addr = m.start + i * kPageSize;
      const PageEntry e = as.table.load(addr.vpn());
      if (e.locked()) return false;
      if (e.state() == PageState::kSystem)
        return want_system && e.fork_shared() && (changing.empty() || !is_changing(addr));
      return want_coherent && e.state() == PageState::kDeviceCoherent &&
             e.device_page()->pagemap().owner() == m.pgmap_owner;
    });
  }

  // A whole unit that leaves may be faulted on before it comes back, by a
  // reader waiting for it: in a huge-fault window that fault leaves no page
  // table in its way (AddressSpace::Impl::open_huge_fault_window).  Opened
  // before the install window: the advice takes the mmap lock.
  const VirtAddr first_block{(m.start.value + kHugePageSize - 1) & ~(kHugePageSize - 1)};
  const std::uint64_t huge_fault_window =
      want_system && first_block + kHugePageSize <= m.end ? as.open_huge_fault_window(*pin) : 0;

  // Passes 1 and 2 run inside the window, and pages move out through the
  // managed userfaultfd, so that none leaves an address the application
  // has changed since the look at the queue (docs/address-space-events.md,
  // case 3).
  as.open_install_window();
  changing = as.pending_event_ranges(m.start, m.end);

  // Pass 1: lock and classify.  Best effort: a busy entry or page is skipped.
  std::vector<std::uint64_t> system_pages;  // indices still to move out
  struct Coherent {
    std::uint64_t i;
    DevicePage* page;
  };
  std::vector<Coherent> coherent_pages;  // collected; their frames still to go home
  for (std::uint64_t i = 0; i < n; ++i) {
    const VirtAddr addr = m.start + i * kPageSize;
    mm::EntrySlot* slot = as.table.slot(addr.vpn(), true);
    auto collect_hole = [&] {
      if (!want_system) return;
      m.src[i] = MIGRATE_PFN_MIGRATE;  // a hole: locked only in migrate_vma_pages
      as.stats.add(Counter::migrate_holes);
    };
    if (!changing.empty() && is_changing(addr)) {
      as.stats.add(Counter::migrate_skipped_locked);  // busy: the application is changing it
      continue;
    }
    const PageEntry seen{slot->load(std::memory_order_acquire)};
    if (seen.state() == PageState::kNone && !seen.locked()) {
      collect_hole();
      continue;
    }
    PageEntry before;
    if (!mm::try_lock_entry(*slot, &before)) {
      as.stats.add(Counter::migrate_skipped_locked);
      continue;
    }
    switch (before.state()) {
      case PageState::kNone:
        as.unlock_and_wake(*slot, before, addr);
        collect_hole();
        break;
      case PageState::kSystem:
        if (want_system) {
          system_pages.push_back(i);
        } else {
          as.unlock_and_wake(*slot, before, addr);
        }
        break;
      case PageState::kDevicePrivate: {
        DevicePage* page = before.device_page();
        const bool mine = want_private && page->pagemap().type() == PagemapType::kPrivate &&
                          page->pagemap().owner() == m.pgmap_owner;
        if (!mine || (page != m.fault_page && !page->trylock())) {
          if (mine) as.stats.add(Counter::migrate_skipped_locked);
          as.unlock_and_wake(*slot, before, addr);
          break;
        }
        page->get();  // the migration's reference, dropped at finalize
        m.src[i] = migrate_pfn(page->pfn()) | MIGRATE_PFN_MIGRATE |
                   (before.device_writable() ? MIGRATE_PFN_WRITE : 0);
        break;
      }
      case PageState::kDeviceCoherent: {
        // Mapped like a system page, but SELECT_SYSTEM never takes it: only
        // its owner moves it, explicitly.
        DevicePage* page = before.device_page();
        const bool mine = want_coherent && is_coherent(page) && page->pagemap().owner() == m.pgmap_owner;
        if (!mine || !page->trylock()) {
          if (mine) as.stats.add(Counter::migrate_skipped_locked);
          as.unlock_and_wake(*slot, before, addr);
          break;
        }
        page->get();  // the migration's reference, dropped at finalize
        coherent_pages.push_back(Coherent{i, page});
        break;
      }
      case PageState::kDeviceExclusive:
        // A device holds it for its atomics: not collected, as the kernel
        // skips its device-exclusive entries.
        as.stats.add(Counter::migrate_skipped_locked);
        as.unlock_and_wake(*slot, before, addr);
        break;
    }
  }

  // Pass 2: take the system pages away from the CPU, in pieces of
  // consecutive pages moving into consecutive staging slots.  A whole
  // aligned 2 MiB block gets a block of the staging pool's huge lane, so a
  // huge page moves as one entry and stays huge.
  struct Piece {
    std::size_t k;  // first index into system_pages
    std::size_t len;
    VirtAddr slot;
  };
  std::vector<Piece> pieces;
  {
    std::vector<std::pair<std::size_t, std::size_t>> small;  // (k, len) needing 4 KiB slots
    std::size_t small_pages = 0;
    for (std::size_t k = 0; k < system_pages.size();) {
      std::size_t len = 1;
      while (k + len < system_pages.size() && system_pages[k + len] == system_pages[k] + len) ++len;
      for (std::size_t pos = k; pos < k + len;) {
        const VirtAddr a = m.start + system_pages[pos] * kPageSize;
        VirtAddr block;
        if (a.huge_aligned() && k + len - pos >= kPagesPerHugePage && as.staging.take_block(false, &block).is_ok()) {
          pieces.push_back(Piece{pos, kPagesPerHugePage, block});
          pos += kPagesPerHugePage;
          continue;
        }
        const std::size_t to_boundary = ((a.huge_down() + kHugePageSize) - a) / kPageSize;
        const std::size_t n_small = std::min(k + len - pos, to_boundary);
        small.emplace_back(pos, n_small);
        small_pages += n_small;
        pos += n_small;
      }
      k += len;
    }
    std::vector<mm::SlotRun> runs;
    if (small_pages > 0 && as.staging.take_empty(small_pages, runs).is_ok()) {
      std::size_t r = 0, used = 0;
      for (auto [k, len] : small) {
        while (len > 0) {
          const std::size_t n_here = std::min(len, runs[r].pages - used);
          pieces.push_back(Piece{k, n_here, runs[r].start + used * kPageSize});
          k += n_here;
          len -= n_here;
          used += n_here;
          if (used == runs[r].pages) {
            ++r;
            used = 0;
          }
        }
      }
    } else {
      // No staging memory: these pages stay where they are (with their
      // fork-shared mark, should pass 0 have failed them).
      for (auto [k, len] : small) {
        for (std::size_t j = k; j < k + len; ++j) {
          const VirtAddr addr = m.start + system_pages[j] * kPageSize;
          mm::EntrySlot* slot = as.table.slot(addr.vpn(), false);
          as.unlock_and_wake(*slot, PageEntry{slot->load(std::memory_order_acquire)}.settled(), addr);
        }
      }
    }
  }
  // A change waiting to be read makes the moves fail (EAGAIN): read it and
  // look at the queue again, a few times, before the rest is skipped.
  constexpr int kRelooks = 3;
  int relooks = 0;
  for (const Piece& piece : pieces) {
    const std::size_t k = piece.k;
    const std::size_t len = piece.len;
    const VirtAddr slot0 = piece.slot;
    const VirtAddr addr0 = m.start + system_pages[k] * kPageSize;
    auto changed = [&](std::size_t j) { return !changing.empty() && is_changing(addr0 + j * kPageSize); };
    std::size_t done = 0;
    while (done < len) {
      std::size_t run = 0;
      while (done + run < len && !changed(done + run)) ++run;
      platform::PartialResult r;
      if (run == kPagesPerHugePage && addr0.huge_aligned()) {
        r = move_unit_out(as, addr0, slot0, huge_fault_window);
      } else if (run > 0) {
        r = as.move_out_in_window(addr0 + done * kPageSize, slot0 + done * kPageSize, run);
      }
      const std::size_t moved = r.bytes_done / kPageSize;
      for (std::size_t j = 0; j < moved; ++j) {
        const std::uint64_t i = system_pages[k + done + j];
        m.src[i] = migrate_pfn((slot0 + (done + j) * kPageSize).value >> kPageShift) | MIGRATE_PFN_MIGRATE |
                   (writable ? MIGRATE_PFN_WRITE : 0);
      }
      if (len == kPagesPerHugePage && moved == kPagesPerHugePage) as.stats.add(Counter::thp_migration_success);
      done += moved;
      if (run > 0 && r.error == 0) continue;
      if (r.error == EAGAIN && relooks < kRelooks) {
        ++relooks;
        as.read_events_in_window();
        changing = as.pending_event_ranges(m.start, m.end);
        continue;
      }
      // The page at `done` did not move (run 0: a change read since pass 1
      // covers it).
      const std::uint64_t i = system_pages[k + done];
      const VirtAddr addr = m.start + i * kPageSize;
      mm::EntrySlot* slot = as.table.slot(addr.vpn(), false);
      // A slot the kernel found occupied (EEXIST) holds a page: keep the
      // pool's books right.
      if (r.error == EEXIST) {
        as.staging.give_back_ready(slot0 + done * kPageSize, 1);
      } else {
        as.staging.give_back_empty(slot0 + done * kPageSize, 1);
      }
      if (run == 0 || r.error == ENOENT || r.error == EAGAIN) {
        // The application changed the address just now (EAGAIN: its event
        // is not read yet): not a hole (a zero page would pass for the
        // range's data), not collected; the event settles the entry, or an
        // access refills it (docs/address-space-events.md, case 3).
        as.unlock_and_wake(*slot, PageEntry{slot->load(std::memory_order_acquire)}.settled(), addr);
        as.stats.add(Counter::migrate_skipped_locked);
      } else if (r.error == EBUSY) {
        // Pinned, or shared with a forked child: a fork since pass 0, or one
        // uhmm did not see (a raw clone, a fork before the range was
        // managed, a page filled while the fork marked).  Stays where it is,
        // never waited for here; marked, so that the next migration
        // un-shares it first (harmless for a pinned page).
        as.unlock_and_wake(*slot, PageEntry::system().with(PageEntry::kForkShared), addr);
        as.stats.add(Counter::migrate_skipped_pinned);
      } else {
        // Refused otherwise (a read-only range).  Stays where it is, as it was.
        as.unlock_and_wake(*slot, PageEntry{slot->load(std::memory_order_acquire)}.settled(), addr);
        as.stats.add(Counter::migrate_skipped_pinned);
      }
      ++done;
    }
  }

  // Pass 1b: coherent pages leave the CPU (take_coherent_frame): each frame
  // goes back to its home slot, where the driver reads it as device memory,
  // or, in a range that is not read-write, stays as the system page.
  for (std::size_t k = 0; k < coherent_pages.size();) {
    const Coherent& c = coherent_pages[k];
    const VirtAddr addr = m.start + c.i * kPageSize;
    mm::EntrySlot* slot = as.table.slot(addr.vpn(), false);
    const int err = (!changing.empty() && is_changing(addr)) ? ENOENT : take_coherent_frame(as, *c.page, addr);
    if (err == EAGAIN && relooks < kRelooks) {
      ++relooks;
      as.read_events_in_window();
      changing = as.pending_event_ranges(m.start, m.end);
      continue;  // this page again
    }
    ++k;
    if (err == 0) {
      m.src[c.i] = migrate_pfn(c.page->pfn()) | MIGRATE_PFN_MIGRATE | (writable ? MIGRATE_PFN_WRITE : 0);
      continue;
    }
    // Changed just now (ENOENT, or EAGAIN with no more looks), or still
    // shared with a forked child (EBUSY, never waited for here): stays,
    // and the change's event settles the entry.
    c.page->unlock();
    as.unlock_and_wake(*slot, PageEntry{slot->load(std::memory_order_acquire)}.settled(), addr);
    c.page->put();
    as.stats.add(err == EBUSY ? Counter::migrate_skipped_pinned : Counter::migrate_skipped_locked);
  }

  as.close_install_window();

  hand_on(m, std::move(pin));
  if (m.flags & MIGRATE_VMA_SELECT_COMPOUND) make_compound_entries(m, as, state_of(m));
  for (std::uint64_t i = 0; i < n; ++i)
    if (entry_migrating(m.src[i])) ++m.cpages;
  return Status::ok();
}

namespace {
// migrate_vma_pages for one entry: whether destination `d` takes source `s`
// at `addr`.  A hole is filled only if it is still unpopulated: its entry
// is locked here (its value before in *hole_before).
bool destination_taken(AddressSpace::Impl& as, std::uint64_t s, std::uint64_t d, VirtAddr addr, bool backed,
                       PageEntry* hole_before) {
  if (!entry_valid(d)) return false;
  if (is_system_entry(d) && !as.staging.contains(system_page_address(d))) return false;
  if (is_device_entry(d) && (migrate_pfn_to_device_page(d) == nullptr || frame_left_in_place(s))) return false;
  if (entry_valid(s) || backed) return true;
  mm::EntrySlot* slot = as.table.slot(addr.vpn(), true);
  if (!mm::try_lock_entry(*slot, hole_before)) return false;
  if (hole_before->state() != PageState::kNone) {
    as.unlock_and_wake(*slot, *hole_before, addr);
    return false;
  }
  return true;
}

// Pages for one entry per page (src and dst may be the state's copies).
void take_destinations(MigrateVma& m, AddressSpace::Impl& as, std::uint64_t* src, const std::uint64_t* dst,
                       std::uint64_t first, std::uint64_t end, bool backed) {
  PageEntry before;
  for (std::uint64_t i = first; i < end; ++i) {
    if (entry_migrating(src[i]) && !destination_taken(as, src[i], dst[i], m.start + i * kPageSize, backed, &before))
      src[i] &= ~MIGRATE_PFN_MIGRATE;
  }
}

// Pages for a unit that stays whole: all of its pages migrate, or none.
void take_large_destination(MigrateVma& m, AddressSpace::Impl& as, MigrateState& st, std::uint64_t i) {
  if (!entry_migrating(st.src[i])) return;
  std::vector<PageEntry> before(kPagesPerHugePage);
  std::uint64_t k = 0;
  while (k < kPagesPerHugePage &&
         destination_taken(as, st.src[i + k], st.dst[i + k], m.start + (i + k) * kPageSize, false, &before[k]))
    ++k;
  if (k == kPagesPerHugePage) return;
  // A page of a hole unit was populated meanwhile: the holes locked go back.
  for (std::uint64_t j = 0; j < k; ++j) {
    if (!entry_valid(st.src[i + j])) {
      const VirtAddr addr = m.start + (i + j) * kPageSize;
      as.unlock_and_wake(*as.table.slot(addr.vpn(), false), before[j], addr);
    }
  }
  for (std::uint64_t j = 0; j < kPagesPerHugePage; ++j) st.src[i + j] &= ~MIGRATE_PFN_MIGRATE;
  m.src[i] &= ~MIGRATE_PFN_MIGRATE;
}
}  // namespace

void migrate_vma_pages(MigrateVma& m) {
  if (m.internal_pin == nullptr) return;  // setup failed or was not called
  AddressSpace::Impl& as = m.address_space->impl();
  MigrateState& st = state_of(m);
  mm::Region& region = *st.pin;
  const bool backed = region.backend != nullptr;
  if (st.units.empty()) {
    take_destinations(m, as, m.src, m.dst, 0, m.npages, backed);
  } else {
    expand_destinations(m, as, st);
    std::uint64_t i = 0;
    for (std::size_t u = 0; u <= st.units.size(); ++u) {
      const std::uint64_t unit = u < st.units.size() ? st.units[u] : m.npages;
      take_destinations(m, as, st.src.data(), st.dst.data(), i, unit, backed);
      for (; i < unit; ++i) m.src[i] = st.src[i];
      if (unit == m.npages) break;
      if (st.split[u]) {
        take_destinations(m, as, st.src.data(), st.dst.data(), unit, unit + kPagesPerHugePage, backed);
        for (std::uint64_t k = 0; k < kPagesPerHugePage; ++k) m.src[unit + k] = st.src[unit + k];
      } else {
        take_large_destination(m, as, st, unit);
      }
      i = unit + kPagesPerHugePage;
    }
  }
  if (backed) region.backend->migrate_commit(as, m, region.backend_offset + (m.start - region.info.start));
  // (The MIGRATE invalidation went out in setup, before anything was
  // unmapped, as the kernel's collect step sends it.)
}

namespace {
// What is left of an entry whose page was not put back (the application
// discarded or unmapped the address while it was in transit): nothing; a
// coherent page's frame stays home and the entry's reference goes.
PageEntry gone_in_transit(PageEntry installed) {
  if (installed.state() == PageState::kDeviceCoherent) {
    DevicePage* page = installed.device_page();
    page->clear_mapping();
    page->put();  // the entry's reference: page_free once nobody else holds it
  }
  return PageEntry::none();
}

// Finalize with one entry a page (m.src and m.dst may be the state's).
// Returns the highest page a CPU access waited on (0: none).
VirtAddr finalize_entries(const MigrateVma& m, AddressSpace::Impl& as, bool range_gone) {
  Installer installer(as);
  struct Unlock {
    mm::EntrySlot* slot;
    VirtAddr addr;
    PageEntry value;  // for device installs: the value already stored
    bool keep_current;
  };
  std::vector<Unlock> unlocks;
  std::vector<DevicePage*> old_device_pages;
  // Staging pages whose data now lives on the device, gathered into runs so
  // the pool is visited once per run rather than once per page.
  std::vector<mm::SlotRun> freed_staging;
  auto free_staging = [&](VirtAddr page) {
    if (!freed_staging.empty() && freed_staging.back().start + freed_staging.back().pages * kPageSize == page) {
      ++freed_staging.back().pages;
    } else {
      freed_staging.push_back(mm::SlotRun{page, 1});
    }
  };
  std::uint64_t success = 0, fail = 0, to_device = 0, to_ram = 0;
  // unlocks[index_of[i]] is page i's, where it has one.
  std::vector<std::size_t> index_of(m.npages, SIZE_MAX);

  for (std::uint64_t i = 0; i < m.npages; ++i) {
    const std::uint64_t s = m.src[i];
    const std::uint64_t d = m.dst[i];
    const VirtAddr addr = m.start + i * kPageSize;
    const bool migrating = entry_migrating(s);
    if (!migrating && !entry_valid(s)) {  // skipped, or a hole that stays a hole: never locked
      release_unused_dst(&as, d);
      continue;
    }
    mm::EntrySlot* slot = as.table.slot(addr.vpn(), true);
    index_of[i] = unlocks.size();
    const bool hole = migrating && !entry_valid(s);
    if (hole && range_gone) {
      ++fail;
      release_unused_dst(&as, d);
      unlocks.push_back({slot, addr, PageEntry::none(), false});
      continue;
    }
    if (migrating) {
      ++success;
      if (frame_left_in_place(s)) {
        DevicePage* page = migrate_pfn_to_device_page(s);
        finish_frame_left_in_place(as, *page, d);
        unlocks.push_back({slot, addr, PageEntry::system(), false});
        old_device_pages.push_back(page);
        ++to_ram;
        continue;
      }
      if (is_device_entry(d)) {
        install_device_page(as, installer, *slot, addr, d);
        unlocks.push_back({slot, addr, {}, true});
        ++to_device;
      } else {
        installer.add(system_page_address(d), addr, *slot, hole ? Source::kHoleFill : Source::kStaging);
        unlocks.push_back({slot, addr, PageEntry::system(), false});
        ++to_ram;
      }
      if (is_system_entry(s)) free_staging(system_page_address(s));
      if (is_device_entry(s)) old_device_pages.push_back(migrate_pfn_to_device_page(s));
    } else {
      ++fail;
      release_unused_dst(&as, d);
      if (is_system_entry(s)) {
        installer.add(system_page_address(s), addr, *slot);  // put the old page back
        unlocks.push_back({slot, addr, PageEntry::system(), false});
      } else {
        DevicePage* page = migrate_pfn_to_device_page(s);
        // A coherent page stays: its frame goes back where the CPU maps it
        // (or never left).
        if (is_coherent(page)) restore_coherent_frame(installer, *page, addr, *slot);
        if (page != m.fault_page) page->unlock();
        page->put();
        unlocks.push_back({slot, addr, {}, true});
      }
    }
  }
  installer.run([&](VirtAddr addr) {
    Unlock& u = unlocks[index_of[(addr - m.start) / kPageSize]];
    const PageEntry now = u.keep_current ? PageEntry{u.slot->load(std::memory_order_acquire)}.settled() : u.value;
    if (now.state() == PageState::kSystem && entry_migrating(m.src[(addr - m.start) / kPageSize])) --to_ram;
    u.value = gone_in_transit(now);
    u.keep_current = false;
  });
  // Counted before anything is woken: an access that resumes, and what the
  // application does next (read the counters), sees the migration done.
  as.stats.add(Counter::pgmigrate_success, success);
  as.stats.add(Counter::pgmigrate_fail, fail);
  as.stats.add(Counter::pgmigrate_to_device, to_device);
  as.stats.add(Counter::pgmigrate_to_ram, to_ram);
  // From migrate_to_ram, the fault path wakes the range itself once it has
  // dropped its own hold on the device page: the access resumes only when
  // the fault is completely done, as in the kernel, where the faulting
  // thread runs migrate_to_ram itself.
  const bool wake_now = m.fault_page == nullptr;
  VirtAddr last_waited;
  for (const Unlock& u : unlocks) {
    const PageEntry value = u.keep_current ? PageEntry{u.slot->load(std::memory_order_acquire)}.settled()
                                           : u.value;
    if (!mm::unlock_entry(*u.slot, value.without(PageEntry::kLocked))) continue;
    last_waited = std::max(last_waited, u.addr);
    if (wake_now) as.wake(u.addr, 1);
  }
  for (DevicePage* page : old_device_pages) release_old_device_page(page, m.fault_page);
  for (const mm::SlotRun& r : freed_staging) as.staging.give_back_ready(r.start, r.pages);
  if (wake_now) installer.wake();
  return last_waited;
}
}  // namespace

void migrate_vma_finalize(MigrateVma& m) {
  if (m.internal_pin == nullptr) return;
  m.last_waited = VirtAddr{};
  AddressSpace::Impl& as = m.address_space->impl();
  MigrateState& st = state_of(m);
  if (st.pin->backend) {
    finalize_backed(m, as, *st.pin);
  } else {
    MigrateVma per_page = m;
    if (!st.units.empty()) {
      if (st.dst.empty()) expand_destinations(m, as, st);  // migrate_vma_pages was not called
      per_page.src = st.src.data();
      per_page.dst = st.dst.data();
    }
    // The application unmapped the range while it was in transit and uhmm
    // has processed that: only holes can still be held then (it waited for
    // every page-holding entry), locked after its sweep; they stay holes
    // (process_unmap sweeps again once the region is closed, so a hole
    // locked before that is dropped there, one locked after sees the flag
    // here).
    m.last_waited = finalize_entries(per_page, as, st.pin->closing.load(std::memory_order_acquire));
  }
  end_state(m);
  as.migration_end();
}

// ---- migrate_device --------------------------------------------------------

namespace {

Status collect_device_page(std::uint64_t* src_entry, DevicePfn pfn) {
  *src_entry = 0;
  DevicePage* page = DevicePagemap::page_from_pfn(pfn);
  if (page == nullptr) return Status::error(EINVAL, "pfn outside every registered page map");
  if (!page->try_get()) return Status::ok();  // free
  if (page->holder() != nullptr) {
    // A page of a shared or file-backed object: its holder brings the data
    // back into the object itself (there is no mapping to restore), and
    // the driver has nothing to copy.
    if (page->trylock()) {
      if (DevicePageHolder* holder = page->holder(); holder != nullptr) {
        holder->evict(*page);  // unlocks
      } else {
        page->unlock();
      }
    }
    page->put();
    return Status::ok();
  }
  const DevicePage::Mapping where = page->mapping();
  if (where.address_space == nullptr) {
    page->put();
    return Status::ok();
  }
  AddressSpace::Impl& as = where.address_space->impl();
  // No page is in transit while the process forks (mm/fork.cpp): wait at
  // the gate holding nothing but a reference, and stay inside until
  // finalize.
  as.migration_begin(/*for_fault=*/false);
  if (!page->trylock()) {
    as.migration_end();
    page->put();
    return Status::ok();
  }
  if (const DevicePage::Mapping now = page->mapping(); now.address_space != where.address_space ||
                                                         now.address != where.address) {
    page->unlock();
    as.migration_end();
    page->put();
    return Status::ok();
  }
  mm::EntrySlot* slot = as.table.slot(where.address.vpn(), false);
  // Mirrors of the page drop it before its entry is locked for the move;
  // once locked, a device fault on it waits for the migration to end.  The
  // kernel's unmap step (try_to_migrate) raises a CLEAR invalidation with no
  // owner, so every driver drops it, the page map's own included.
  mm::ScopedInvalidation invalidation(as.notifiers,
                                      NotifyRange{where.address, where.address + kPageSize, NotifyEvent::kClear});
  PageEntry before;
  if (slot == nullptr || !invalidation.ok() || !mm::try_lock_entry(*slot, &before)) {
    page->unlock();
    as.migration_end();
    page->put();
    return Status::ok();
  }
  if (!before.holds_device_page() || before.device_page() != page) {
    as.unlock_and_wake(*slot, before, where.address);
    page->unlock();
    as.migration_end();
    page->put();
    return Status::ok();
  }
  bool writable = before.device_writable();
  if (before.state() == PageState::kDeviceCoherent) {
    // Its frame goes home first, where the driver copies it from.
    // Still shared (a fork since the un-sharing): skipped; evictions retry.
    if (!collect_coherent_frame(as, *slot, where.address, before, *page)) {
      as.migration_end();
      page->put();
      return Status::ok();
    }
    writable = as.read_write_at(where.address);
  }
  *src_entry = migrate_pfn(pfn) | MIGRATE_PFN_MIGRATE | (writable ? MIGRATE_PFN_WRITE : 0);
  return Status::ok();
}

// migrate_device's pass 0, the counterpart of migrate_vma_setup's: makes the
// coherent frames of the pages private, holding nothing but a reference
// per page while the write fault runs; consecutive addresses go together.
template <typename PfnAt>
void unshare_device_frames(std::uint64_t n, PfnAt pfn_at) {
  const AddressSpace* run_as = nullptr;
  VirtAddr run_start, run_end;
  auto flush = [&] {
    if (run_as != nullptr) (void)platform::advise(run_start, run_end - run_start, MADV_POPULATE_WRITE);
    run_as = nullptr;
  };
  for (std::uint64_t i = 0; i < n; ++i) {
    DevicePage* page = DevicePagemap::page_from_pfn(pfn_at(i));
    if (page == nullptr || !is_coherent(page) || !page->try_get()) continue;
    const DevicePage::Mapping where = page->mapping();
    page->put();
    if (where.address_space == nullptr) continue;
    if (where.address_space != run_as || where.address != run_end) {
      flush();
      run_as = where.address_space;
      run_start = where.address;
    }
    run_end = where.address + kPageSize;
  }
  flush();
}

}  // namespace

Status migrate_device_range(std::uint64_t* src, DevicePfn start, PageCount npages) {
  if (src == nullptr || npages.value == 0) return Status::error(EINVAL, "empty range or no src array");
  DevicePage* first = DevicePagemap::page_from_pfn(start);
  DevicePage* last = DevicePagemap::page_from_pfn(start + (npages.value - 1));
  if (first == nullptr || last == nullptr || &first->pagemap() != &last->pagemap())
    return Status::error(EINVAL, "range not inside one registered page map");
  if (first->pagemap().type() == PagemapType::kCoherent)
    unshare_device_frames(npages.value, [&](std::uint64_t i) { return start + i; });
  for (std::uint64_t i = 0; i < npages.value; ++i) UHMM_TRY(collect_device_page(&src[i], start + i));
  return Status::ok();
}

Status migrate_device_pfns(std::uint64_t* src, std::span<const DevicePfn> pfns) {
  if (src == nullptr || pfns.empty()) return Status::error(EINVAL, "empty list or no src array");
  for (std::size_t i = 0; i < pfns.size(); ++i) {
    if (DevicePagemap::page_from_pfn(pfns[i]) == nullptr) return Status::error(EINVAL, "unknown pfn");
  }
  unshare_device_frames(pfns.size(), [&](std::size_t i) { return pfns[i]; });
  for (std::size_t i = 0; i < pfns.size(); ++i) UHMM_TRY(collect_device_page(&src[i], pfns[i]));
  return Status::ok();
}

void migrate_device_pages(std::uint64_t* src, std::uint64_t* dst, PageCount npages) {
  for (std::uint64_t i = 0; i < npages.value; ++i) {
    if (!entry_migrating(src[i])) continue;
    DevicePage* page = migrate_pfn_to_device_page(src[i]);
    const DevicePage::Mapping where = page->mapping();
    bool ok = is_system_entry(dst[i]) && where.address_space != nullptr &&
              where.address_space->impl().staging.contains(system_page_address(dst[i]));
    ok = ok || (is_device_entry(dst[i]) && !frame_left_in_place(src[i]));
    if (!ok) src[i] &= ~MIGRATE_PFN_MIGRATE;
  }
}

void migrate_device_finalize(std::uint64_t* src, std::uint64_t* dst, PageCount npages) {
  for (std::uint64_t i = 0; i < npages.value; ++i) {
    if (!entry_valid(src[i])) {  // nothing was collected here
      release_unused_dst(nullptr, dst[i]);
      continue;
    }
    DevicePage* page = migrate_pfn_to_device_page(src[i]);
    const DevicePage::Mapping where = page->mapping();
    AddressSpace::Impl& as = where.address_space->impl();
    mm::EntrySlot* slot = as.table.slot(where.address.vpn(), false);
    // Installs (see migrate_vma_finalize: the address may have been
    // discarded, unmapped or moved meanwhile), counts, unlocks and wakes.
    // `to`: the entry to unlock with; none: what the install left.
    // `to_ram`: counted in pgmigrate_to_ram if it was put back.
    auto settle = [&](Installer& installer, std::optional<PageEntry> to, Counter outcome, bool to_ram) {
      bool kept = true;
      installer.run([&](VirtAddr) {
        to = gone_in_transit(to ? *to : PageEntry{slot->load(std::memory_order_acquire)}.settled());
        kept = false;
      });
      // Counted before anything is woken (see migrate_vma_finalize).
      as.stats.add(outcome);
      if (to_ram && kept) as.stats.add(Counter::pgmigrate_to_ram);
      const PageEntry value = to ? *to : PageEntry{slot->load(std::memory_order_acquire)}.settled();
      as.unlock_and_wake(*slot, value, where.address);
      installer.wake();
    };
    Installer installer(as);
    if (entry_migrating(src[i]) && frame_left_in_place(src[i])) {
      finish_frame_left_in_place(as, *page, dst[i]);
      as.stats.add(Counter::pgmigrate_success);
      as.stats.add(Counter::pgmigrate_to_ram);
      as.unlock_and_wake(*slot, PageEntry::system(), where.address);
      release_old_device_page(page, nullptr);
    } else if (entry_migrating(src[i])) {
      if (is_device_entry(dst[i])) {
        install_device_page(as, installer, *slot, where.address, dst[i]);
        settle(installer, std::nullopt, Counter::pgmigrate_success, false);
      } else {
        installer.add(system_page_address(dst[i]), where.address, *slot);
        settle(installer, PageEntry::system(), Counter::pgmigrate_success, true);
      }
      release_old_device_page(page, nullptr);
    } else {
      release_unused_dst(&as, dst[i]);
      // A coherent page stays: its frame goes back where the CPU maps it
      // (or never left).
      if (is_coherent(page)) restore_coherent_frame(installer, *page, where.address, *slot);
      settle(installer, std::nullopt, Counter::pgmigrate_fail, false);
      page->unlock();
      page->put();
    }
    as.migration_end();  // collect_device_page's
  }
}

// ---- ScopedMigrateVma ------------------------------------------------------

ScopedMigrateVma::ScopedMigrateVma(AddressSpace& as, VirtAddr start, VirtAddr end, const void* owner,
                                   std::uint32_t flags, DevicePage* fault_page) {
  const std::size_t n = end > start ? (end - start) / kPageSize : 0;
  src_.assign(n, 0);
  dst_.assign(n, 0);
  args_.address_space = &as;
  args_.start = start;
  args_.end = end;
  args_.src = src_.data();
  args_.dst = dst_.data();
  args_.pgmap_owner = owner;
  args_.flags = flags;
  args_.fault_page = fault_page;
}

ScopedMigrateVma::~ScopedMigrateVma() {
  if (phase_ == Phase::kSetUp) pages();
  if (phase_ == Phase::kPages) finalize();
}

Status ScopedMigrateVma::setup() {
  UHMM_CHECK(phase_ == Phase::kNew, "setup out of order");
  Status s = migrate_vma_setup(args_);
  phase_ = s.is_ok() ? Phase::kSetUp : Phase::kFinalized;
  return s;
}

void ScopedMigrateVma::pages() {
  UHMM_CHECK(phase_ == Phase::kSetUp, "pages out of order");
  migrate_vma_pages(args_);
  phase_ = Phase::kPages;
}

void ScopedMigrateVma::finalize() {
  if (phase_ == Phase::kSetUp) pages();
  UHMM_CHECK(phase_ == Phase::kPages, "finalize out of order");
  migrate_vma_finalize(args_);
  phase_ = Phase::kFinalized;
}

}  // namespace uhmm
