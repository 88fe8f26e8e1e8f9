// Large pages in the three-phase API: MIGRATE_VMA_SELECT_COMPOUND entries,
// large device pages (zone_device_folio_init) and 2 MiB system pages
// (alloc_system_huge_page) as COMPOUND destinations, and splitting a unit
// for base-page destinations (docs/migration.md, "Large pages").
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <vector>

#include "e2e/test_support.hpp"
#include "migrate/test_driver.hpp"
#include "uhmm/uhmm.hpp"

namespace uhmm {
namespace {

using test::count_states;
using test::fill_range;
using test::range_has_pattern;
using test::RawMigration;
using test::TestDriver;

constexpr std::size_t kUnit = kPagesPerHugePage;
constexpr std::uint32_t kToDevice = MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_COMPOUND;
constexpr std::uint32_t kBack = MIGRATE_VMA_SELECT_DEVICE_PRIVATE | MIGRATE_VMA_SELECT_COMPOUND;

struct CompoundTest : ::testing::Test {
  void SetUp() override {
    AddressSpaceOptions options;
    options.hole_fault_around_pages = 1;  // the tests decide which pages exist
    auto r = AddressSpace::create(options);
    ASSERT_TRUE(r.is_ok()) << r.status().to_string();
    as = std::move(*r);
    drv = TestDriver::create(4 * kUnit);
    ASSERT_NE(drv, nullptr);
  }
  void TearDown() override {
    as.reset();
    if (drv) {
      EXPECT_TRUE(drv->books_balanced());
    }
    drv.reset();
  }

  // `units` whole aligned 2 MiB units of a managed range.
  VirtAddr map_units(std::size_t units) {
    auto r = as->map((units + 1) * kHugePageSize);
    EXPECT_TRUE(r.is_ok()) << r.status().to_string();
    if (!r.is_ok()) return VirtAddr{};
    const VirtAddr at = *r;
    return at.huge_aligned() ? at : at.huge_down() + kHugePageSize;
  }

  std::uint64_t counter(Counter c) const { return as->stats().get(c); }

  // The driver's copy for a COMPOUND entry at src[i]: one large device page
  // (zeroed for a hole), dst[i] = its head | COMPOUND.
  bool copy_unit_to_large_page(const std::uint64_t* src, std::uint64_t* dst, std::size_t i) {
    DevicePage* head = drv->alloc_large();
    if (head == nullptr) return false;
    if (src[i] & MIGRATE_PFN_VALID) {
      std::memcpy(drv->memory(*head), migrate_pfn_to_host(src[i]), kHugePageSize);
    } else {
      std::memset(drv->memory(*head), 0, kHugePageSize);
    }
    dst[i] = migrate_pfn(head->pfn()) | MIGRATE_PFN_COMPOUND | MIGRATE_PFN_WRITE;
    return true;
  }

  // The driver's copy for a COMPOUND device entry at src[i]: one 2 MiB
  // system page, dst[i] = its first pfn | COMPOUND.
  bool copy_unit_to_huge_system_page(const std::uint64_t* src, std::uint64_t* dst, std::size_t i) {
    DevicePage* head = migrate_pfn_to_device_page(src[i]);
    std::uint64_t pfn = 0;
    if (head == nullptr || !alloc_system_huge_page(*as, &pfn).is_ok()) return false;
    std::memcpy(reinterpret_cast<void*>(pfn << kPageShift), drv->memory(*head), kHugePageSize);
    dst[i] = migrate_pfn(pfn) | MIGRATE_PFN_COMPOUND;
    return true;
  }

  // The unit at `base` filled with pattern `seed`, collected as one
  // COMPOUND entry (the migration ends when the result goes).
  std::unique_ptr<RawMigration> collect_filled_unit(VirtAddr base, std::uint64_t seed) {
    fill_range(base, kUnit, seed);
    auto m = std::make_unique<RawMigration>(*as, base, base + kHugePageSize, drv->owner(), kToDevice);
    EXPECT_TRUE(m->setup().is_ok()) << m->setup_status.to_string();
    EXPECT_NE(m->src[0] & MIGRATE_PFN_COMPOUND, 0u);
    return m;
  }

