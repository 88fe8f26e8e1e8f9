// uhmm/device_memory.hpp: device memory as page maps (the kernel's
// dev_pagemap / ZONE_DEVICE), device page descriptors and their refcounts.
//
// A driver registers a range of device memory as a DevicePagemap with a type,
// an owner cookie and an ops table.  Each device page then has a DevicePage
// descriptor, found again from its pfn.  The rules (hmm-semantics section 1):
//   * PRIVATE needs page_free, migrate_to_ram and an owner; COHERENT needs
//     page_free, an owner and (a uhmm difference) the CPU-addressable memory
//     behind the map; every other type is refused with EINVAL;
//   * empty ranges and ranges overlapping another page map are refused;
//   * a free page has refcount 0; zone_device_page_init() makes it 1 and
//     locked before the page is handed to migration; when the last reference
//     goes, page_free runs, exactly once per page lifetime;
//   * unregistering waits until every page is free (or fails with EBUSY when
//     the caller's patience runs out; nothing is lost either way).
// Device pfns are a process-wide numbering space (like physical addresses):
// request_free_mem_region() hands out ranges that never collide.  That
// registry is the only process-wide state in uhmm; it holds no policy.
//
// Device-coherent memory in user space (docs/differences.md, "coherent"):
// the map's memory is a pool of anonymous frames of this process, one
// "home" slot per device page.  A coherent page that is mapped into a
// managed range has its frame moved there (UFFDIO_MOVE, no copy), so the
// CPU reaches it with plain loads and stores; migrating it away moves the
// frame home again, where the driver's copy engine reads it.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>

#include "uhmm/status.hpp"
#include "uhmm/types.hpp"

namespace uhmm {

class AddressSpace;
class DevicePagemap;
class DevicePage;

enum class PagemapType : std::uint8_t {
  kPrivate = 1,   // MEMORY_DEVICE_PRIVATE: the CPU cannot address it
  kCoherent = 2,  // MEMORY_DEVICE_COHERENT: CPU-addressable, mapped like system memory
  kFsDax = 3,
  kGeneric = 4,
  kP2pDma = 5,
};

/// What migrate_to_ram is handed (the kernel's struct vm_fault).
struct CpuFault {
  AddressSpace* address_space = nullptr;
  VirtAddr address;           // page-aligned faulting address
  bool write = false;         // the access was a write
  DevicePage* page = nullptr;  // the device page, locked and referenced by the fault path
};

/// migrate_to_ram's answer (the kernel's vm_fault_t values that matter).
enum class FaultOutcome {
  kOk,      // the page was migrated back, or someone else already had it
  kSigbus,  // the device cannot bring it back: the access ends in SIGBUS
  kOom,     // no system memory: treated like SIGBUS for the faulting thread
};

/// Whoever holds a device page that backs a page of a shared or
/// file-backed object (uhmm's FileCache: the page cache, in the kernel's
/// terms) rather than a private anonymous mapping.  Eviction
/// (migrate_device_range) asks it to take the page back.
class DevicePageHolder {
 public:
  /// Called with the page locked and referenced by the caller; brings the
  /// page's data back into the object (or decides it is not needed) and
  /// lets go of the page, or does nothing if it is busy (eviction retries).
  /// The holder must not be touched after the page is unlocked.
  virtual void evict(DevicePage& page) = 0;

 protected:
  ~DevicePageHolder() = default;
};

struct PagemapOps {
  /// The page's last reference went away; give it back to the driver's
  /// free list.  Called exactly once per page lifetime, never concurrently
  /// for the same page.  Must not block on uhmm locks.
  std::function<void(DevicePage&)> page_free;
  /// A CPU access hit a device page of this map.  Must migrate at least the
  /// faulting page back (migrate_vma_* with fault_page set) or fail.  The
  /// device cannot refuse.
  std::function<FaultOutcome(const CpuFault&)> migrate_to_ram;
  /// Optional: device pages in shared and file-backed objects (seed 003's
  /// second stage).  Copies the data of `page`, which backs a page of such
  /// an object, into `dst` (one page of host memory), when a CPU access,
  /// read(), write(), writeback, eviction or truncation needs it back.  The
  /// page's dirty mark (DevicePage::set_dirty) says whether the device wrote
  /// it.  Without it (the first stage), only clean pages of such objects go
  /// to the device, read-only, and coming back re-reads the backing store.
  /// An error also re-reads the store: what the device wrote is lost, so a
  /// driver fails only when its data is truly gone.
  std::function<Status(DevicePage& page, std::span<std::byte> dst)> migrate_to_pagecache;
};

struct PagemapConfig {
  PagemapType type = PagemapType::kPrivate;
  /// Size of the map.  Ignored when `range` is given.
  PageCount npages;
  /// An explicit pfn range (tests use it to provoke overlaps); by default a
  /// free range is requested with request_free_mem_region().
  std::optional<DevicePfnRange> range;
  /// "My device" cookie; must not be null.
  const void* owner = nullptr;
  PagemapOps ops;
  /// kCoherent only, and required there: the memory the CPU reaches the
  /// device pages through, private anonymous read-write memory of this
  /// process, page aligned, one page per device page (page i at
  /// coherent_memory + i * kPageSize).  The page map registers it with a
  /// userfaultfd of its own (frames are moved into it) and advises it
  /// MADV_NOHUGEPAGE (frames travel one by one); it must stay mapped until
  /// the map is destroyed.  While a device page is mapped in a managed
  /// range its frame is there and its home slot is empty: a driver writes a
  /// page's home slot only while it owns the page (allocated, or collected
  /// by a migration).
  void* coherent_memory = nullptr;
};

/// The descriptor of one device page (struct page for ZONE_DEVICE).
///
/// Concurrency: refcount and lock are atomics usable from any thread.
/// zone_device_data belongs to the driver.  The reverse map (where the page
/// is mapped) is written by the migration layer while it holds the page's
/// page-table entry locked (docs/locking.md).
class DevicePage {
 public:
  DevicePage(const DevicePage&) = delete;
  DevicePage& operator=(const DevicePage&) = delete;

