// mm: hmm_range_fault, the mirroring walk (hmm-semantics section 4).  How a
// driver uses it with interval notifiers, and the per-page table of
// requests and results: docs/mirroring.md.
//
// The walk reads the software page table only (no system call per page):
// one region look-up per managed range crossed, one leaf look-up per 512
// pages (PageTable::for_each_populated), then one word per page.  When a
// page needs a fault (or a migration holding it must be waited out), the
// walk stops there, drops its region pin, serves the fault in the calling
// thread with AddressSpace::Impl::fault_in (exactly what a CPU access would
// do), checks the notifier sequence and goes on from that page, as the
// kernel's walk does.
//
// Locks: regions_mutex (shared) only to find and pin the next region; the
// walk itself takes none and never takes an entry lock (a migration that
// met a locked entry would skip the page).  Faults run with no lock held.
#include <sys/mman.h>

#include <algorithm>

#include "core/sync.hpp"
#include "mm/address_space_impl.hpp"
#include "uhmm/device_memory.hpp"
#include "uhmm/hmm.hpp"
#include "uhmm/notifier.hpp"

namespace uhmm {

using mm::PageEntry;
using mm::PageState;

DevicePage* hmm_pfn_to_device_page(std::uint64_t hmm_pfn) {
  if (!(hmm_pfn & HMM_PFN_VALID)) return nullptr;
  const std::uint64_t pfn = hmm_pfn_to_pfn(hmm_pfn);
  if (!is_device_pfn(pfn)) return nullptr;
  return DevicePagemap::page_from_pfn(DevicePfn{pfn});
}

void* hmm_pfn_to_host(std::uint64_t hmm_pfn) {
  if (!(hmm_pfn & HMM_PFN_VALID)) return nullptr;
  const std::uint64_t pfn = hmm_pfn_to_pfn(hmm_pfn);
  if (is_device_pfn(pfn)) return nullptr;
  return VirtAddr::from_vpn(Vpn{pfn}).ptr();
}

namespace {

/// What the driver asked for one page.
struct Request {
  bool fault = false;
  bool write = false;
};

Request request_of(const HmmRange& range, std::uint64_t entry) {
  const std::uint64_t req = (entry & range.pfn_flags_mask) | range.default_flags;
  return Request{(req & HMM_PFN_REQ_FAULT) != 0, (req & HMM_PFN_REQ_WRITE) != 0};
}

/// Whether any entry of [first, first + count) asks for a fault.
bool any_fault_requested(const HmmRange& range, std::uint64_t first, std::uint64_t count) {
  if (!((range.default_flags | range.pfn_flags_mask) & HMM_PFN_REQ_FAULT)) return false;
  for (std::uint64_t i = first; i < first + count; ++i)
    if (request_of(range, range.hmm_pfns[i]).fault) return true;
  return false;
}

/// The kernel's hmm_pte_need_fault: what the request needs, given what the
/// CPU has (`valid`: a page the device may read; `writable`: and write).
enum class Need { kNothing, kFault, kWriteFault };

Need need_fault(Request q, bool valid, bool writable) {
  if (!q.fault) return Need::kNothing;
  if (q.write && !writable) return Need::kWriteFault;
  if (!valid) return Need::kFault;
  return Need::kNothing;
}

/// Where the walk stopped.
struct Stop {
  enum Kind {
    kDone,   // every entry of the range is filled
    kFault,  // `addr` must be faulted in, then the walk goes on from it
    kWait,   // a migration holds `addr`: wait until it lets go, then go on from it
    kError,  // the walk fails with `code`
  };
  Kind kind = kDone;
  VirtAddr addr;
  bool write = false;
  int code = 0;
};

/// A stretch of the range: a pinned managed region, or (no pin) a gap
/// between regions, up to `end`.
struct Stretch {
  mm::RegionPin pin;
  VirtAddr end;
};

Stretch stretch_at(const AddressSpace::Impl& as, VirtAddr at, VirtAddr limit) {
  ReaderLock lock(as.regions_mutex);
  auto next = as.regions.upper_bound(at.value);
  if (next != as.regions.begin()) {
    const std::shared_ptr<mm::Region>& region = std::prev(next)->second;
    if (region->contains(at)) {
      region->users.fetch_add(1, std::memory_order_acq_rel);
      const VirtAddr end = region->info.end() < limit ? region->info.end() : limit;
      return Stretch{mm::RegionPin(region), end};
    }
  }
  const VirtAddr gap_end = (next == as.regions.end() || VirtAddr{next->first} > limit) ? limit : VirtAddr{next->first};
  return Stretch{mm::RegionPin(), gap_end};
}

class Walk {
 public:
  Walk(AddressSpace::Impl& as, HmmRange& range) : as_(as), range_(range) {}

