// mm: AddressSpace, regions, the CPU side of moving pages.
// Layer rules and locks: src/mm/README.md.  The CPU fault path is in
// fault_service.cpp; the story is docs/walkthrough-cpu-fault.md.
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "core/assert.hpp"
#include "mm/address_space_impl.hpp"
#include "platform/maps.hpp"
#include "platform/threads.hpp"
#include "uhmm/device_memory.hpp"

namespace uhmm {

using mm::PageEntry;
using mm::PageState;

// ---- Impl ------------------------------------------------------------------

Status AddressSpace::Impl::init() {
  const bool in_thread = options.fault_mode == FaultMode::kInThread;
  // Events: the application's munmap, madvise and mremap of managed memory
  // reach uhmm (mm/uffd_events.cpp).
  constexpr std::uint64_t kEvents = UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMAP;
  const std::uint64_t features =
      platform::kFeatureMove | platform::kFeaturePoison | kEvents | (in_thread ? UFFD_FEATURE_SIGBUS : UFFD_FEATURE_THREAD_ID);
  // Shared and file-backed regions track written pages with asynchronous
  // write-protection, and take minor faults so that a page the cache holds
  // can be kept from the CPU while it moves to a device
  // (docs/adr/0006-file-cache.md); without them they are refused,
  // everything else works.
  constexpr std::uint64_t kSharedWp =
      platform::kFeatureWpAsync | UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_MINOR_SHMEM;
  auto u = platform::Uffd::open(features | kSharedWp, /*nonblocking=*/true);
  shared_write_tracking = u.is_ok();
  if (!u) u = platform::Uffd::open(features, /*nonblocking=*/true);
  if (!u) return u.status();
  uffd = std::move(*u);
  // Until a pending event is read, COPY and MOVE into managed ranges fail
  // with EAGAIN, and the installing thread may be the only reader free: it
  // reads (docs/address-space-events.md), then lets the changing thread
  // run, which is what ends the EAGAIN.
  uffd.set_on_busy([this] {
    if (install_window_held()) return false;  // the holder closes it, then reads
    drain_events();
    std::this_thread::yield();
    return true;
  });
  huge_fault_windows = platform::huge_read_faults_available();
  UHMM_TRY(staging.init(options.staging_reserve_bytes, options.staging_keep_bytes));
  auto zero = platform::map_anonymous(kHugePageSize, PROT_READ, false);
  if (!zero) return zero.status();
  zero_source = *zero;
  auto transit_block = map_transit_block();
  if (!transit_block) return transit_block.status();
  transit = *transit_block;
  renew_huge_transit();
  if (in_thread) UHMM_TRY(register_in_thread());
  UHMM_TRY(start_fault_service());
  register_for_fork();
  return Status::ok();
}

void AddressSpace::Impl::abandon_in_child() {
  for (auto& t : fault_threads) t.detach();
  fault_threads.clear();
  if (event_worker.joinable()) event_worker.detach();
  if (backup_reader.joinable()) backup_reader.detach();
  if (zap_readers) zap_readers->abandon();
  for (int* fd : {&stop_fd, &deferred_fd}) {
    if (*fd >= 0) ::close(*fd);
    *fd = -1;
  }
  std::vector<std::shared_ptr<mm::Region>> gone;
  {
    WriterLock lock(regions_mutex);
    for (auto& [start, region] : regions) gone.push_back(region);
    regions.clear();
  }
  // Device pages stay the parent's: only forget them.
  for (const auto& region : gone)
    table.for_each_populated(region->info.start.vpn(), region->info.length / kPageSize,
                             [&](Vpn v, PageEntry) { table.slot(v, false)->store(PageEntry::none().bits()); });
}

AddressSpace::Impl::~Impl() {
  stop_fault_service();
  if (options.fault_mode == FaultMode::kInThread) unregister_in_thread();
  if (zero_source.value != 0) (void)platform::unmap(zero_source, kHugePageSize);
  unmap_transit_block(transit);
  unmap_transit_block(huge_transit);
}

Result<VirtAddr> AddressSpace::Impl::map_transit_block() {
  auto block = platform::map_anonymous_aligned(kHugePageSize, kHugePageSize, PROT_READ | PROT_WRITE, true);
  if (!block) return block.status();
  if (Status s = uffd.register_range(*block, kHugePageSize, UFFDIO_REGISTER_MODE_MISSING); !s) {
    (void)platform::unmap(*block, kHugePageSize);
    return s;
  }
  return *block;
}

void AddressSpace::Impl::unmap_transit_block(VirtAddr& block) {
  if (block.value == 0) return;
  (void)uffd.unregister_range(block, kHugePageSize);  // no UNMAP event for it
  (void)platform::unmap(block, kHugePageSize);
  block = VirtAddr{};
}

void AddressSpace::Impl::renew_huge_transit() {
  unmap_transit_block(huge_transit);
  // Without one, whole units go through `transit` (and are split on the way).
  if (auto block = map_transit_block()) huge_transit = *block;
}

std::optional<RegionInfo> AddressSpace::Impl::region_info_at(VirtAddr addr) const {
  ReaderLock lock(regions_mutex);
  auto it = regions.upper_bound(addr.value);
  if (it == regions.begin()) return std::nullopt;
  --it;
  if (!it->second->contains(addr)) return std::nullopt;
  return it->second->info;
}

bool AddressSpace::Impl::read_write_at(VirtAddr addr) const {
  const std::optional<RegionInfo> info = region_info_at(addr);
  return info && info->prot == (PROT_READ | PROT_WRITE);
}

bool AddressSpace::Impl::huge_pages_at(VirtAddr addr) const {
  const std::optional<RegionInfo> info = region_info_at(addr);
  return info && !info->no_huge_pages;
}

std::uint64_t AddressSpace::Impl::open_huge_fault_window(mm::Region& region) {
  if (!huge_fault_windows || region.info.adopted || region.backend || region.info.length < kHugePageSize) return 0;
  // The epoch before the flag: should a close come between the two, the
  // epoch returned is stale already, and faults then count as building a
  // table (a zap more, never a unit split for nothing).
  const std::uint64_t epoch = huge_fault_epoch.load(std::memory_order_seq_cst);
  if (region.huge_faults.load(std::memory_order_seq_cst)) return epoch;
  ReaderLock regions_lock(regions_mutex);
  if (!still_managed(region)) return 0;
  MutexLock lock(huge_window_mutex);
  if (!region.huge_faults.load(std::memory_order_seq_cst)) {
    if (!platform::advise(region.info.start, region.info.length, MADV_HUGEPAGE)) return 0;
    region.huge_faults.store(true, std::memory_order_seq_cst);
  }
  return huge_fault_epoch.load(std::memory_order_seq_cst);
}

bool AddressSpace::Impl::still_managed(const mm::Region& region) const {
  // A pinned region may have been cut up (munmap, mremap) meanwhile: its
  // old range may hold another mapping now, whose advice is not uhmm's.
  const auto it = regions.find(region.info.start.value);
  return it != regions.end() && it->second.get() == &region;
}

void AddressSpace::Impl::close_huge_fault_window(mm::Region& region) {
  if (options.transparent_huge_pages) return;  // open for good
  ReaderLock regions_lock(regions_mutex);
  if (!still_managed(region)) return;
  MutexLock lock(huge_window_mutex);
  if (!region.huge_faults.load(std::memory_order_seq_cst)) return;
  // A new epoch first: from here on, faults count as building tables
  // everywhere, before any can meet the mapping without the advice.
  huge_fault_epoch.fetch_add(1, std::memory_order_seq_cst);
  region.huge_faults.store(false, std::memory_order_seq_cst);
  (void)platform::advise(region.info.start, region.info.length, MADV_NOHUGEPAGE);
}

mm::RegionPin AddressSpace::Impl::pin_region(VirtAddr start, VirtAddr end) const {
  ReaderLock lock(regions_mutex);
  auto it = regions.upper_bound(start.value);
  if (it == regions.begin()) return {};
  --it;
  const auto& region = it->second;
  if (!region->contains(start) || end > region->info.end()) return {};
  region->users.fetch_add(1, std::memory_order_acq_rel);
  return mm::RegionPin(region);
}

namespace {
bool resident(VirtAddr page) {
  unsigned char v = 0;
  return platform::resident_pages(page, kPageSize, &v).is_ok() && (v & 1);
}

// UFFDIO_MOVE, trusting only what the page tables say when it reports an
// error: on this kernel a move out of a huge page that other threads are
// splitting at the same time can report EEXIST for a page it did move
// (seen on 6.18; regression test CpuAccessTest.ConcurrentFaultsNeverInstallAZeroPage).
// A page counts as moved when its source is empty and its destination
// present; both sides of every uhmm move are owned by the caller (entry
// locked, staging slot taken), so nobody else can have filled either.
platform::PartialResult move_verified(platform::Uffd& uffd, VirtAddr dst, VirtAddr src, std::size_t pages,
                                      std::uint64_t mode) {
  platform::PartialResult total;
  const std::size_t bytes = pages * kPageSize;
  while (total.bytes_done < bytes) {
    const platform::PartialResult r =
        uffd.move(dst + total.bytes_done, src + total.bytes_done, bytes - total.bytes_done, mode);
    total.bytes_done += r.bytes_done;
    if (r.error == 0) return total;
    const VirtAddr failed_src = src + total.bytes_done;
    const VirtAddr failed_dst = dst + total.bytes_done;
    if (!resident(failed_src) && resident(failed_dst)) {
      total.bytes_done += kPageSize;  // it did move
      continue;
    }
    total.error = r.error;
    return total;
  }
  return total;
}
}  // namespace

platform::PartialResult AddressSpace::Impl::move_out(VirtAddr managed, VirtAddr slot, std::size_t pages) {
  // Issued on the staging uffd: the destination must be registered with it.
  return move_verified(staging.uffd(), slot, managed, pages, 0);
}

platform::PartialResult AddressSpace::Impl::move_out_in_window(VirtAddr managed, VirtAddr slot, std::size_t pages,
                                                               std::optional<VirtAddr> via) {
  UHMM_DCHECK(install_window_held(), "transit is used inside the install window only");
  const VirtAddr through = via ? *via : transit;
  platform::PartialResult total;
  const std::size_t bytes = pages * kPageSize;
  while (total.bytes_done < bytes) {
    const std::size_t chunk = std::min(bytes - total.bytes_done, kHugePageSize) / kPageSize;
    const platform::PartialResult in =
        move_verified(uffd, through, managed + total.bytes_done, chunk, platform::kMoveModeDontWake);
    if (in.bytes_done > 0) {
      move_transit_to_staging(through, slot + total.bytes_done, in.bytes_done);
      total.bytes_done += in.bytes_done;
    }
    if (in.error != 0) {
      total.error = in.error;
      return total;
    }
  }
  return total;
}

void AddressSpace::Impl::move_transit_to_staging(VirtAddr through, VirtAddr slot, std::size_t bytes) {
  constexpr int kTries = 2;
  std::size_t moved = 0;
  for (int attempt = 1; attempt <= kTries && moved < bytes; ++attempt) {
    const platform::PartialResult step =
        take_injected_refusal()
            ? platform::PartialResult{0, EBUSY}
            : move_verified(staging.uffd(), slot + moved, through + moved, (bytes - moved) / kPageSize, 0);
    moved += step.bytes_done;
  }
  if (moved == bytes) return;
  // Refused: the data goes on as a copy.  The slots are uhmm's own memory,
  // populated by the writes; the transit's pages are present (the first
  // hop put them there), so reading them never faults.
  const std::size_t left = bytes - moved;
  std::memcpy((slot + moved).ptr(), (through + moved).ptr(), left);
  stats.add(Counter::transit_copies, left / kPageSize);
  clear_transit(through, moved, left);
}

bool AddressSpace::Impl::take_injected_refusal() {
  unsigned left = refuse_staging_moves_for_test.load(std::memory_order_relaxed);
  while (left > 0 && !refuse_staging_moves_for_test.compare_exchange_weak(left, left - 1)) {
  }
  return left > 0;
}

void AddressSpace::Impl::clear_transit(VirtAddr through, std::size_t offset, std::size_t bytes) {
  // A zap of a registered range would wait for its REMOVE event to be read,
  // and inside the install window nobody reads.  Unregistered, the block
  // raises no event; registered again, it is a transit as before.  Should
  // that registration fail, the next first hop into it fails (EINVAL) and
  // its pages stay on the CPU: refused, never lost.
  const VirtAddr block = through.huge_down();
  (void)uffd.unregister_range(block, kHugePageSize);
  (void)platform::advise(through + offset, bytes, MADV_DONTNEED);
  if (Status s = uffd.register_range(block, kHugePageSize, UFFDIO_REGISTER_MODE_MISSING); !s)
    std::fprintf(stderr, "uhmm: a transit area could not be registered again (%s): pages it should carry stay on the CPU\n",
                 s.to_string().c_str());
}

int AddressSpace::Impl::move_to_transit(VirtAddr managed) {
  UHMM_DCHECK(install_window_held(), "transit is used inside the install window only");
  return move_verified(uffd, transit, managed, 1, platform::kMoveModeDontWake).error;
}

platform::PartialResult AddressSpace::Impl::move_in(VirtAddr slot, VirtAddr managed, std::size_t pages,
                                                    bool wake_waiters) {
  return move_verified(uffd, managed, slot, pages, wake_waiters ? 0 : platform::kMoveModeDontWake);
}

void AddressSpace::Impl::wake(VirtAddr start, std::size_t pages) {
  // Pairs with wait_entry_unlocked: either it sees the entry unlocked, or
  // this sees it asleep.  A read-modify-write reads the latest count, and
  // one that reads 0 comes before the sleeper's increment, which then
  // sees the unlock that came before it.  (A fence would do, but
  // ThreadSanitizer does not model fences.)
  if (entry_sleepers.fetch_add(0, std::memory_order_seq_cst) != 0) {
    entry_wakeups.fetch_add(1, std::memory_order_seq_cst);
    platform::futex_wake_all(entry_wakeups);
  }
  // In SIGBUS mode no access ever sleeps in the kernel.
  if (options.fault_mode == FaultMode::kInThread) return;
  (void)uffd.wake(start, pages * kPageSize);
}

void AddressSpace::Impl::as_empty_block(VirtAddr block) {
  // With CONFIG_PT_RECLAIM (Linux >= 6.14) MADV_DONTNEED frees the empty
  // page table, so a huge page can then move in as one entry; elsewhere it
  // changes nothing.
  stats.add(Counter::empty_table_zaps);
  zap_own(block, kHugePageSize);
}

void AddressSpace::Impl::clear_poison(VirtAddr addr) {
  // MADV_DONTNEED zaps the poison marker.
  zap_own(addr, kPageSize);
}

void AddressSpace::Impl::unlock_and_wake(mm::EntrySlot& slot, PageEntry after, VirtAddr addr) {
  if (mm::unlock_entry(slot, after)) wake(addr, 1);
}

void AddressSpace::Impl::evict_device_pages(VirtAddr start, VirtAddr end) {
  restore_exclusive_pages(start, end);
  std::vector<Vpn> device_vpns;
  table.for_each_populated(start.vpn(), (end - start) / kPageSize, [&](Vpn v, PageEntry e) {
    if (e.state() == PageState::kDevicePrivate) device_vpns.push_back(v);
  });
  for (Vpn v : device_vpns) {
    mm::EntrySlot* slot = table.slot(v, false);
    for (int attempt = 0; slot != nullptr && attempt < 1000; ++attempt) {
      PageEntry e{slot->load(std::memory_order_acquire)};
      if (e.state() != PageState::kDevicePrivate) break;
      if (e.locked()) {
        std::this_thread::yield();
        continue;
      }
      const std::optional<FaultOutcome> outcome = call_migrate_to_ram(*slot, e, VirtAddr::from_vpn(v), false);
      wake(start, (end - start) / kPageSize);  // finalize leaves waking to fault paths
      if (outcome && *outcome != FaultOutcome::kOk) break;  // teardown drops it; the device failed
    }
  }
}

void AddressSpace::Impl::teardown_region(mm::Region& region) {
  while (region.users.load(std::memory_order_acquire) != 0) std::this_thread::yield();
  const VirtAddr start = region.info.start;
  const std::uint64_t npages = region.info.length / kPageSize;
  drop_entries(start, region.info.end());
  (void)uffd.unregister_range(start, region.info.length);
  if (!region.info.adopted) {
    (void)platform::unmap(start, region.info.length);
  } else {
    // Device-resident pages that could not come back are holes now; wake
    // anything still asleep on the range so it re-faults normally.
    wake(start, npages);
  }
}

// ---- AddressSpace ----------------------------------------------------------

AddressSpace::AddressSpace(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) { impl_->self = this; }

Result<std::unique_ptr<AddressSpace>> AddressSpace::create(AddressSpaceOptions options) {
  auto impl = std::make_unique<Impl>(options);
  std::unique_ptr<AddressSpace> as(new AddressSpace(std::move(impl)));
  if (Status s = as->impl_->init(); !s) return s;
  return as;
}

AddressSpace::~AddressSpace() {
  // Nothing may touch managed memory any more (the destructor's contract),
  // so the fault service goes first: its threads end before the ranges do,
  // and no thread exit races with the unmapping below.  Bringing device
  // pages of adopted ranges back calls migrate_to_ram directly.
  impl_->unregister_for_fork();
  if (impl_->forked_child) {
    // The parent's object, inherited: its threads do not exist here, and its
    // userfaultfds still act on the parent's memory.  Touch neither.
    impl_->abandon_in_child();
    return;
  }
  // Caches still open write their mappings back and let go of this object
  // while the fault service and the event worker can still serve them.
  impl_->close_backends();
  impl_->stop_fault_service();
  if (impl_->options.fault_mode == FaultMode::kInThread) impl_->unregister_in_thread();
  {
    // The whole address space goes: every mirror drops everything.
    mm::ScopedInvalidation release(impl_->notifiers,
                                   NotifyRange{VirtAddr{0}, VirtAddr{~std::uintptr_t{0}}, NotifyEvent::kRelease});
  }
  std::vector<std::uintptr_t> starts;
  {
    ReaderLock lock(impl_->regions_mutex);
    for (const auto& [start, region] : impl_->regions) starts.push_back(start);
  }
  for (std::uintptr_t s : starts) (void)impl_->unmap_region(VirtAddr{s}, /*backed_ok=*/true);
}

static Status check_length(std::size_t length) {
  if (length == 0) return Status::error(EINVAL, "zero length");
  if (length % kPageSize != 0) return Status::error(EINVAL, "length not a multiple of the page size");
  return Status::ok();
}

Result<VirtAddr> AddressSpace::map(std::size_t length, int prot) {
  UHMM_TRY(check_length(length));
  if (prot != PROT_NONE && prot != PROT_READ && prot != (PROT_READ | PROT_WRITE))
    return Status::error(EINVAL, "protection must be PROT_NONE, PROT_READ or PROT_READ|PROT_WRITE");
  const std::size_t align = length >= kHugePageSize ? kHugePageSize : kPageSize;
  auto addr = platform::map_anonymous_aligned(length, align, prot, /*noreserve=*/true);
  if (!addr) return addr.status();
  // Huge-fault windows (Impl::open_huge_fault_window) start closed, or open
  // for good when the application asks for transparent huge pages.  Closed
  // is MADV_NOHUGEPAGE rather than no advice: a closed window must mean the
  // same under the kernel's "always" as under "madvise".
  const bool huge_faults = impl_->options.transparent_huge_pages;
  if (length >= kHugePageSize && (huge_faults || impl_->huge_fault_windows))
    (void)platform::advise(*addr, length, huge_faults ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
  if (Status s = impl_->uffd.register_range(*addr, length, UFFDIO_REGISTER_MODE_MISSING); !s) {
    (void)platform::unmap(*addr, length);
    return s;
  }
  impl_->settle_events_in(*addr, *addr + length);
  auto region = std::make_shared<mm::Region>();
  region->info = RegionInfo{*addr, length, RegionKind::kPrivateAnonymous, prot, false};
  region->huge_faults.store(huge_faults && impl_->huge_fault_windows && length >= kHugePageSize);
  WriterLock lock(impl_->regions_mutex);
  impl_->regions.emplace(addr->value, std::move(region));
  return *addr;
}

void AddressSpace::Impl::attach_backend(std::weak_ptr<mm::RegionBackend> owner) {
  MutexLock lock(backends_mutex);
  attached_backends.push_back(std::move(owner));
}

void AddressSpace::Impl::detach_backend(const mm::RegionBackend* owner) {
  MutexLock lock(backends_mutex);
  std::erase_if(attached_backends, [&](const std::weak_ptr<mm::RegionBackend>& w) {
    const auto live = w.lock();
    return live == nullptr || live.get() == owner;
  });
}

void AddressSpace::Impl::close_backends() {
  std::vector<std::shared_ptr<mm::RegionBackend>> live;
  {
    MutexLock lock(backends_mutex);
    for (const auto& w : attached_backends)
      if (auto b = w.lock()) live.push_back(std::move(b));
    attached_backends.clear();
  }
  for (const auto& b : live) b->address_space_closing();
}

Result<VirtAddr> AddressSpace::Impl::map_backed(int fd, std::uint64_t offset, std::size_t length, int prot,
                                                RegionKind kind, bool track_writes,
                                                std::shared_ptr<mm::RegionBackend> backend) {
  UHMM_TRY(check_length(length));
  if (forked_child) return Status::error(ECHILD, "this address space belongs to the parent process");
  if (track_writes && !shared_write_tracking)
    return Status::error(ENOSYS, "the kernel lacks asynchronous write-protection of shared memory (Linux >= 6.7)");
  void* p = ::mmap(nullptr, length, prot, MAP_SHARED, fd, static_cast<off_t>(offset));
  if (p == MAP_FAILED) return Status::error(errno, "mmap: " + platform::errno_text(errno));
  const VirtAddr addr{reinterpret_cast<std::uintptr_t>(p)};
  auto fail = [&](Status s) {
    (void)platform::unmap(addr, length);
    return s;
  };
  // A forked child would share the pages but not the registration: a page
  // uhmm later moves (or the cache drops) would silently differ between
  // the two.  The child gets no mapping at all instead.
  if (Status s = platform::advise(addr, length, MADV_DONTFORK); !s) return fail(s);
  // Minor faults too: an access to a page the object holds but this
  // mapping does not map (another mapping read it in, or the cache took it
  // from every mapping to move it) reaches the backend.
  const std::uint64_t mode = UFFDIO_REGISTER_MODE_MISSING | (track_writes ? UFFDIO_REGISTER_MODE_WP : 0) |
                             (shared_write_tracking ? UFFDIO_REGISTER_MODE_MINOR : 0);
  if (Status s = uffd.register_range(addr, length, mode); !s) return fail(s);
  if (track_writes) {
    // Every page starts protected, present or not (markers in empty slots):
    // what the first scan calls written was written through this mapping.
    std::vector<std::pair<VirtAddr, VirtAddr>> ignored;
    if (Status s = platform::scan_written(addr, length, /*reprotect=*/true, &ignored); !s) {
      (void)uffd.unregister_range(addr, length);
      return fail(s);
    }
  }
  settle_events_in(addr, addr + length);
  auto region = std::make_shared<mm::Region>();
  region->info = RegionInfo{addr, length, kind, prot, false};
  region->backend = std::move(backend);
  region->backend_offset = offset;
  WriterLock lock(regions_mutex);
  regions.emplace(addr.value, std::move(region));
  return addr;
}

Status AddressSpace::adopt(VirtAddr start, std::size_t length) {
  UHMM_TRY(check_length(length));
  if (!start.page_aligned()) return Status::error(EINVAL, "start not page aligned");
  if (start.value + length < start.value) return Status::error(EINVAL, "range wraps around");
  impl_->settle_events_in(start, start + length);  // an old range's munmap at these addresses goes first
  int prot = 0;
  if (!platform::is_private_anonymous_mapping(start, length, &prot))
    return Status::error(EINVAL, "not one private anonymous mapping");
  if (prot != (PROT_READ | PROT_WRITE)) return Status::error(EINVAL, "adopted mappings must be read-write");
  // The application's choice of page size for its mapping, as it stands now
  // (a later madvise raises no event uhmm could see).
  const bool no_huge_pages = platform::mapping_has_flag(start, "nh").value_or(false);
  WriterLock lock(impl_->regions_mutex);
  auto next = impl_->regions.lower_bound(start.value);
  if (next != impl_->regions.end() && next->first < start.value + length)
    return Status::error(EBUSY, "overlaps a managed range");
  if (next != impl_->regions.begin() && std::prev(next)->second->info.end() > start)
    return Status::error(EBUSY, "overlaps a managed range");
  // Learn which pages the application already populated.  A fork before
  // the adoption may have left them shared copy-on-write (uhmm cannot tell):
  // marked so that a migration un-shares them before moving them.
  std::vector<unsigned char> resident(length / kPageSize);
  UHMM_TRY(platform::resident_pages(start, length, resident.data()));
  for (std::size_t i = 0; i < resident.size(); ++i) {
    if (resident[i] & 1)
      impl_->table.slot(start.vpn() + i, true)->store(PageEntry::system().with(PageEntry::kForkShared).bits());
  }
  UHMM_TRY(impl_->uffd.register_range(start, length, UFFDIO_REGISTER_MODE_MISSING));
  impl_->table.note_kernel_table_maybe(start.vpn(), length / kPageSize);  // the application's own tables
  auto region = std::make_shared<mm::Region>();
  region->info = RegionInfo{start, length, RegionKind::kPrivateAnonymous, prot, true};
  region->info.no_huge_pages = no_huge_pages;
  impl_->regions.emplace(start.value, std::move(region));
  return Status::ok();
}

Status AddressSpace::unmap(VirtAddr start) { return impl_->unmap_region(start, /*backed_ok=*/false); }

Status AddressSpace::Impl::unmap_region(VirtAddr start, bool backed_ok) {
  std::shared_ptr<mm::Region> region;
  {
    ReaderLock lock(regions_mutex);
    auto it = regions.find(start.value);
    if (it == regions.end()) return Status::error(EINVAL, "no managed range starts here");
    region = it->second;
  }
  // The owner of a backed range writes its pages back first; unmapped from
  // here, what the page tables knew about written pages would be lost.
  if (region->backend && !backed_ok)
    return Status::error(EINVAL, "a shared or file-backed range is unmapped through its FileCache");
  if (region->closing.exchange(true)) return Status::error(EBUSY, "range already being unmapped");
  if (region->info.adopted) evict_device_pages(region->info.start, region->info.end());
  // Mirrors drop the range before it goes.
  mm::ScopedInvalidation invalidation(notifiers,
                                      NotifyRange{region->info.start, region->info.end(), NotifyEvent::kUnmap});
  {
    WriterLock lock(regions_mutex);
    regions.erase(start.value);
  }
  teardown_region(*region);
  return Status::ok();
}

Status AddressSpace::protect(VirtAddr start, std::size_t length, int prot) {
  if (impl_->forked_child) return Status::error(ECHILD, "this address space belongs to the parent process");
  UHMM_TRY(check_length(length));
  if (!start.page_aligned()) return Status::error(EINVAL, "start not page aligned");
  if (prot != PROT_NONE && prot != PROT_READ && prot != (PROT_READ | PROT_WRITE))
    return Status::error(EINVAL, "protection must be PROT_NONE, PROT_READ or PROT_READ|PROT_WRITE");
  const VirtAddr end = start + length;
  std::shared_ptr<mm::Region> region;
  {
    ReaderLock lock(impl_->regions_mutex);
    auto it = impl_->regions.upper_bound(start.value);
    if (it != impl_->regions.begin()) {
      --it;
      if (it->second->contains(start) && end <= it->second->info.end()) region = it->second;
    }
  }
  if (!region) return Status::error(EINVAL, "range not inside one managed range");
  if (region->backend) return Status::error(EINVAL, "shared and file-backed ranges keep the protection they were mapped with");
  // Exclusive pages come back first: the kernel moves frames only between
  // mappings of one protection, and the device would lose its access to
  // them below anyway.
  if (prot != (PROT_READ | PROT_WRITE)) impl_->restore_exclusive_pages(start, end);
  // Mirrors drop the range first: the next device fault sees the new
  // protection (hmm_range_fault: EPERM for a write, ERROR/EFAULT for none).
  mm::ScopedInvalidation invalidation(impl_->notifiers, NotifyRange{start, end, NotifyEvent::kProtectionVma});
  if (::mprotect(start.ptr(), length, prot) != 0)
    return Status::error(errno, "mprotect: " + platform::errno_text(errno));
  impl_->table.note_kernel_table_maybe(start.vpn(), length / kPageSize);  // a huge page split at the edge
  // Device entries of a range that is no longer writable lose the write bit,
  // as the kernel downgrades its device-private entries.
  if (!(prot & PROT_WRITE)) {
    impl_->table.for_each_populated(start.vpn(), length / kPageSize, [&](Vpn v, PageEntry e) {
      if (!e.holds_device_page() || !e.device_writable()) return;
      mm::EntrySlot* slot = impl_->table.slot(v, false);
      PageEntry before;
      while (!mm::try_lock_entry(*slot, &before)) std::this_thread::yield();
      impl_->unlock_and_wake(*slot, before.settled().without(PageEntry::kDeviceWrite), VirtAddr::from_vpn(v));
    });
  }
  // The region splits where the protection changes.
  WriterLock lock(impl_->regions_mutex);
  auto it = impl_->regions.find(region->info.start.value);
  if (it == impl_->regions.end() || it->second != region) return Status::ok();  // changed meanwhile
  impl_->regions.erase(it);
  const std::tuple<VirtAddr, VirtAddr, int> pieces[3] = {
      {region->info.start, start, region->info.prot}, {start, end, prot}, {end, region->info.end(), region->info.prot}};
  for (const auto& [s, e, p] : pieces) {
    if (e <= s) continue;
    auto part = std::make_shared<mm::Region>();
    part->info = region->info;
    part->info.start = s;
    part->info.length = e - s;
    part->info.prot = p;
    impl_->regions.emplace(s.value, std::move(part));
  }
  // Neighbours that end up alike merge again, as the kernel merges VMAs:
  // restoring a protection gives back one range.
  auto alike = [](const RegionInfo& a, const RegionInfo& b) {
    return a.end() == b.start && a.prot == b.prot && a.kind == b.kind && a.adopted == b.adopted;
  };
  auto at = impl_->regions.lower_bound(region->info.start.value);
  if (at != impl_->regions.begin()) --at;
  while (at != impl_->regions.end()) {
    auto next = std::next(at);
    if (next == impl_->regions.end() || next->first > region->info.end().value) break;
    if (!alike(at->second->info, next->second->info)) {
      at = next;
      continue;
    }
    auto merged = std::make_shared<mm::Region>();
    merged->info = at->second->info;
    merged->info.length += next->second->info.length;
    impl_->regions.erase(next);
    at->second = std::move(merged);
  }
  return Status::ok();
}

std::optional<RegionInfo> AddressSpace::find_region(VirtAddr addr) const {
  ReaderLock lock(impl_->regions_mutex);
  auto it = impl_->regions.upper_bound(addr.value);
  if (it == impl_->regions.begin()) return std::nullopt;
  --it;
  if (!it->second->contains(addr)) return std::nullopt;
  return it->second->info;
}

PageInfo AddressSpace::page_info(VirtAddr addr) const {
  const PageEntry e = impl_->table.load(addr.vpn());
  PageInfo info;
  info.state = e.state();
  info.locked = e.locked();
  info.writable = e.device_writable();
  info.poisoned = e.poisoned();
  if (e.holds_device_page()) info.device_page = e.device_page();
  return info;
}

namespace {
// process_vm_readv/writev on this process: a kernel-mode access.  With
// service threads, device-resident pages fault back like for any syscall;
// in SIGBUS mode the kernel reports EFAULT instead, and `fault_in` serves
// the page in this thread before the copy goes on.
template <class Syscall>
Status copy_self(AddressSpace::Impl& impl, Syscall&& call, std::byte* local_buf, VirtAddr remote_addr,
                 std::size_t len, bool write, const char* what) {
  const bool in_thread = impl.options.fault_mode == FaultMode::kInThread;
  std::size_t done = 0;
  unsigned stalls = 0;
  while (done < len) {
    struct iovec local {
      local_buf + done, len - done
    };
    struct iovec remote {
      (remote_addr + done).ptr(), len - done
    };
    const ssize_t n = call(::getpid(), &local, 1, &remote, 1, 0);
    const int err = errno;
    if (n > 0) done += static_cast<std::size_t>(n);
    if (done == len) break;
    // Fault the page in and go on; a page that migrates away again before
    // the copy reaches it gets a few more chances.
    stalls = n > 0 ? 0 : stalls + 1;
    if (!in_thread || stalls > 8 ||
        impl.fault_in((remote_addr + done).page_down(), write) != AddressSpace::Impl::FaultResult::kResolved)
      return Status::error(EFAULT, std::string(what) + " of managed memory failed: " + platform::errno_text(err));
  }
  return Status::ok();
}
}  // namespace

Status AddressSpace::read(VirtAddr src, std::span<std::byte> out) const {
  return copy_self(*impl_, ::process_vm_readv, out.data(), src, out.size(), false, "read");
}

Status AddressSpace::write(VirtAddr dst, std::span<const std::byte> in) const {
  return copy_self(*impl_, ::process_vm_writev, const_cast<std::byte*>(in.data()), dst, in.size(), true, "write");
}

Stats& AddressSpace::stats() { return impl_->stats; }
const Stats& AddressSpace::stats() const { return impl_->stats; }

std::size_t AddressSpace::overhead_bytes() const {
  return impl_->table.bytes() + impl_->staging.ready_pages() * kPageSize;
}

void AddressSpace::await_changes() const {
  impl_->await_returned_changes(VirtAddr{0}, VirtAddr{~std::uintptr_t{0}});
}

Status AddressSpace::check_invariants() const {
  // Processing a change locks the entries it touches, like a migration.
  await_changes();
  // A device may still be finishing a migration of its own (a prefetch
  // that a fault queued), whose entries and staging slots are held.
  for (int i = 0; i < 2000 && impl_->migrations_in_flight.load(std::memory_order_acquire) != 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  if (impl_->migrations_in_flight.load(std::memory_order_acquire) != 0)
    return Status::error(EBUSY, "a migration is still running");
  std::vector<std::shared_ptr<mm::Region>> regions;
  {
    ReaderLock lock(impl_->regions_mutex);
    for (const auto& [s, r] : impl_->regions) regions.push_back(r);
  }
  // Staging slots are taken only by migrations in progress and by the
  // frames of exclusive pages.
  std::size_t held_frames = 0;
  for (const auto& r : regions) {
    Status bad;
    impl_->table.for_each_populated(r->info.start.vpn(), r->info.length / kPageSize, [&](Vpn v, PageEntry e) {
      if (!bad.is_ok()) return;
      const VirtAddr a = VirtAddr::from_vpn(v);
      if (e.locked()) {
        bad = Status::error(EINVAL, "entry locked with no migration running");
        return;
      }
      if (e.holds_device_page()) {
        DevicePage* page = e.device_page();
        if (page == nullptr) {
          bad = Status::error(EINVAL, "device entry without a page");
          return;
        }
        if ((page->pagemap().type() == PagemapType::kCoherent) != (e.state() == PageState::kDeviceCoherent)) {
          bad = Status::error(EINVAL, "device entry state disagrees with its page map's type");
          return;
        }
        if (page->refcount() == 0) bad = Status::error(EINVAL, "device entry names a free page");
        const auto m = page->mapping();
        if (m.address_space != this || m.address != a)
          bad = Status::error(EINVAL, "device page reverse map disagrees with the page table");
        if (page->is_locked()) bad = Status::error(EINVAL, "device page locked with no migration running");
        if (e.device_writable() && !(r->info.prot & PROT_WRITE))
          bad = Status::error(EINVAL, "writable device entry in a read-only range");
      }
      if (e.state() == PageState::kDeviceExclusive) ++held_frames;
    });
    if (!bad.is_ok()) return bad;
  }
  if (impl_->staging.taken_pages() != held_frames)
    return Status::error(EINVAL, "staging pages still taken with no migration running");
  return Status::ok();
}

}  // namespace uhmm