  DevicePfn pfn() const { return pfn_; }
  DevicePagemap& pagemap() const { return *pagemap_; }
  /// Index of the page inside its page map.
  std::uint64_t index() const;

  std::uint32_t refcount() const { return refcount_.load(std::memory_order_acquire); }
  /// Takes a reference.  The page must already be in use (refcount > 0).
  void get();
  /// Takes a reference unless the page is free; false if it was free.
  bool try_get();
  /// Drops a reference; the last one calls the page map's page_free.
  void put();

  bool trylock();
  void lock();
  void unlock();
  bool is_locked() const { return lock_.load(std::memory_order_acquire) != 0; }

  /// Driver-private data (the kernel's zone_device_data).
  void* zone_device_data = nullptr;

  /// Reverse map: where this page is mapped, if anywhere.
  struct Mapping {
    AddressSpace* address_space = nullptr;
    VirtAddr address;
  };
  Mapping mapping() const;
  void set_mapping(AddressSpace* as, VirtAddr addr);
  void clear_mapping();

  /// A page backing a page of a shared or file-backed object: its holder
  /// and the page's offset in the object (the kernel's page->mapping and
  /// page->index).  Such a page has no Mapping.  Set and cleared by the
  /// holder with the page locked.
  DevicePageHolder* holder() const { return holder_.load(std::memory_order_acquire); }
  std::uint64_t holder_offset() const { return holder_offset_.load(std::memory_order_acquire); }
  void set_holder(DevicePageHolder* holder, std::uint64_t offset);

  /// The device wrote the page since it came (the kernel's set_page_dirty):
  /// drivers mark it, the holder of a file page reads it when the page
  /// comes back, so that the data reaches the file.
  void set_dirty() { dirty_.store(true, std::memory_order_release); }
  bool dirty() const { return dirty_.load(std::memory_order_acquire); }
  bool test_and_clear_dirty() { return dirty_.exchange(false, std::memory_order_acq_rel); }

 private:
  friend class DevicePagemap;
  friend void zone_device_page_init(DevicePage&);
  DevicePage() = default;

  std::atomic<std::uint32_t> refcount_{0};
  std::atomic<std::uint32_t> lock_{0};
  DevicePagemap* pagemap_ = nullptr;
  DevicePfn pfn_;
  std::atomic<AddressSpace*> rmap_as_{nullptr};
  std::atomic<std::uintptr_t> rmap_addr_{0};
  std::atomic<DevicePageHolder*> holder_{nullptr};
  std::atomic<std::uint64_t> holder_offset_{0};
  std::atomic<bool> dirty_{false};
  // Coherent pages: a migration left the frame mapped (copy_frame_home).
  std::atomic<bool> frame_left_in_place_{false};
};

/// The driver's allocator hands out a free page: refcount 0 -> 1, locked.
void zone_device_page_init(DevicePage& page);

/// The order of a large device page (a 2 MiB folio: 512 pages).
inline constexpr unsigned kDeviceFolioOrder = 9;

/// The driver's allocator hands out a large device page (zone_device_folio_init):
/// `head` and the pages after it, 1 << order of them, each refcount 0 -> 1
/// and locked.  Order 0 is zone_device_page_init; order kDeviceFolioOrder
/// needs a head whose pfn is a multiple of 512 with all 512 pages in one
/// page map.  It is what a driver puts in dst[] as one COMPOUND entry
/// (migrate.hpp).  Once migrated in, uhmm keeps its pages as base pages: a
/// CPU fault, a discard or an eviction takes one without the others, and
/// page_free runs for each page when its last reference goes, not once for
/// the folio (docs/differences.md).  EINVAL (nothing changed) for another
/// order, a misaligned head, a folio past the end of its map, or a page of
/// it in use.
Status zone_device_folio_init(DevicePage& head, unsigned order);

class DevicePagemap {
 public:
  /// memremap_pages: validates the config and registers the range.
  static Result<std::unique_ptr<DevicePagemap>> create(PagemapConfig config);
  /// Unregisters, waiting (without limit, as the kernel does) for pages in
  /// use.  Call unregister() first to bound the wait.
  ~DevicePagemap();
  DevicePagemap(const DevicePagemap&) = delete;
  DevicePagemap& operator=(const DevicePagemap&) = delete;

