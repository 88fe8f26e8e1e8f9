// uhmm/sim_device.hpp: the simulated device, uhmm's default device.
//
// Device memory is host arenas: one of memory_bytes at creation and, when
// the device may grow, one more of grow_bytes each time every page is in
// use (each arena is a page map of its own, as the kernel's drivers add
// memory in chunks).  By default it is device-private: uhmm
// never maps it into managed ranges, and the CPU cannot reach it through a
// managed address.  With memory_type = kCoherent it is device-coherent
// memory: the arena is the page map's coherent_memory, a page on the device
// has its frame mapped at its virtual address, and the CPU uses it there
// without faulting (docs/migration.md, "Device-coherent pages").
// A DMA engine of worker threads copies between staging pages and the arena
// in batches, through an optional link model.  The driver side allocates
// device pages, implements migrate_to_ram, and offers device reads, writes
// and "kernels" over a virtual range.  Device accesses go through a mirrored
// page table per address space, filled on device faults with
// hmm_range_fault and kept coherent by an interval notifier
// (docs/mirroring.md, "The simulated device's mirror").
//
// Concurrency: all members are thread safe, except that the destructor must
// not race with other calls.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>

#include "uhmm/address_space.hpp"
#include "uhmm/device_memory.hpp"
#include "uhmm/stats.hpp"
#include "uhmm/status.hpp"
#include "uhmm/types.hpp"

namespace uhmm::sim {

/// A simple model of the link between host and device.  Transfers (one
/// batch each) share it: each occupies the link for its bytes at
/// `bytes_per_second`, after the transfers started before it, and completes
/// `setup_latency` after that (pipelined: the latency delays a transfer,
/// not the link).  The copies themselves run at memory speed; the rest of a
/// transfer's time is a sleep, leaving the CPUs to the application.
struct LinkModel {
  double bytes_per_second = 0;               // 0: unlimited (memory speed)
  std::chrono::nanoseconds setup_latency{0};  // per transfer (one batch)
};

/// How the device holds pages of shared and file-backed objects (FileCache
/// mappings; seed 003's two stages, docs/adr/0006-file-cache.md).
enum class FilePages : std::uint8_t {
  /// Stage 2: the device may write them; coming back copies the device's
  /// data into the cache (migrate_to_pagecache), dirty if the device wrote.
  kCopiedBack,
  /// Stage 1: clean pages only (dirty ones are written back first), held
  /// read-only; coming back re-reads the file.  A device write brings the
  /// page back to the CPU first.
  kReadOnly,
};

struct SimDeviceOptions {
  std::size_t memory_bytes = std::size_t{1} << 30;  // device memory size (the first chunk when it grows)
  /// 0: memory_bytes is all the memory the device has.  Otherwise an
  /// allocation that finds every page in use adds a chunk of this size, a
  /// new arena and page map with the same owner, without limit: it fails
  /// only when the host cannot map another chunk.  Chunks stay until the
  /// device is destroyed.
  std::size_t grow_bytes = 0;
  /// kPrivate (CPU accesses fault the page back) or kCoherent (the CPU maps
  /// device pages in place; they come back only when migrated explicitly).
  PagemapType memory_type = PagemapType::kPrivate;
  unsigned dma_threads = 2;
  LinkModel link;
  /// Touch the whole arena at creation so first use is not slowed by the
  /// host backing memory lazily.
  bool warm_memory = true;
  /// Transfers smaller than this are copied by the calling thread: a
  /// hand-off to a DMA worker costs more than it saves.
  std::size_t inline_copy_bytes = std::size_t{4} << 20;
  /// Pages migrate_to_ram brings back around a faulting page (within its
  /// aligned 2 MiB block and region).  1 disables fault-around.
  std::size_t fault_around_pages = kPagesPerHugePage;
  /// Pages per migrate_vma call in migrate_to_device / migrate_to_system
  /// and the prefetcher (8 MiB).  Larger batches than 2 MiB measured faster
  /// to the device, and a CPU reading right behind the prefetcher waits for
  /// (and is woken by) one batch in four times fewer (docs/performance.md).
  std::size_t batch_pages = 4 * kPagesPerHugePage;
  /// Sequential prefetch: when CPU faults walk the device-resident blocks of
  /// a range in order (a fault in the block right after the last one served
  /// or prefetched), the following 2 MiB blocks are migrated back in the
  /// background while the CPU works on the current one.  The window starts
  /// at `prefetch_blocks` and doubles each time the stream goes on, up to
  /// `prefetch_max_blocks` (like the kernel's readahead ramp), so a long
  /// stream never waits for a synchronous migration while a short one
  /// costs little.  A fault inside the window already queued (the reader
  /// overtook the prefetch) continues the stream; any other fault out of
  /// sequence starts over.  0 disables.
  std::size_t prefetch_blocks = 2;
  std::size_t prefetch_max_blocks = 32;
  FilePages file_pages = FilePages::kCopiedBack;
  /// Explicit migrations (and prefetch) ask for MIGRATE_VMA_SELECT_COMPOUND
  /// (docs/migration.md, "Large pages"): a whole 2 MiB unit goes to one
  /// large device page (one allocation, zone_device_folio_init) when the
  /// device has an aligned free 2 MiB, to base pages otherwise (or when the
  /// large allocation fails), and a unit still whole comes back into one
  /// 2 MiB system page.  A copy failure anywhere in a large page leaves the
  /// whole unit where it was.  kPrivate memory only.  Large pages make
  /// explicit migration faster (docs/performance.md); CPU faults still
  /// bring pages back as base pages (fault-around fills the unit).
  bool large_pages = true;
};

/// Fault injection, for tests: each knob fires once per arming.
class FaultInjection {
 public:
  /// The n-th device page allocation from now (0 = the next) fails.
  void fail_alloc_after(std::uint64_t n);
  /// Every allocation fails until disarmed (device out of memory).
  void fail_all_allocs(bool on);
  /// The n-th page copied by DMA from now fails (0 = the next).
  void fail_copy_after(std::uint64_t n);
  /// Every migrate_to_ram fails (the device is in an error state).
  void fail_migrate_to_ram(bool on);
  void disarm();