  // The driver takes page k of a collected unit as a base page (its data
  // from `unit_data`, the unit's 2 MiB in staging): dst[k] is set.
  void give_base_page(RawMigration& m, const std::byte* unit_data, std::size_t k) {
    DevicePage* page = drv->alloc();
    ASSERT_NE(page, nullptr);
    std::memcpy(drv->memory(*page), unit_data + k * kPageSize, kPageSize);
    m.dst[k] = migrate_pfn(page->pfn()) | MIGRATE_PFN_WRITE;
  }

  // After a split that moved `moved` pages of the unit at `base`.
  void expect_split(VirtAddr base, std::size_t moved, std::uint64_t seed) {
    const auto states = count_states(*as, base, kUnit);
    EXPECT_EQ(states.device, moved);
    EXPECT_EQ(states.system, kUnit - moved);
    EXPECT_EQ(counter(Counter::pgmigrate_to_device), moved);
    EXPECT_EQ(counter(Counter::thp_migration_split), 1u);
    UHMM_EXPECT_INVARIANTS(*as);
    EXPECT_TRUE(range_has_pattern(base, kUnit, seed));
  }

  // Moves `units` units starting at `base` to one large device page each.
  void units_to_large_pages(VirtAddr base, std::size_t units) {
    RawMigration m(*as, base, base + units * kHugePageSize, drv->owner(), kToDevice);
    ASSERT_TRUE(m.setup().is_ok()) << m.setup_status.to_string();
    ASSERT_EQ(m.args.cpages, units);
    for (std::size_t u = 0; u < units; ++u) ASSERT_TRUE(copy_unit_to_large_page(m.src.data(), m.dst.data(), u * kUnit));
    m.pages_and_finalize();
    ASSERT_EQ(count_states(*as, base, units * kUnit).device, units * kUnit);
  }