  /// Whether the page of the last kFault stop is in memory now: a fault
  /// that leaves it out made no progress.
  bool fault_left_page_out(const PageEntry& after) const {
    if (fault_backend_) return fault_backend_->look_up(fault_offset_).kind == mm::RegionBackend::Look::kAbsent;
    return after.state() == PageState::kNone && !after.locked();
  }

  /// Fills entries from `from` to the end of the range, or stops at the
  /// first page that needs more than a look.
  Stop run(VirtAddr from) {
    fault_backend_.reset();
    VirtAddr at = from;
    while (at < range_.end) {
      Stretch s = stretch_at(as_, at, range_.end);
      // No managed mapping, or one the device may not read: ERROR, or
      // EFAULT if a fault was asked for anywhere in it.
      if (!s.pin || !(s.pin->info.prot & PROT_READ)) {
        const std::uint64_t first = index_of(at.vpn());
        const std::uint64_t count = (s.end - at) / kPageSize;
        if (any_fault_requested(range_, first, count)) return Stop{Stop::kError, at, false, EFAULT};
        std::fill_n(range_.hmm_pfns + first, count, std::uint64_t{HMM_PFN_ERROR});
      } else if (s.pin->backend) {
        const Stop stop = walk_backed(*s.pin, at, s.end);
        if (stop.kind != Stop::kDone) return stop;
      } else {
        const Stop stop = walk_region(*s.pin, at, s.end);
        if (stop.kind != Stop::kDone) return stop;
      }
      at = s.end;
    }
    return Stop{};
  }

 private:
  std::uint64_t index_of(Vpn vpn) const { return vpn - range_.start.vpn(); }

  Stop walk_region(const mm::Region& region, VirtAddr from, VirtAddr to) {
    writable_ = (region.info.prot & PROT_WRITE) != 0;
    const std::uint64_t last = to.vpn().value;
    std::uint64_t v = from.vpn().value;
    Stop stop;
    while (v < last && stop.kind == Stop::kDone) {
      // One leaf of the page table (512 pages) at a time, so that stopping
      // early never costs more than one leaf's scan.
      const std::uint64_t chunk_end = std::min(last, (v | (kPagesPerHugePage - 1)) + 1);
      std::uint64_t next = v;  // first page not looked at yet
      as_.table.for_each_populated(Vpn{v}, chunk_end - v, [&](Vpn vpn, PageEntry e) {
        if (stop.kind != Stop::kDone) return;
        for (; next < vpn.value && stop.kind == Stop::kDone; ++next) stop = look_at(Vpn{next}, PageEntry::none());
        if (stop.kind != Stop::kDone) return;
        stop = look_at(vpn, e);
        ++next;
      });
      for (; next < chunk_end && stop.kind == Stop::kDone; ++next) stop = look_at(Vpn{next}, PageEntry::none());
      v = chunk_end;
    }
    return stop;
  }