  // Driver side.
  bool should_fail_alloc();
  bool should_fail_copy();
  bool migrate_to_ram_broken() const { return fail_m2r_.load(std::memory_order_acquire); }

 private:
  std::atomic<std::int64_t> alloc_countdown_{-1};
  std::atomic<bool> fail_all_allocs_{false};
  std::atomic<std::int64_t> copy_countdown_{-1};
  std::atomic<bool> fail_m2r_{false};
};

/// What the device's mirrored page tables did (cumulative, all address spaces).
struct MirrorStats {
  std::uint64_t device_faults = 0;  // device faults: batches of misses serviced with hmm_range_fault
  std::uint64_t pages_faulted = 0;  // the misses those batches serviced
  std::uint64_t mirror_hits = 0;    // pages a device access found mirrored on its first look
  std::uint64_t invalidations = 0;  // invalidate() callbacks that reached a mirror
  std::uint64_t entries_dropped = 0;  // mirror entries removed by invalidations and evictions
  std::uint64_t retries = 0;        // walks started over (EBUSY, or read_retry under the lock)
};

/// What a migration helper did.
struct MigrateReport {
  std::uint64_t pages_requested = 0;
  std::uint64_t pages_migrated = 0;  // now where they were asked to go
  std::uint64_t pages_skipped = 0;   // stayed where they were (pinned, busy, no memory, copy error, ...)
  std::uint64_t holes = 0;           // unpopulated pages (zero-filled at the destination)
};

class DmaEngine;

class SimDevice {
 public:
  static Result<std::unique_ptr<SimDevice>> create(SimDeviceOptions options = {});
  /// Evicts every page still on the device (migrates it back to system
  /// memory), then unregisters the page map.
  ~SimDevice();
  SimDevice(const SimDevice&) = delete;
  SimDevice& operator=(const SimDevice&) = delete;

