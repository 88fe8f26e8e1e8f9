// uhmm/migrate.hpp: the three-phase migration API (migrate_vma_*) and
// device-side eviction (migrate_device_*), with the kernel's encodings.
//
// Phases and who owns what between them: docs/migration.md.  In short:
//   setup     collects and unmaps: every page it returns with MIGRATE set is
//             locked in the page table (CPU accesses wait) and its data sits
//             in a system page the driver can read (system pfn) or on the
//             device (device pfn).  Holes carry MIGRATE without VALID.
//   (driver)  allocates destinations, copies, writes dst[i]; dst[i] = 0 skips.
//   pages     commits: entries without a destination lose MIGRATE; a hole is
//             filled only if still unpopulated.
//   finalize  installs the new page where MIGRATE survived, restores the old
//             one elsewhere, unlocks, frees what is no longer used, and
//             wakes waiting CPU accesses.
// Always call all three (or use ScopedMigrateVma), even when cpages is 0.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "uhmm/device_memory.hpp"
#include "uhmm/status.hpp"
#include "uhmm/types.hpp"

namespace uhmm {

class AddressSpace;

// Entry encoding: pfn << MIGRATE_PFN_SHIFT | flags (kernel values).
inline constexpr std::uint64_t MIGRATE_PFN_VALID = 1u << 0;
inline constexpr std::uint64_t MIGRATE_PFN_MIGRATE = 1u << 1;
inline constexpr std::uint64_t MIGRATE_PFN_WRITE = 1u << 3;
inline constexpr std::uint64_t MIGRATE_PFN_COMPOUND = 1u << 4;
inline constexpr unsigned MIGRATE_PFN_SHIFT = 6;

// Large pages (SELECT_COMPOUND, docs/migration.md "Large pages"): setup
// makes a whole aligned 2 MiB unit one entry with COMPOUND set, the next
// 511 entries 0.  The driver answers with one COMPOUND destination (a 2 MiB
// system page, alloc_system_huge_page, or a large device page,
// zone_device_folio_init), or splits the unit by writing a base page into
// its dst[] entries (pages then fills the unit's src[] entries in), or 0 in
// all of them to leave it.  A unit that stays whole migrates all or nothing.

// Selection flags (request side; a different type from entry flags).
enum MigrateSelect : std::uint32_t {
  MIGRATE_VMA_SELECT_SYSTEM = 1u << 0,
  MIGRATE_VMA_SELECT_DEVICE_PRIVATE = 1u << 1,
  MIGRATE_VMA_SELECT_DEVICE_COHERENT = 1u << 2,
  MIGRATE_VMA_SELECT_COMPOUND = 1u << 3,
};

constexpr std::uint64_t migrate_pfn(std::uint64_t pfn) {
  return (pfn << MIGRATE_PFN_SHIFT) | MIGRATE_PFN_VALID;
}
constexpr std::uint64_t migrate_pfn_to_pfn(std::uint64_t entry) { return entry >> MIGRATE_PFN_SHIFT; }
constexpr std::uint64_t migrate_pfn(DevicePfn pfn) { return migrate_pfn(pfn.value); }

/// The device page an entry names, or nullptr (not VALID, or a system pfn).
DevicePage* migrate_pfn_to_device_page(std::uint64_t entry);
/// The host address of the system page an entry names, or nullptr.  The
/// driver reads a source from it, or writes a destination into it.
void* migrate_pfn_to_host(std::uint64_t entry);

/// Allocates system pages to receive device data (alloc_page_vma).  Each
/// returned value is a system pfn (wrap it with migrate_pfn for dst[]).
/// Contiguous where possible, so that a batch copies as one run.  ENOMEM
/// when the staging pool is exhausted.
Status alloc_system_pages(AddressSpace& as, std::span<std::uint64_t> pfns_out);
/// Allocates one 2 MiB system page (a block of the staging pool's huge
/// lane) for a COMPOUND destination; `*pfn_out` is its first pfn.  ENOMEM
/// when no block is free.
Status alloc_system_huge_page(AddressSpace& as, std::uint64_t* pfn_out);
/// Returns system pages the driver allocated but did not use.
void free_system_pages(AddressSpace& as, std::span<const std::uint64_t> pfns);

struct MigrateVma {
  AddressSpace* address_space = nullptr;
  VirtAddr start;  // page aligned
  VirtAddr end;    // page aligned, > start, inside one managed region
  std::uint64_t* src = nullptr;  // (end - start) / page entries, caller owned
  std::uint64_t* dst = nullptr;  // same size, caller owned
  const void* pgmap_owner = nullptr;
  std::uint32_t flags = 0;               // MigrateSelect bits
  DevicePage* fault_page = nullptr;      // set only from migrate_to_ram
  // Outputs of setup.
  std::uint64_t npages = 0;  // entries collected (== number of pages in range)
  std::uint64_t cpages = 0;  // entries with MIGRATE set
  // Output of finalize (uhmm's, not the kernel's): the highest page a CPU
  // access waited on while this migration held it, 0 if none did.  Where a
  // reader stands, for a driver's prefetch (the sim's continues its stream
  // from there).
  VirtAddr last_waited;

  /// Internal: the managed range held between setup and finalize.
  void* internal_pin = nullptr;
};

/// Phase 1.  EINVAL for a bad range (unaligned, empty, not managed, crossing
/// regions), missing arrays, no selection flag, or a fault_page that is not a
/// locked device page.  Returns ok even when nothing can migrate.
Status migrate_vma_setup(MigrateVma& args);
/// Phase 3.
void migrate_vma_pages(MigrateVma& args);
/// Phase 4.
void migrate_vma_finalize(MigrateVma& args);

/// Device-side eviction without a mapping: collects every in-use page of
/// [start, start + npages) into src[] (VALID|MIGRATE, |WRITE), locking each
/// page and its CPU mapping (mirrors get a kClear invalidation of it first).
/// Free pages give 0.  EINVAL if the range is not inside one registered
/// page map.  A fork of the process waits until migrate_device_finalize,
/// which must be called on the same thread.
Status migrate_device_range(std::uint64_t* src, DevicePfn start, PageCount npages);
/// Same for a list of pfns (migrate_device_pfns).
Status migrate_device_pfns(std::uint64_t* src, std::span<const DevicePfn> pfns);
void migrate_device_pages(std::uint64_t* src, std::uint64_t* dst, PageCount npages);
void migrate_device_finalize(std::uint64_t* src, std::uint64_t* dst, PageCount npages);

/// RAII owner of one migrate_vma sequence: arrays sized to the range, and
/// the phases run in order (finalize runs on destruction if not yet called).
class ScopedMigrateVma {
 public:
  ScopedMigrateVma(AddressSpace& as, VirtAddr start, VirtAddr end, const void* owner,
                   std::uint32_t flags, DevicePage* fault_page = nullptr);
  ~ScopedMigrateVma();
  ScopedMigrateVma(const ScopedMigrateVma&) = delete;
  ScopedMigrateVma& operator=(const ScopedMigrateVma&) = delete;

  Status setup();
  void pages();
  void finalize();

  MigrateVma& args() { return args_; }
  std::span<std::uint64_t> src() { return src_; }
  std::span<std::uint64_t> dst() { return dst_; }

 private:
  enum class Phase { kNew, kSetUp, kPages, kFinalized };
  std::vector<std::uint64_t> src_;
  std::vector<std::uint64_t> dst_;
  MigrateVma args_;
  Phase phase_ = Phase::kNew;
};

}  // namespace uhmm
