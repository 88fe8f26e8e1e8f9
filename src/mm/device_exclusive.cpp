// mm: exclusive device access for atomics (the kernel's
// make_device_exclusive).  The page's frame leaves the managed address for a
// staging slot (UFFDIO_MOVE, no copy), so that the next CPU access faults;
// the device works on the frame in the slot meanwhile.  The fault (or
// anything else that needs the page: hmm_range_fault, fork, teardown)
// revokes the device's access with an invalidation and moves the frame
// back.  The entry's life: docs/page-states.md.
#include <sys/mman.h>

#include <chrono>
#include <cstdio>
#include <thread>

#include "mm/address_space_impl.hpp"
#include "uhmm/hmm.hpp"

namespace uhmm {

using mm::PageEntry;
using mm::PageState;

bool AddressSpace::Impl::restore_exclusive(mm::EntrySlot& slot, VirtAddr addr) {
  // The device loses its access before the frame moves: once every callback
  // has returned, no device touches the slot any more.
  mm::ScopedInvalidation revoke(notifiers, NotifyRange{addr, addr + kPageSize, NotifyEvent::kExclusive, nullptr});
  if (!revoke.ok()) return false;
  PageEntry before;
  if (!mm::try_lock_entry(slot, &before)) return false;
  if (before.state() != PageState::kDeviceExclusive) {
    unlock_and_wake(slot, before, addr);
    return false;
  }
  const VirtAddr frame = before.held_frame();
  table.note_kernel_table_maybe(addr.vpn(), 1);  // one page goes in
  // Inside the install window, as migrations put pages back: the frame goes
  // home only if no change queued touches the address (a REMAP still unread
  // moves the entry with the range; an UNMAP or REMOVE drops it).  The kernel
  // itself refuses the move while a change is unread (EAGAIN).
  open_install_window();
  const std::vector<struct uffd_msg> changes = queued_changes();
  const bool untouched = changes.empty() || after_changes(changes, addr) == std::optional<VirtAddr>{addr};
  platform::PartialResult r = untouched ? move_in(frame, addr, 1, /*wake=*/false) : platform::PartialResult{0, EAGAIN};
  if (r.bytes_done != kPageSize && r.error != EEXIST && r.error != EAGAIN && r.error != ENOENT) {
    // The kernel moves frames only between mappings of the same protection
    // (the application may have called mprotect itself): copy instead.
    r = uffd.copy(addr, frame.ptr(), kPageSize, /*wake=*/false);
  }
  close_install_window();
  if (r.bytes_done == kPageSize) {
    staging.give_back_empty(frame, 1);
  } else if (r.error == EEXIST) {
    // A page is mapped there already, which only the application can have
    // done (a new mapping over the old one): the held data belonged to the
    // mapping that went.
    staging.give_back_ready(frame, 1);
  } else if (r.error == EAGAIN || r.error == ENOENT) {
    // A change waits to be read (EAGAIN), or the mapping moved or went with
    // its event still unread (the kernel looks for the mapping first):
    // read, and let the caller look again where the entry is then.
    unlock_and_wake(slot, before, addr);
    drain_events();
    return false;
  } else {
    std::fprintf(stderr, "uhmm: giving %#lx back from exclusive access failed: %s\n",
                 static_cast<unsigned long>(addr.value), platform::errno_text(r.error).c_str());
    unlock_and_wake(slot, before, addr);
    return false;
  }
  stats.add(Counter::device_exclusive_revoked);
  (void)mm::unlock_entry(slot, PageEntry::system());
  wake(addr, 1);  // the access that faulted sleeps in the kernel, entry waiter or not
  return true;
}

void AddressSpace::Impl::restore_exclusive_pages(VirtAddr start, VirtAddr end) {
  std::vector<Vpn> held;
  table.for_each_populated(start.vpn(), (end - start) / kPageSize, [&](Vpn v, PageEntry e) {
    if (e.state() == PageState::kDeviceExclusive) held.push_back(v);
  });
  for (Vpn v : held) {
    mm::EntrySlot* slot = table.slot(v, false);
    for (int attempt = 0; attempt < 1000; ++attempt) {
      const PageEntry e{slot->load(std::memory_order_acquire)};
      if (e.state() != PageState::kDeviceExclusive) break;
      if (!e.locked() && restore_exclusive(*slot, VirtAddr::from_vpn(v))) break;
      std::this_thread::yield();
    }
  }
}

Result<DeviceExclusivePage> make_device_exclusive(AddressSpace& as, VirtAddr addr, const void* owner) {
  if (owner == nullptr) return Status::error(EINVAL, "make_device_exclusive: no owner");
  if (!addr.page_aligned()) return Status::error(EINVAL, "make_device_exclusive: address not page aligned");
  AddressSpace::Impl& impl = as.impl();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(1);
  for (unsigned attempt = 0;; ++attempt) {
    if (std::chrono::steady_clock::now() > deadline)
      return Status::error(EBUSY, "make_device_exclusive: the page keeps changing");
    if (attempt > 0) std::this_thread::yield();
    mm::RegionPin region = impl.pin_region(addr, addr + kPageSize);
    if (!region) return Status::error(EFAULT, "make_device_exclusive: not managed memory");
    if (region->info.kind != RegionKind::kPrivateAnonymous)
      return Status::error(EOPNOTSUPP, "make_device_exclusive: only private anonymous memory");
    if ((region->info.prot & (PROT_READ | PROT_WRITE)) != (PROT_READ | PROT_WRITE))
      return Status::error(EFAULT, "make_device_exclusive: the page is not writable");
    mm::EntrySlot* slot = impl.table.slot(addr.vpn(), true);
    const PageEntry seen{slot->load(std::memory_order_acquire)};
    if (seen.locked()) continue;  // a migration holds it: wait it out
    if (seen.state() == PageState::kDeviceCoherent)
      return Status::error(EOPNOTSUPP, "make_device_exclusive: the page is in device-coherent memory");
    if (seen.state() != PageState::kSystem) {
      // A hole, a device page, another device's exclusive page: the CPU's
      // own fault path brings it in (and revokes that device's access).
      if (impl.fault_in(addr, /*write=*/true) == AddressSpace::Impl::FaultResult::kFailed)
        return Status::error(EFAULT, "make_device_exclusive: the page could not be faulted in");
      continue;
    }
    // Present for the CPU; make it writable and this process's own (a page
    // shared copy-on-write with a forked child cannot move), without
    // touching the data.  Fails when the page went meanwhile (a hole the
    // kernel reports to uhmm in SIGBUS mode, or the application dropped it).
    if (::madvise(addr.ptr(), kPageSize, MADV_POPULATE_WRITE) != 0) {
      impl.await_read_in_progress();
      if (impl.fault_in(addr, /*write=*/true) == AddressSpace::Impl::FaultResult::kFailed)
        return Status::error(EFAULT, "make_device_exclusive: the page could not be faulted in");
      continue;
    }
    // No exclusive entry is made while a fork runs: the fork gate brings
    // them all back, and waits for this bracket.
    impl.migration_begin(/*for_fault=*/false);
    struct MigrationBracket {
      AddressSpace::Impl& impl;
      ~MigrationBracket() { impl.migration_end(); }
    } bracket{impl};
    mm::ScopedInvalidation invalidation(impl.notifiers, NotifyRange{addr, addr + kPageSize, NotifyEvent::kExclusive, owner});
    if (!invalidation.ok()) return invalidation.status();
    PageEntry before;
    if (!mm::try_lock_entry(*slot, &before)) continue;
    if (before.state() != PageState::kSystem || impl.event_pending_at(addr)) {
      impl.unlock_and_wake(*slot, before, addr);
      continue;
    }
    std::vector<mm::SlotRun> runs;
    if (Status s = impl.staging.take_empty(1, runs); !s) {
      impl.unlock_and_wake(*slot, before, addr);
      return s;
    }
    const VirtAddr frame = runs.front().start;
    // Inside the install window and through the transit, as migrations take
    // pages out: the kernel refuses the move while a change of the
    // application is unread, so the frame only leaves an address the queued
    // changes describe (docs/address-space-events.md, case 3).
    impl.open_install_window();
    const bool changing = !impl.pending_event_ranges(addr, addr + kPageSize).empty();
    const platform::PartialResult r =
        changing ? platform::PartialResult{0, EAGAIN} : impl.move_out_in_window(addr, frame, 1);
    impl.close_install_window();
    if (r.bytes_done != kPageSize) {
      // EAGAIN: a change waits to be read (read it); ENOENT: the page went
      // after all (an event is on its way); EBUSY: pinned, or shared with a
      // child forked since.  Look again.
      if (r.error == EAGAIN) impl.drain_events();
      if (r.error == EEXIST) {
        impl.staging.give_back_ready(frame, 1);
      } else {
        impl.staging.give_back_empty(frame, 1);
      }
      impl.unlock_and_wake(*slot, before, addr);
      continue;
    }
    impl.stats.add(Counter::device_exclusive_made);
    mm::update_locked_entry(*slot, PageEntry::device_exclusive(frame));
    return DeviceExclusivePage(as, addr, static_cast<std::byte*>(frame.ptr()));
  }
}

void DeviceExclusivePage::unlock() {
  if (as_ == nullptr) return;
  AddressSpace::Impl& impl = std::exchange(as_, nullptr)->impl();
  mm::EntrySlot* slot = impl.table.slot(address_.vpn(), false);
  // CPU accesses that arrived meanwhile wake and fault again: they find the
  // exclusive entry and revoke it.
  impl.unlock_and_wake(*slot, PageEntry{slot->load(std::memory_order_acquire)}.settled(), address_);
}

}  // namespace uhmm
