// uhmm/hmm.hpp: mirroring a range of an address space into a device page
// table (the kernel's hmm_range_fault), with the kernel's encodings.
//
// A driver that lets its device use process memory in place (shared virtual
// memory) asks, for a range of virtual pages, where each page is: a system
// page the device can reach, one of the device's own device-private pages,
// or nothing yet.  hmm_range_fault answers with one word per page and, where
// the driver asks for it, first faults the page in for the CPU (zero-filling
// a hole, bringing another device's page back through its migrate_to_ram).
// The answer is only a snapshot: it must be paired with an interval
// notifier (uhmm/notifier.hpp) and its sequence protocol before the driver
// programs its device.  How a driver mirrors, step by step, with the
// per-page table of inputs and outputs: docs/mirroring.md.  The sequence
// protocol itself: docs/notifiers.md.
//
// Glossary:
//   request   what the driver wants for one page, computed per entry as
//             (hmm_pfns[i] & pfn_flags_mask) | default_flags.  Request bits
//             are HmmPfnRequest values.
//   result    what hmm_range_fault writes back into hmm_pfns[i]: result
//             flags (HmmPfnFlag values), a map order, and a pfn.
//   pfn       for a device-private page of `dev_private_owner`, and for
//             any device-coherent page: its device pfn (>= kDevicePfnBase;
//             a coherent page is also at its virtual address for the CPU).
//             For a system page: in uhmm, the virtual page number of the
//             page itself (the device reaches system memory through the
//             process's own mapping; a real driver would DMA-map that
//             address).  is_device_pfn() tells them apart.
//
// Concurrency contract: hmm_range_fault may be called from any thread
// except uhmm's own (fault service, DMA workers) and except from an
// interval notifier's invalidate() callback, and *without any driver lock
// held*: when it faults a page in it may call a page map's migrate_to_ram
// (which takes that driver's locks and raises invalidations whose callbacks
// take them too) and it waits for migrations in progress to end, so it
// must also not be called by a thread that holds a migration of the range
// (between migrate_vma_setup and migrate_vma_finalize): it would wait for
// itself.  Several calls may run at once, on overlapping ranges too.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>

#include "uhmm/status.hpp"
#include "uhmm/types.hpp"