  /// memunmap_pages: waits up to `patience` for every page to be free, then
  /// removes the map from the pfn registry.  EBUSY (and still registered) if
  /// pages are still in use; the caller should evict them
  /// (migrate_device_range) and try again.
  Status unregister(std::chrono::milliseconds patience);
  bool registered() const { return registered_.load(std::memory_order_acquire); }

  PagemapType type() const { return type_; }
  const void* owner() const { return owner_; }
  DevicePfnRange range() const { return range_; }
  const PagemapOps& ops() const { return ops_; }

  DevicePage& page_at(std::uint64_t index) { return pages_[index]; }
  /// Coherent maps: the home slot of `page`, where its frame lives while no
  /// managed range maps it (the driver's copy engine reads and writes it
  /// there).  VirtAddr{0} for other types.
  VirtAddr home_address(const DevicePage& page) const;

  /// For the migration layer.  Moves the frame mapped at `from` (a page of a
  /// managed range of this process) into the home slot of `page`, without
  /// copying: 0, or the errno of the move (ENOENT: nothing mapped at
  /// `from`; EBUSY: the frame is pinned or shared copy-on-write with a
  /// forked child; EINVAL: the protections of the two sides differ).  A
  /// stale frame left in the home slot is discarded first.
  int move_frame_home(const DevicePage& page, VirtAddr from);
  /// For the migration layer, where the kernel refused move_frame_home for
  /// a frame in uhmm's own transit area (which it rarely does): the data of
  /// the page at `from` (present, readable) is copied into the home slot,
  /// after any stale frame there is discarded.
  void copy_into_home(const DevicePage& page, VirtAddr from);
  /// For the migration layer, where the kernel will not move the frame (a
  /// range that is not read-write): the frame stays mapped at `from`, to
  /// become the system page the migration leaves there, and its data is
  /// copied into the home slot for the driver's copy engine.  The read never
  /// faults; should the frame be gone already (the application discarded
  /// or moved the range) the copy is left as it is, and the result names
  /// the errno.  The page records that its frame was left in place until
  /// drop_home_copy.
  Status copy_frame_home(DevicePage& page, VirtAddr from);
  /// Whether copy_frame_home left the page's frame in place.
  bool frame_left_in_place(const DevicePage& page) const;
  /// Ends a copy_frame_home: the home slot's copy goes.
  void drop_home_copy(DevicePage& page);
  /// nullptr if the pfn is outside this map.
  DevicePage* page(DevicePfn pfn);
  /// Pages whose refcount is not zero.
  std::uint64_t pages_in_use() const { return in_use_.load(std::memory_order_acquire); }

  /// Looks a device pfn up in the process-wide registry; nullptr if no
  /// registered page map covers it.
  static DevicePage* page_from_pfn(DevicePfn pfn);

 private:
  friend class DevicePage;
  friend void zone_device_page_init(DevicePage&);
  explicit DevicePagemap(PagemapConfig config, DevicePfnRange range);
  void page_became_free(DevicePage& page);
  void discard_home(const DevicePage& page);

  PagemapType type_;
  const void* owner_;
  PagemapOps ops_;
  DevicePfnRange range_;
  bool range_owned_ = false;  // came from request_free_mem_region
  std::unique_ptr<DevicePage[]> pages_;
  // Coherent maps: the home slots and the userfaultfd they are registered
  // with (UFFDIO_MOVE is issued on the destination's userfaultfd).
  VirtAddr home_;
  struct HomeUffd;
  std::unique_ptr<HomeUffd> home_uffd_;
  std::atomic<std::uint64_t> in_use_{0};
  std::atomic<bool> registered_{false};
};

/// request_free_mem_region: a device pfn range no other page map uses and no
/// other request will be handed.  ENOMEM if the space is exhausted.
Result<DevicePfnRange> request_free_mem_region(PageCount npages);
/// Gives a range obtained from request_free_mem_region back.
void release_mem_region(DevicePfnRange range);

}  // namespace uhmm
