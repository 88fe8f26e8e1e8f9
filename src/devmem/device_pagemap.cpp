// devmem: device page maps, device page descriptors, the device pfn space.
// Layer rules and locks: src/devmem/README.md.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <vector>
#include <thread>

#include <sys/mman.h>

#include "core/assert.hpp"
#include "core/sync.hpp"
#include "platform/uffd.hpp"
#include "uhmm/device_memory.hpp"

namespace uhmm {

namespace {

// The process-wide device pfn space: which ranges are handed out, and which
// page map covers which pfns.  Both live behind one mutex.  Lookups come
// per page (512 for every 2 MiB a migration moves), so each thread keeps
// the last map it found, valid while no map has been added or removed
// since (the generation): a hit takes no lock.  A map goes only once its
// pages are free, so a pfn of a page in use never finds a freed map, with
// or without the cache.
class PfnRegistry {
 public:
  static PfnRegistry& instance() {
    static PfnRegistry registry;  // the pfn space is process-wide, like physical memory
    return registry;
  }

  Result<DevicePfnRange> reserve(PageCount npages) {
    MutexLock lock(mutex_);
    // First fit above kDevicePfnBase in the gaps between reservations and
    // registered maps (a map may have been given an explicit range).
    std::vector<std::pair<std::uint64_t, std::uint64_t>> used(reserved_.begin(), reserved_.end());
    for (const auto& [first, map] : maps_) used.emplace_back(first, map->range().count.value);
    std::sort(used.begin(), used.end());
    // Every range starts on a 2 MiB boundary, so that a driver can hand out
    // large pages (zone_device_folio_init) from any of them.
    auto aligned = [](std::uint64_t pfn) { return (pfn + kPagesPerHugePage - 1) & ~(kPagesPerHugePage - 1); };
    std::uint64_t candidate = kDevicePfnBase;
    for (const auto& [first, count] : used) {
      if (candidate + npages.value <= first) break;
      candidate = std::max(candidate, aligned(first + count));
    }
    if (candidate + npages.value < candidate) return Status::error(ENOMEM, "device pfn space exhausted");
    reserved_.emplace(candidate, npages.value);
    return DevicePfnRange{DevicePfn{candidate}, npages};
  }

  void unreserve(DevicePfnRange range) {
    MutexLock lock(mutex_);
    reserved_.erase(range.first.value);
  }

  Status add(DevicePagemap* map) {
    MutexLock lock(mutex_);
    const DevicePfnRange r = map->range();
    auto next = maps_.lower_bound(r.first.value);
    if (next != maps_.end() && next->second->range().overlaps(r))
      return Status::error(EBUSY, "range overlaps a registered page map");
    if (next != maps_.begin() && std::prev(next)->second->range().overlaps(r))
      return Status::error(EBUSY, "range overlaps a registered page map");
    maps_.emplace(r.first.value, map);
    generation_.fetch_add(1, std::memory_order_release);
    return Status::ok();
  }

  void remove(DevicePagemap* map) {
    MutexLock lock(mutex_);
    auto it = maps_.find(map->range().first.value);
    if (it != maps_.end() && it->second == map) maps_.erase(it);
    generation_.fetch_add(1, std::memory_order_release);
  }

  DevicePage* lookup(DevicePfn pfn) {
    struct Last {
      std::uint64_t generation = 0;  // 0: nothing cached (generations start at 1)
      DevicePagemap* map = nullptr;
    };
    thread_local Last last;
    const std::uint64_t now = generation_.load(std::memory_order_acquire);
    if (last.generation == now && last.map->range().contains(pfn)) return last.map->page(pfn);
    MutexLock lock(mutex_);
    auto it = maps_.upper_bound(pfn.value);
    if (it == maps_.begin()) return nullptr;
    --it;
    DevicePage* page = it->second->page(pfn);
    if (page != nullptr) last = Last{generation_.load(std::memory_order_relaxed), it->second};
    return page;
  }