  const void* owner() const { return this; }
  /// The page map of the first chunk: all of the device's memory unless it
  /// grows (SimDeviceOptions::grow_bytes).
  DevicePagemap& pagemap();
  FaultInjection& faults() { return faults_; }
  Stats& stats() { return stats_; }
  const SimDeviceOptions& options() const { return options_; }

  /// Device pages not in use, in the chunks the device has now.
  std::uint64_t free_pages() const;
  /// The device's memory now: memory_bytes, plus grow_bytes per chunk added.
  std::size_t memory_bytes() const;

  /// Migrates [addr, addr+length) of `as` to the device in batches.  Pages
  /// that cannot move (pinned, busy, device full, copy error) stay on the
  /// CPU with their data intact; the report says how many.  Prefetches
  /// queued for blocks of the range are dropped: the application wants
  /// them here.  `client_faults`,
  /// if given, is consulted by this call's device page allocations before
  /// the device's own: fault injection armed by one client of the device
  /// that must not fire for another (the dmirror emulation's per-fd
  /// FAIL_ALLOC).
  Result<MigrateReport> migrate_to_device(AddressSpace& as, VirtAddr addr, std::size_t length,
                                          FaultInjection* client_faults = nullptr);
  /// Migrates this device's pages of [addr, addr+length) back to system
  /// memory (MIGRATE_VMA_SELECT_DEVICE_PRIVATE, or _DEVICE_COHERENT).
  Result<MigrateReport> migrate_to_system(AddressSpace& as, VirtAddr addr, std::size_t length);
  /// Evicts every page of this device back to system memory
  /// (migrate_device_range over the whole map).
  Result<MigrateReport> evict_all();

  /// Device access to a virtual range through the device's mirror of `as`:
  /// pages resident on this device are read or written in device memory,
  /// system pages and device-coherent pages (which the CPU maps) at their
  /// virtual address, fault-safe (AddressSpace::read/write).  Pages not
  /// mirrored yet are one device fault, serviced with hmm_range_fault
  /// (pages on the CPU stay there; other devices' pages come back; holes
  /// are zero-filled).
  /// EFAULT outside managed memory; EPERM for a write to a read-only page;
  /// EBUSY if the range keeps changing for a second.
  Status device_read(AddressSpace& as, VirtAddr addr, std::span<std::byte> out);
  Status device_write(AddressSpace& as, VirtAddr addr, std::span<const std::byte> in);
  /// Runs a device "kernel" over the device-resident pages of a range: `fn`
  /// gets each page's device memory and its virtual address.  EFAULT if a
  /// page of the range is not on this device (nothing is faulted or moved).
  /// `fn` runs under the mirror's page-table lock: it must not touch managed
  /// memory of `as` nor call this device.  On a coherent device the page is
  /// the frame the CPU maps at `va`: `fn` gets a copy of it (read and
  /// written back fault-safe, after the lock), so a CPU store to the same
  /// page while the kernel runs may be overwritten, as on real hardware
  /// without atomics.
  Status run_kernel(AddressSpace& as, VirtAddr addr, std::size_t length,
                    const std::function<void(std::span<std::byte> page, VirtAddr va)>& fn);

  /// Takes exclusive access to the pages of [addr, addr+length) for device
  /// atomics (make_device_exclusive, page by page) and maps each in the
  /// mirror with the atomic tag.  The first CPU access to such a page (or
  /// anything else that needs it) revokes it.  Errors of
  /// make_device_exclusive (uhmm/hmm.hpp); EINVAL for a bad range; EBUSY if
  /// the pages keep being revoked for a second.
  Status make_exclusive(AddressSpace& as, VirtAddr addr, std::size_t length);
  /// Pages of [addr, addr+length) the device still holds exclusively.
  std::size_t exclusive_pages(const AddressSpace& as, VirtAddr addr, std::size_t length) const;
  /// A device atomic: adds `value` to the 64-bit word at `addr` (8-byte
  /// aligned) and returns the old value, taking the page exclusive first if
  /// the device does not hold it.  Atomic with respect to the CPU: the page
  /// is not CPU-accessible while the device holds it.
  Result<std::uint64_t> atomic_fetch_add(AddressSpace& as, VirtAddr addr, std::uint64_t value);