namespace uhmm {

class AddressSpace;
class DevicePage;
class IntervalNotifier;

/// Result flags of an hmm_pfns[] entry (the kernel's enum hmm_pfn_flags,
/// output side).  Bits 53-57 hold the map order, bits 0-52 the pfn.
enum HmmPfnFlag : std::uint64_t {
  /// The entry names a page the device may read (the pfn is meaningful).
  HMM_PFN_VALID = std::uint64_t{1} << 63,
  /// The device may also write the page.
  HMM_PFN_WRITE = std::uint64_t{1} << 62,
  /// No usable mapping here (outside every managed range, or PROT_NONE) and
  /// no fault was requested.  Nothing else in the entry is meaningful.
  HMM_PFN_ERROR = std::uint64_t{1} << 61,
};

/// Request flags of an hmm_pfns[] entry (input side).  Their values are the
/// kernel's, equal to VALID and WRITE, so one array carries both directions;
/// they are a type of their own so that code says which side it means.
enum HmmPfnRequest : std::uint64_t {
  /// Fault the page in for the CPU if it is not present (or is another
  /// owner's device page), so that the result is VALID.
  HMM_PFN_REQ_FAULT = HMM_PFN_VALID,
  /// With REQ_FAULT: the result must also be WRITE (a write fault if not).
  HMM_PFN_REQ_WRITE = HMM_PFN_WRITE,
};

/// The map order: log2 of the number of pages of the CPU mapping the page
/// belongs to (9 for a 2 MiB mapping), 5 bits from here.
inline constexpr unsigned HMM_PFN_ORDER_SHIFT = 53;
inline constexpr std::uint64_t HMM_PFN_ORDER_MASK = std::uint64_t{0x1f} << HMM_PFN_ORDER_SHIFT;
/// Every bit that is not the pfn.
inline constexpr std::uint64_t HMM_PFN_FLAGS = ~((std::uint64_t{1} << HMM_PFN_ORDER_SHIFT) - 1);

/// The pfn of a result entry (meaningful when HMM_PFN_VALID is set).
constexpr std::uint64_t hmm_pfn_to_pfn(std::uint64_t hmm_pfn) { return hmm_pfn & ~HMM_PFN_FLAGS; }
/// The map order of a result entry.  uhmm always reports 0 (see
/// docs/mirroring.md): a device mapping 4 KiB granules is always correct.
constexpr unsigned hmm_pfn_to_map_order(std::uint64_t hmm_pfn) {
  return static_cast<unsigned>((hmm_pfn & HMM_PFN_ORDER_MASK) >> HMM_PFN_ORDER_SHIFT);
}
/// The device page a VALID result entry names, or nullptr (not VALID, or a
/// system page).
DevicePage* hmm_pfn_to_device_page(std::uint64_t hmm_pfn);
/// The host address of the system page a VALID result entry names (in uhmm
/// the page's own virtual address), or nullptr (not VALID, or a device page).
void* hmm_pfn_to_host(std::uint64_t hmm_pfn);

/// One mirroring request (the kernel's struct hmm_range).
struct HmmRange {
  AddressSpace* address_space = nullptr;
  /// The subscription covering [start, end), or nullptr (no EBUSY check).
  IntervalNotifier* notifier = nullptr;
  /// What notifier->read_begin() returned before this walk.
  std::uint64_t notifier_seq = 0;
  VirtAddr start;  // page aligned
  VirtAddr end;    // page aligned, > start; may span several managed ranges and the gaps between them
  /// (end - start) / kPageSize entries, caller owned: requests in, results out.
  std::uint64_t* hmm_pfns = nullptr;
  /// Request bits applied to every entry.
  std::uint64_t default_flags = 0;
  /// Which request bits of each entry count (0: only default_flags does).
  std::uint64_t pfn_flags_mask = 0;
  /// The driver's page-map owner: device-private pages of this owner are
  /// reported with their device pfn and never faulted.
  const void* dev_private_owner = nullptr;
};

/// Fills range.hmm_pfns for [range.start, range.end) (the kernel's
/// hmm_range_fault).  Per page, with request r = (entry & pfn_flags_mask) |
/// default_flags:
///   present system page           pfn | VALID (| WRITE if the range is writable)
///   device page of dev_private_owner  device pfn | VALID (| WRITE), never faulted
///   device-coherent page (any owner)  device pfn | VALID (| WRITE if the range
///                                 is writable), never faulted: it is mapped
///   hole, another owner's device page, page under migration
///   (a poisoned page: EFAULT when a fault is asked for)
///                                 0 without REQ_FAULT; with it the page is
///                                 faulted in (a migration is waited out) and
///                                 looked at again
///   outside every managed range, or PROT_NONE
///                                 ERROR without REQ_FAULT; EFAULT with it
/// Returns ok, or
///   EBUSY   range.notifier's sequence moved since range.notifier_seq
///           (checked at the start and after every fault or wait): the walk
///           is stale; call read_begin() again and retry;
///   EFAULT  a page asked for could not be faulted in: no usable mapping,
///           or the device cannot bring it back (a failed migrate_to_ram);
///   EPERM   REQ_FAULT | REQ_WRITE on a page of a read-only range (the
///           driver's own device pages excepted: they are never faulted);
///   ENOMEM  a hole could not be populated (its zero-fill keeps failing);
///   EINVAL  no address space, no array, an unaligned or empty range.
/// Entries past the page that ended the walk with an error are left as they
/// were.  Must be called without driver locks held (see the header comment).
Status hmm_range_fault(HmmRange& range);

/// A page just handed to a device for exclusive access (make_device_exclusive's
/// answer), still locked: nothing can revoke the device's access before
/// the driver has mapped the page in its page table and unlocked it (the
/// kernel returns the page locked for the same reason).  Move-only; the
/// destructor unlocks.
class DeviceExclusivePage {
 public:
  DeviceExclusivePage() = default;
  DeviceExclusivePage(AddressSpace& as, VirtAddr address, std::byte* memory)
      : as_(&as), address_(address), memory_(memory) {}
  DeviceExclusivePage(DeviceExclusivePage&& o) noexcept
      : as_(std::exchange(o.as_, nullptr)), address_(o.address_), memory_(o.memory_) {}
  DeviceExclusivePage& operator=(DeviceExclusivePage&& o) noexcept {
    if (this != &o) {
      unlock();
      as_ = std::exchange(o.as_, nullptr);
      address_ = o.address_;
      memory_ = o.memory_;
    }
    return *this;
  }
  ~DeviceExclusivePage() { unlock(); }

  VirtAddr address() const { return address_; }
  /// The page's memory while it is exclusive: the device's atomics go here.
  /// Valid until an invalidation of the page reaches the driver (which then
  /// drops its mapping): the memory is neither moved nor freed before every
  /// invalidate() callback of that invalidation has returned.
  std::byte* memory() const { return memory_; }
  /// Lets revocation (and the CPU accesses waiting for the page) go ahead.
  void unlock();

 private:
  AddressSpace* as_ = nullptr;  // null once unlocked
  VirtAddr address_;
  std::byte* memory_ = nullptr;
};

/// Gives the device `owner` exclusive access to the page at `addr` for its
/// atomics (the kernel's make_device_exclusive): the page is faulted in
/// writable (a copy-on-write page shared with a forked child is copied
/// first), an kExclusive invalidation carrying `owner` is raised (drivers
/// skip their own), and the CPU mapping is replaced by a device-exclusive
/// entry.  The page comes back locked: the driver maps `memory()` in its
/// page table, then unlocks.  From then on, the first CPU access to the
/// page (or a syscall on it, another device's fault or migration request,
/// make_device_exclusive by anyone, fork, mprotect, AddressSpace::read or
/// write) restores the normal mapping, with the device's writes in it,
/// after an kExclusive invalidation with no owner has revoked the device's
/// access.
///
/// Errors: EINVAL (unaligned address, null owner), EFAULT (not managed
/// memory, or PROT_NONE or read-only: the page must be writable),
/// EOPNOTSUPP (not private anonymous memory, or a device-coherent page),
/// EBUSY (the page kept changing for a second), ENOMEM (no staging page to
/// hold it).  Not from an invalidate() callback, nor with a lock that one
/// takes (like hmm_range_fault, it may fault the page in).
Result<DeviceExclusivePage> make_device_exclusive(AddressSpace& as, VirtAddr addr, const void* owner);

}  // namespace uhmm