  /// A shared or file-backed range: its pages are the object's, and the
  /// object says where each is (docs/adr/0006-file-cache.md).
  Stop walk_backed(const mm::Region& region, VirtAddr from, VirtAddr to) {
    writable_ = (region.info.prot & PROT_WRITE) != 0;
    for (VirtAddr addr = from; addr < to; addr = addr + kPageSize) {
      std::uint64_t& out = range_.hmm_pfns[index_of(addr.vpn())];
      const Request q = request_of(range_, out);
      const std::uint64_t offset = region.backend_offset + (addr - region.info.start);
      const mm::RegionBackend::Look look = region.backend->look_up(offset);
      Need need = Need::kNothing;
      switch (look.kind) {
        case mm::RegionBackend::Look::kPresent:
          need = need_fault(q, true, writable_);
          if (need == Need::kNothing)
            out = addr.vpn().value | HMM_PFN_VALID | (writable_ ? std::uint64_t{HMM_PFN_WRITE} : 0);
          break;
        case mm::RegionBackend::Look::kDevice: {
          const DevicePagemap& map = look.page->pagemap();
          if (range_.dev_private_owner != nullptr && map.type() == PagemapType::kPrivate &&
              map.owner() == range_.dev_private_owner) {
            // The driver's own page: never faulted, unless a write is asked
            // of a page the device holds read-only (the first stage).
            const bool device_writable = look.device_writable && writable_;
            need = need_fault(q, true, device_writable);
            if (need == Need::kNothing)
              out = look.page->pfn().value | HMM_PFN_VALID | (device_writable ? std::uint64_t{HMM_PFN_WRITE} : 0);
          } else {
            need = need_fault(q, false, false);
            if (need == Need::kNothing) out = 0;
          }
          break;
        }
        case mm::RegionBackend::Look::kAbsent:
          need = need_fault(q, false, false);
          if (need == Need::kNothing) out = 0;
          break;
      }
      if (need == Need::kWriteFault && !writable_) return Stop{Stop::kError, addr, true, EPERM};
      if (need != Need::kNothing) {
        fault_backend_ = region.backend;
        fault_offset_ = offset;
        return Stop{Stop::kFault, addr, need == Need::kWriteFault, 0};
      }
    }
    return Stop{};
  }

  /// One page: stores its result, or says what must happen first.
  Stop look_at(Vpn vpn, PageEntry e) {
    std::uint64_t& out = range_.hmm_pfns[index_of(vpn)];
    const Request q = request_of(range_, out);
    const VirtAddr addr = VirtAddr::from_vpn(vpn);
    auto fault = [&](Need need) {
      if (need == Need::kWriteFault && !writable_) return Stop{Stop::kError, addr, true, EPERM};
      return Stop{Stop::kFault, addr, need == Need::kWriteFault, 0};
    };
    if (e.locked()) {
      // A migration owns the page (its data is in transit, or a hole is
      // being filled): not present for now.  The kernel's migration entry.
      if (!q.fault) {
        out = 0;
        return Stop{};
      }
      return Stop{Stop::kWait, addr, q.write, 0};
    }
    switch (e.state()) {
      case PageState::kSystem: {
        // A page the application dropped behind uhmm's back
        // (MADV_DONTNEED) says kSystem, and is reported present, until uhmm
        // has processed the change; the CLEAR invalidation that processing
        // raises is what tells the driver (read_retry).
        // docs/address-space-events.md.
        const Need need = need_fault(q, true, writable_);
        if (need != Need::kNothing) return fault(need);  // a write asked of a read-only range: EPERM
        out = vpn.value | HMM_PFN_VALID | (writable_ ? std::uint64_t{HMM_PFN_WRITE} : 0);
        return Stop{};
      }
      case PageState::kDevicePrivate: {
        // The entry holds a reference on the page, so its descriptor stays
        // valid for this look (the fault path reads it the same way).
        const DevicePage* page = e.device_page();
        const DevicePagemap& map = page->pagemap();
        if (range_.dev_private_owner != nullptr && map.type() == PagemapType::kPrivate &&
            map.owner() == range_.dev_private_owner) {
          // The driver's own page: its device pfn, never faulted (even if
          // the CPU could not get it back: the device still has the data).
          out = page->pfn().value | HMM_PFN_VALID | (e.device_writable() ? std::uint64_t{HMM_PFN_WRITE} : 0);
          return Stop{};
        }
        const Need need = need_fault(q, false, false);
        if (need == Need::kNothing) {
          out = 0;
          return Stop{};
        }
        if (need == Need::kWriteFault && !writable_) return fault(need);
        // The owner could not bring it back before (the CPU gets SIGBUS):
        // faulting again cannot succeed.
        if (e.poisoned()) return Stop{Stop::kError, addr, false, EFAULT};
        return fault(need);
      }
      case PageState::kDeviceCoherent: {
        // Mapped for the CPU like a system page, so present for every
        // device alike: its device pfn (where a device reaches it), never
        // faulted.  Only a write asked of a read-only range needs more
        // (EPERM).  The entry's reference keeps the descriptor valid.
        const Need need = need_fault(q, true, writable_);
        if (need != Need::kNothing) return fault(need);
        out = e.device_page()->pfn().value | HMM_PFN_VALID | (writable_ ? std::uint64_t{HMM_PFN_WRITE} : 0);
        return Stop{};
      }
      case PageState::kDeviceExclusive:
        // A device's exclusive entry, whoever's: not present for this
        // walk; faulting it in revokes the device's access (as for a hole,
        // below).
      case PageState::kNone:
        break;
    }
    const Need need = need_fault(q, false, false);
    if (need == Need::kNothing) {
      out = 0;
      return Stop{};
    }
    return fault(need);
  }

