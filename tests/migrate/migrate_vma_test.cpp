// The raw three-phase API (migrate_vma_setup / pages / finalize) and
// device-side eviction (migrate_device_range / pages / finalize), driven by
// a hand-written test driver (test_driver.hpp) instead of the sim device.
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "e2e/test_support.hpp"
#include "migrate/test_driver.hpp"
#include "uhmm/uhmm.hpp"

namespace uhmm {
namespace {

using test::count_states;
using test::fill_range;
using test::page_has_pattern;
using test::range_has_pattern;
using test::RawMigration;
using test::TestDriver;

constexpr std::size_t kDevicePages = 256;

struct MigrateVmaTest : ::testing::Test {
  void SetUp() override {
    // One page per hole fault, so that tests control exactly which pages
    // are populated (the default zero-fills the whole 2 MiB block).
    AddressSpaceOptions options;
    options.hole_fault_around_pages = 1;
    auto as_r = AddressSpace::create(options);
    ASSERT_TRUE(as_r.is_ok()) << as_r.status().to_string();
    as = std::move(*as_r);
    drv = TestDriver::create(kDevicePages);
    ASSERT_NE(drv, nullptr);
  }
  void TearDown() override {
    // The address space first: it drops the entries' references to device
    // pages (page_free runs) before the driver unregisters its map.
    as.reset();
    if (drv) {
      EXPECT_TRUE(drv->books_balanced());
    }
    drv.reset();
    if (coh) {
      EXPECT_TRUE(coh->books_balanced());
    }
    coh.reset();
  }

  VirtAddr map_pages(std::size_t n) {
    auto r = as->map(n * kPageSize);
    EXPECT_TRUE(r.is_ok()) << r.status().to_string();
    return r.is_ok() ? *r : VirtAddr{};
  }

  std::uint64_t counter(Counter c) const { return as->stats().get(c); }

  // Moves [start, start + n pages) to the test driver; returns pages moved.
  std::size_t to_device(VirtAddr start, std::size_t n) {
    RawMigration m(*as, start, start + n * kPageSize, drv->owner(), MIGRATE_VMA_SELECT_SYSTEM);
    EXPECT_TRUE(m.setup().is_ok()) << m.setup_status.to_string();
    drv->copy_to_device(m.src.data(), m.dst.data(), n);
    m.pages_and_finalize();
    return m.migrating();
  }

  // Moves [start, start + n pages) to the coherent driver `coh`.
  std::size_t to_coherent(VirtAddr start, std::size_t n) {
    RawMigration m(*as, start, start + n * kPageSize, coh->owner(), MIGRATE_VMA_SELECT_SYSTEM);
    EXPECT_TRUE(m.setup().is_ok()) << m.setup_status.to_string();
    coh->copy_to_device(m.src.data(), m.dst.data(), n);
    m.pages_and_finalize();
    return m.migrating();
  }

