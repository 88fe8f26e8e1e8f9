// mm/address_space_impl.hpp: AddressSpace internals shared with the layers
// above (migrate, devices).  Not a public header.
//
// Locks owned here (order: docs/locking.md): regions_mutex (rank kRegions),
// page-table entry locks (bit locks, never waited on while holding a mutex),
// the staging pool's mutex.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "core/sync.hpp"
#include "mm/notifier_table.hpp"
#include "mm/page_table.hpp"
#include "mm/staging_pool.hpp"
#include "mm/zap_readers.hpp"
#include "platform/uffd.hpp"
#include "uhmm/address_space.hpp"
#include "uhmm/device_memory.hpp"
#include "uhmm/migrate.hpp"

namespace uhmm {

namespace mm {

/// What a CPU fault on a missing page of a region that is not private
/// anonymous memory does: the kernel's vm_operations_struct for mm.  The
/// layer above that owns the pages implements it (src/file/: a page cache
/// over a memfd, docs/adr/0006-file-cache.md); mm only dispatches to it and
/// reports changes the application made behind uhmm's back.
class RegionBackend {
 public:
  virtual ~RegionBackend() = default;
  enum class Fault : std::uint8_t {
    kInstalled,  // the page is present now (installed, or someone else did)
    kBeyondEnd,  // past the end of the object: the access gets SIGBUS from the kernel
    kFailed,     // the page could not be read: the access ends in SIGBUS
  };
  /// Serves a fault at `page` (page aligned), `offset` bytes into the
  /// object, where this mapping maps nothing: the object lacks the page
  /// (missing), holds it without this mapping having it mapped (minor), or
  /// keeps it on a device (brought back first).  `pages_left` pages of the
  /// region start there (it may fill them too).  Runs on a fault-service
  /// thread, in the faulting thread's SIGBUS handler, or for
  /// hmm_range_fault, with no mm lock held; may block on I/O.  It wakes
  /// nobody at `page`: the caller does.
  virtual Fault fault_missing(AddressSpace::Impl& as, VirtAddr page, std::uint64_t offset, std::size_t pages_left,
                              bool write) = 0;

  /// migrate_vma_setup on [m.start, m.end) of one of the object's mappings
  /// (protection `prot`), whose first page is `offset` bytes into the
  /// object: fills src[] with
  /// the object's pages the selection takes, each kept from every mapping
  /// (and from the object's own read/write) until migrate_finish.  Holes are
  /// not collected: a page the object lacks is not in memory to move.
  /// Returns how many were collected.
  virtual std::uint64_t migrate_collect(AddressSpace::Impl& as, MigrateVma& m, std::uint64_t offset, int prot) = 0;
  /// migrate_vma_pages' side: clears MIGRATE where dst[] cannot hold the
  /// page (a device of the first stage and a dirty page it could not write
  /// back, say), so that the driver learns it, as from the kernel's.
  virtual void migrate_commit(AddressSpace::Impl& as, MigrateVma& m, std::uint64_t offset) = 0;
  /// migrate_vma_finalize's side: pages whose src[] kept MIGRATE now live
  /// at dst[]; the others stay where they were.  Counts into `moved`.
  struct Moved {
    std::uint64_t success = 0, fail = 0, to_device = 0, to_ram = 0;
  };
  virtual void migrate_finish(AddressSpace::Impl& as, MigrateVma& m, std::uint64_t offset, Moved& moved) = 0;

