// mm: fork.  A child must see every byte of managed memory and keep
// copy-on-write for CPU and device writes alike (hmm-semantics section 2).
// The kernel's way, sharing the device-private entry read-only with the
// child, needs the child's faults served from the parent
// (UFFD_FEATURE_EVENT_FORK), which makes fork wait for uhmm's threads and
// can deadlock a process whose other threads hold malloc's lock
// (platform-costs.md).  uhmm instead brings every device page back to
// system memory just before fork (a pthread_atfork prepare handler) and
// holds new migrations until fork is done: the child then inherits plain
// memory with the right data, and the kernel's copy-on-write covers both
// sides, device writes included (the sim writes system pages through the
// parent's own mapping).  The price is that device residency does not
// survive a fork.  Device-coherent pages are not device residency in that
// sense: they are mapped for the CPU, so the kernel copies them to the child
// like any present page and the parent keeps them (neither the eviction nor
// holds_device_or_moving_pages looks at them).  After the fork the parent's
// present pages are shared copy-on-write with the child, which UFFDIO_MOVE
// refuses until a write fault un-shares them: the parent handler marks them
// (kForkShared) for migrations to un-share first.  Details:
// docs/address-space-events.md ("fork").
#include <pthread.h>

#include <algorithm>
#include <cstdio>
#include <mutex>
#include <thread>
#include <vector>

#include "mm/address_space_impl.hpp"

namespace uhmm {

using mm::PageEntry;
using mm::PageState;

namespace {

std::mutex g_spaces_mutex;  // held from the prepare handler to the parent/child handler
std::vector<AddressSpace::Impl*> g_spaces;  // guarded by g_spaces_mutex
std::once_flag g_atfork_once;

// Migrations this thread is inside (a driver may nest them, e.g. a pipeline).
thread_local int t_migrations_held = 0;
// Set on the forking thread while it brings device pages back: its own
// migrations pass the closed gate.
thread_local bool t_forking_thread = false;

void prepare_fork_all() {
  g_spaces_mutex.lock();
  for (AddressSpace::Impl* impl : g_spaces) impl->prepare_fork();
}

void after_fork_in_parent() {
  for (AddressSpace::Impl* impl : g_spaces) {
    impl->mark_shared_after_fork();
    impl->end_fork();
  }
  g_spaces_mutex.unlock();
}

void after_fork_in_child() {
  for (AddressSpace::Impl* impl : g_spaces) {
    impl->forked_child = true;
    impl->end_fork();
  }
  g_spaces_mutex.unlock();
}

}  // namespace

void AddressSpace::Impl::register_for_fork() {
  std::call_once(g_atfork_once, [] { (void)pthread_atfork(prepare_fork_all, after_fork_in_parent, after_fork_in_child); });
  std::lock_guard lock(g_spaces_mutex);
  g_spaces.push_back(this);
}

void AddressSpace::Impl::unregister_for_fork() {
  std::lock_guard lock(g_spaces_mutex);
  g_spaces.erase(std::remove(g_spaces.begin(), g_spaces.end(), this), g_spaces.end());
}

void AddressSpace::Impl::migration_begin(bool for_fault) {
  // A fault's migration holds the device page's lock already: waiting here
  // would keep the fork from bringing that page back.  It only brings a
  // page back, and faults that have not locked a page yet wait for the
  // fork in handle_fault.
  if (t_migrations_held++ > 0 || t_forking_thread || for_fault) {
    migrations_in_flight.fetch_add(1, std::memory_order_acq_rel);  // already inside one: no waiting
    return;
  }
  for (;;) {
    forking.wait(true, std::memory_order_acquire);
    migrations_in_flight.fetch_add(1, std::memory_order_acq_rel);
    if (!forking.load(std::memory_order_acquire)) return;
    // A fork started meanwhile: step back until it is done.
    if (migrations_in_flight.fetch_sub(1, std::memory_order_acq_rel) == 1) migrations_in_flight.notify_all();
  }
}

int AddressSpace::Impl::migrations_held_by_this_thread() { return t_migrations_held; }

void AddressSpace::Impl::migration_end() {
  --t_migrations_held;
  if (migrations_in_flight.fetch_sub(1, std::memory_order_acq_rel) == 1) migrations_in_flight.notify_all();
}

bool AddressSpace::Impl::holds_device_or_moving_pages() const {
  std::vector<std::pair<VirtAddr, std::size_t>> ranges;
  {
    ReaderLock lock(regions_mutex);
    for (const auto& [start, region] : regions) ranges.emplace_back(region->info.start, region->info.length);
  }
  bool found = false;
  for (const auto& [start, length] : ranges) {
    table.for_each_populated(start.vpn(), length / kPageSize, [&](Vpn, PageEntry e) {
      found = found || e.state() == PageState::kDevicePrivate || e.state() == PageState::kDeviceExclusive ||
              e.locked();
    });
    if (found) return true;
  }
  return false;
}

void AddressSpace::Impl::prepare_fork() {
  // Close the gate first, so that nothing moves to a device from here on;
  // faults on device pages wait at it before they lock the page (see
  // handle_fault), so the pages they wanted can be brought back here.
  forking.store(true, std::memory_order_release);
  for (int in_flight = migrations_in_flight.load(std::memory_order_acquire); in_flight != 0;
       in_flight = migrations_in_flight.load(std::memory_order_acquire))
    migrations_in_flight.wait(in_flight, std::memory_order_acquire);
  std::vector<std::pair<VirtAddr, VirtAddr>> ranges;
  {
    ReaderLock lock(regions_mutex);
    for (const auto& [start, region] : regions) ranges.emplace_back(region->info.start, region->info.end());
  }
  t_forking_thread = true;
  for (int round = 0; round < 8; ++round) {
    for (const auto& [start, end] : ranges) evict_device_pages(start, end);
    if (!holds_device_or_moving_pages()) break;
    std::this_thread::yield();  // an entry another thread holds for a moment (a hole being filled)
    if (round == 7)
      std::fprintf(stderr,
                   "uhmm: fork: device pages could not all be brought back; the child reads zeros in their place\n");
  }
  t_forking_thread = false;
}

void AddressSpace::Impl::mark_shared_after_fork() {
  // Every present page is now shared copy-on-write with the child, which
  // UFFDIO_MOVE refuses until a write fault un-shares it (even after the
  // child exits).  Marked before the gate opens, so that the next
  // migration un-shares them first, holding nothing (migrate_vma_setup).
  std::vector<std::pair<VirtAddr, std::size_t>> ranges;
  {
    ReaderLock lock(regions_mutex);
    for (const auto& [start, region] : regions) ranges.emplace_back(region->info.start, region->info.length);
  }
  for (const auto& [start, length] : ranges) {
    table.for_each_populated(start.vpn(), length / kPageSize, [&](Vpn v, PageEntry e) {
      if (e.state() == PageState::kSystem && !e.fork_shared()) mm::mark_fork_shared(*table.slot(v, false));
    });
  }
}

void AddressSpace::Impl::end_fork() {
  forking.store(false, std::memory_order_release);
  forking.notify_all();
}

}  // namespace uhmm