  std::unique_ptr<AddressSpace> as;
  std::unique_ptr<TestDriver> drv;
  std::unique_ptr<TestDriver> coh;  // a device-coherent driver, for the tests that want one
};

// ---- setup argument checking ------------------------------------------------

// Runs setup with `m`, expects EINVAL, then runs pages/finalize (which must
// be harmless after a failed setup) and checks the range is untouched.
void expect_setup_einval(AddressSpace& as, MigrateVma m, VirtAddr data, std::size_t pages, const char* what) {
  SCOPED_TRACE(what);
  const Status s = migrate_vma_setup(m);
  EXPECT_EQ(s.code(), EINVAL) << s.to_string();
  EXPECT_EQ(m.internal_pin, nullptr);
  migrate_vma_pages(m);
  migrate_vma_finalize(m);
  const auto st = count_states(as, data, pages);
  EXPECT_EQ(st.system, pages);
  EXPECT_EQ(st.locked, 0u);
  EXPECT_TRUE(range_has_pattern(data, pages));
}

TEST_F(MigrateVmaTest, SetupRejectsBadArgumentsWithEinval) {
  constexpr std::size_t n = 16;
  const VirtAddr base = map_pages(n);
  fill_range(base, n);
  std::vector<std::uint64_t> src(n + 1), dst(n + 1);
  MigrateVma good;
  good.address_space = as.get();
  good.start = base;
  good.end = base + n * kPageSize;
  good.src = src.data();
  good.dst = dst.data();
  good.pgmap_owner = drv->owner();
  good.flags = MIGRATE_VMA_SELECT_SYSTEM;

  MigrateVma m = good;
  m.start = base + 8;
  expect_setup_einval(*as, m, base, n, "unaligned start");
  m = good;
  m.end = VirtAddr{(base + n * kPageSize).value - 100};
  expect_setup_einval(*as, m, base, n, "unaligned end");
  m = good;
  m.end = m.start;
  expect_setup_einval(*as, m, base, n, "end == start");
  m = good;
  m.start = base + 4 * kPageSize;
  m.end = base + 2 * kPageSize;
  expect_setup_einval(*as, m, base, n, "end < start");
  m = good;
  m.src = nullptr;
  expect_setup_einval(*as, m, base, n, "null src");
  m = good;
  m.dst = nullptr;
  expect_setup_einval(*as, m, base, n, "null dst");
  m = good;
  m.flags = 0;
  expect_setup_einval(*as, m, base, n, "no selection flag");
  m = good;
  m.flags = MIGRATE_VMA_SELECT_COMPOUND;
  expect_setup_einval(*as, m, base, n, "only SELECT_COMPOUND");
  m = good;
  m.address_space = nullptr;
  expect_setup_einval(*as, m, base, n, "no address space");
  m = good;
  m.end = base + (n + 1) * kPageSize;
  expect_setup_einval(*as, m, base, n, "range runs past the end of the region");

  // Nothing migrated, nothing counted.
  EXPECT_EQ(counter(Counter::pgmigrate_success), 0u);
  EXPECT_EQ(counter(Counter::pgmigrate_fail), 0u);
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_F(MigrateVmaTest, SetupRejectsUnmanagedRange) {
  constexpr std::size_t n = 8;
  void* plain = ::mmap(nullptr, n * kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(plain, MAP_FAILED);
  const VirtAddr base = VirtAddr::of(plain);
  fill_range(base, n);
  RawMigration m(*as, base, base + n * kPageSize, drv->owner(), MIGRATE_VMA_SELECT_SYSTEM);
  EXPECT_EQ(m.setup().code(), EINVAL);
  m.pages_and_finalize();
  EXPECT_TRUE(range_has_pattern(base, n));
  ::munmap(plain, n * kPageSize);
}

TEST_F(MigrateVmaTest, SetupRejectsRangeCrossingTwoRegions) {
  // Two managed regions side by side: adopt both halves of one mapping.
  constexpr std::size_t half = 8;
  void* raw = ::mmap(nullptr, 2 * half * kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(raw, MAP_FAILED);
  const VirtAddr a = VirtAddr::of(raw);
  const VirtAddr b = a + half * kPageSize;
  fill_range(a, 2 * half);
  ASSERT_TRUE(as->adopt(a, half * kPageSize).is_ok());
  ASSERT_TRUE(as->adopt(b, half * kPageSize).is_ok());
  ASSERT_TRUE(as->find_region(a).has_value());
  ASSERT_TRUE(as->find_region(b).has_value());
  ASSERT_NE(as->find_region(a)->start, as->find_region(b)->start);

  RawMigration m(*as, VirtAddr{b.value - 2 * kPageSize}, b + 2 * kPageSize, drv->owner(), MIGRATE_VMA_SELECT_SYSTEM);
  EXPECT_EQ(m.setup().code(), EINVAL);
  m.pages_and_finalize();
  EXPECT_TRUE(range_has_pattern(a, 2 * half));

  // Each half on its own is fine.
  EXPECT_EQ(to_device(a, half), half);
  EXPECT_EQ(to_device(b, half), half);
  EXPECT_EQ(count_states(*as, a, 2 * half).device, 2 * half);
  EXPECT_TRUE(range_has_pattern(a, 2 * half));  // faults everything back
  ASSERT_TRUE(test::settles_to(drv->pagemap(), 0));
  UHMM_EXPECT_INVARIANTS(*as);
  ASSERT_TRUE(as->unmap(a).is_ok());
  ASSERT_TRUE(as->unmap(b).is_ok());
  // Adopted ranges stay mapped and keep their data after unmap().
  EXPECT_TRUE(range_has_pattern(a, 2 * half));
  ::munmap(raw, 2 * half * kPageSize);
}

TEST_F(MigrateVmaTest, SetupRejectsFaultPageThatIsNotLockedDevicePrivate) {
  constexpr std::size_t n = 4;
  const VirtAddr base = map_pages(n);
  fill_range(base, n);
  ASSERT_EQ(to_device(base, n), n);
  DevicePage* page = as->page_info(base).device_page;
  ASSERT_NE(page, nullptr);
  ASSERT_FALSE(page->is_locked());

  {
    SCOPED_TRACE("unlocked device page");
    RawMigration m(*as, base, base + kPageSize, drv->owner(), MIGRATE_VMA_SELECT_DEVICE_PRIVATE);
    m.args.fault_page = page;
    EXPECT_EQ(m.setup().code(), EINVAL);
    m.pages_and_finalize();
  }
  {
    SCOPED_TRACE("locked page of a device-coherent map");
    char coherent_owner = 0;
    PagemapConfig config;
    config.type = PagemapType::kCoherent;
    config.npages = PageCount{4};
    config.owner = &coherent_owner;
    int freed = 0;
    config.ops.page_free = [&freed](DevicePage&) { ++freed; };
    void* memory = ::mmap(nullptr, 4 * kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ASSERT_NE(memory, MAP_FAILED);
    config.coherent_memory = memory;
    auto map = DevicePagemap::create(std::move(config));
    ASSERT_TRUE(map.is_ok()) << map.status().to_string();
    DevicePage& cpage = (*map)->page_at(0);
    zone_device_page_init(cpage);
    ASSERT_TRUE(cpage.is_locked());
    RawMigration m(*as, base, base + kPageSize, drv->owner(), MIGRATE_VMA_SELECT_DEVICE_PRIVATE);
    m.args.fault_page = &cpage;
    EXPECT_EQ(m.setup().code(), EINVAL);
    m.pages_and_finalize();
    cpage.unlock();
    cpage.put();
    EXPECT_EQ(freed, 1);
    EXPECT_TRUE((*map)->unregister(std::chrono::milliseconds(100)).is_ok());
    map->reset();
    ::munmap(memory, 4 * kPageSize);
  }
  // Still on the device, still intact.
  EXPECT_EQ(count_states(*as, base, n).device, n);
  EXPECT_EQ(counter(Counter::device_private_faults), 0u);
  UHMM_EXPECT_INVARIANTS(*as);
  EXPECT_TRUE(range_has_pattern(base, n));
}

// ---- what setup collects -----------------------------------------------------

TEST_F(MigrateVmaTest, SetupCollectsPresentPagesAndReportsHoles) {
  constexpr std::size_t n = 16, present = 8;  // pages 0-7 written, 8-15 never touched
  const VirtAddr base = map_pages(n);
  fill_range(base, present);
  ASSERT_EQ(count_states(*as, base + present * kPageSize, n - present).none, n - present)
      << "hole fault-around populated untouched pages; the test needs holes";

  RawMigration m(*as, base, base + n * kPageSize, drv->owner(), MIGRATE_VMA_SELECT_SYSTEM);
  ASSERT_TRUE(m.setup().is_ok()) << m.setup_status.to_string();
  EXPECT_EQ(m.args.npages, n);
  EXPECT_EQ(m.args.cpages, n);
  for (std::size_t i = 0; i < n; ++i) {
    SCOPED_TRACE(i);
    EXPECT_EQ(m.dst[i], 0u) << "setup must clear dst";
    if (i < present) {
      EXPECT_EQ(m.src[i] & ((1u << MIGRATE_PFN_SHIFT) - 1),
                MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE | MIGRATE_PFN_WRITE);
      const void* host = migrate_pfn_to_host(m.src[i]);
      ASSERT_NE(host, nullptr);
      EXPECT_NE(host, (base + i * kPageSize).ptr()) << "the page must have left the managed range";
      EXPECT_TRUE(page_has_pattern(host, i));
      EXPECT_EQ(migrate_pfn_to_device_page(m.src[i]), nullptr);
      // Collected pages are locked: a CPU access would wait.
      EXPECT_TRUE(as->page_info(base + i * kPageSize).locked);
    } else {
      EXPECT_EQ(m.src[i], MIGRATE_PFN_MIGRATE) << "a hole is MIGRATE without VALID";
      EXPECT_EQ(migrate_pfn_to_host(m.src[i]), nullptr);
    }
  }
  EXPECT_EQ(counter(Counter::migrate_holes), n - present);

  // The driver migrates nothing: every page is restored.
  m.pages_and_finalize();
  for (std::size_t i = 0; i < n; ++i) EXPECT_EQ(m.src[i] & MIGRATE_PFN_MIGRATE, 0u) << i;
  const auto st = count_states(*as, base, n);
  EXPECT_EQ(st.system, present);
  EXPECT_EQ(st.none, n - present);
  EXPECT_EQ(st.locked, 0u);
  EXPECT_EQ(counter(Counter::pgmigrate_success), 0u);
  EXPECT_EQ(counter(Counter::pgmigrate_fail), present);  // holes have nothing to restore
  EXPECT_EQ(counter(Counter::pgmigrate_to_device), 0u);
  UHMM_EXPECT_INVARIANTS(*as);
  EXPECT_TRUE(range_has_pattern(base, present));
  EXPECT_EQ(drv->page_free_calls(), 0u);
}

// Holes a migration collected in a range the application unmapped before
// they were filled stay holes: no device page is left behind at an address
// nobody manages any more (nothing would ever free it).
TEST_F(MigrateVmaTest, HolesOfARangeUnmappedInTransitStayHoles) {
  constexpr std::size_t n = 16;
  const VirtAddr base = map_pages(n);  // never touched: every page a hole
  RawMigration m(*as, base, base + n * kPageSize, drv->owner(), MIGRATE_VMA_SELECT_SYSTEM);
  ASSERT_TRUE(m.setup().is_ok());
  ASSERT_EQ(m.args.cpages, n);
  ASSERT_EQ(::munmap(base.ptr(), n * kPageSize), 0);
  ASSERT_TRUE(test::eventually([&] { return !as->find_region(base).has_value(); }));
  ASSERT_EQ(drv->copy_to_device(m.src.data(), m.dst.data(), n), n);
  m.pages_and_finalize();
  EXPECT_TRUE(test::eventually([&] { return drv->pagemap().pages_in_use() == 0; }))
      << drv->pagemap().pages_in_use() << " device pages left at an unmapped address";
  EXPECT_EQ(drv->free_pages(), kDevicePages);
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_F(MigrateVmaTest, PagesAndHolesMoveToTheDevice) {
  constexpr std::size_t n = 16, present = 10;
  const VirtAddr base = map_pages(n);
  fill_range(base, present);
  RawMigration m(*as, base, base + n * kPageSize, drv->owner(), MIGRATE_VMA_SELECT_SYSTEM);
  ASSERT_TRUE(m.setup().is_ok());
  ASSERT_EQ(m.args.cpages, n);
  ASSERT_EQ(drv->copy_to_device(m.src.data(), m.dst.data(), n), n);
  m.pages_and_finalize();
  EXPECT_EQ(m.migrating(), n);

  EXPECT_EQ(drv->pagemap().pages_in_use(), n);
  EXPECT_EQ(drv->free_pages(), kDevicePages - n);
  for (std::size_t i = 0; i < n; ++i) {
    SCOPED_TRACE(i);
    const VirtAddr a = base + i * kPageSize;
    const PageInfo info = as->page_info(a);
    ASSERT_EQ(info.state, PageInfo::State::kDevicePrivate);
    EXPECT_FALSE(info.locked);
    EXPECT_TRUE(info.writable);
    ASSERT_NE(info.device_page, nullptr);
    EXPECT_EQ(&info.device_page->pagemap(), &drv->pagemap());
    EXPECT_EQ(info.device_page->mapping().address_space, as.get());
    EXPECT_EQ(info.device_page->mapping().address, a);
    EXPECT_EQ(info.device_page->refcount(), 1u);
    EXPECT_FALSE(info.device_page->is_locked());
    // The data is in device memory now.
    if (i < present) {
      EXPECT_TRUE(test::buffer_has_pattern(drv->memory(*info.device_page), i));
    } else {
      const std::byte* mem = drv->memory(*info.device_page);
      EXPECT_TRUE(std::all_of(mem, mem + kPageSize, [](std::byte b) { return b == std::byte{0}; }));
    }
  }
  EXPECT_EQ(counter(Counter::pgmigrate_success), n);
  EXPECT_EQ(counter(Counter::pgmigrate_to_device), n);
  EXPECT_EQ(counter(Counter::pgmigrate_fail), 0u);
  UHMM_EXPECT_INVARIANTS(*as);

  // CPU access faults each page back through the driver's migrate_to_ram.
  EXPECT_TRUE(range_has_pattern(base, present));
  for (std::size_t i = present; i < n; ++i)
    EXPECT_EQ(*(base + i * kPageSize).as<volatile std::uint64_t>(), 0u) << "hole page " << i;
  ASSERT_TRUE(test::settles_to(drv->pagemap(), 0));
  EXPECT_EQ(drv->migrate_to_ram_calls(), n);
  EXPECT_EQ(counter(Counter::device_private_faults), n);
  EXPECT_EQ(counter(Counter::pgmigrate_to_ram), n);
  EXPECT_EQ(count_states(*as, base, n).system, n);
  EXPECT_EQ(drv->pagemap().pages_in_use(), 0u);
  EXPECT_EQ(drv->page_free_calls(), n);
  EXPECT_TRUE(drv->books_balanced());
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_F(MigrateVmaTest, DstZeroSkipsThePage) {
  constexpr std::size_t n = 8;
  const VirtAddr base = map_pages(n);
  fill_range(base, n);
  RawMigration m(*as, base, base + n * kPageSize, drv->owner(), MIGRATE_VMA_SELECT_SYSTEM);
  ASSERT_TRUE(m.setup().is_ok());
  ASSERT_EQ(m.args.cpages, n);
  // Only even pages get a destination.
  ASSERT_EQ(drv->copy_to_device(m.src.data(), m.dst.data(), n, [](std::size_t i) { return i % 2 == 0; }), n / 2);
  m.pages_and_finalize();
  for (std::size_t i = 0; i < n; ++i) {
    SCOPED_TRACE(i);
    EXPECT_EQ((m.src[i] & MIGRATE_PFN_MIGRATE) != 0, i % 2 == 0);
    EXPECT_EQ(as->page_info(base + i * kPageSize).state,
              i % 2 == 0 ? PageInfo::State::kDevicePrivate : PageInfo::State::kSystem);
  }
  EXPECT_EQ(counter(Counter::pgmigrate_success), n / 2);
  EXPECT_EQ(counter(Counter::pgmigrate_fail), n / 2);
  UHMM_EXPECT_INVARIANTS(*as);
  // The skipped pages never left the CPU: reading them does not fault.
  for (std::size_t i = 1; i < n; i += 2) EXPECT_TRUE(page_has_pattern((base + i * kPageSize).ptr(), i)) << i;
  EXPECT_EQ(counter(Counter::device_private_faults), 0u);
  EXPECT_TRUE(range_has_pattern(base, n));
  EXPECT_EQ(counter(Counter::device_private_faults), n / 2);
}

// finalize tells the driver where a CPU access waited for the migration
// (MigrateVma::last_waited: the highest such page), and 0 when none did.
TEST_F(MigrateVmaTest, FinalizeReportsTheHighestPageACpuAccessWaitedOn) {
  constexpr std::size_t n = 8;
  const VirtAddr base = map_pages(n);
  fill_range(base, n);
  {
    RawMigration quiet(*as, base, base + n * kPageSize, drv->owner(), MIGRATE_VMA_SELECT_SYSTEM);
    ASSERT_TRUE(quiet.setup().is_ok());
    quiet.pages_and_finalize();  // no destinations: every page stays, nobody waited
    EXPECT_EQ(quiet.args.last_waited.value, 0u);
  }
  RawMigration m(*as, base, base + n * kPageSize, drv->owner(), MIGRATE_VMA_SELECT_SYSTEM);
  ASSERT_TRUE(m.setup().is_ok());
  ASSERT_EQ(m.args.cpages, n);
  const std::uint64_t parked = counter(Counter::faults_parked);
  std::atomic<bool> read_ok{false};
  std::thread reader([&] { read_ok = page_has_pattern((base + 5 * kPageSize).ptr(), 5); });
  for (int i = 0; i < 10000 && counter(Counter::faults_parked) == parked; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  ASSERT_EQ(counter(Counter::faults_parked), parked + 1);  // the read waits for the migration
  ASSERT_EQ(drv->copy_to_device(m.src.data(), m.dst.data(), n, [](std::size_t) { return true; }), n);
  m.pages_and_finalize();
  EXPECT_EQ(m.args.last_waited, base + 5 * kPageSize);
  reader.join();
  EXPECT_TRUE(read_ok.load());  // it then faulted the page back from the device
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_F(MigrateVmaTest, HoleIsFilledOnlyIfStillUnpopulated) {
  constexpr std::size_t n = 4;
  const VirtAddr base = map_pages(n);
  RawMigration m(*as, base, base + n * kPageSize, drv->owner(), MIGRATE_VMA_SELECT_SYSTEM);
  ASSERT_TRUE(m.setup().is_ok());
  ASSERT_EQ(m.src[0], MIGRATE_PFN_MIGRATE);
  // The CPU populates the hole between setup and pages (holes are not
  // locked by setup, so this does not wait).
  *base.as<volatile std::uint64_t>() = 0xC0FFEE;
  ASSERT_EQ(drv->copy_to_device(m.src.data(), m.dst.data(), n), n);
  m.pages_and_finalize();
  EXPECT_EQ(m.src[0] & MIGRATE_PFN_MIGRATE, 0u) << "a hole the CPU populated must not be replaced";
  EXPECT_EQ(as->page_info(base).state, PageInfo::State::kSystem);
  EXPECT_EQ(*base.as<volatile std::uint64_t>(), 0xC0FFEEu);
  // Every page is readable; the unused device destinations went back.
  for (std::size_t i = 0; i < n; ++i) {
    const auto* w = (base + i * kPageSize).as<volatile std::uint64_t>();
    for (std::size_t k = (i == 0 ? 1 : 0); k < test::kWordsPerPage; ++k) ASSERT_EQ(w[k], 0u) << i << ":" << k;
  }
  ASSERT_TRUE(test::settles_to(drv->pagemap(), 0));
  EXPECT_EQ(drv->pagemap().pages_in_use(), 0u);
  EXPECT_TRUE(drv->books_balanced());
  UHMM_EXPECT_INVARIANTS(*as);
}

// ---- device pages: selection by owner, migrating back ----------------------

TEST_F(MigrateVmaTest, SelectionIgnoresAnotherOwnersDevicePages) {
  auto other = TestDriver::create(64);
  ASSERT_NE(other, nullptr);
  constexpr std::size_t n = 8;
  const VirtAddr base = map_pages(n);
  fill_range(base, n);
  ASSERT_EQ(to_device(base, n), n);
  {
    SCOPED_TRACE("SELECT_DEVICE_PRIVATE with another owner");
    RawMigration m(*as, base, base + n * kPageSize, other->owner(), MIGRATE_VMA_SELECT_DEVICE_PRIVATE);
    ASSERT_TRUE(m.setup().is_ok());
    EXPECT_EQ(m.args.npages, n);
    EXPECT_EQ(m.args.cpages, 0u);
    for (std::size_t i = 0; i < n; ++i) EXPECT_EQ(m.src[i], 0u) << i;
    m.pages_and_finalize();
  }
  {
    SCOPED_TRACE("SELECT_SYSTEM does not select device pages");
    RawMigration m(*as, base, base + n * kPageSize, drv->owner(), MIGRATE_VMA_SELECT_SYSTEM);
    ASSERT_TRUE(m.setup().is_ok());
    EXPECT_EQ(m.args.cpages, 0u);
    for (std::size_t i = 0; i < n; ++i) EXPECT_EQ(m.src[i], 0u) << i;
    other->copy_to_device(m.src.data(), m.dst.data(), n);  // nothing to copy
    m.pages_and_finalize();
  }
  EXPECT_EQ(count_states(*as, base, n).device, n);
  EXPECT_EQ(drv->pagemap().pages_in_use(), n);
  EXPECT_EQ(other->pagemap().pages_in_use(), 0u);
  EXPECT_EQ(counter(Counter::device_private_faults), 0u);
  UHMM_EXPECT_INVARIANTS(*as);
  EXPECT_TRUE(range_has_pattern(base, n));
  EXPECT_TRUE(other->books_balanced());
}

TEST_F(MigrateVmaTest, SelectDevicePrivateWithOwnerMigratesBackAndFreesEachPageOnce) {
  constexpr std::size_t n = 12;
  const VirtAddr base = map_pages(n);
  fill_range(base, n, 500);
  ASSERT_EQ(to_device(base, n), n);
  std::vector<DevicePage*> pages(n);
  for (std::size_t i = 0; i < n; ++i) pages[i] = as->page_info(base + i * kPageSize).device_page;

  RawMigration m(*as, base, base + n * kPageSize, drv->owner(), MIGRATE_VMA_SELECT_DEVICE_PRIVATE);
  ASSERT_TRUE(m.setup().is_ok());
  EXPECT_EQ(m.args.npages, n);
  EXPECT_EQ(m.args.cpages, n);
  for (std::size_t i = 0; i < n; ++i) {
    SCOPED_TRACE(i);
    EXPECT_EQ(m.src[i], migrate_pfn(pages[i]->pfn()) | MIGRATE_PFN_MIGRATE | MIGRATE_PFN_WRITE);
    EXPECT_EQ(migrate_pfn_to_device_page(m.src[i]), pages[i]);
    EXPECT_EQ(migrate_pfn_to_host(m.src[i]), nullptr);
    EXPECT_TRUE(pages[i]->is_locked());
    EXPECT_TRUE(test::buffer_has_pattern(drv->memory(*pages[i]), 500 + i));
  }
  ASSERT_EQ(drv->copy_to_ram(*as, m.src.data(), m.dst.data(), n), n);
  EXPECT_EQ(drv->page_free_calls(), 0u) << "no page may be freed before finalize";
  m.pages_and_finalize();
  EXPECT_EQ(m.migrating(), n);
  EXPECT_EQ(drv->page_free_calls(), n);
  for (std::size_t i = 0; i < n; ++i) EXPECT_EQ(drv->page_free_calls(pages[i]->index()), 1u) << i;
  EXPECT_EQ(drv->pagemap().pages_in_use(), 0u);
  EXPECT_EQ(count_states(*as, base, n).system, n);
  EXPECT_EQ(counter(Counter::pgmigrate_to_ram), n);
  EXPECT_EQ(counter(Counter::pgmigrate_to_device), n);
  EXPECT_EQ(counter(Counter::pgmigrate_success), 2 * n);
  UHMM_EXPECT_INVARIANTS(*as);
  EXPECT_TRUE(range_has_pattern(base, n, 500));
  EXPECT_EQ(counter(Counter::device_private_faults), 0u) << "explicit migration back must not fault";
  EXPECT_TRUE(drv->books_balanced());
}

TEST_F(MigrateVmaTest, MixedSelectionCollectsSystemAndOwnDevicePages) {
  constexpr std::size_t n = 8;
  const VirtAddr base = map_pages(n);
  fill_range(base, n);
  ASSERT_EQ(to_device(base, n / 2), n / 2);  // pages 0-3 on the device, 4-7 on the CPU
  RawMigration m(*as, base, base + n * kPageSize, drv->owner(),
                 MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_DEVICE_PRIVATE);
  ASSERT_TRUE(m.setup().is_ok());
  EXPECT_EQ(m.args.cpages, n);
  for (std::size_t i = 0; i < n; ++i) {
    SCOPED_TRACE(i);
    EXPECT_EQ(migrate_pfn_to_device_page(m.src[i]) != nullptr, i < n / 2);
    EXPECT_EQ(migrate_pfn_to_host(m.src[i]) != nullptr, i >= n / 2);
  }
  // Swap sides: device pages come back, system pages go out.
  drv->copy_to_ram(*as, m.src.data(), m.dst.data(), n / 2);
  drv->copy_to_device(m.src.data() + n / 2, m.dst.data() + n / 2, n / 2);
  m.pages_and_finalize();
  for (std::size_t i = 0; i < n; ++i)
    EXPECT_EQ(as->page_info(base + i * kPageSize).state,
              i < n / 2 ? PageInfo::State::kSystem : PageInfo::State::kDevicePrivate)
        << i;
  EXPECT_EQ(drv->pagemap().pages_in_use(), n / 2);
  UHMM_EXPECT_INVARIANTS(*as);
  EXPECT_TRUE(range_has_pattern(base, n));
}

TEST_F(MigrateVmaTest, CpuWriteToDevicePageFaultsItBackWithItsData) {
  constexpr std::size_t n = 4;
  const VirtAddr base = map_pages(n);
  fill_range(base, n);
  ASSERT_EQ(to_device(base, n), n);
  auto* w = (base + 2 * kPageSize).as<volatile std::uint64_t>();
  w[100] = 0xABCDEF;
  ASSERT_TRUE(test::settles_to(drv->pagemap(), n - 1));
  EXPECT_EQ(drv->migrate_to_ram_calls(), 1u);
  EXPECT_EQ(counter(Counter::device_private_faults), 1u);
  EXPECT_EQ(as->page_info(base + 2 * kPageSize).state, PageInfo::State::kSystem);
  // The driver brings back exactly the faulting page.
  EXPECT_EQ(count_states(*as, base, n).device, n - 1);
  for (std::size_t k = 0; k < test::kWordsPerPage; ++k)
    ASSERT_EQ(w[k], k == 100 ? 0xABCDEFu : test::pattern_word(2, k)) << k;
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_F(MigrateVmaTest, PageFreeRunsOncePerLifetimeAcrossRoundTrips) {
  constexpr std::size_t n = 8;
  const VirtAddr base = map_pages(n);
  fill_range(base, n);
  for (int round = 0; round < 5; ++round) {
    SCOPED_TRACE(round);
    ASSERT_EQ(to_device(base, n), n);
    EXPECT_EQ(drv->pagemap().pages_in_use(), n);
    ASSERT_TRUE(range_has_pattern(base, n));  // faults back one page at a time
    ASSERT_TRUE(test::settles_to(drv->pagemap(), 0));
    EXPECT_EQ(drv->pagemap().pages_in_use(), 0u);
    EXPECT_EQ(drv->page_free_calls(), (round + 1) * n);
    EXPECT_TRUE(drv->books_balanced());
  }
  EXPECT_EQ(counter(Counter::pgmigrate_to_ram), 5 * n);
  UHMM_EXPECT_INVARIANTS(*as);
}

// Fault completion ordering: the faulting access resumes only once the
// whole fault is done, page_free of the old device page included, as in the
// kernel, where the faulting thread runs migrate_to_ram itself.  (uhmm used
// to wake the access from the UFFDIO_MOVE, before finalize and the fault's
// put_page; a slow page_free makes that gap visible deterministically.)
TEST_F(MigrateVmaTest, AccessResumesOnlyAfterFaultMigrationHasFreedTheDevicePage) {
  const VirtAddr base = map_pages(1);
  test::fill_page(base.ptr(), 9);
  ASSERT_EQ(to_device(base, 1), 1u);
  drv->set_page_free_delay(std::chrono::milliseconds(300));
  EXPECT_EQ(*base.as<volatile std::uint64_t>(), test::pattern_word(9, 0));
  // The access has completed: the migration back, page_free included, must be over.
  EXPECT_EQ(drv->pagemap().pages_in_use(), 0u);
  EXPECT_EQ(drv->free_pages(), kDevicePages);
  ASSERT_TRUE(test::settles_to(drv->pagemap(), 0));
  drv->set_page_free_delay(std::chrono::milliseconds(0));
  EXPECT_TRUE(page_has_pattern(base.ptr(), 9));
}

TEST_F(MigrateVmaTest, UnmapWithDevicePagesFreesThem) {
  constexpr std::size_t n = 8;
  const VirtAddr base = map_pages(n);
  fill_range(base, n);
  ASSERT_EQ(to_device(base, n), n);
  ASSERT_TRUE(as->unmap(base).is_ok());
  EXPECT_EQ(drv->pagemap().pages_in_use(), 0u);
  EXPECT_EQ(drv->page_free_calls(), n);
  EXPECT_TRUE(drv->books_balanced());
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_F(MigrateVmaTest, UnregisterWithPagesInUseIsEbusyThenSucceeds) {
  constexpr std::size_t n = 4;
  const VirtAddr base = map_pages(n);
  fill_range(base, n);
  ASSERT_EQ(to_device(base, n), n);
  EXPECT_EQ(drv->pagemap().unregister(std::chrono::milliseconds(10)).code(), EBUSY);
  EXPECT_TRUE(drv->pagemap().registered());
  EXPECT_TRUE(range_has_pattern(base, n));
  EXPECT_TRUE(test::settles_to(drv->pagemap(), 0));
  EXPECT_TRUE(drv->pagemap().unregister(std::chrono::milliseconds(10)).is_ok());
  EXPECT_FALSE(drv->pagemap().registered());
}

// ---- device-side eviction ----------------------------------------------------

TEST_F(MigrateVmaTest, MigrateDeviceRangeOfWholeMapEvictsEverything) {
  constexpr std::size_t n = 40, present = 30;
  const VirtAddr base = map_pages(n);
  fill_range(base, present, 77);
  ASSERT_EQ(to_device(base, n), n);
  const std::uint64_t faults_before = counter(Counter::device_private_faults);

  const DevicePfnRange range = drv->pagemap().range();
  ASSERT_EQ(range.count.value, kDevicePages);
  std::vector<std::uint64_t> src(kDevicePages, ~std::uint64_t{0}), dst(kDevicePages, 0);
  ASSERT_TRUE(migrate_device_range(src.data(), range.first, range.count).is_ok());
  std::size_t collected = 0;
  for (std::size_t i = 0; i < kDevicePages; ++i) {
    DevicePage& page = drv->pagemap().page_at(i);
    if (page.refcount() == 0) {
      EXPECT_EQ(src[i], 0u) << "free page " << i << " must not be collected";
      continue;
    }
    ++collected;
    EXPECT_EQ(src[i], migrate_pfn(page.pfn()) | MIGRATE_PFN_MIGRATE | MIGRATE_PFN_WRITE) << i;
    EXPECT_TRUE(page.is_locked());
  }
  EXPECT_EQ(collected, n);
  EXPECT_EQ(drv->copy_to_ram(*as, src.data(), dst.data(), kDevicePages), n);
  migrate_device_pages(src.data(), dst.data(), range.count);
  migrate_device_finalize(src.data(), dst.data(), range.count);

  EXPECT_EQ(drv->pagemap().pages_in_use(), 0u);
  EXPECT_EQ(drv->page_free_calls(), n);
  EXPECT_TRUE(drv->books_balanced());
  EXPECT_EQ(count_states(*as, base, n).system, n);
  EXPECT_EQ(counter(Counter::pgmigrate_to_ram), n);
  UHMM_EXPECT_INVARIANTS(*as);
  EXPECT_TRUE(range_has_pattern(base, present, 77));
  for (std::size_t i = present; i < n; ++i) EXPECT_EQ(*(base + i * kPageSize).as<volatile std::uint64_t>(), 0u);
  EXPECT_EQ(counter(Counter::device_private_faults), faults_before) << "eviction must not go through CPU faults";
}

TEST_F(MigrateVmaTest, MigrateDeviceRangeDiscardWhileInTransitWins) {
  constexpr std::size_t n = 8;
  const VirtAddr base = map_pages(n);
  fill_range(base, n, 5);
  ASSERT_EQ(to_device(base, n), n);
  const DevicePfnRange range = drv->pagemap().range();
  std::vector<std::uint64_t> src(kDevicePages, 0), dst(kDevicePages, 0);
  ASSERT_TRUE(migrate_device_range(src.data(), range.first, range.count).is_ok());
  // The pages are in transit (nothing mapped): the discard zaps nothing.
  ASSERT_EQ(::madvise((base + 2 * kPageSize).ptr(), 2 * kPageSize, MADV_DONTNEED), 0);
  EXPECT_EQ(drv->copy_to_ram(*as, src.data(), dst.data(), kDevicePages), n);
  migrate_device_pages(src.data(), dst.data(), range.count);
  migrate_device_finalize(src.data(), dst.data(), range.count);
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint64_t w = *(base + i * kPageSize).as<volatile std::uint64_t>();
    if (i == 2 || i == 3) {
      EXPECT_EQ(w, 0u) << "discarded page " << i << " came back";
    } else {
      EXPECT_EQ(w, test::pattern_word(5 + i, 0)) << i;
    }
  }
  EXPECT_TRUE(test::settles(*as));
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_F(MigrateVmaTest, ForkWaitsForADeviceEvictionInTransit) {
  constexpr std::size_t n = 4;
  const VirtAddr base = map_pages(n);
  fill_range(base, n, 9);
  ASSERT_EQ(to_device(base, n), n);
  const DevicePfnRange range = drv->pagemap().range();
  std::vector<std::uint64_t> src(kDevicePages, 0), dst(kDevicePages, 0);
  ASSERT_TRUE(migrate_device_range(src.data(), range.first, range.count).is_ok());
  std::atomic<bool> forked{false};
  test::ChildResult child;
  std::thread forker([&] {
    child = test::run_in_child([&] { return range_has_pattern(base, n, 9) ? 0 : 1; });
    forked.store(true);
  });
  // Not a timing assertion: a slow machine can only make this pass wrongly.
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_FALSE(forked.load()) << "fork went ahead with pages in transit";
  EXPECT_EQ(drv->copy_to_ram(*as, src.data(), dst.data(), kDevicePages), n);
  migrate_device_pages(src.data(), dst.data(), range.count);
  migrate_device_finalize(src.data(), dst.data(), range.count);
  forker.join();
  EXPECT_TRUE(child.exited && child.exit_code == 0) << child.describe();
  EXPECT_TRUE(range_has_pattern(base, n, 9));
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_F(MigrateVmaTest, MigrateDevicePagesWithoutDestinationLeavesPagesOnDevice) {
  constexpr std::size_t n = 6;
  const VirtAddr base = map_pages(n);
  fill_range(base, n);
  ASSERT_EQ(to_device(base, n), n);
  const DevicePfnRange range = drv->pagemap().range();
  std::vector<std::uint64_t> src(kDevicePages), dst(kDevicePages, 0);
  ASSERT_TRUE(migrate_device_range(src.data(), range.first, range.count).is_ok());
  // The driver gives up (no destinations): everything stays put.
  migrate_device_pages(src.data(), dst.data(), range.count);
  migrate_device_finalize(src.data(), dst.data(), range.count);
  EXPECT_EQ(count_states(*as, base, n).device, n);
  EXPECT_EQ(count_states(*as, base, n).locked, 0u);
  EXPECT_EQ(drv->pagemap().pages_in_use(), n);
  for (std::size_t i = 0; i < n; ++i) EXPECT_FALSE(drv->pagemap().page_at(i).is_locked()) << i;
  EXPECT_EQ(counter(Counter::pgmigrate_fail), n);
  UHMM_EXPECT_INVARIANTS(*as);
  EXPECT_TRUE(range_has_pattern(base, n));
}

TEST_F(MigrateVmaTest, MigrateDeviceRangeOutsideAnyMapIsEinval) {
  std::vector<std::uint64_t> src(64);
  // System pfns are never device pfns.
  EXPECT_EQ(migrate_device_range(src.data(), DevicePfn{kDevicePfnBase - 32}, PageCount{16}).code(), EINVAL);
  // A reserved range no page map covers.
  auto free_range = request_free_mem_region(PageCount{32});
  ASSERT_TRUE(free_range.is_ok());
  EXPECT_EQ(migrate_device_range(src.data(), free_range->first, PageCount{16}).code(), EINVAL);
  const DevicePfn stray[] = {free_range->first + 3};
  EXPECT_EQ(migrate_device_pfns(src.data(), stray).code(), EINVAL);
  release_mem_region(*free_range);
  // Part inside the map, part past its end.
  const DevicePfnRange range = drv->pagemap().range();
  EXPECT_EQ(migrate_device_range(src.data(), DevicePfn{range.end().value - 8}, PageCount{16}).code(), EINVAL);
  // Bad arguments.
  EXPECT_EQ(migrate_device_range(nullptr, range.first, PageCount{4}).code(), EINVAL);
  EXPECT_EQ(migrate_device_range(src.data(), range.first, PageCount{0}).code(), EINVAL);
  EXPECT_EQ(drv->pagemap().pages_in_use(), 0u);
}

// ---- device-coherent pages ---------------------------------------------------

// Coherent pages are mapped like system pages, but only their owner moves
// them, with SELECT_DEVICE_COHERENT: SELECT_SYSTEM and SELECT_DEVICE_PRIVATE
// (any owner) leave them, as does SELECT_DEVICE_COHERENT with another owner.
TEST_F(MigrateVmaTest, OnlyTheirOwnerWithSelectDeviceCoherentCollectsCoherentPages) {
  coh = TestDriver::create(64, PagemapType::kCoherent);
  ASSERT_NE(coh, nullptr);
  constexpr std::size_t n = 8;
  const VirtAddr base = map_pages(n);
  fill_range(base, n);
  ASSERT_EQ(to_coherent(base, n), n);
  ASSERT_EQ(count_states(*as, base, n).coherent, n);
  const std::uint64_t busy_before = counter(Counter::migrate_skipped_locked);

  struct Case {
    const void* owner;
    std::uint32_t flags;
    const char* what;
  } cases[] = {
      {coh->owner(), MIGRATE_VMA_SELECT_SYSTEM, "SELECT_SYSTEM, own owner"},
      {drv->owner(), MIGRATE_VMA_SELECT_SYSTEM, "SELECT_SYSTEM, another owner"},
      {coh->owner(), MIGRATE_VMA_SELECT_DEVICE_PRIVATE, "SELECT_DEVICE_PRIVATE, own owner"},
      {drv->owner(), MIGRATE_VMA_SELECT_DEVICE_COHERENT, "SELECT_DEVICE_COHERENT, another owner"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    RawMigration m(*as, base, base + n * kPageSize, c.owner, c.flags);
    ASSERT_TRUE(m.setup().is_ok());
    EXPECT_EQ(m.args.cpages, 0u);
    for (std::size_t i = 0; i < n; ++i) EXPECT_EQ(m.src[i], 0u) << i;
    EXPECT_EQ(count_states(*as, base, n).locked, 0u);
    m.pages_and_finalize();
    EXPECT_EQ(count_states(*as, base, n).coherent, n);
  }
  EXPECT_EQ(counter(Counter::migrate_skipped_locked), busy_before);
  EXPECT_TRUE(range_has_pattern(base, n));
  EXPECT_EQ(coh->page_free_calls(), 0u);
  UHMM_EXPECT_INVARIANTS(*as);
}

// setup takes the frame home (the driver reads it there, the CPU waits);
// without a destination finalize puts it back: the page stays coherent,
// data intact, and no page_free runs.  Migrated for real afterwards, each
// page is freed exactly once.
TEST_F(MigrateVmaTest, CoherentPageWithoutDestinationIsRestoredWithItsData) {
  coh = TestDriver::create(64, PagemapType::kCoherent);
  ASSERT_NE(coh, nullptr);
  constexpr std::size_t n = 8;
  const VirtAddr base = map_pages(n);
  fill_range(base, n, 40);
  ASSERT_EQ(to_coherent(base, n), n);
  std::vector<DevicePage*> pages(n);
  for (std::size_t i = 0; i < n; ++i) pages[i] = as->page_info(base + i * kPageSize).device_page;
  const std::uint64_t faults_before = counter(Counter::uffd_faults);

  {
    RawMigration m(*as, base, base + n * kPageSize, coh->owner(), MIGRATE_VMA_SELECT_DEVICE_COHERENT);
    ASSERT_TRUE(m.setup().is_ok());
    EXPECT_EQ(m.args.cpages, n);
    for (std::size_t i = 0; i < n; ++i) {
      EXPECT_EQ(m.src[i], migrate_pfn(pages[i]->pfn()) | MIGRATE_PFN_MIGRATE | MIGRATE_PFN_WRITE) << i;
      EXPECT_EQ(migrate_pfn_to_device_page(m.src[i]), pages[i]);
      // The frame is home, where the driver's copy engine reads it.
      EXPECT_TRUE(test::buffer_has_pattern(coh->memory(*pages[i]), 40 + i)) << i;
      EXPECT_TRUE(pages[i]->is_locked());
    }
    EXPECT_EQ(count_states(*as, base, n).locked, n);
    std::fill(m.dst.begin(), m.dst.end(), 0);  // the driver migrates none of them
    m.pages_and_finalize();
    for (std::size_t i = 0; i < n; ++i) EXPECT_EQ(m.src[i] & MIGRATE_PFN_MIGRATE, 0u) << i;
  }
  EXPECT_EQ(count_states(*as, base, n).coherent, n);
  EXPECT_EQ(coh->page_free_calls(), 0u);
  for (std::size_t i = 0; i < n; ++i) EXPECT_EQ(as->page_info(base + i * kPageSize).device_page, pages[i]);
  EXPECT_TRUE(range_has_pattern(base, n, 40));
  EXPECT_EQ(counter(Counter::uffd_faults), faults_before) << "the restored frames are mapped again";
  UHMM_EXPECT_INVARIANTS(*as);

  RawMigration back(*as, base, base + n * kPageSize, coh->owner(), MIGRATE_VMA_SELECT_DEVICE_COHERENT);
  ASSERT_TRUE(back.setup().is_ok());
  EXPECT_EQ(coh->copy_to_ram(*as, back.src.data(), back.dst.data(), n), n);
  back.pages_and_finalize();
  EXPECT_EQ(count_states(*as, base, n).system, n);
  EXPECT_TRUE(range_has_pattern(base, n, 40));
  EXPECT_EQ(coh->page_free_calls(), n);
  for (std::size_t i = 0; i < n; ++i) EXPECT_EQ(coh->page_free_calls(pages[i]->index()), 1u);
  EXPECT_TRUE(coh->books_balanced());
  UHMM_EXPECT_INVARIANTS(*as);
}

// Eviction collects coherent pages too: their frames go home, the driver
// copies them to system pages, each device page is freed once.
TEST_F(MigrateVmaTest, MigrateDeviceRangeEvictsCoherentPages) {
  coh = TestDriver::create(64, PagemapType::kCoherent);
  ASSERT_NE(coh, nullptr);
  constexpr std::size_t n = 12;
  const VirtAddr base = map_pages(n);
  fill_range(base, n, 9);
  ASSERT_EQ(to_coherent(base, n), n);
  const DevicePfnRange range = coh->pagemap().range();
  std::vector<std::uint64_t> src(range.count.value), dst(range.count.value, 0);
  ASSERT_TRUE(migrate_device_range(src.data(), range.first, range.count).is_ok());
  std::size_t collected = 0;
  for (std::uint64_t s : src)
    if (s & MIGRATE_PFN_MIGRATE) ++collected;
  EXPECT_EQ(collected, n);
  EXPECT_EQ(count_states(*as, base, n).locked, n);
  EXPECT_EQ(coh->copy_to_ram(*as, src.data(), dst.data(), src.size()), n);
  migrate_device_pages(src.data(), dst.data(), range.count);
  migrate_device_finalize(src.data(), dst.data(), range.count);
  EXPECT_EQ(count_states(*as, base, n).system, n);
  EXPECT_TRUE(range_has_pattern(base, n, 9));
  EXPECT_EQ(coh->pagemap().pages_in_use(), 0u);
  EXPECT_EQ(coh->page_free_calls(), n);
  EXPECT_TRUE(coh->books_balanced());
  UHMM_EXPECT_INVARIANTS(*as);
}

// Eviction without destinations leaves coherent pages mapped, data intact.
TEST_F(MigrateVmaTest, MigrateDeviceRangeWithoutDestinationLeavesCoherentPagesMapped) {
  coh = TestDriver::create(64, PagemapType::kCoherent);
  ASSERT_NE(coh, nullptr);
  constexpr std::size_t n = 4;
  const VirtAddr base = map_pages(n);
  fill_range(base, n, 3);
  ASSERT_EQ(to_coherent(base, n), n);
  const DevicePfnRange range = coh->pagemap().range();
  std::vector<std::uint64_t> src(range.count.value), dst(range.count.value, 0);
  ASSERT_TRUE(migrate_device_range(src.data(), range.first, range.count).is_ok());
  migrate_device_pages(src.data(), dst.data(), range.count);
  migrate_device_finalize(src.data(), dst.data(), range.count);
  EXPECT_EQ(count_states(*as, base, n).coherent, n);
  EXPECT_TRUE(range_has_pattern(base, n, 3));
  EXPECT_EQ(coh->page_free_calls(), 0u);
  UHMM_EXPECT_INVARIANTS(*as);
}

// The address space's teardown drops coherent entries: page_free once each.
TEST_F(MigrateVmaTest, UnmapWithCoherentPagesFreesThemOnce) {
  coh = TestDriver::create(64, PagemapType::kCoherent);
  ASSERT_NE(coh, nullptr);
  constexpr std::size_t n = 6;
  const VirtAddr base = map_pages(n);
  fill_range(base, n);
  ASSERT_EQ(to_coherent(base, n), n);
  ASSERT_TRUE(as->unmap(base).is_ok());
  EXPECT_EQ(coh->pagemap().pages_in_use(), 0u);
  EXPECT_EQ(coh->page_free_calls(), n);
  EXPECT_TRUE(coh->books_balanced());
}

}  // namespace
}  // namespace uhmm