  /// hmm_range_fault's look at the page `offset` bytes into the object.
  struct Look {
    enum Kind : std::uint8_t {
      kAbsent,   // not in memory: a fault reads it in
      kPresent,  // in memory, where the CPU maps it (at the mapping's address)
      kDevice,   // on a device: `page` (valid while the object holds it)
    } kind = kAbsent;
    const DevicePage* page = nullptr;
    bool device_writable = false;  // kDevice: the device may write it in place
  };
  virtual Look look_up(std::uint64_t offset) const = 0;
  /// The application discarded or unmapped [offset, offset + len) of one of
  /// the object's mappings behind uhmm's back (madvise, munmap, mremap):
  /// whatever the page tables knew there (which pages were written) is gone.
  /// Called by the event worker, with no lock held.
  virtual void mapping_lost(std::uint64_t offset, std::size_t len) noexcept = 0;
  /// The address space is being destroyed (an owner registered with
  /// AddressSpace::Impl::attach_backend): the owner removes its mappings and
  /// stops using the address space before this returns.  Called first thing
  /// in the destructor, with every uhmm thread still running.
  virtual void address_space_closing() noexcept {}
};

/// A managed range (the kernel's vm_area_struct).
struct Region {
  RegionInfo info;
  /// Serves faults of shared and file-backed regions; null for private
  /// anonymous memory, which mm serves itself.
  std::shared_ptr<RegionBackend> backend;
  /// Offset of info.start in the backend's object (the kernel's vm_pgoff, in bytes).
  std::uint64_t backend_offset = 0;

  /// A new region for [start, start + len) of this one, same backend.
  std::shared_ptr<Region> slice(VirtAddr start, std::size_t len) const {
    auto part = std::make_shared<Region>();
    part->info = info;
    part->info.start = start;
    part->info.length = len;
    part->backend = backend;
    part->backend_offset = backend_offset + (start - info.start);
    part->huge_faults.store(huge_faults.load());  // the mapping keeps its advice
    return part;
  }
  /// Migrations and faults in flight inside the region; unmap waits for 0.
  std::atomic<int> users{0};
  /// Set once unmap starts: no new migration to a device may begin.
  std::atomic<bool> closing{false};
  /// The mapping is advised MADV_HUGEPAGE: a CPU fault on an empty 2 MiB
  /// block takes the kernel's huge-page fault path, which leaves no page
  /// table (AddressSpace::Impl::open_huge_fault_window).
  std::atomic<bool> huge_faults{false};

  bool contains(VirtAddr a) const { return a >= info.start && a < info.end(); }
};

/// Holds a region use for the duration of an operation.
class RegionPin {
 public:
  RegionPin() = default;
  explicit RegionPin(std::shared_ptr<Region> r) : region_(std::move(r)) {}
  RegionPin(RegionPin&& o) noexcept : region_(std::move(o.region_)) {}
  RegionPin& operator=(RegionPin&& o) noexcept {
    reset();
    region_ = std::move(o.region_);
    return *this;
  }
  ~RegionPin() { reset(); }
  void reset() {
    if (region_) region_->users.fetch_sub(1, std::memory_order_acq_rel);
    region_.reset();
  }
  explicit operator bool() const { return region_ != nullptr; }
  Region* operator->() const { return region_.get(); }
  Region& operator*() const { return *region_; }

 private:
  std::shared_ptr<Region> region_;
};

}  // namespace mm

struct AddressSpace::Impl {
  explicit Impl(AddressSpaceOptions opts) : options(opts) {}
  ~Impl();

  AddressSpace* self = nullptr;
  AddressSpaceOptions options;
  platform::Uffd uffd;  // managed ranges: MISSING mode, kernel-mode faults served
  mm::StagingPool staging;
  mm::PageTable table;
  Stats stats;
  mm::NotifierTable notifiers;
  VirtAddr zero_source;  // kHugePageSize of zeros, never written
  // kHugePageSize, aligned, registered with `uffd` and empty between uses;
  // used only inside the install window (read_mutex), so by one thread.
  VirtAddr transit;
  // The same for whole 2 MiB units, kept without a page table: a huge page
  // moves through a block as one entry only if the block has none (the
  // kernel's deposited table moves with it).  0 if none could be made.
  VirtAddr huge_transit;

  mutable SharedMutex regions_mutex{LockRank::kRegions};
  std::map<std::uintptr_t, std::shared_ptr<mm::Region>> regions UHMM_GUARDED_BY(regions_mutex);

  // Fault service.
  int stop_fd = -1;
  std::vector<std::thread> fault_threads;