  MirrorStats mirror_stats() const;
  /// Pages of [addr, addr + length) mirrored for `as` now (for tests).
  std::size_t mirrored_pages(const AddressSpace& as, VirtAddr addr, std::size_t length) const;

  /// Tests: while held, the prefetch thread starts on no queued block (what
  /// faults queue stays queued), so that what happens to queued work can be
  /// looked at.
  void hold_prefetch_for_test(bool on);
  /// 2 MiB blocks the prefetch thread has queued or is migrating back now.
  std::size_t prefetch_pending() const;

  /// Device memory behind a device page (for tests and the DMA engine); for
  /// a coherent device the page's home slot, which holds the data only while
  /// no managed range maps the page.
  std::byte* page_memory(const DevicePage& page);

 private:
  SimDevice(SimDeviceOptions options);
  Status init();
  /// Whether a fault injection knob fails this allocation (counted).
  bool injected_alloc_failure(FaultInjection* client_faults);
  DevicePage* alloc_page(FaultInjection* client_faults);
  /// 512 aligned free pages as one large page (their head), or nullptr.
  DevicePage* alloc_large_page(FaultInjection* client_faults);
  void free_page(DevicePage& page);
  FaultOutcome migrate_to_ram(const CpuFault& fault);
  Status copy_to_pagecache(DevicePage& page, std::span<std::byte> dst);
  FaultOutcome migrate_one_to_ram(AddressSpace& as, const CpuFault& fault);
  /// How the prefetch thread keeps one migration back going.  `waited`
  /// hears after each batch of the highest page a CPU access waited on in it
  /// (MigrateVma::last_waited), if any.  `more(end)` hands over the bytes
  /// queued right at `end` since (0: none): the migration takes them on
  /// without draining its pipeline, and a reader that catches up finds the
  /// next block taken already rather than queued, where its own fault would
  /// split the block with the prefetch.
  struct Continuation {
    std::function<void(VirtAddr)> waited;
    std::function<std::size_t(VirtAddr)> more;
  };
  Result<MigrateReport> migrate_range(AddressSpace& as, VirtAddr addr, std::size_t length, bool to_device,
                                      FaultInjection* client_faults, const Continuation* continuation = nullptr);
  class Mirror;
  struct Mirrors;
  enum class Need : std::uint8_t { kRead, kWrite, kResident };
  std::shared_ptr<Mirror> mirror_for(AddressSpace& as);
  std::shared_ptr<Mirror> find_mirror(const AddressSpace& as) const;
  Status service_device_fault(Mirror& m, AddressSpace& as, std::uint64_t first_vpn, std::uint64_t end_vpn,
                              std::size_t misses, Need need, std::chrono::steady_clock::time_point deadline);
  template <class Fn>
  Status mirrored_access(AddressSpace& as, VirtAddr first_page, std::size_t npages, Need need, Fn&& fn);
  struct Transfer;
  bool prepare(Transfer& t, std::span<const std::uint64_t> src, AddressSpace& as, MigrateReport* r);
  bool complete(Transfer& t, std::span<std::uint64_t> dst, AddressSpace& as);
  bool copy_to_system(std::span<std::uint64_t> src, std::span<std::uint64_t> dst, bool may_skip,
                      AddressSpace& as);

  SimDeviceOptions options_;
  FaultInjection faults_;
  Stats stats_;
  struct Chunk;
  /// Maps a chunk of `bytes` and registers its page map; all its pages free.
  Result<std::unique_ptr<Chunk>> make_chunk(std::size_t bytes);
  static Chunk& chunk_of(const DevicePage& page);
  std::unique_ptr<DmaEngine> dma_;
  class Prefetcher;
  std::unique_ptr<Prefetcher> prefetcher_;
  struct FreeList;
  std::unique_ptr<FreeList> free_list_;
  std::unique_ptr<Mirrors> mirrors_;
};

}  // namespace uhmm::sim
