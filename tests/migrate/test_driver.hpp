// A minimal device-private "driver" for tests of the raw migrate_vma_* and
// migrate_device_* API: a DevicePagemap (kPrivate) whose device memory is a
// std::vector<std::byte> indexed by DevicePage::index(), a free list, and a
// migrate_to_ram that brings back exactly the faulting page.  It keeps books
// on every page lifetime so tests can check that page_free runs exactly once
// per allocation, never for a free page.
#pragma once

#include <gtest/gtest.h>
#include <sys/mman.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "uhmm/uhmm.hpp"

namespace uhmm::test {

class TestDriver {
 public:
  /// nullptr (with a gtest failure) if the page map cannot be registered.
  /// kCoherent: device memory is an anonymous mapping (the map's
  /// coherent_memory), and there is no migrate_to_ram.
  static std::unique_ptr<TestDriver> create(std::size_t npages, PagemapType type = PagemapType::kPrivate) {
    std::unique_ptr<TestDriver> d(new TestDriver(npages));
    PagemapConfig config;
    config.type = type;
    config.npages = PageCount{npages};
    config.owner = d->owner();
    config.ops.page_free = [drv = d.get()](DevicePage& page) { drv->page_free(page); };
    if (type == PagemapType::kCoherent) {
      void* m = ::mmap(nullptr, npages * kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (m == MAP_FAILED) {
        ADD_FAILURE() << "mmap of coherent memory failed";
        return nullptr;
      }
      d->coherent_ = static_cast<std::byte*>(m);
      config.coherent_memory = m;
    } else {
      config.ops.migrate_to_ram = [drv = d.get()](const CpuFault& fault) { return drv->migrate_to_ram(fault); };
    }
    auto map = DevicePagemap::create(std::move(config));
    if (!map.is_ok()) {
      ADD_FAILURE() << "DevicePagemap::create: " << map.status().to_string();
      return nullptr;
    }
    d->map_ = std::move(*map);
    return d;
  }

  ~TestDriver() {
    if (!map_) return;
    const Status s = map_->unregister(std::chrono::milliseconds(2000));
    if (!s.is_ok()) {
      // Destroying the map now would wait forever; leak it so the suite
      // reports the failure instead of hanging.
      ADD_FAILURE() << "test driver destroyed with device pages in use: " << s.to_string();
      (void)map_.release();
      return;
    }
    map_.reset();
    if (coherent_ != nullptr) ::munmap(coherent_, npages_ * kPageSize);
  }
  TestDriver(const TestDriver&) = delete;
  TestDriver& operator=(const TestDriver&) = delete;

  const void* owner() const { return &cookie_; }
  DevicePagemap& pagemap() { return *map_; }
  std::size_t npages() const { return npages_; }

  /// The page's device memory (for a coherent driver: its home slot, which
  /// holds the data only while no managed range maps the page).
  std::byte* memory(const DevicePage& page) {
    return (coherent_ != nullptr ? coherent_ : store_.data()) + page.index() * kPageSize;
  }

  /// Takes a free device page: refcount 1, locked (zone_device_page_init).
  DevicePage* alloc() {
    std::uint64_t index;
    {
      std::lock_guard lock(mutex_);
      if (free_.empty()) return nullptr;
      index = free_.back();
      free_.pop_back();
      allocated_[index] = true;
      ++allocs_[index];
    }
    DevicePage& page = map_->page_at(index);
    zone_device_page_init(page);
    return &page;
  }

  /// Takes 512 free pages that make one large device page
  /// (zone_device_folio_init): the head, or nullptr if no aligned run of
  /// free pages is left.
  DevicePage* alloc_large() {
    const std::uint64_t first_pfn = map_->range().first.value;
    std::uint64_t head = npages_;
    {
      std::lock_guard lock(mutex_);
      for (std::uint64_t h = (kPagesPerHugePage - first_pfn % kPagesPerHugePage) % kPagesPerHugePage;
           h + kPagesPerHugePage <= npages_ && head == npages_; h += kPagesPerHugePage) {
        bool free = true;
        for (std::uint64_t k = 0; k < kPagesPerHugePage && free; ++k) free = !allocated_[h + k];
        if (free) head = h;
      }
      if (head == npages_) return nullptr;
      std::erase_if(free_, [&](std::uint64_t i) { return i >= head && i < head + kPagesPerHugePage; });
      for (std::uint64_t k = 0; k < kPagesPerHugePage; ++k) {
        allocated_[head + k] = true;
        ++allocs_[head + k];
      }
    }
    DevicePage& page = map_->page_at(head);
    const Status s = zone_device_folio_init(page, kDeviceFolioOrder);
    EXPECT_TRUE(s.is_ok()) << s.to_string();
    return &page;
  }

  std::size_t free_pages() const {
    std::lock_guard lock(mutex_);
    return free_.size();
  }
  std::uint64_t page_free_calls() const { return page_free_calls_.load(); }
  std::uint64_t page_free_calls(std::uint64_t index) const {
    std::lock_guard lock(mutex_);
    return frees_[index];
  }
  /// page_free for a page that was not allocated (a double free).
  std::uint64_t bad_frees() const { return bad_frees_.load(); }
  std::uint64_t migrate_to_ram_calls() const { return m2r_calls_.load(); }
  void set_broken(bool b) { broken_.store(b); }
  /// page_free sleeps this long before returning the page to the free list.
  void set_page_free_delay(std::chrono::milliseconds d) { page_free_delay_ms_.store(d.count()); }

  /// True when every allocation so far was freed exactly once.
  ::testing::AssertionResult books_balanced() const {
    std::lock_guard lock(mutex_);
    for (std::size_t i = 0; i < npages_; ++i) {
      if (allocs_[i] != frees_[i] || allocated_[i])
        return ::testing::AssertionFailure() << "device page " << i << ": " << allocs_[i] << " allocations, "
                                             << frees_[i] << " page_free calls"
                                             << (allocated_[i] ? " (still allocated)" : "");
    }
    if (bad_frees_.load() != 0) return ::testing::AssertionFailure() << bad_frees_.load() << " bad page_free calls";
    return ::testing::AssertionSuccess();
  }

  /// Driver copy to the device for every MIGRATE entry of src[0, n) for
  /// which keep(i) is true: allocates a page, copies (or zeroes a hole),
  /// writes dst[i] (|WRITE when the source is writable or a hole).  Returns
  /// the number of destinations set.
  template <class Keep>
  std::size_t copy_to_device(const std::uint64_t* src, std::uint64_t* dst, std::size_t n, Keep&& keep) {
    std::size_t set = 0;
    for (std::size_t i = 0; i < n; ++i) {
      if (!(src[i] & MIGRATE_PFN_MIGRATE) || !keep(i)) continue;
      DevicePage* page = alloc();
      if (page == nullptr) continue;
      const bool hole = !(src[i] & MIGRATE_PFN_VALID);
      if (hole) {
        std::memset(memory(*page), 0, kPageSize);
      } else {
        const void* from = migrate_pfn_to_host(src[i]);
        if (from == nullptr) {
          ADD_FAILURE() << "entry " << i << " is VALID but names no system page";
          page->unlock();
          page->put();
          continue;
        }
        std::memcpy(memory(*page), from, kPageSize);
      }
      const bool writable = hole || (src[i] & MIGRATE_PFN_WRITE);
      dst[i] = migrate_pfn(page->pfn()) | (writable ? MIGRATE_PFN_WRITE : 0);
      ++set;
    }
    return set;
  }
  std::size_t copy_to_device(const std::uint64_t* src, std::uint64_t* dst, std::size_t n) {
    return copy_to_device(src, dst, n, [](std::size_t) { return true; });
  }

  /// Driver copy back to system memory for every MIGRATE entry naming one
  /// of this driver's pages.  Returns the number of destinations set.
  std::size_t copy_to_ram(AddressSpace& as, const std::uint64_t* src, std::uint64_t* dst, std::size_t n) {
    std::size_t set = 0;
    for (std::size_t i = 0; i < n; ++i) {
      if (!(src[i] & MIGRATE_PFN_MIGRATE)) continue;
      DevicePage* page = migrate_pfn_to_device_page(src[i]);
      if (page == nullptr || &page->pagemap() != map_.get()) continue;
      std::uint64_t pfn = 0;
      if (!alloc_system_pages(as, std::span<std::uint64_t>(&pfn, 1)).is_ok()) continue;
      std::memcpy(reinterpret_cast<void*>(pfn << kPageShift), memory(*page), kPageSize);
      dst[i] = migrate_pfn(pfn);
      ++set;
    }
    return set;
  }

 private:
  explicit TestDriver(std::size_t npages)
      : npages_(npages), store_(npages * kPageSize), allocated_(npages, false), allocs_(npages, 0),
        frees_(npages, 0) {
    for (std::size_t i = npages; i-- > 0;) free_.push_back(i);  // page 0 is handed out first
  }

  void page_free(DevicePage& page) {
    page_free_calls_.fetch_add(1);
    if (const auto ms = page_free_delay_ms_.load(); ms > 0)
      std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    std::lock_guard lock(mutex_);
    const std::uint64_t i = page.index();
    if (i >= npages_ || !allocated_[i]) {
      bad_frees_.fetch_add(1);
      return;
    }
    allocated_[i] = false;
    ++frees_[i];
    free_.push_back(i);
  }

  FaultOutcome migrate_to_ram(const CpuFault& fault) {
    m2r_calls_.fetch_add(1);
    if (broken_.load()) return FaultOutcome::kSigbus;
    ScopedMigrateVma mig(*fault.address_space, fault.address, fault.address + kPageSize, owner(),
                         MIGRATE_VMA_SELECT_DEVICE_PRIVATE, fault.page);
    if (!mig.setup().is_ok()) return FaultOutcome::kSigbus;
    const bool collected = mig.src()[0] & MIGRATE_PFN_MIGRATE;
    const std::size_t copied = copy_to_ram(*fault.address_space, mig.src().data(), mig.dst().data(), 1);
    mig.pages();
    mig.finalize();
    if (collected && copied == 0) return FaultOutcome::kOom;
    return FaultOutcome::kOk;
  }

  const std::size_t npages_;
  const char cookie_ = 0;
  std::unique_ptr<DevicePagemap> map_;
  std::vector<std::byte> store_;
  std::byte* coherent_ = nullptr;
  mutable std::mutex mutex_;
  std::vector<std::uint64_t> free_;
  std::vector<bool> allocated_;
  std::vector<std::uint64_t> allocs_;
  std::vector<std::uint64_t> frees_;
  std::atomic<std::uint64_t> page_free_calls_{0};
  std::atomic<std::uint64_t> bad_frees_{0};
  std::atomic<std::uint64_t> m2r_calls_{0};
  std::atomic<bool> broken_{false};
  std::atomic<std::int64_t> page_free_delay_ms_{0};
};

/// Runs the three phases over [start, end) with the test driver as the
/// destination: every collected page whose index passes keep(i) moves.
struct RawMigration {
  std::vector<std::uint64_t> src, dst;
  MigrateVma args;
  Status setup_status;

  RawMigration(AddressSpace& as, VirtAddr start, VirtAddr end, const void* owner, std::uint32_t flags) {
    const std::size_t n = end > start ? (end - start) / kPageSize : 0;
    src.assign(n, ~std::uint64_t{0});
    dst.assign(n, ~std::uint64_t{0});
    args.address_space = &as;
    args.start = start;
    args.end = end;
    args.src = src.data();
    args.dst = dst.data();
    args.pgmap_owner = owner;
    args.flags = flags;
  }
  // A test that stops early (a failed ASSERT) still ends the migration, so
  // that tearing the address space down does not wait for its entries.
  ~RawMigration() {
    if (args.internal_pin != nullptr) migrate_vma_finalize(args);
  }
  RawMigration(const RawMigration&) = delete;
  RawMigration& operator=(const RawMigration&) = delete;

  Status setup() { return setup_status = migrate_vma_setup(args); }
  void pages_and_finalize() {
    migrate_vma_pages(args);
    migrate_vma_finalize(args);
  }
  std::size_t migrating() const {
    std::size_t c = 0;
    for (std::size_t i = 0; i < args.npages; ++i)
      if (src[i] & MIGRATE_PFN_MIGRATE) ++c;
    return c;
  }
};

}  // namespace uhmm::test