  // Userfaultfd events: changes the application makes behind uhmm's back
  // (munmap, madvise, mremap).  The story: docs/address-space-events.md.
  /// Held around read() of the managed uffd and the queueing of the events
  /// it returns, so the queue keeps the kernel's order.
  Mutex read_mutex{LockRank::kUffdRead};
  mutable Mutex events_mutex{LockRank::kUffdEvents};
  std::condition_variable_any events_cv;  // an event was queued or done
  /// Events read and not yet fully processed (the front one may be in
  /// progress); faults on the ranges they cover wait for them.
  std::deque<struct uffd_msg> pending_events UHMM_GUARDED_BY(events_mutex);
  /// uhmm's own MADV_DONTNEED calls whose REMOVE events are not read yet:
  /// those events are not changes.
  std::vector<std::pair<std::uintptr_t, std::uintptr_t>> own_zaps UHMM_GUARDED_BY(events_mutex);
  /// Faults read by drain_events on behalf of the service threads.
  std::deque<struct uffd_msg> deferred_faults UHMM_GUARDED_BY(events_mutex);
  int deferred_fd = -1;  // eventfd: deferred faults are waiting
  bool events_stopping UHMM_GUARDED_BY(events_mutex) = false;
  /// zap_own calls waiting for their REMOVE event to be read.
  int zaps_waiting UHMM_GUARDED_BY(events_mutex) = 0;
  std::thread event_worker;
  /// Read the event of a zap_own on the zapping thread's CPU.
  std::unique_ptr<mm::LocalZapReaders> zap_readers;
  /// Service mode: reads the uffd when a zap_own waits long and no zap
  /// reader reads it, in case every service thread is blocked (e.g. one in
  /// zap_own, the other waiting for a page lock the first holds).
  std::thread backup_reader;

  Status init();

  /// The userfaultfd supports asynchronous write-protection on shared
  /// memory (UFFD_FEATURE_WP_ASYNC and WP_HUGETLBFS_SHMEM, Linux >= 6.7).
  bool shared_write_tracking = false;
  /// Maps `length` bytes of `fd` at `offset` (MAP_SHARED), registers the
  /// range for missing-page faults (and, when `track_writes`, asynchronous
  /// write-protection, with every page protected), and manages it as a
  /// region of `kind` whose faults `backend` serves.  The mapping is not
  /// inherited by fork (MADV_DONTFORK: docs/adr/0006-file-cache.md).
  Result<VirtAddr> map_backed(int fd, std::uint64_t offset, std::size_t length, int prot, RegionKind kind,
                              bool track_writes, std::shared_ptr<mm::RegionBackend> backend);
  /// AddressSpace::unmap; a backed region only if `backed_ok` (its owner,
  /// which has written its pages back, or the address space's destructor).
  Status unmap_region(VirtAddr start, bool backed_ok);
  /// Owners of backends (file caches) that live as long as they like: the
  /// destructor calls address_space_closing() on those still attached, so
  /// that destroying the address space first is safe.
  void attach_backend(std::weak_ptr<mm::RegionBackend> owner);
  void detach_backend(const mm::RegionBackend* owner);
  void close_backends();
  Mutex backends_mutex{LockRank::kLeaf};
  std::vector<std::weak_ptr<mm::RegionBackend>> attached_backends UHMM_GUARDED_BY(backends_mutex);
  /// mremap may have grown a mapping of `backend` in place (or while moving
  /// it), which sends no event: takes the growth into its regions, so that
  /// a writeback scans and an unmap removes all of each mapping.
  void follow_backed_growth(const mm::RegionBackend* backend);
  /// Calls `fn(start, length, offset)` for each managed region `backend`
  /// serves, holding regions_mutex shared, so no region is removed (and no
  /// new one is added) while `fn` looks at its page tables.
  template <class Fn>
  void for_each_backed_region(const mm::RegionBackend* backend, Fn&& fn) const {
    ReaderLock lock(regions_mutex);
    for (const auto& [start, region] : regions)
      if (region->backend.get() == backend) fn(region->info.start, region->info.length, region->backend_offset);
  }

  /// The managed range holding `addr`, as it is now; nullopt if none does.
  std::optional<RegionInfo> region_info_at(VirtAddr addr) const;
  /// True if `addr` lies in a managed range that is read and write.
  bool read_write_at(VirtAddr addr) const;
  /// True if `addr` lies in a managed range where uhmm may put a 2 MiB page
  /// (RegionInfo::no_huge_pages).
  bool huge_pages_at(VirtAddr addr) const;
  /// Pins the region holding all of [start, end); null if none does.
  mm::RegionPin pin_region(VirtAddr start, VirtAddr end) const;

