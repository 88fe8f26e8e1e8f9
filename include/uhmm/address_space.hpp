// uhmm/address_space.hpp: managed address space (the kernel's mm_struct).
//
// An AddressSpace owns a userfaultfd, the fault-service threads, the managed
// ranges (Regions), the software page table beside the kernel's, and a
// staging pool of system pages in transit.  More than one may exist in a
// process; none is global.
//
// Concurrency contract: every public member may be called from any thread,
// except that the destructor must not race with other calls on the same
// object.  Application threads may touch managed memory at any time; uhmm's
// own threads never touch managed memory with loads or stores.
//
// How a CPU access to a device page is served: docs/walkthrough-cpu-fault.md.
#pragma once

#include <signal.h>
#include <sys/mman.h>

#include <cstddef>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "uhmm/stats.hpp"
#include "uhmm/status.hpp"
#include "uhmm/types.hpp"

namespace uhmm {

class DevicePage;

enum class RegionKind : std::uint8_t {
  kPrivateAnonymous,
  kSharedAnonymous,  // FileCache::create_anonymous (docs/adr/0006-file-cache.md)
  kFile,             // FileCache::open
};

struct RegionInfo {
  VirtAddr start;
  std::size_t length = 0;
  RegionKind kind = RegionKind::kPrivateAnonymous;
  int prot = PROT_READ | PROT_WRITE;
  bool adopted = false;  // the application made the mapping; uhmm only manages it
  /// An adopted mapping the application marked MADV_NOHUGEPAGE when uhmm
  /// adopted it: pages uhmm puts there are 4 KiB pages, never a 2 MiB one.
  /// (Elsewhere a whole aligned 2 MiB unit goes in as one huge page.)
  bool no_huge_pages = false;
  VirtAddr end() const { return start + length; }
};

/// Who serves a CPU fault on a managed page (docs/adr/0004-in-thread-faults.md).
enum class FaultMode : std::uint8_t {
  /// Service threads read the userfaultfd.  Every access is served, syscalls
  /// included: read(2) into a device-resident buffer migrates it back.
  kServiceThreads,
  /// The faulting thread serves its own fault in a SIGBUS handler uhmm
  /// installs (chaining to the previous one): about half the latency of
  /// kServiceThreads, but a syscall that touches a never-populated or
  /// device-resident page fails with EFAULT (AddressSpace::read/write still
  /// work).  For applications whose device buffers never reach syscalls,
  /// and that touch managed memory only outside signal handlers and
  /// allocator internals.
  kInThread,
};

struct AddressSpaceOptions {
  FaultMode fault_mode = FaultMode::kServiceThreads;
  /// Fault-service threads (kServiceThreads); 0 picks one per online CPU (at least 2).
  unsigned fault_threads = 0;
  /// Virtual size reserved for staging pages (system pages in transit).
  std::size_t staging_reserve_bytes = std::size_t{64} << 30;
  /// Populated staging memory kept warm for migrations back; beyond this,
  /// freed staging pages are returned to the kernel.
  std::size_t staging_keep_bytes = std::size_t{512} << 20;
  /// Ask for transparent huge pages (MADV_HUGEPAGE) on regions uhmm maps,
  /// for good.  Off by default: for an empty 2 MiB block of such a range the
  /// kernel allocates and zeroes a huge page on every write fault before it
  /// reports the fault to uhmm, then throws it away, which a range being
  /// filled for the first time pays on every block.  uhmm advises a region
  /// MADV_HUGEPAGE on its own while whole 2 MiB units of it are on a device
  /// (until a write fault fills an empty block of it), where the kernel's
  /// huge-page fault path spares their return a zap (docs/migration.md,
  /// "Faults that leave no page table").  Huge pages the application brings
  /// (adopt) migrate whole either way.
  bool transparent_huge_pages = false;
  /// A fault on a never-populated page zero-fills up to this many pages
  /// around it (within its aligned 2 MiB block and its region).
  std::size_t hole_fault_around_pages = kPagesPerHugePage;
};

/// What the software page table says about one page (for tests and tools).
struct PageInfo {
  enum class State : std::uint8_t {
    kNone,           // never populated (or dropped): a hole
    kSystem,         // in system memory, mapped for the CPU
    kDevicePrivate,  // on a device; any CPU access faults and migrates it back
    kDeviceCoherent,  // in CPU-addressable device memory, mapped: CPU access does not fault
    kDeviceExclusive,  // held for a device's atomics; any CPU access revokes that and faults it back
  };
  State state = State::kNone;
  bool locked = false;    // under migration
  bool writable = false;  // device entry carries the write bit
  bool poisoned = false;  // a failed migrate_to_ram left a SIGBUS marker
  DevicePage* device_page = nullptr;
};

/// uhmm's SIGBUS handling for FaultMode::kInThread, for applications that
/// install a SIGBUS handler of their own after creating such an address
/// space: call this first; true means uhmm served the fault and the handler
/// should return at once.  (uhmm's own handler chains to the handler that
/// was installed before it; a handler installed later must call this.)
bool handle_sigbus(int sig, siginfo_t* info, void* ucontext);

class AddressSpace {
 public:
  /// Opens the userfaultfd (kernel-mode faults included: needs root or
  /// access to /dev/userfaultfd) and starts the fault service.  EPERM with a
  /// message saying what is missing when userfaultfd is unavailable; ENOSYS
  /// when the kernel lacks UFFDIO_MOVE.
  static Result<std::unique_ptr<AddressSpace>> create(AddressSpaceOptions options = {});
  /// Stops the fault service, returns every device page (page_free runs for
  /// pages nobody else holds), unregisters adopted ranges and unmaps the
  /// ranges uhmm mapped.  Device-resident data of adopted ranges is lost;
  /// migrate it back first.
  ~AddressSpace();
  AddressSpace(const AddressSpace&) = delete;
  AddressSpace& operator=(const AddressSpace&) = delete;