  std::unique_ptr<AddressSpace> as;
  std::unique_ptr<TestDriver> drv;
};

TEST_F(CompoundTest, SelectCompoundMakesOneEntryPerWholeUnitOfDataOrHoles) {
  const VirtAddr base = map_units(2);
  fill_range(base, kUnit, 11);  // unit 0: data; unit 1: never touched
  RawMigration m(*as, base, base + 2 * kHugePageSize, drv->owner(), kToDevice);
  ASSERT_TRUE(m.setup().is_ok()) << m.setup_status.to_string();
  EXPECT_EQ(m.args.npages, 2 * kUnit);
  EXPECT_EQ(m.args.cpages, 2u) << "one collected entry per unit";
  const std::uint64_t flags = MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE | MIGRATE_PFN_WRITE | MIGRATE_PFN_COMPOUND;
  EXPECT_EQ(m.src[0] & ((1u << MIGRATE_PFN_SHIFT) - 1), flags);
  EXPECT_EQ(migrate_pfn_to_pfn(m.src[0]) % kUnit, 0u) << "the unit's data is one aligned 2 MiB block";
  EXPECT_TRUE(test::page_has_pattern(migrate_pfn_to_host(m.src[0]), 11));
  EXPECT_TRUE(test::page_has_pattern(static_cast<std::byte*>(migrate_pfn_to_host(m.src[0])) + 511 * kPageSize,
                                     11 + 511));
  EXPECT_EQ(m.src[kUnit], MIGRATE_PFN_MIGRATE | MIGRATE_PFN_COMPOUND) << "a unit of holes";
  for (std::size_t i = 1; i < kUnit; ++i) {
    ASSERT_EQ(m.src[i], 0u) << i;
    ASSERT_EQ(m.src[kUnit + i], 0u) << i;
  }
  ASSERT_TRUE(copy_unit_to_large_page(m.src.data(), m.dst.data(), 0));
  ASSERT_TRUE(copy_unit_to_large_page(m.src.data(), m.dst.data(), kUnit));
  migrate_vma_pages(m.args);
  EXPECT_NE(m.src[0] & MIGRATE_PFN_MIGRATE, 0u);
  EXPECT_NE(m.src[kUnit] & MIGRATE_PFN_MIGRATE, 0u);
  EXPECT_EQ(m.src[1], 0u) << "a unit that stays whole keeps its one entry";
  migrate_vma_finalize(m.args);

  EXPECT_EQ(count_states(*as, base, 2 * kUnit).device, 2 * kUnit);
  EXPECT_EQ(drv->pagemap().pages_in_use(), 2 * kUnit);
  EXPECT_EQ(counter(Counter::pgmigrate_to_device), 2 * kUnit);
  EXPECT_EQ(counter(Counter::thp_migration_split), 0u);
  // Page k of the range is page k of its unit's large page.
  const DevicePage* head = as->page_info(base).device_page;
  ASSERT_NE(head, nullptr);
  EXPECT_EQ(as->page_info(base + 300 * kPageSize).device_page->pfn(), head->pfn() + 300);
  UHMM_EXPECT_INVARIANTS(*as);
  // The CPU reads everything back, page by page.
  EXPECT_TRUE(range_has_pattern(base, kUnit, 11));
  for (std::size_t i = 0; i < kUnit; ++i)
    ASSERT_EQ(*(base + kHugePageSize + i * kPageSize).as<volatile std::uint64_t>(), 0u) << i;
}

TEST_F(CompoundTest, WithoutSelectCompoundOrWithoutAWholeUnitEntriesArePages) {
  const VirtAddr base = map_units(2);
  fill_range(base, kUnit + kUnit / 2, 3);  // unit 1: half data, half holes
  {
    SCOPED_TRACE("no SELECT_COMPOUND");
    RawMigration m(*as, base, base + 2 * kHugePageSize, drv->owner(), MIGRATE_VMA_SELECT_SYSTEM);
    ASSERT_TRUE(m.setup().is_ok());
    EXPECT_EQ(m.args.cpages, 2 * kUnit);
    std::size_t compound = 0;
    for (std::size_t i = 0; i < 2 * kUnit; ++i) compound += (m.src[i] & MIGRATE_PFN_COMPOUND) != 0;
    EXPECT_EQ(compound, 0u);
    m.pages_and_finalize();  // no destinations: everything stays
  }
  {
    SCOPED_TRACE("a whole unit, then a mixed one the range ends one page short of");
    RawMigration m(*as, base, base + (2 * kHugePageSize - kPageSize), drv->owner(), kToDevice);
    ASSERT_TRUE(m.setup().is_ok());
    EXPECT_NE(m.src[0] & MIGRATE_PFN_COMPOUND, 0u);
    EXPECT_EQ(m.args.cpages, 1 + (kUnit - 1));
    std::size_t compound = 0;
    for (std::size_t i = 1; i < 2 * kUnit - 1; ++i) compound += (m.src[i] & MIGRATE_PFN_COMPOUND) != 0;
    EXPECT_EQ(compound, 0u);
    m.pages_and_finalize();
  }
  EXPECT_EQ(count_states(*as, base, 2 * kUnit).device, 0u);
  EXPECT_TRUE(range_has_pattern(base, kUnit + kUnit / 2, 3));
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_F(CompoundTest, BasePageDestinationsSplitTheUnitAndFillItsSourceEntries) {
  const VirtAddr base = map_units(1);
  auto collected = collect_filled_unit(base, 40);
  RawMigration& m = *collected;
  const std::uint64_t compound = m.src[0];
  // The driver has base pages only: one per page of the unit, every other
  // one left out (dst 0: that page stays).
  const auto* data = static_cast<const std::byte*>(migrate_pfn_to_host(m.src[0]));
  std::size_t given = 0;
  for (std::size_t k = 0; k < kUnit; k += 2, ++given) give_base_page(m, data, k);
  migrate_vma_pages(m.args);
  EXPECT_EQ(counter(Counter::thp_migration_split), 1u);
  for (std::size_t k = 0; k < kUnit; ++k) {
    SCOPED_TRACE(k);
    const std::uint64_t expected = (compound & ~MIGRATE_PFN_COMPOUND) + (k << MIGRATE_PFN_SHIFT);
    ASSERT_EQ(m.src[k], k % 2 == 0 ? expected : expected & ~MIGRATE_PFN_MIGRATE);
  }
  migrate_vma_finalize(m.args);
  expect_split(base, given, 40);
}

TEST_F(CompoundTest, BasePagesAfterAZeroFirstDestinationStillSplitTheUnit) {
  const VirtAddr base = map_units(1);
  auto collected = collect_filled_unit(base, 23);
  RawMigration& m = *collected;
  const auto* data = static_cast<const std::byte*>(migrate_pfn_to_host(m.src[0]));
  for (std::size_t k = 1; k < 4; ++k) give_base_page(m, data, k);  // page 0 stays; pages 1..3 go
  m.pages_and_finalize();
  EXPECT_EQ(m.src[0] & MIGRATE_PFN_MIGRATE, 0u);
  EXPECT_NE(m.src[1] & MIGRATE_PFN_MIGRATE, 0u);
  expect_split(base, 3, 23);
}

TEST_F(CompoundTest, BasePagesWrittenBesideACompoundDestinationGoBack) {
  const VirtAddr base = map_units(1);
  auto collected = collect_filled_unit(base, 29);
  RawMigration& m = *collected;
  ASSERT_TRUE(copy_unit_to_large_page(m.src.data(), m.dst.data(), 0));
  DevicePage* stray = drv->alloc();
  ASSERT_NE(stray, nullptr);
  m.dst[5] = migrate_pfn(stray->pfn()) | MIGRATE_PFN_WRITE;
  m.pages_and_finalize();
  EXPECT_NE(m.src[0] & MIGRATE_PFN_MIGRATE, 0u);
  EXPECT_EQ(count_states(*as, base, kUnit).device, kUnit);
  EXPECT_NE(as->page_info(base + 5 * kPageSize).device_page, stray);
  ASSERT_TRUE(test::settles_to(drv->pagemap(), kUnit)) << "the stray page went back";
  UHMM_EXPECT_INVARIANTS(*as);
  EXPECT_TRUE(range_has_pattern(base, kUnit, 29));
}

TEST_F(CompoundTest, DstZeroLeavesTheWholeUnitWithItsData) {
  const VirtAddr base = map_units(1);
  auto collected = collect_filled_unit(base, 7);
  RawMigration& m = *collected;
  std::fill(m.dst.begin(), m.dst.end(), 0);
  m.pages_and_finalize();
  EXPECT_EQ(m.src[0] & MIGRATE_PFN_MIGRATE, 0u);
  EXPECT_EQ(count_states(*as, base, kUnit).system, kUnit);
  EXPECT_EQ(counter(Counter::pgmigrate_fail), kUnit);
  EXPECT_EQ(count_states(*as, base, kUnit).locked, 0u);
  EXPECT_TRUE(range_has_pattern(base, kUnit, 7));
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_F(CompoundTest, AHoleUnitTheCpuTouchedBeforePagesMigratesNothing) {
  const VirtAddr base = map_units(1);
  RawMigration m(*as, base, base + kHugePageSize, drv->owner(), kToDevice);
  ASSERT_TRUE(m.setup().is_ok());
  ASSERT_EQ(m.src[0], MIGRATE_PFN_MIGRATE | MIGRATE_PFN_COMPOUND);
  // Holes are not locked by setup: the CPU populates one in the middle.
  *(base + 200 * kPageSize).as<volatile std::uint64_t>() = 0xFEED;
  ASSERT_TRUE(copy_unit_to_large_page(m.src.data(), m.dst.data(), 0));
  m.pages_and_finalize();
  EXPECT_EQ(m.src[0] & MIGRATE_PFN_MIGRATE, 0u) << "all of a whole unit, or none of it";
  const auto states = count_states(*as, base, kUnit);
  EXPECT_EQ(states.device, 0u);
  EXPECT_EQ(states.locked, 0u);
  EXPECT_EQ(*(base + 200 * kPageSize).as<volatile std::uint64_t>(), 0xFEEDu);
  // The large page went back to the driver, each of its pages once.
  ASSERT_TRUE(test::settles_to(drv->pagemap(), 0));
  EXPECT_EQ(drv->page_free_calls(), kUnit);
  EXPECT_TRUE(drv->books_balanced());
  // The other holes are still holes that read as zeros.
  EXPECT_EQ(*(base + 199 * kPageSize).as<volatile std::uint64_t>(), 0u);
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_F(CompoundTest, ALargeDevicePageComesBackWholeIntoOneHugeSystemPage) {
  const VirtAddr base = map_units(1);
  fill_range(base, kUnit, 90);
  units_to_large_pages(base, 1);
  const DevicePage* head = as->page_info(base).device_page;
  ASSERT_NE(head, nullptr);

  RawMigration m(*as, base, base + kHugePageSize, drv->owner(), kBack);
  ASSERT_TRUE(m.setup().is_ok());
  EXPECT_EQ(m.args.cpages, 1u);
  EXPECT_EQ(m.src[0], migrate_pfn(head->pfn()) | MIGRATE_PFN_MIGRATE | MIGRATE_PFN_WRITE | MIGRATE_PFN_COMPOUND);
  for (std::size_t i = 1; i < kUnit; ++i) ASSERT_EQ(m.src[i], 0u) << i;
  ASSERT_TRUE(copy_unit_to_huge_system_page(m.src.data(), m.dst.data(), 0));
  EXPECT_EQ(drv->page_free_calls(), 0u) << "nothing is freed before finalize";
  m.pages_and_finalize();
  EXPECT_NE(m.src[0] & MIGRATE_PFN_MIGRATE, 0u);
  EXPECT_EQ(count_states(*as, base, kUnit).system, kUnit);
  EXPECT_EQ(drv->page_free_calls(), kUnit);
  EXPECT_EQ(drv->pagemap().pages_in_use(), 0u);
  EXPECT_EQ(counter(Counter::device_private_faults), 0u);
  UHMM_EXPECT_INVARIANTS(*as);
  EXPECT_TRUE(range_has_pattern(base, kUnit, 90));
  EXPECT_TRUE(drv->books_balanced());
}

TEST_F(CompoundTest, ACpuFaultBringsBackOnePageOfALargeDevicePage) {
  const VirtAddr base = map_units(1);
  fill_range(base, kUnit, 5);
  units_to_large_pages(base, 1);
  // The test driver's migrate_to_ram brings back the faulting page only.
  EXPECT_TRUE(test::page_has_pattern((base + 17 * kPageSize).ptr(), 5 + 17));
  EXPECT_EQ(drv->migrate_to_ram_calls(), 1u);
  EXPECT_EQ(drv->page_free_calls(), 1u);
  EXPECT_EQ(count_states(*as, base, kUnit).device, kUnit - 1);
  // The rest is no longer a whole unit: it comes back as base entries.
  RawMigration m(*as, base, base + kHugePageSize, drv->owner(), kBack);
  ASSERT_TRUE(m.setup().is_ok());
  EXPECT_EQ(m.args.cpages, kUnit - 1);
  for (std::size_t i = 0; i < kUnit; ++i) ASSERT_EQ(m.src[i] & MIGRATE_PFN_COMPOUND, 0u) << i;
  EXPECT_EQ(drv->copy_to_ram(*as, m.src.data(), m.dst.data(), kUnit), kUnit - 1);
  m.pages_and_finalize();
  EXPECT_EQ(count_states(*as, base, kUnit).system, kUnit);
  EXPECT_EQ(drv->page_free_calls(), kUnit);
  UHMM_EXPECT_INVARIANTS(*as);
  EXPECT_TRUE(range_has_pattern(base, kUnit, 5));
}

TEST_F(CompoundTest, ACompoundDestinationThatIsNotALargePageIsRefused) {
  const VirtAddr base = map_units(1);
  auto collected = collect_filled_unit(base, 61);
  RawMigration& m = *collected;
  // A base page, misaligned for a large one, offered as COMPOUND.
  DevicePage* first = drv->alloc();
  DevicePage* page = drv->alloc();
  ASSERT_NE(first, nullptr);
  ASSERT_NE(page, nullptr);
  first->unlock();
  first->put();
  ASSERT_NE(page->pfn().value % kUnit, 0u);
  m.dst[0] = migrate_pfn(page->pfn()) | MIGRATE_PFN_COMPOUND | MIGRATE_PFN_WRITE;
  m.pages_and_finalize();
  EXPECT_EQ(m.src[0] & MIGRATE_PFN_MIGRATE, 0u);
  EXPECT_EQ(count_states(*as, base, kUnit).system, kUnit);
  EXPECT_TRUE(range_has_pattern(base, kUnit, 61));
  ASSERT_TRUE(test::settles_to(drv->pagemap(), 0)) << "the page offered is given back";
  UHMM_EXPECT_INVARIANTS(*as);
}

}  // namespace
}  // namespace uhmm