 private:
  Mutex mutex_{LockRank::kPfnRegistry};
  std::map<std::uint64_t, std::uint64_t> reserved_ UHMM_GUARDED_BY(mutex_);  // first -> count
  std::map<std::uint64_t, DevicePagemap*> maps_ UHMM_GUARDED_BY(mutex_);     // first pfn -> map
  std::atomic<std::uint64_t> generation_{1};  // bumped under mutex_ by add and remove
};

}  // namespace

Result<DevicePfnRange> request_free_mem_region(PageCount npages) {
  if (npages.value == 0) return Status::error(EINVAL, "empty device range");
  return PfnRegistry::instance().reserve(npages);
}

void release_mem_region(DevicePfnRange range) { PfnRegistry::instance().unreserve(range); }

// ---- DevicePage ------------------------------------------------------------

std::uint64_t DevicePage::index() const { return pfn_ - pagemap_->range().first; }

void DevicePage::get() {
  const auto old = refcount_.fetch_add(1, std::memory_order_acq_rel);
  UHMM_CHECK(old > 0, "get() on a free device page");
}

bool DevicePage::try_get() {
  auto cur = refcount_.load(std::memory_order_acquire);
  while (cur > 0) {
    if (refcount_.compare_exchange_weak(cur, cur + 1, std::memory_order_acq_rel)) return true;
  }
  return false;
}

void DevicePage::put() {
  const auto old = refcount_.fetch_sub(1, std::memory_order_acq_rel);
  UHMM_CHECK(old > 0, "put() on a free device page");
  if (old == 1) pagemap_->page_became_free(*this);
}

bool DevicePage::trylock() {
  std::uint32_t expected = 0;
  return lock_.compare_exchange_strong(expected, 1, std::memory_order_acquire);
}

void DevicePage::lock() {
  while (!trylock()) lock_.wait(1, std::memory_order_relaxed);
}

void DevicePage::unlock() {
  UHMM_DCHECK(is_locked(), "unlock of an unlocked device page");
  lock_.store(0, std::memory_order_release);
  lock_.notify_all();
}

DevicePage::Mapping DevicePage::mapping() const {
  return Mapping{rmap_as_.load(std::memory_order_acquire), VirtAddr{rmap_addr_.load(std::memory_order_acquire)}};
}

void DevicePage::set_mapping(AddressSpace* as, VirtAddr addr) {
  rmap_addr_.store(addr.value, std::memory_order_release);
  rmap_as_.store(as, std::memory_order_release);
}

void DevicePage::clear_mapping() {
  rmap_as_.store(nullptr, std::memory_order_release);
  rmap_addr_.store(0, std::memory_order_release);
}

void DevicePage::set_holder(DevicePageHolder* holder, std::uint64_t offset) {
  holder_offset_.store(offset, std::memory_order_release);
  holder_.store(holder, std::memory_order_release);
}

void zone_device_page_init(DevicePage& page) {
  std::uint32_t expected = 0;
  const bool was_free = page.refcount_.compare_exchange_strong(expected, 1, std::memory_order_acq_rel);
  UHMM_CHECK(was_free, "zone_device_page_init on a page in use");
  page.pagemap_->in_use_.fetch_add(1, std::memory_order_acq_rel);
  const bool locked = page.trylock();
  UHMM_CHECK(locked, "free device page was locked");
}

Status zone_device_folio_init(DevicePage& head, unsigned order) {
  if (order == 0) {
    if (head.refcount() != 0) return Status::error(EINVAL, "device page in use");
    zone_device_page_init(head);
    return Status::ok();
  }
  if (order != kDeviceFolioOrder) return Status::error(EINVAL, "device folios are of order 0 or 9");
  const std::uint64_t pages = std::uint64_t{1} << order;
  if (head.pfn().value % pages != 0) return Status::error(EINVAL, "device folio head not aligned to its size");
  if (head.index() + pages > head.pagemap().range().count.value)
    return Status::error(EINVAL, "device folio past the end of its page map");
  DevicePagemap& map = head.pagemap();
  for (std::uint64_t k = 0; k < pages; ++k)
    if (map.page_at(head.index() + k).refcount() != 0) return Status::error(EINVAL, "device folio page in use");
  for (std::uint64_t k = 0; k < pages; ++k) zone_device_page_init(map.page_at(head.index() + k));
  return Status::ok();
}

// ---- DevicePagemap ---------------------------------------------------------

// A coherent map's own userfaultfd: frames can only be moved into memory
// registered with the userfaultfd the move is issued on, and the home slots
// may serve several address spaces.  Write-protect mode only (and no
// events), so the driver touching a slot never blocks and discarding one
// never waits for an event reader.
struct DevicePagemap::HomeUffd {
  platform::Uffd uffd;
};

namespace {
Status check_coherent_memory(void* memory, std::uint64_t npages) {
  if (memory == nullptr) return Status::error(EINVAL, "a device-coherent page map needs its coherent_memory");
  const VirtAddr base = VirtAddr::of(memory);
  if (!base.page_aligned()) return Status::error(EINVAL, "coherent_memory not page aligned");
  int prot = 0;
  if (!platform::is_private_anonymous_mapping(base, npages * kPageSize, &prot) || prot != (PROT_READ | PROT_WRITE))
    return Status::error(EINVAL, "coherent_memory must be one private anonymous read-write mapping of npages pages");
  return Status::ok();
}

bool resident(VirtAddr page) {
  unsigned char v = 0;
  return platform::resident_pages(page, kPageSize, &v).is_ok() && (v & 1);
}
}  // namespace

DevicePagemap::DevicePagemap(PagemapConfig config, DevicePfnRange range)
    : type_(config.type), owner_(config.owner), ops_(std::move(config.ops)), range_(range),
      home_(VirtAddr::of(config.coherent_memory)) {
  pages_.reset(new DevicePage[range.count.value]);
  for (std::uint64_t i = 0; i < range.count.value; ++i) {
    pages_[i].pagemap_ = this;
    pages_[i].pfn_ = range.first + i;
  }
}

Result<std::unique_ptr<DevicePagemap>> DevicePagemap::create(PagemapConfig config) {
  switch (config.type) {
    case PagemapType::kPrivate:
      if (!config.ops.page_free || !config.ops.migrate_to_ram)
        return Status::error(EINVAL, "a device-private page map needs page_free and migrate_to_ram");
      if (config.owner == nullptr) return Status::error(EINVAL, "a device-private page map needs an owner");
      break;
    case PagemapType::kCoherent:
      if (!config.ops.page_free) return Status::error(EINVAL, "a device-coherent page map needs page_free");
      if (config.owner == nullptr) return Status::error(EINVAL, "a device-coherent page map needs an owner");
      break;
    default:
      return Status::error(EINVAL, "unsupported page map type");
  }
  if (config.type != PagemapType::kCoherent && config.coherent_memory != nullptr)
    return Status::error(EINVAL, "only a device-coherent page map has coherent_memory");
  DevicePfnRange range{};
  bool owned = false;
  if (config.range) {
    range = *config.range;
    if (range.count.value == 0) return Status::error(EINVAL, "empty device range");
    if (!is_device_pfn(range.first.value))
      return Status::error(EINVAL, "device pfn range below kDevicePfnBase");
  } else {
    if (config.npages.value == 0) return Status::error(EINVAL, "empty device range");
    auto r = request_free_mem_region(config.npages);
    if (!r) return r.status();
    range = *r;
    owned = true;
  }
  std::unique_ptr<DevicePagemap> map(new DevicePagemap(std::move(config), range));
  map->range_owned_ = owned;
  if (map->type_ == PagemapType::kCoherent) {
    Status s = check_coherent_memory(map->home_.ptr(), range.count.value);
    if (s.is_ok()) {
      auto uffd = platform::Uffd::open(platform::kFeatureMove, /*nonblocking=*/true);
      if (uffd) {
        map->home_uffd_ = std::make_unique<HomeUffd>(HomeUffd{std::move(*uffd)});
        (void)platform::advise(map->home_, range.count.value * kPageSize, MADV_NOHUGEPAGE);
        s = map->home_uffd_->uffd.register_range(map->home_, range.count.value * kPageSize, UFFDIO_REGISTER_MODE_WP);
      } else {
        s = uffd.status();
      }
    }
    if (!s) {
      if (owned) release_mem_region(range);
      map->range_owned_ = false;
      return s;
    }
  }
  if (Status s = PfnRegistry::instance().add(map.get()); !s) {
    if (owned) release_mem_region(range);
    map->range_owned_ = false;
    return s;
  }
  map->registered_.store(true, std::memory_order_release);
  return map;
}

DevicePagemap::~DevicePagemap() {
  while (registered()) {
    if (unregister(std::chrono::milliseconds(1000)).is_ok()) break;
    std::fprintf(stderr, "uhmm: page map destroyed with %llu device pages in use; waiting\n",
                 static_cast<unsigned long long>(pages_in_use()));
  }
  if (range_owned_) release_mem_region(range_);
}

Status DevicePagemap::unregister(std::chrono::milliseconds patience) {
  if (!registered()) return Status::ok();
  const auto deadline = std::chrono::steady_clock::now() + patience;
  for (;;) {
    const auto in_use = in_use_.load(std::memory_order_acquire);
    if (in_use == 0) break;
    if (std::chrono::steady_clock::now() >= deadline)
      return Status::error(EBUSY, std::to_string(in_use) + " device pages still in use");
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  PfnRegistry::instance().remove(this);
  registered_.store(false, std::memory_order_release);
  return Status::ok();
}

DevicePage* DevicePagemap::page(DevicePfn pfn) {
  if (!range_.contains(pfn)) return nullptr;
  return &pages_[pfn - range_.first];
}

DevicePage* DevicePagemap::page_from_pfn(DevicePfn pfn) { return PfnRegistry::instance().lookup(pfn); }

VirtAddr DevicePagemap::home_address(const DevicePage& page) const {
  if (type_ != PagemapType::kCoherent) return VirtAddr{0};
  return home_ + page.index() * kPageSize;
}

int DevicePagemap::move_frame_home(const DevicePage& page, VirtAddr from) {
  UHMM_CHECK(type_ == PagemapType::kCoherent && home_uffd_ != nullptr, "move_frame_home on a map that is not coherent");
  const VirtAddr home = home_address(page);
  for (int attempt = 0;; ++attempt) {
    const platform::PartialResult r = home_uffd_->uffd.move(home, from, kPageSize, 0);
    if (r.error == 0) return 0;
    // The kernel may report an error for a page it did move (seen with huge
    // pages split under it; see move_verified in mm/address_space.cpp): the
    // page tables have the last word.
    if (!resident(from) && resident(home)) return 0;
    // A frame in the way: the slot was touched while its page was mapped
    // elsewhere (or a copy left it there).  It holds nothing the page needs.
    if (r.error == EEXIST && attempt == 0) {
      discard_home(page);
      continue;
    }
    return r.error;
  }
}

void DevicePagemap::copy_into_home(const DevicePage& page, VirtAddr from) {
  UHMM_CHECK(type_ == PagemapType::kCoherent, "copy_into_home on a map that is not coherent");
  discard_home(page);
  // The home slots are registered for write protection only: the write
  // populates the slot and never waits.
  std::memcpy(home_address(page).ptr(), from.ptr(), kPageSize);
}

Status DevicePagemap::copy_frame_home(DevicePage& page, VirtAddr from) {
  UHMM_CHECK(type_ == PagemapType::kCoherent, "copy_frame_home on a map that is not coherent");
  page.frame_left_in_place_.store(true, std::memory_order_release);
  return platform::read_own_memory(from, home_address(page).ptr(), kPageSize);
}

bool DevicePagemap::frame_left_in_place(const DevicePage& page) const {
  return page.frame_left_in_place_.load(std::memory_order_acquire);
}

void DevicePagemap::drop_home_copy(DevicePage& page) {
  if (!page.frame_left_in_place_.exchange(false, std::memory_order_acq_rel)) return;
  discard_home(page);
}

void DevicePagemap::discard_home(const DevicePage& page) {
  // No events are requested on the home userfaultfd: this never waits.
  (void)platform::advise(home_address(page), kPageSize, MADV_DONTNEED);
}

void DevicePagemap::page_became_free(DevicePage& page) {
  page.clear_mapping();
  page.set_holder(nullptr, 0);
  page.dirty_.store(false, std::memory_order_release);
  UHMM_DCHECK(!page.frame_left_in_place_.load(std::memory_order_acquire), "a home copy outlived its migration");
  if (ops_.page_free) ops_.page_free(page);
  in_use_.fetch_sub(1, std::memory_order_acq_rel);
}

}  // namespace uhmm