  // Huge-fault windows.  A CPU fault on an empty 2 MiB block (a unit on a
  // device, or in flight back) makes the kernel's 4 KiB fault path build a
  // page table before it asks uhmm, and the unit's huge page can then move
  // back in whole only after a zap: tens of microseconds, on the path of
  // every reader that waits for a migration back.  In a mapping advised
  // MADV_HUGEPAGE the kernel takes its huge-page path instead, which asks
  // uhmm before it leaves a table; but there a *write* fault on an empty
  // block first allocates and zeroes a 2 MiB page that it then throws away,
  // which a region being filled for the first time would pay on every
  // block.  So a region's mapping is advised MADV_HUGEPAGE from the moment
  // a whole unit of it leaves for a device until a write fault fills an
  // empty block of it (AddressSpaceOptions::transparent_huge_pages: for
  // good), and MADV_NOHUGEPAGE otherwise.  docs/migration.md, "Faults that
  // leave no page table".
  /// Whether the kernel offers that path to this process (THP not "never",
  /// the huge zero page on, not disabled by prctl); decided at init.
  std::atomic<bool> huge_fault_windows{false};  // tests turn it off
  /// Opens `region`'s window unless it is open; returns the epoch to note
  /// with a unit leaving it (PageTable::note_no_kernel_table), 0 if the
  /// region cannot have one (adopted, backed, or no kernel support).
  std::uint64_t open_huge_fault_window(mm::Region& region);
  /// Closes `region`'s window (after a write fault filled an empty block).
  void close_huge_fault_window(mm::Region& region);
  /// The epoch of the windows open now; a close starts a new one, so a
  /// unit whose epoch is still current left a region whose window has been
  /// open since.
  std::atomic<std::uint64_t> huge_fault_epoch{mm::PageTable::kFirstHugeFaultWindow};
  /// Serialises opening and closing (madvise and the region's flag).
  Mutex huge_window_mutex{LockRank::kLeaf};
  /// `region` is in the region map (not cut up since it was pinned).
  bool still_managed(const mm::Region& region) const UHMM_REQUIRES_SHARED(regions_mutex);

  /// Moves `pages` pages from the managed range into staging slots.
  platform::PartialResult move_out(VirtAddr managed, VirtAddr staging_slot, std::size_t pages);
  /// The same inside the install window, by way of `transit`: the first
  /// hop is a move on the managed userfaultfd, which the kernel refuses
  /// (EAGAIN) while a change of the application is unread, so a page only
  /// leaves the mapping that the queued changes describe
  /// (docs/address-space-events.md, case 3).
  /// `via` (up to 2 MiB, registered with `uffd`, empty) replaces `transit`:
  /// a huge page moves whole only into a block without a page table, and
  /// `transit` has one from its first small move.
  /// The second hop, transit to staging, can be refused too (EBUSY, seen
  /// rarely under load on 6.18, transient: docs/address-space-events.md,
  /// case 3): after one retry the data goes on as a copy
  /// (Counter::transit_copies), so the pages still leave, and the transit
  /// is cleared without an event (clear_transit).
  platform::PartialResult move_out_in_window(VirtAddr managed, VirtAddr staging_slot, std::size_t pages,
                                             std::optional<VirtAddr> via = std::nullopt);
  /// Tests: the next `n` second hops out of transit (into staging, or a
  /// coherent frame's home) report EBUSY without moving anything, as the
  /// kernel rarely does.
  std::atomic<unsigned> refuse_staging_moves_for_test{0};
  /// Takes one of those refusals, if a test left any.
  bool take_injected_refusal();
  /// move_out_in_window's second hop: `bytes` present in transit at
  /// `through` end up in the slots, moved or copied.
  void move_transit_to_staging(VirtAddr through, VirtAddr staging_slot, std::size_t bytes);
  /// Drops the pages at [through + offset, + bytes), a part of a transit
  /// block, inside the install window.
  void clear_transit(VirtAddr through, std::size_t offset, std::size_t bytes);
  /// Inside the install window: after a unit went through huge_transit in
  /// pieces (which leaves a page table there), replaces it by a fresh block.
  void renew_huge_transit();
  /// A 2 MiB-aligned block registered with `uffd`, for `transit` or
  /// `huge_transit`; and its end (no event: it is unregistered first).
  Result<VirtAddr> map_transit_block();
  void unmap_transit_block(VirtAddr& block);
  /// Inside the install window: moves the one page at `managed` into
  /// `transit` (on the managed userfaultfd, refused with EAGAIN while a
  /// change is unread, as for move_out_in_window); the caller takes it on
  /// from there at once.  0 or the errno of the move.
  int move_to_transit(VirtAddr managed);
  /// Moves populated staging slots into the managed range; `wake` also
  /// wakes accesses asleep on it (callers that still have entries to settle
  /// pass false and wake afterwards).
  platform::PartialResult move_in(VirtAddr staging_slot, VirtAddr managed, std::size_t pages, bool wake);
  /// Wakes CPU accesses asleep on the range, and every thread asleep in
  /// wait_entry_unlocked.
  void wake(VirtAddr start, std::size_t pages);
  /// Removes a SIGBUS marker so a page can be installed again.
  void clear_poison(VirtAddr addr);
  /// Drops the page table of an aligned 2 MiB managed block whose every page
  /// is absent and locked by the caller, so that a huge page can move in whole.
  void as_empty_block(VirtAddr block);

