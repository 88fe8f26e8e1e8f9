// mm: the fault service.  Threads that read the managed userfaultfd and
// resolve each CPU fault: zero-fill for never-populated pages, the page
// map's migrate_to_ram for device pages, a nap for pages under migration
// (the migration wakes them when it unlocks the entry).
// The full story, layer by layer: docs/walkthrough-cpu-fault.md.
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <exception>
#include <optional>
#include <vector>

#include "core/assert.hpp"
#include "mm/address_space_impl.hpp"
#include "platform/maps.hpp"
#include "platform/threads.hpp"
#include "uhmm/device_memory.hpp"

namespace uhmm {

using mm::PageEntry;
using mm::PageState;

Status AddressSpace::Impl::start_fault_service() {
  stop_fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (stop_fd < 0) return Status::error(errno, "eventfd: " + platform::errno_text(errno));
  deferred_fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (deferred_fd < 0) return Status::error(errno, "eventfd: " + platform::errno_text(errno));
  UHMM_TRY(start_event_worker());
  unsigned n = options.fault_threads;
  const unsigned cpus = std::thread::hardware_concurrency();
  if (n == 0) n = cpus < 2 ? 2 : cpus;
  // In SIGBUS mode faults never reach the uffd: one thread reads the events.
  if (options.fault_mode == FaultMode::kInThread) n = 1;
  for (unsigned i = 0; i < n; ++i) fault_threads.emplace_back([this, i] { fault_thread_main(i); });
  return Status::ok();
}

void AddressSpace::Impl::stop_fault_service() {
  if (stop_fd < 0) return;
  const std::uint64_t one = 1;
  (void)!::write(stop_fd, &one, sizeof one);
  for (auto& t : fault_threads) t.join();
  fault_threads.clear();
  stop_event_worker();
  ::close(stop_fd);
  stop_fd = -1;
  ::close(deferred_fd);
  deferred_fd = -1;
}

void AddressSpace::Impl::fault_thread_main(unsigned index) {
  // In SIGBUS mode the one thread here only reads events.
  if (options.fault_mode == FaultMode::kInThread) {
    platform::name_this_thread("evread");
  } else {
    platform::name_this_thread("fault", index);
  }
  // One thread per CPU, each kept on its CPU, each waiting in an epoll set
  // of its own on the userfaultfd, exclusively: a fault wakes one waiting
  // thread, not all.  Waking a thread whose CPU is idle costs the faulting
  // thread an interrupt to that CPU, which on a virtual machine with guest
  // halt-polling off is an exit to the host: 13-15 us, paid before the
  // fault is served (docs/performance.md).  The kernel wakes the first
  // idle waiter in a fixed order, so a thread that served a fault of a
  // thread on another CPU moves itself to the back of that order, and the
  // thread on the faulting CPU comes first next time.
  const unsigned cpus = std::thread::hardware_concurrency();
  const bool pinned = cpus > 1 && index < cpus;
  if (pinned) (void)platform::pin_this_thread(index);
  struct EpollFd {
    int fd = ::epoll_create1(EPOLL_CLOEXEC);
    ~EpollFd() {
      if (fd >= 0) ::close(fd);
    }
  } epoll;
  auto watch = [&](int fd, std::uint32_t events) {
    struct epoll_event ev {};
    ev.events = events;
    ev.data.fd = fd;
    return ::epoll_ctl(epoll.fd, EPOLL_CTL_ADD, fd, &ev) == 0;
  };
  constexpr std::uint32_t kUffdEvents = EPOLLIN | EPOLLEXCLUSIVE;
  if (epoll.fd < 0 || !watch(uffd.fd(), kUffdEvents) || !watch(stop_fd, EPOLLIN) || !watch(deferred_fd, EPOLLIN)) {
    std::fprintf(stderr, "uhmm: fault service cannot wait: %s\n", platform::errno_text(errno).c_str());
    return;
  }
  // Whose faults this thread served last, and how many since it looked
  // where that thread runs (threads move between CPUs now and then).
  std::uint32_t last_tid = 0;
  unsigned served_since_look = 0;
  // Every 8th: the scheduler may move the faulting thread to the other,
  // idle CPU when the local service thread wakes it, and looking only every
  // 64th fault let some runs stay that way (every fault served across CPUs,
  // p50 18-20 us).  Every 8th or 16th measured 7.7-8.5 us in every run;
  // every 1st or 2nd costs more (a look delays the next fault), 12 us
  // (docs/performance.md).
  constexpr unsigned kLookEvery = 8;
  for (;;) {
    struct epoll_event ready[3];
    const int rc = ::epoll_wait(epoll.fd, ready, 3, -1);
    if (rc < 0) {
      if (errno == EINTR) continue;
      std::fprintf(stderr, "uhmm: fault service wait failed: %s\n", platform::errno_text(errno).c_str());
      return;
    }
    bool uffd_ready = false;
    for (int k = 0; k < rc; ++k) {
      if (ready[k].data.fd == stop_fd) return;
      if (ready[k].data.fd == uffd.fd()) uffd_ready = true;
      if (ready[k].data.fd == deferred_fd) {
        std::uint64_t ignored;
        (void)!::read(deferred_fd, &ignored, sizeof ignored);
      }
    }
    // Events go to the event worker's queue (in the kernel's order); page
    // faults come back here.
    struct uffd_msg faults[16];
    const std::size_t count = uffd_ready ? read_messages(faults, 16) : 0;
    for (std::size_t i = 0; i < count; ++i) serve_fault_message(faults[i]);
    struct uffd_msg deferred;
    while (take_deferred_fault(&deferred)) serve_fault_message(deferred);
    // After the faulting thread is on its way: a look at /proc costs a few
    // microseconds.
    if (!pinned || count == 0) continue;
    const std::uint32_t tid = faults[count - 1].arg.pagefault.feat.ptid;
    if (tid == last_tid && ++served_since_look < kLookEvery) continue;
    last_tid = tid;
    served_since_look = 0;
    Result<int> cpu = platform::last_cpu_of_thread(tid);
    if (!cpu || static_cast<unsigned>(*cpu) == index) continue;
    (void)::epoll_ctl(epoll.fd, EPOLL_CTL_DEL, uffd.fd(), nullptr);
    if (!watch(uffd.fd(), kUffdEvents)) {
      std::fprintf(stderr, "uhmm: fault service cannot wait: %s\n", platform::errno_text(errno).c_str());
      return;
    }
    stats.add(Counter::fault_service_requeues);
    last_tid = 0;  // look again after the next one
  }
}

void AddressSpace::Impl::serve_fault_message(const struct uffd_msg& msg) {
  const VirtAddr addr = VirtAddr{static_cast<std::uintptr_t>(msg.arg.pagefault.address)}.page_down();
  const bool write = msg.arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WRITE;
  try {
    (void)handle_fault(addr, write);
  } catch (const std::exception& e) {
    // Never let a library thread take the process down; the access
    // cannot complete, so it ends like a device failure.
    std::fprintf(stderr, "uhmm: fault at %#lx failed: %s\n", static_cast<unsigned long>(addr.value), e.what());
    poison_or_wake(addr);
  } catch (...) {
    std::fprintf(stderr, "uhmm: fault at %#lx failed\n", static_cast<unsigned long>(addr.value));
    poison_or_wake(addr);
  }
}

bool AddressSpace::Impl::waits_for_event(VirtAddr addr) {
  // A change the application made before this access has had its event
  // read already (the kernel holds the changing call until then), so it is
  // queued, or about to be by the read in progress.
  await_read_in_progress();
  if (options.fault_mode == FaultMode::kInThread) {
    wait_for_events_at(addr);
    return false;
  }
  if (!event_pending_at(addr)) return false;
  // Parked: the event worker wakes the range once the change is processed.
  stats.add(Counter::faults_parked);
  return true;
}

AddressSpace::Impl::FaultResult AddressSpace::Impl::handle_fault(VirtAddr addr, bool write) {
  const auto started = std::chrono::steady_clock::now();
  // A change the application made (munmap, madvise, mremap) that is not
  // processed yet decides what a fault on a range it touches finds: such a
  // fault waits for it (docs/address-space-events.md, case 2): a device page
  // may have been discarded, and an mremap may have moved pages onto the
  // address, still in transit where a zero fill would stand in their way.
  if (event_pending_at(addr)) {
    if (waits_for_event(addr)) return FaultResult::kParked;
  }
  mm::RegionPin region = pin_region(addr, addr + kPageSize);
  if (!region && waits_for_event(addr)) return FaultResult::kParked;
  if (!region) region = pin_region(addr, addr + kPageSize);
  if (!region && take_in_place_growth(addr)) region = pin_region(addr, addr + kPageSize);
  if (!region) {
    // A message from our uffd for an address that is not (or no longer) a
    // managed range: a range unmapped meanwhile.  Let the access go on as
    // for plain anonymous memory.  (A SIGBUS may come from any uffd, and
    // the kernel lets one uffd fill another's range: in SIGBUS mode the
    // address is not ours.)
    if (options.fault_mode == FaultMode::kServiceThreads) {
      switch (zero_fill_unmanaged(addr)) {
        case UnmanagedFill::kFilled:
          return FaultResult::kResolved;
        case UnmanagedFill::kChanged:
          return handle_fault(addr, write);  // a change reached the address: look again
        case UnmanagedFill::kRefused:
          break;
      }
    }
    wake(addr, 1);
    return FaultResult::kNotManaged;
  }
  stats.add(Counter::uffd_faults);
  if (region->backend) {
    // A shared or file-backed page the object does not hold yet: its owner
    // reads it in (docs/adr/0006-file-cache.md).
    const std::uint64_t offset = region->backend_offset + (addr - region->info.start);
    const std::size_t pages_left = (region->info.end() - addr) / kPageSize;
    switch (region->backend->fault_missing(*this, addr, offset, pages_left, write)) {
      case mm::RegionBackend::Fault::kInstalled:
        wake(addr, 1);
        return FaultResult::kResolved;
      case mm::RegionBackend::Fault::kBeyondEnd:
        wake(addr, 1);  // the retried access gets the kernel's SIGBUS
        return FaultResult::kFailed;
      case mm::RegionBackend::Fault::kFailed:
        poison_or_wake(addr);
        return FaultResult::kFailed;
    }
  }
  mm::EntrySlot* slot = table.slot(addr.vpn(), true);
  bool device_fault = false;
  bool events_checked = false;
  bool fault_around = true;
  for (unsigned attempt = 0;; ++attempt) {
    if (attempt > 64) std::this_thread::yield();  // a device that keeps declining
    PageEntry e{slot->load(std::memory_order_acquire)};
    if (e.locked()) {
      // A migration owns the page: sleep until it unlocks and wakes us.
      std::uint64_t expected = e.bits();
      if (slot->compare_exchange_strong(expected, e.with(PageEntry::kWaiters).bits(), std::memory_order_acq_rel)) {
        stats.add(Counter::faults_parked);
        return FaultResult::kParked;
      }
      continue;
    }
    if (e.state() == PageState::kDevicePrivate && e.poisoned()) {
      poison_or_wake(addr);  // still broken: SIGBUS again
      return FaultResult::kFailed;
    }
    if (!events_checked) {
      // Has the application discarded a device's page (private, exclusive,
      // or a coherent frame that is not mapped), or moved a range onto this
      // address (a zero fill would then stand in the way of a page in
      // transit)?  The change must be processed first, or the fault would
      // outrun it.  (Look at the entry afresh afterwards: time passed.)
      events_checked = true;
      if (waits_for_event(addr)) return FaultResult::kParked;
      continue;
    }
    if (e.state() == PageState::kDeviceExclusive) {
      // A device holds the page for its atomics: revoke that, give it back.
      if (restore_exclusive(*slot, addr)) break;
      continue;
    }
    if (e.state() != PageState::kDevicePrivate) {
      const MissingResult filled = resolve_missing(*region, addr, write, fault_around);
      if (filled == MissingResult::kDone) break;
      if (filled == MissingResult::kChanged) {
        // A change of the range was read meanwhile: wait for it as above.
        // Should it cover only neighbours, the next fill skips them.
        events_checked = false;
        fault_around = false;
      }
      continue;
    }
    if (forking.load(std::memory_order_acquire)) {
      // A fork is bringing device pages back: wait for it without holding
      // the page (it may be this one); then look again.
      forking.wait(true, std::memory_order_acquire);
      continue;
    }
    const std::optional<FaultOutcome> called = call_migrate_to_ram(*slot, e, addr, write);
    if (!called) continue;  // the entry changed meanwhile: look again
    device_fault = true;
    stats.add(Counter::device_private_faults);
    const FaultOutcome outcome = *called;
    if (outcome != FaultOutcome::kOk) {
      stats.add(Counter::migrate_to_ram_fail);
      PageEntry before;
      if (mm::try_lock_entry(*slot, &before)) {
        const bool still_device = before.state() == PageState::kDevicePrivate;
        if (still_device) poison_or_wake(addr);
        (void)mm::unlock_entry(*slot, still_device ? before.with(PageEntry::kPoisoned) : before);
        if (still_device) {
          // Other pages of the driver's window may have come back.
          wake(region->info.start, region->info.length / kPageSize);
          return FaultResult::kFailed;
        }
      }
      continue;  // the page moved meanwhile: serve the fault again
    }
    // migrate_to_ram brought it back, or declined because someone else holds
    // it: look again.  Decided before the wake: once woken, the application
    // goes on, may move the page out again (or discard it), and this fault,
    // served already, must not bring it back a second time.
    const bool back = PageEntry{slot->load(std::memory_order_acquire)}.state() == PageState::kSystem;
    // migrate_vma_finalize leaves waking to us when called for a fault: wake
    // everything the driver may have brought back (its window lies within
    // the region), now that the fault is completely done.
    wake(region->info.start, region->info.length / kPageSize);
    if (back) break;
  }
  if (device_fault) stats.fault_latency().record(std::chrono::steady_clock::now() - started);
  return FaultResult::kResolved;
}

std::optional<FaultOutcome> AddressSpace::Impl::call_migrate_to_ram(mm::EntrySlot& slot, PageEntry seen,
                                                                   VirtAddr addr, bool write) {
  DevicePage* page = seen.device_page();
  if (!page->try_get()) return std::nullopt;  // freed under us
  page->lock();
  std::optional<FaultOutcome> outcome;
  // Held like the kernel holds it around migrate_to_ram; the entry must
  // still name this page, or it moved while we waited for the lock.
  if (PageEntry{slot.load(std::memory_order_acquire)}.settled() == seen.settled()) {
    outcome = page->pagemap().ops().migrate_to_ram(CpuFault{self, addr, write, page});
  }
  page->unlock();
  page->put();
  return outcome;
}

void AddressSpace::Impl::poison_or_wake(VirtAddr addr) {
  // UFFDIO_POISON wakes the access, which then gets SIGBUS.  A marker that
  // is already there (EEXIST) does not wake: wake by hand, and the access
  // hits the marker.
  if (!uffd.poison(addr, kPageSize).is_ok()) wake(addr, 1);
}

AddressSpace::Impl::MissingResult AddressSpace::Impl::resolve_missing(mm::Region& region, VirtAddr addr,
                                                                    bool write, bool fault_around) {
  mm::EntrySlot* slot = table.slot(addr.vpn(), true);
  PageEntry before;
  if (!mm::try_lock_entry(*slot, &before)) return MissingResult::kRetry;
  if (before.state() == PageState::kDevicePrivate || before.state() == PageState::kDeviceExclusive) {
    (void)mm::unlock_entry(*slot, before);
    return MissingResult::kRetry;
  }
  // A page the table calls present is either present already (another
  // thread's fault won the race: spurious) or was dropped by the kernel;
  // either way only this page is looked at.  A coherent page is present
  // too: a fault finds its frame back in place (a migration that held it
  // restored it) or gone with a change the kernel made, which releases it.
  // Fault-around is for holes: lock never-populated neighbours in the same
  // 2 MiB block.
  const bool coherent = before.state() == PageState::kDeviceCoherent;
  const bool was_hole = before.state() == PageState::kNone;
  const std::size_t around = was_hole && fault_around ? options.hole_fault_around_pages : 1;
  VirtAddr block = addr.huge_down();
  VirtAddr lo_limit = block < region.info.start ? region.info.start : block;
  VirtAddr hi_limit = block + kHugePageSize;
  if (hi_limit > region.info.end()) hi_limit = region.info.end();
  VirtAddr lo = addr;
  VirtAddr hi = addr + kPageSize;
  auto grab = [&](VirtAddr a) {
    mm::EntrySlot* s = table.slot(a.vpn(), true);
    PageEntry b;
    if (PageEntry{s->load(std::memory_order_acquire)}.state() != PageState::kNone) return false;
    if (!mm::try_lock_entry(*s, &b)) return false;
    if (b.state() != PageState::kNone) {
      (void)mm::unlock_entry(*s, b);
      return false;
    }
    return true;
  };
  while ((hi - lo) / kPageSize < around && hi < hi_limit && grab(hi)) hi = hi + kPageSize;
  while ((hi - lo) / kPageSize < around && lo > lo_limit && grab(VirtAddr{lo.value - kPageSize}))
    lo = VirtAddr{lo.value - kPageSize};

  // A whole aligned 2 MiB hole is filled with a huge page: the kernel zeroes
  // a block of the staging pool's huge lane, and one move installs it.
  VirtAddr fill_block;
  const bool whole_hole_block = was_hole && lo.huge_aligned() && hi - lo == kHugePageSize;
  // In a huge-fault window, the kernel allocated and zeroed a huge page for
  // this write before it asked uhmm, and threw it away: a region filled
  // for the first time would pay that on every block.
  if (whole_hole_block && write && region.huge_faults.load(std::memory_order_relaxed))
    close_huge_fault_window(region);
  if (whole_hole_block && !region.info.no_huge_pages && staging.take_block(false, &fill_block).is_ok()) {
    // The faulting access made the kernel allocate an (empty) page table
    // for the block; a huge page can only move in whole once it is gone.
    // Every page of the block is a locked hole, so there is nothing to
    // lose, unless a change the application made moved pages onto it.
    await_read_in_progress();
    if (!region.info.adopted && pending_event_ranges(lo, hi).empty()) as_empty_block(lo);
    if (!platform::advise(fill_block, kHugePageSize, MADV_POPULATE_WRITE).is_ok()) {
      staging.give_back_ready(fill_block, kPagesPerHugePage);
      fill_block = VirtAddr{0};
    }
  }
  bool already_present = false;
  VirtAddr cur = lo;
  const bool outrun = !fill_holes(lo, hi, addr, fill_block, &cur, &already_present);
  DevicePage* released = nullptr;
  for (VirtAddr a = lo; a < hi; a = a + kPageSize) {
    // What was not filled stays as it was: the neighbours holes, the
    // faulting page whatever it was (a present page whose fill a change
    // outran is still present, somewhere the change's processing finds it).
    PageEntry after = a == addr ? before : PageEntry::none();
    if (a < cur) {
      if (coherent && !already_present) released = before.device_page();  // its frame was gone: a zero page now
      if (!coherent || !already_present) after = PageEntry::system();
    }
    (void)mm::unlock_entry(*table.slot(a.vpn(), false), after);
  }
  if (released != nullptr) {
    released->clear_mapping();
    released->put();  // page_free once nobody else holds it
    stats.add(Counter::device_pages_dropped);
  }
  const bool done = !outrun || cur > addr;
  if (done) stats.add(already_present ? Counter::faults_spurious : Counter::hole_faults);
  // Wake only now, with every entry settled, the staging pages returned and
  // the fault counted.
  wake(lo, (hi - lo) / kPageSize);
  return done ? MissingResult::kDone : MissingResult::kChanged;
}

bool AddressSpace::Impl::fill_holes(VirtAddr lo, VirtAddr hi, VirtAddr addr, VirtAddr fill_block, VirtAddr* cur,
                                    bool* already_present) {
  // The fill runs inside the install window, after a fresh look at the
  // queue.  A change read since the caller looked (an mremap onto these
  // addresses, of pages on a device or in transit) would otherwise be
  // outrun: a zero page installed where uhmm's entry still says hole, and
  // the change's processing then moving a device page's entry over it.
  // Inside the window no change is read, and the kernel refuses fills while
  // one is unread (EAGAIN) or has taken the mapping away (ENOENT).  A fault
  // read late (by another thread's drain_events) met exactly this
  // (MigrationsRacingMremapKeepEveryByte).
  bool changed = false;
  const int error = install_in_window([&] {
    if (!pending_event_ranges(*cur, hi).empty()) {
      changed = true;
      return 0;
    }
    if (fill_block.value != 0) {
      const std::size_t moved = move_in(fill_block, lo, kPagesPerHugePage, /*wake=*/false).bytes_done / kPageSize;
      staging.give_back_empty(fill_block, moved);
      staging.give_back_ready(fill_block + moved * kPageSize, kPagesPerHugePage - moved);
      fill_block = VirtAddr{0};
      *cur = *cur + moved * kPageSize;  // the rest, if any, is copied below
    }
    // A page that turns out present (the kernel says EEXIST) is kept.
    while (*cur < hi) {
      const platform::PartialResult r = uffd.copy(*cur, zero_source.ptr(), hi - *cur, /*wake=*/false);
      *cur = *cur + r.bytes_done;
      if (r.error == 0) break;
      if (r.error != EEXIST) return r.error;
      if (*cur == addr) *already_present = true;
      *cur = *cur + kPageSize;
    }
    return 0;
  });
  if (changed) {
    if (fill_block.value != 0) staging.give_back_ready(fill_block, kPagesPerHugePage);
    return false;
  }
  // ENOENT: the range went or moved meanwhile; the access faults again (or
  // finds no mapping).  Out of memory: the rest re-faults.
  if (error != 0 && error != ENOENT)
    std::fprintf(stderr, "uhmm: zero-fill at %#lx failed: %s\n", static_cast<unsigned long>(cur->value),
                 platform::errno_text(error).c_str());
  return true;
}

AddressSpace::Impl::UnmanagedFill AddressSpace::Impl::zero_fill_unmanaged(VirtAddr addr) {
  // As fill_holes: inside the window, after a look at the queue.  The
  // message may be late (read by another thread's drain_events) and the
  // address managed again by now: an mremap whose event was read just now
  // may have moved a range here, with pages on a device where this would
  // put a zero page.
  bool changed = false;
  const int error = install_in_window([&] {
    if (event_pending_at(addr)) {
      changed = true;
      return 0;
    }
    return uffd.zeropage(addr, kPageSize, /*wake=*/true).code();
  });
  if (changed) return UnmanagedFill::kChanged;
  return error == 0 ? UnmanagedFill::kFilled : UnmanagedFill::kRefused;
}

bool AddressSpace::Impl::take_in_place_growth(VirtAddr addr) {
  // mremap grew a managed range in place: the kernel extended its mapping,
  // registration included, and reports no event.  One mapping then holds
  // the range and `addr` beyond its end (docs/address-space-events.md).
  std::shared_ptr<mm::Region> below;
  std::uintptr_t limit = ~std::uintptr_t{0};  // the next managed range's start
  {
    ReaderLock lock(regions_mutex);
    auto it = regions.upper_bound(addr.value);
    if (it != regions.end()) limit = it->first;
    if (it == regions.begin()) return false;
    below = std::prev(it)->second;
  }
  const std::optional<platform::Mapping> m = platform::mapping_at(addr);
  // A backed range grows like a file mapping: the new part maps the object
  // further on, which its backend serves (docs/adr/0006-file-cache.md).
  if (!m || m->start > below->info.start.value || !(below->backend ? m->shared : m->private_anonymous()))
    return false;
  WriterLock lock(regions_mutex);
  auto it = regions.find(below->info.start.value);
  if (it == regions.end() || it->second != below) return true;  // replaced meanwhile: look again
  auto grown = below->slice(below->info.start, std::min(m->end, limit) - below->info.start.value);
  // Operations in flight keep the old object and its (shorter) view.
  it->second = std::move(grown);
  stats.add(Counter::uffd_events);
  return true;
}

void AddressSpace::Impl::follow_backed_growth(const mm::RegionBackend* backend) {
  std::vector<VirtAddr> ends;
  for_each_backed_region(backend, [&](VirtAddr start, std::size_t length, std::uint64_t) { ends.push_back(start + length); });
  for (VirtAddr end : ends) {
    if (pin_region(end, end + kPageSize)) continue;  // another range starts there: no room to grow
    (void)take_in_place_growth(end);
  }
}

}  // namespace uhmm