  AddressSpace::Impl& as_;
  HmmRange& range_;
  bool writable_ = false;  // of the region being walked
  // A kFault stop in a shared or file-backed range: the object (kept alive
  // past the walk's pin) and the page's offset in it.
  std::shared_ptr<mm::RegionBackend> fault_backend_;
  std::uint64_t fault_offset_ = 0;
};

/// Waits until the entry of `addr` is unlocked, politely (the migration
/// holding it may take a while: a DMA copy).  Waiting, not faulting: what
/// the migration leaves behind (the driver's own device page, say) must be
/// looked at again, not brought back.
void wait_unlocked(AddressSpace::Impl& as, VirtAddr addr) { as.wait_entry_unlocked(addr); }

Status check(const HmmRange& range) {
  if (range.address_space == nullptr) return Status::error(EINVAL, "hmm_range_fault: no address space");
  if (range.hmm_pfns == nullptr) return Status::error(EINVAL, "hmm_range_fault: no hmm_pfns array");
  if (!range.start.page_aligned() || !range.end.page_aligned())
    return Status::error(EINVAL, "hmm_range_fault: range not page aligned");
  if (range.end <= range.start) return Status::error(EINVAL, "hmm_range_fault: empty range");
  return Status::ok();
}

}  // namespace

Status hmm_range_fault(HmmRange& range) {
  UHMM_TRY(check(range));
  AddressSpace::Impl& as = range.address_space->impl();
  Walk walk(as, range);
  VirtAddr from = range.start;
  // Consecutive faults on one page that left it unpopulated (a zero-fill
  // that failed for want of memory).
  unsigned fruitless = 0;
  for (;;) {
    // The kernel's mmu_interval_check_retry: a walk that an invalidation
    // overtook is stale whatever it finds; the driver must start over with
    // a new read_begin().  Checked before every (re)start of the walk.
    if (range.notifier != nullptr && range.notifier->check_retry(range.notifier_seq))
      return Status::error(EBUSY, "hmm_range_fault: the range was invalidated since read_begin");
    const Stop stop = walk.run(from);
    switch (stop.kind) {
      case Stop::kDone:
        return Status::ok();
      case Stop::kError:
        return Status::error(stop.code, stop.code == EPERM ? "hmm_range_fault: write asked of a read-only range"
                                                           : "hmm_range_fault: no usable page at an address asked for");
      case Stop::kWait:
        wait_unlocked(as, stop.addr);
        fruitless = 0;
        break;
      case Stop::kFault: {
        // The CPU's own fault path, in this thread: zero-fills a hole,
        // calls the owner's migrate_to_ram for a device page, waits out a
        // migration.  kNotManaged: the range went away meanwhile, which the
        // walk will now see.
        const auto result = as.fault_in(stop.addr, stop.write);
        if (result == AddressSpace::Impl::FaultResult::kFailed)
          return Status::error(EFAULT, "hmm_range_fault: the device could not bring a page back");
        const PageEntry after = as.table.load(stop.addr.vpn());
        if (result == AddressSpace::Impl::FaultResult::kResolved && walk.fault_left_page_out(after)) {
          if (++fruitless >= 3) return Status::error(ENOMEM, "hmm_range_fault: cannot populate a page");
        } else {
          fruitless = 0;
        }
        break;
      }
    }
    from = stop.addr;
  }
}

}  // namespace uhmm