  // Fork (mm/fork.cpp): device pages come back before fork, and no
  // migration runs across it.
  std::atomic<bool> forking{false};
  std::atomic<int> migrations_in_flight{0};
  /// Set in a forked child: this object belongs to the parent (its threads
  /// and userfaultfds are the parent's); it only lets itself be destroyed.
  bool forked_child = false;
  void register_for_fork();
  void unregister_for_fork();
  /// Brackets every migrate_vma sequence (setup to finalize); `for_fault`:
  /// migrate_to_ram's, which passes a closed gate.
  void migration_begin(bool for_fault);
  void migration_end();
  /// How many migrate sequences (of any address space) the calling thread
  /// is inside: a driver may pipeline batches, setting up one while it
  /// still holds the entries of the one before.
  static int migrations_held_by_this_thread();
  void prepare_fork();
  void end_fork();
  /// Parent side of a fork: marks the present system pages kForkShared.
  void mark_shared_after_fork();
  /// In a forked child: lets go of the parent's threads and descriptors
  /// without touching them.
  void abandon_in_child();
  bool holds_device_or_moving_pages() const;

  // Events (mm/uffd_events.cpp).
  Status start_event_worker();
  void stop_event_worker();
  /// Reads the managed uffd once (non-blocking) under read_mutex, queueing
  /// the events; returns the page-fault messages read (copied to
  /// `faults_out`); `read_total` gets the number of messages read.
  std::size_t read_messages(struct uffd_msg* faults_out, std::size_t capacity, std::size_t* read_total = nullptr);
  /// Reads whatever the uffd holds now, so that events the kernel queued
  /// before a fault are known when the fault is served.
  void drain_events();
  bool take_deferred_fault(struct uffd_msg* out);
  /// Before serving a fault at `addr`: reads pending events; true if one
  /// covers `addr` and the fault is parked (the event worker wakes it);
  /// in SIGBUS mode waits for it instead and returns false.
  bool waits_for_event(VirtAddr addr);
  /// Serves one fault message read from the uffd (service threads).
  void serve_fault_message(const struct uffd_msg& msg);
  /// True if a queued event covers `addr` (its fault must wait for it).
  bool event_pending_at(VirtAddr addr) const;
  /// The ranges of queued events that overlap [start, end): pages there
  /// must not migrate until the events are processed.
  std::vector<std::pair<VirtAddr, VirtAddr>> pending_event_ranges(VirtAddr start, VirtAddr end) const;
  /// Returns once no read of the uffd is between taking messages and
  /// queueing them: every event read so far is in pending_events.  Since
  /// the kernel holds munmap/madvise/mremap until their event is read, that
  /// covers every change that has returned to the application.
  void await_read_in_progress();
  /// The install window (docs/address-space-events.md, case 3): a thread
  /// putting back pages a migration held (or setup, taking them out) holds
  /// read_mutex while it checks what the application changed and installs,
  /// so no change is read in between; the changes queued are then all that can have touched the
  /// pages (madvise waits for its read before it zaps; munmap and mremap
  /// make COPY and MOVE fail with EAGAIN until theirs is read).  An EAGAIN
  /// inside the window returns to the holder, who closes it to read.
  void open_install_window() UHMM_ACQUIRE(read_mutex);
  void close_install_window() UHMM_RELEASE(read_mutex);
  /// Inside the window: closes it, reads the change that made a move fail
  /// (EAGAIN), and opens it again.
  void read_events_in_window() UHMM_REQUIRES(read_mutex);
  /// Runs `attempt` (an install into managed memory after a look at what
  /// changed: 0 or the errno it stopped on) inside the window, and again,
  /// after reading the uffd, for as long as it stops on EAGAIN: a change
  /// unread, for which the kernel holds installs back.  Its last result.
  template <typename Attempt>
  int install_in_window(Attempt&& attempt) {
    for (;;) {
      open_install_window();
      const int error = attempt();
      close_install_window();
      if (error != EAGAIN) return error;
      drain_events();
    }
  }
  bool install_window_held() const;
  /// The changes queued (REMOVE, UNMAP and REMAP events), in the kernel's
  /// order.
  std::vector<struct uffd_msg> queued_changes() const;
  /// Where the page at `addr` is after `changes` (a REMAP moved it), or
  /// nullopt when one discarded or unmapped it.
  static std::optional<VirtAddr> after_changes(const std::vector<struct uffd_msg>& changes, VirtAddr addr);
  /// Reads the uffd and waits until no queued event overlaps [start, end):
  /// before a new managed range goes there (an munmap of an old range at
  /// the same addresses may still be queued, and would take the new one).
  void settle_events_in(VirtAddr start, VirtAddr end);
  /// Waits until no queued event overlaps [start, end), reading nothing
  /// (after await_read_in_progress, that covers every change that has
  /// returned).  Unlike settle_events_in it takes no fault off the uffd: a
  /// fault read on another thread's behalf is served late, after the
  /// access it stood for may have been resumed by someone else.
  void wait_for_events_in(VirtAddr start, VirtAddr end);
  /// The same for the page at `addr` (in-thread faults).
  void wait_for_events_at(VirtAddr addr);
  /// Before a migration of [start, end) that no fault asked for: waits
  /// until the changes of the range that have returned to the application
  /// are processed (an mremap's event is read before the call returns, but
  /// the range is at its new place, pages and all, only once processed).
  /// Reads nothing (see wait_for_events_in).  Does nothing on a thread that
  /// holds a migration: processing a change may wait for its entries.
  void await_returned_changes(VirtAddr start, VirtAddr end);
  /// MADV_DONTNEED of managed memory by uhmm itself (its REMOVE event is
  /// recognised and dropped, not processed).
  void zap_own(VirtAddr start, std::size_t len);
  void event_worker_main();
  void backup_reader_main();
  void process_remove(VirtAddr start, VirtAddr end);
  void process_unmap(VirtAddr start, VirtAddr end);
  void process_remap(VirtAddr from, VirtAddr to, std::size_t len);
  /// Drops every page-table entry of [start, end) (device pages released,
  /// page_free when nobody else holds them), waiting out migrations.
  void drop_entries(VirtAddr start, VirtAddr end);