  /// Creates a managed private anonymous mapping of `length` bytes (a
  /// multiple of the page size).  Reserving is cheap: nothing is populated.
  /// `prot` is PROT_NONE, PROT_READ or PROT_READ|PROT_WRITE, as for
  /// protect(); pages of a range that is not read-write do not move to a
  /// device (docs/differences.md).
  Result<VirtAddr> map(std::size_t length, int prot = PROT_READ | PROT_WRITE);
  /// Adopts an existing private anonymous mapping [start, start+length) the
  /// application made itself.  EINVAL if unaligned, empty, or not one
  /// private anonymous read-write mapping; EBUSY if it overlaps a managed
  /// range.
  Status adopt(VirtAddr start, std::size_t length);
  /// Ends management of the region starting at `start`: device pages are
  /// migrated back first (adopted regions keep their data), then the range
  /// is unregistered; a range uhmm mapped is also unmapped.  EINVAL for a
  /// FileCache mapping: FileCache::unmap writes it back first.
  Status unmap(VirtAddr start);

  /// mprotect for managed memory: userfaultfd reports no event for
  /// mprotect, so call this instead of ::mprotect to keep uhmm and the
  /// mirrors coherent.  Notifiers get PROTECTION_VMA; device entries of a
  /// range that loses PROT_WRITE lose their write bit.  `prot` is
  /// PROT_NONE, PROT_READ or PROT_READ|PROT_WRITE; the range must lie in one
  /// managed range (which splits where the protection changes).  Pages of a
  /// range that is not read-write stay where they are when asked to migrate
  /// to a device (the kernel refuses to move them out), but come back from
  /// one.  EINVAL for bad input.
  Status protect(VirtAddr start, std::size_t length, int prot);

  std::optional<RegionInfo> find_region(VirtAddr addr) const;
  PageInfo page_info(VirtAddr addr) const;

  /// Returns once every change the application made to managed memory that
  /// has returned to it (munmap, madvise MADV_DONTNEED/MADV_FREE, mremap) is
  /// applied to uhmm's page table and told to the mirrors.  uhmm applies
  /// those on a worker thread just after the call returns (userfaultfd
  /// reports them asynchronously); page_info() may show the state before
  /// until then.  Call it from a thread that holds no migration.
  void await_changes() const;

  /// Fault-safe copies between managed memory and a private buffer, usable
  /// from any thread except the fault service (process_vm_readv/writev: the
  /// kernel faults device pages back like any syscall would).
  Status read(VirtAddr src, std::span<std::byte> out) const;
  Status write(VirtAddr dst, std::span<const std::byte> in) const;

  Stats& stats();
  const Stats& stats() const;

  /// Walks every structure and checks every invariant (page table against
  /// device-page reverse maps and refcounts, staging pool accounting).
  /// Meant for tests: slow.  Must not be called while the caller runs a
  /// migration; waits for the application's changes first (await_changes),
  /// and up to 2 s for migrations in flight to end (a device's background
  /// prefetch: EBUSY if one is still running then).
  Status check_invariants() const;

  /// Resident memory uhmm holds for this address space (page-table nodes and
  /// warm staging pages), in bytes.
  std::size_t overhead_bytes() const;

  struct Impl;
  Impl& impl() { return *impl_; }
  const Impl& impl() const { return *impl_; }

 private:
  explicit AddressSpace(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace uhmm
