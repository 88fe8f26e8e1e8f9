// mm: userfaultfd events, i.e. changes the application makes to managed
// memory behind uhmm's back: munmap (UNMAP), MADV_DONTNEED/MADV_FREE
// (REMOVE) and mremap (REMAP).  The story, with the races this closes:
// docs/address-space-events.md.
//
// Readers (the fault-service threads, or the event reader in SIGBUS mode)
// read the uffd under read_mutex and queue events in the kernel's order; one
// worker processes them in that order.  The kernel lets the changing thread
// go on as soon as its event is read, so a fault on a range with an event
// still queued waits for it (parked, or blocked in SIGBUS mode): otherwise
// it could bring back a device page the application has just discarded.
#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <exception>
#include <thread>
#include <vector>

#include "core/assert.hpp"
#include "mm/address_space_impl.hpp"
#include "platform/threads.hpp"
#include "uhmm/device_memory.hpp"

namespace uhmm {

using mm::PageEntry;
using mm::PageState;

namespace {

struct EventRange {
  VirtAddr start, end;
};

// The ranges an event changes (REMAP: where the pages were and where they go).
int event_ranges(const struct uffd_msg& m, EventRange out[2]) {
  switch (m.event) {
    case UFFD_EVENT_REMOVE:
    case UFFD_EVENT_UNMAP:
      out[0] = {VirtAddr{m.arg.remove.start}, VirtAddr{m.arg.remove.end}};
      return 1;
    case UFFD_EVENT_REMAP:
      out[0] = {VirtAddr{m.arg.remap.from}, VirtAddr{m.arg.remap.from + m.arg.remap.len}};
      out[1] = {VirtAddr{m.arg.remap.to}, VirtAddr{m.arg.remap.to + m.arg.remap.len}};
      return 2;
    default:
      return 0;
  }
}

bool covers(const struct uffd_msg& m, VirtAddr addr) {
  EventRange r[2];
  const int n = event_ranges(m, r);
  for (int i = 0; i < n; ++i)
    if (addr >= r[i].start && addr < r[i].end) return true;
  return false;
}

}  // namespace

Status AddressSpace::Impl::start_event_worker() {
  zap_readers = std::make_unique<mm::LocalZapReaders>(
      uffd.fd(), mm::LocalZapReaders::Hooks{
                     [this] { drain_events(); },
                     [this] {
                       MutexLock lock(events_mutex);
                       return !own_zaps.empty();
                     },
                     [this] { events_cv.notify_all(); },
                 });
  event_worker = std::thread([this] {
    platform::name_this_thread("events");
    event_worker_main();
  });
  // In SIGBUS mode the event reader never blocks; service threads can.
  if (options.fault_mode == FaultMode::kServiceThreads) {
    backup_reader = std::thread([this] {
      platform::name_this_thread("evbackup");
      backup_reader_main();
    });
  }
  return Status::ok();
}

void AddressSpace::Impl::stop_event_worker() {
  if (zap_readers) zap_readers->stop();
  if (!event_worker.joinable()) return;
  {
    MutexLock lock(events_mutex);
    events_stopping = true;
  }
  events_cv.notify_all();
  event_worker.join();
  if (backup_reader.joinable()) backup_reader.join();
}

void AddressSpace::Impl::backup_reader_main() {
  for (;;) {
    {
      MutexLock lock(events_mutex);
      while (!events_stopping && zaps_waiting == 0) events_cv.wait(events_mutex);
      if (events_stopping) return;
    }
    // A service thread normally reads the zap's event within microseconds;
    // step in only when none does.
    const struct timespec grace = {0, 200'000};
    (void)::nanosleep(&grace, nullptr);
    bool still_waiting;
    {
      MutexLock lock(events_mutex);
      still_waiting = zaps_waiting > 0;
    }
    if (still_waiting) drain_events();
  }
}

std::size_t AddressSpace::Impl::read_messages(struct uffd_msg* faults_out, std::size_t capacity,
                                              std::size_t* read_total) {
  struct uffd_msg msgs[16];
  const std::size_t want = capacity < 16 ? capacity : 16;
  if (read_total != nullptr) *read_total = 0;
  MutexLock read_lock(read_mutex);
  const ssize_t got = ::read(uffd.fd(), msgs, want * sizeof(struct uffd_msg));
  if (got <= 0) return 0;  // another reader took it (EAGAIN)
  const auto count = static_cast<std::size_t>(got) / sizeof(struct uffd_msg);
  if (read_total != nullptr) *read_total = count;
  std::size_t faults = 0;
  bool queued = false;
  {
    MutexLock lock(events_mutex);
    for (std::size_t i = 0; i < count; ++i) {
      const struct uffd_msg& m = msgs[i];
      if (m.event == UFFD_EVENT_PAGEFAULT) {
        // The kernel built a page table for the address before it queued
        // the fault, outside a huge-fault window: known from now on, not
        // only once a service thread gets to the fault
        // (Installer::empty_blocks relies on it).  Faults raised as
        // signals: fault_in.
        table.note_fault(VirtAddr{m.arg.pagefault.address}.vpn(), huge_fault_epoch.load(std::memory_order_seq_cst));
        faults_out[faults++] = m;
        continue;
      }
      if (m.event == UFFD_EVENT_REMOVE) {
        // uhmm's own zap: nothing changed that uhmm does not know.  (The
        // record, not the timing, identifies it: its event may be read
        // after other zaps' events; the record goes with its event.)
        // The event has the zap's range; or, where VMA boundaries split the
        // zap, each piece starts or ends where the zap does.  An
        // application's discard that merely lies inside a zap of ours is
        // its own event (regression test FaultAroundDoesNotUndoADontneed...).
        const std::uintptr_t s = m.arg.remove.start, e = m.arg.remove.end;
        auto own = std::find_if(own_zaps.begin(), own_zaps.end(),
                                [&](const auto& z) { return s == z.first && e == z.second; });
        if (own == own_zaps.end())
          own = std::find_if(own_zaps.begin(), own_zaps.end(), [&](const auto& z) {
            return s >= z.first && e <= z.second && (s == z.first || e == z.second);
          });
        if (own != own_zaps.end()) {
          if (e == own->second) own_zaps.erase(own);  // the zap's last piece
          continue;
        }
      }
      pending_events.push_back(m);
      queued = true;
    }
  }
  if (queued) events_cv.notify_all();
  return faults;
}

void AddressSpace::Impl::drain_events() {
  // Reads what the uffd holds now, so that every event queued so far is in
  // pending_events.  Faults read meanwhile go to the service threads.
  for (int round = 0; round < 8; ++round) {
    struct uffd_msg faults[16];
    std::size_t total = 0;
    const std::size_t n = read_messages(faults, 16, &total);
    if (n > 0) {
      {
        MutexLock lock(events_mutex);
        for (std::size_t i = 0; i < n; ++i) deferred_faults.push_back(faults[i]);
      }
      const std::uint64_t one = 1;
      (void)!::write(deferred_fd, &one, sizeof one);
    }
    if (total < 16) return;
  }
}

bool AddressSpace::Impl::take_deferred_fault(struct uffd_msg* out) {
  MutexLock lock(events_mutex);
  if (deferred_faults.empty()) return false;
  *out = deferred_faults.front();
  deferred_faults.pop_front();
  return true;
}

bool AddressSpace::Impl::event_pending_at(VirtAddr addr) const {
  MutexLock lock(events_mutex);
  for (const struct uffd_msg& m : pending_events)
    if (covers(m, addr)) return true;
  return false;
}

std::vector<std::pair<VirtAddr, VirtAddr>> AddressSpace::Impl::pending_event_ranges(VirtAddr start, VirtAddr end) const {
  std::vector<std::pair<VirtAddr, VirtAddr>> out;
  MutexLock lock(events_mutex);
  for (const struct uffd_msg& m : pending_events) {
    EventRange r[2];
    const int n = event_ranges(m, r);
    for (int i = 0; i < n; ++i)
      if (r[i].start < end && start < r[i].end) out.emplace_back(r[i].start, r[i].end);
  }
  return out;
}

void AddressSpace::Impl::await_read_in_progress() {
  // The kernel completes an event (and lets the changing call go on) inside
  // the read; the reader queues it under read_mutex right after.
  MutexLock read_lock(read_mutex);
}

namespace {
// The address space whose install window this thread holds, if any.
thread_local const AddressSpace::Impl* t_install_window = nullptr;
}  // namespace

void AddressSpace::Impl::open_install_window() {
  read_mutex.lock();
  t_install_window = this;
}

void AddressSpace::Impl::close_install_window() {
  t_install_window = nullptr;
  read_mutex.unlock();
}

void AddressSpace::Impl::read_events_in_window() {
  close_install_window();
  drain_events();
  open_install_window();
}

bool AddressSpace::Impl::install_window_held() const { return t_install_window == this; }

std::vector<struct uffd_msg> AddressSpace::Impl::queued_changes() const {
  MutexLock lock(events_mutex);
  return {pending_events.begin(), pending_events.end()};
}

std::optional<VirtAddr> AddressSpace::Impl::after_changes(const std::vector<struct uffd_msg>& changes,
                                                         VirtAddr addr) {
  for (const struct uffd_msg& m : changes) {
    switch (m.event) {
      case UFFD_EVENT_REMOVE:
      case UFFD_EVENT_UNMAP:
        if (covers(m, addr)) return std::nullopt;
        break;
      case UFFD_EVENT_REMAP:
        if (addr.value >= m.arg.remap.from && addr.value < m.arg.remap.from + m.arg.remap.len)
          addr = VirtAddr{addr.value - m.arg.remap.from + m.arg.remap.to};
        break;
      default:
        break;
    }
  }
  return addr;
}

void AddressSpace::Impl::settle_events_in(VirtAddr start, VirtAddr end) {
  drain_events();
  wait_for_events_in(start, end);
}

void AddressSpace::Impl::wait_for_events_in(VirtAddr start, VirtAddr end) {
  MutexLock lock(events_mutex);
  for (;;) {
    bool pending = false;
    for (const struct uffd_msg& m : pending_events) {
      EventRange r[2];
      const int n = event_ranges(m, r);
      for (int i = 0; i < n; ++i) pending = pending || (r[i].start < end && start < r[i].end);
    }
    if (!pending) return;
    events_cv.wait(events_mutex);
  }
}

void AddressSpace::Impl::wait_for_events_at(VirtAddr addr) { wait_for_events_in(addr, addr + kPageSize); }

void AddressSpace::Impl::await_returned_changes(VirtAddr start, VirtAddr end) {
  if (migrations_held_by_this_thread() != 0) return;
  await_read_in_progress();
  wait_for_events_in(start, end);
}

void AddressSpace::Impl::zap_own(VirtAddr start, std::size_t len) {
  const std::pair<std::uintptr_t, std::uintptr_t> range{start.value, start.value + len};
  {
    MutexLock lock(events_mutex);
    own_zaps.push_back(range);
    ++zaps_waiting;
  }
  // The reader on this CPU reads the event the moment this thread blocks
  // (mm/zap_readers.hpp); without one, the backup reader stands by.
  if (!zap_readers || !zap_readers->before_zap()) events_cv.notify_all();
  // Returns once a reader has read the REMOVE event; that reader drops the
  // event and the record.
  (void)platform::advise(start, len, MADV_DONTNEED);
  {
    MutexLock lock(events_mutex);
    --zaps_waiting;
  }
}

void AddressSpace::Impl::event_worker_main() {
  for (;;) {
    struct uffd_msg m;
    {
      MutexLock lock(events_mutex);
      while (!events_stopping && pending_events.empty()) events_cv.wait(events_mutex);
      if (pending_events.empty()) return;  // stopping, and everything is processed
      m = pending_events.front();
    }
    try {
      switch (m.event) {
        case UFFD_EVENT_REMOVE:
          process_remove(VirtAddr{m.arg.remove.start}, VirtAddr{m.arg.remove.end});
          break;
        case UFFD_EVENT_UNMAP:
          process_unmap(VirtAddr{m.arg.remove.start}, VirtAddr{m.arg.remove.end});
          break;
        case UFFD_EVENT_REMAP:
          process_remap(VirtAddr{m.arg.remap.from}, VirtAddr{m.arg.remap.to}, m.arg.remap.len);
          break;
        default:
          std::fprintf(stderr, "uhmm: unexpected userfaultfd event %u ignored\n", static_cast<unsigned>(m.event));
          break;
      }
    } catch (const std::exception& e) {
      std::fprintf(stderr, "uhmm: processing a userfaultfd event failed: %s\n", e.what());
    } catch (...) {
      std::fprintf(stderr, "uhmm: processing a userfaultfd event failed\n");
    }
    {
      MutexLock lock(events_mutex);
      pending_events.pop_front();
    }
    events_cv.notify_all();
    // Faults parked on the ranges re-fault now and find the new state.
    EventRange r[2];
    const int n = event_ranges(m, r);
    for (int i = 0; i < n; ++i) wake(r[i].start, (r[i].end - r[i].start) / kPageSize);
  }
}

void AddressSpace::Impl::drop_entries(VirtAddr start, VirtAddr end) {
  std::vector<Vpn> populated;
  table.for_each_populated(start.vpn(), (end - start) / kPageSize, [&](Vpn v, PageEntry) { populated.push_back(v); });
  for (Vpn v : populated) {
    mm::EntrySlot* slot = table.slot(v, false);
    PageEntry before;
    // A migration holds it: it finishes on its own (it never waits for
    // this worker), then the entry goes.
    while (!mm::try_lock_entry(*slot, &before)) std::this_thread::yield();
    // A coherent page's frame went with the change (the kernel freed or
    // moved it); only the device page's reference is left to drop.
    if (before.holds_device_page()) {
      DevicePage* page = before.device_page();
      page->clear_mapping();
      page->put();  // page_free once nobody else holds it
      stats.add(Counter::device_pages_dropped);
    } else if (before.state() == PageState::kDeviceExclusive) {
      staging.give_back_ready(before.held_frame(), 1);  // its data goes with the range
    }
    unlock_and_wake(*slot, PageEntry::none(), VirtAddr::from_vpn(v));
  }
}

namespace {
// The managed regions overlapping [start, end), pinned.
std::vector<std::shared_ptr<mm::Region>> overlapping(const AddressSpace::Impl& as, VirtAddr start, VirtAddr end) {
  std::vector<std::shared_ptr<mm::Region>> out;
  ReaderLock lock(as.regions_mutex);
  auto it = as.regions.upper_bound(start.value);
  if (it != as.regions.begin()) --it;
  for (; it != as.regions.end() && it->first < end.value; ++it)
    if (it->second->info.end() > start) out.push_back(it->second);
  return out;
}
}  // namespace

void AddressSpace::Impl::process_remove(VirtAddr start, VirtAddr end) {
  // MADV_DONTNEED and MADV_FREE look the same from here; both discard device
  // pages (MADV_FREE allows it: docs/address-space-events.md).
  mm::ScopedInvalidation invalidation(notifiers, NotifyRange{start, end, NotifyEvent::kClear});
  table.note_kernel_table_maybe(start.vpn(), (end - start) / kPageSize);  // part of a huge page split
  for (const auto& region : overlapping(*this, start, end)) {
    const VirtAddr lo = std::max(start, region->info.start);
    const VirtAddr hi = std::min(end, region->info.end());
    drop_entries(lo, hi);
    if (region->backend) region->backend->mapping_lost(region->backend_offset + (lo - region->info.start), hi - lo);
  }
  stats.add(Counter::uffd_events);
}

void AddressSpace::Impl::process_unmap(VirtAddr start, VirtAddr end) {
  mm::ScopedInvalidation invalidation(notifiers, NotifyRange{start, end, NotifyEvent::kUnmap});
  table.note_kernel_table_maybe(start.vpn(), (end - start) / kPageSize);  // part of a huge page split
  for (const auto& region : overlapping(*this, start, end)) {
    const VirtAddr lo = std::max(start, region->info.start);
    const VirtAddr hi = std::min(end, region->info.end());
    drop_entries(lo, hi);
    if (region->backend) region->backend->mapping_lost(region->backend_offset + (lo - region->info.start), hi - lo);
    // The region object is shared with operations in flight, which keep
    // their view; the address space gets new regions for what is left.
    {
      WriterLock lock(regions_mutex);
      auto it = regions.find(region->info.start.value);
      if (it == regions.end() || it->second != region) continue;  // replaced meanwhile
      regions.erase(it);
      region->closing.store(true, std::memory_order_release);
      const std::pair<VirtAddr, VirtAddr> left_over[2] = {{region->info.start, lo}, {hi, region->info.end()}};
      for (const auto& [s, e] : left_over) {
        if (e > s) regions.emplace(s.value, region->slice(s, e - s));
      }
    }
    // A migration that pinned the region before it closed may have locked
    // holes after the sweep above, and finalize would fill them: sweep
    // again (it waits for such entries).  One that locks holes after this
    // sweep finds the region closed at finalize and leaves them holes.
    drop_entries(lo, hi);
  }
  stats.add(Counter::uffd_events);
}

void AddressSpace::Impl::process_remap(VirtAddr from, VirtAddr to, std::size_t len) {
  // The pages (and their registration) moved from `from` to `to`; the old
  // range either went (an UNMAP event follows) or stays, empty
  // (MREMAP_DONTUNMAP).  Mirrors of the old range drop it.
  mm::ScopedInvalidation invalidation(notifiers, NotifyRange{from, from + len, NotifyEvent::kUnmap});
  table.note_kernel_table_maybe(from.vpn(), len / kPageSize);
  table.note_kernel_table_maybe(to.vpn(), len / kPageSize);
  const auto sources = overlapping(*this, from, from + len);
  if (sources.empty()) return;  // not managed (any more)
  {
    const mm::Region& source = *sources.front();
    auto moved = source.slice(source.info.start, len);
    moved->info.start = to;
    if (from > source.info.start) moved->backend_offset += from - source.info.start;
    // The page tables moved with their write-protect bits, but a scan may
    // have looked at neither place in between: count them as written.
    if (source.backend) source.backend->mapping_lost(moved->backend_offset, len);
    WriterLock lock(regions_mutex);
    regions.emplace(to.value, std::move(moved));
  }
  const std::uint64_t pages = len / kPageSize;
  for (std::uint64_t i = 0; i < pages; ++i) {
    mm::EntrySlot* src = table.slot(from.vpn() + i, false);
    if (src == nullptr || PageEntry{src->load(std::memory_order_acquire)}.state() == PageState::kNone) continue;
    PageEntry before;
    while (!mm::try_lock_entry(*src, &before)) std::this_thread::yield();
    mm::EntrySlot* dst = table.slot(to.vpn() + i, true);
    PageEntry dst_before;
    while (!mm::try_lock_entry(*dst, &dst_before)) std::this_thread::yield();
    const VirtAddr new_addr = to + i * kPageSize;
    if (before.holds_device_page()) before.device_page()->set_mapping(self, new_addr);
    unlock_and_wake(*dst, before.settled(), new_addr);
    unlock_and_wake(*src, PageEntry::none(), from + i * kPageSize);
  }
  stats.add(Counter::uffd_events);
}

}  // namespace uhmm