  /// Unlocks an entry and wakes a fault asleep on it.
  void unlock_and_wake(mm::EntrySlot& slot, mm::PageEntry after, VirtAddr addr);

  // Fault service (mm/fault_service.cpp).
  Status start_fault_service();
  void stop_fault_service();
  void fault_thread_main(unsigned index);
  enum class FaultResult {
    kResolved,    // the page is present: the access can complete
    kParked,      // a migration holds the entry and wakes the access when done
    kFailed,      // the page is poisoned: the access ends in SIGBUS (EFAULT)
    kNotManaged,  // no managed range holds the address (any more)
  };
  /// Serves one CPU fault; called by the service threads, by the in-thread
  /// SIGBUS handler and by fault_in.
  FaultResult handle_fault(VirtAddr addr, bool write);
  /// Serves a fault in the calling thread, waiting out a migration that
  /// holds the page: never kParked.  Runs in the SIGBUS handler in
  /// FaultMode::kInThread (what that allows: docs/adr/0004-in-thread-faults.md).
  FaultResult fault_in(VirtAddr addr, bool write);
  /// Waits until nothing holds the entry of `addr` (a migration may take a
  /// while: a DMA copy), asleep: it marks the entry as waited on, so the
  /// unlock calls wake(), which wakes it.  For threads with no kernel
  /// wake-up to sleep on (in-thread faults, hmm_range_fault).
  void wait_entry_unlocked(VirtAddr addr);
  // Threads asleep in wait_entry_unlocked, and the word they sleep on (a
  // futex), which wake() bumps when there are any.  One word for the whole
  // address space: a wake-up wakes them all, and each looks at its entry.
  std::atomic<std::uint32_t> entry_sleepers{0};
  std::atomic<std::uint32_t> entry_wakeups{0};
  // How long one sleep lasts at most: a few places unlock briefly held
  // entries without a wake-up (a fault that locked a page only to look at
  // it), and this bounds what such an unlock costs a sleeper.  Tests that
  // check the wake-up itself set it long.
  std::atomic<std::int64_t> entry_sleep_us{500};
  // FaultMode::kInThread (mm/in_thread_faults.cpp).
  Status register_in_thread();
  void unregister_in_thread();
  /// Calls the page map's migrate_to_ram for the device page `seen` names,
  /// holding the page (reference and lock) as the kernel does.  nullopt if
  /// the entry changed before the page was held: look again.  Wakes nobody.
  std::optional<FaultOutcome> call_migrate_to_ram(mm::EntrySlot& slot, mm::PageEntry seen, VirtAddr addr,
                                                  bool write);
  /// Makes the access at `addr` end in SIGBUS (EFAULT for a syscall).
  void poison_or_wake(VirtAddr addr);
  enum class UnmanagedFill { kFilled, kRefused, kChanged };
  /// A fault on our uffd at `addr`, outside every managed range (unmapped
  /// meanwhile): a zero page lets the access go on, unless a change queued
  /// meanwhile covers the address (kChanged: serve the fault again).
  UnmanagedFill zero_fill_unmanaged(VirtAddr addr);
  /// A fault at `addr` beyond every managed range: if mremap grew the range
  /// below it in place, the range takes the growth (true: look again).
  bool take_in_place_growth(VirtAddr addr);
  enum class MissingResult {
    kDone,     // filled (or found present); the access goes on
    kRetry,    // the entry was locked or changed state meanwhile: look again
    kChanged,  // a change of the range was read before the fill: wait for it
  };
  /// Zero-fills never-populated pages around `addr` (only `addr` without
  /// `fault_around`).
  MissingResult resolve_missing(mm::Region& region, VirtAddr addr, bool write, bool fault_around);
  /// resolve_missing's fill of its locked entries [lo, hi) from `*cur` (and
  /// `fill_block`, a populated staging block for a whole 2 MiB hole, or 0),
  /// inside the install window.  False if a queued change covers what is
  /// left; `*cur` ends where the fill stopped.
  bool fill_holes(VirtAddr lo, VirtAddr hi, VirtAddr addr, VirtAddr fill_block, VirtAddr* cur,
                  bool* already_present);

  // Device-exclusive entries (mm/device_exclusive.cpp).
  /// Revokes the device's exclusive access to the page at `addr` and gives
  /// the frame back to the CPU; false if the entry was not (or no longer) an
  /// unlocked exclusive entry, or the move failed: look again.
  bool restore_exclusive(mm::EntrySlot& slot, VirtAddr addr);
  /// restore_exclusive for every exclusive entry of a range.
  void restore_exclusive_pages(VirtAddr start, VirtAddr end);

  /// Tears a region down (after removal from `regions`).
  void teardown_region(mm::Region& region);
  /// Brings every device page of a range back through its page map's
  /// migrate_to_ram; used before giving an adopted range back.
  void evict_device_pages(VirtAddr start, VirtAddr end);
};

}  // namespace uhmm
