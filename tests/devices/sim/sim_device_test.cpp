// The simulated device: explicit migrations both ways, bad input, device
// memory exhaustion and injected failures, pinned (shared) pages, device-side
// access, eviction, teardown with pages on the device.
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "e2e/test_support.hpp"
#include "uhmm/uhmm.hpp"

namespace uhmm {
namespace {

using test::count_states;
using test::fill_range;
using test::page_has_pattern;
using test::range_has_pattern;

constexpr std::size_t kDeviceBytes = 16 << 20;
constexpr std::size_t kDevicePages = kDeviceBytes / kPageSize;

struct SimDeviceTest : ::testing::Test {
  void SetUp() override {
    // Hole faults fill one page each here (UFFDIO_COPY): these tests are
    // about the device, and the staging-backed fill of bigger hole runs has
    // its own test (PartialBlockHoleFillLeavesNoStagingSlotPopulated).
    AddressSpaceOptions options;
    options.hole_fault_around_pages = 1;
    auto as_r = AddressSpace::create(options);
    ASSERT_TRUE(as_r.is_ok()) << as_r.status().to_string();
    as = std::move(*as_r);
    make_device(kDeviceBytes);
  }
  void TearDown() override {
    dev.reset();
    as.reset();
  }
  // Base pages unless asked: most tests here count allocations and copy
  // failures page by page.
  void make_device(std::size_t bytes, bool large_pages = false) {
    dev.reset();
    sim::SimDeviceOptions o;
    o.memory_bytes = bytes;
    o.large_pages = large_pages;
    o.warm_memory = false;
    auto dev_r = sim::SimDevice::create(o);
    ASSERT_TRUE(dev_r.is_ok()) << dev_r.status().to_string();
    dev = std::move(*dev_r);
  }
  VirtAddr map_bytes(std::size_t len) {
    auto r = as->map(len);
    EXPECT_TRUE(r.is_ok()) << r.status().to_string();
    return r.is_ok() ? *r : VirtAddr{};
  }
  std::uint64_t counter(Counter c) const { return as->stats().get(c); }
  // Writes the pattern (hole faults, or faults of device pages back) and
  // waits for the fault service to finish with the range.
  void fill(VirtAddr base, std::size_t pages, std::uint64_t salt = 0) {
    fill_range(base, pages, salt);
    EXPECT_TRUE(test::settles(*as));
  }

  std::unique_ptr<AddressSpace> as;
  std::unique_ptr<sim::SimDevice> dev;
};

// ---- round trips -------------------------------------------------------------

struct RoundTripCase {
  std::size_t offset_pages;  // from the start of a 2 MiB aligned region
  std::size_t pages;
};

class SimRoundTrip : public SimDeviceTest, public ::testing::WithParamInterface<RoundTripCase> {};

TEST_P(SimRoundTrip, ExplicitRoundTripKeepsEveryByteAndNothingElseMoves) {
  const RoundTripCase c = GetParam();
  constexpr std::size_t kRegionPages = 1536;  // 6 MiB
  const VirtAddr base = map_bytes(kRegionPages * kPageSize);
  ASSERT_TRUE(base.huge_aligned());
  fill(base, kRegionPages, 1000);
  const VirtAddr start = base + c.offset_pages * kPageSize;
  const std::size_t len = c.pages * kPageSize;

  auto to = dev->migrate_to_device(*as, start, len);
  ASSERT_TRUE(to.is_ok()) << to.status().to_string();
  EXPECT_EQ(to->pages_requested, c.pages);
  EXPECT_EQ(to->pages_migrated, c.pages);
  EXPECT_EQ(to->pages_skipped, 0u);
  EXPECT_EQ(to->holes, 0u);
  EXPECT_EQ(dev->free_pages(), kDevicePages - c.pages);
  EXPECT_EQ(count_states(*as, start, c.pages).device, c.pages);
  EXPECT_EQ(count_states(*as, base, kRegionPages).device, c.pages) << "pages outside the range moved";
  EXPECT_EQ(counter(Counter::pgmigrate_to_device), c.pages);
  UHMM_EXPECT_INVARIANTS(*as);

  auto back = dev->migrate_to_system(*as, start, len);
  ASSERT_TRUE(back.is_ok()) << back.status().to_string();
  EXPECT_EQ(back->pages_requested, c.pages);
  EXPECT_EQ(back->pages_migrated, c.pages);
  EXPECT_EQ(dev->free_pages(), kDevicePages);
  EXPECT_EQ(count_states(*as, base, kRegionPages).system, kRegionPages);
  EXPECT_EQ(counter(Counter::pgmigrate_to_ram), c.pages);
  UHMM_EXPECT_INVARIANTS(*as);
  EXPECT_TRUE(range_has_pattern(base, kRegionPages, 1000));
  EXPECT_EQ(counter(Counter::device_private_faults), 0u) << "explicit migrations must not need CPU faults";
  EXPECT_EQ(dev->stats().get(Counter::dma_bytes_to_device), c.pages * kPageSize);
  EXPECT_EQ(dev->stats().get(Counter::dma_bytes_from_device), c.pages * kPageSize);
}

INSTANTIATE_TEST_SUITE_P(Sizes, SimRoundTrip,
                         ::testing::Values(RoundTripCase{0, 1},       // one page
                                           RoundTripCase{0, 512},     // one aligned 2 MiB block
                                           RoundTripCase{3, 100},     // unaligned, inside one block
                                           RoundTripCase{509, 7},     // straddles a 2 MiB boundary
                                           RoundTripCase{0, 1000},    // not a 2 MiB multiple
                                           RoundTripCase{17, 1300},   // unaligned, three blocks
                                           RoundTripCase{0, 1536}));  // whole region

TEST_F(SimDeviceTest, RepeatedRoundTripsWithCpuWritesInBetween) {
  constexpr std::size_t n = 300;
  const VirtAddr base = map_bytes(n * kPageSize);
  for (std::uint64_t round = 0; round < 4; ++round) {
    SCOPED_TRACE(round);
    fill(base, n, round * 7919);  // the CPU rewrites every page (faulting it back if needed)
    auto to = dev->migrate_to_device(*as, base, n * kPageSize);
    ASSERT_TRUE(to.is_ok());
    EXPECT_EQ(to->pages_migrated, n);
    if (round % 2 == 0) {
      auto back = dev->migrate_to_system(*as, base, n * kPageSize);
      ASSERT_TRUE(back.is_ok());
    }
    ASSERT_TRUE(range_has_pattern(base, n, round * 7919));
  }
  ASSERT_TRUE(test::settles_to(dev->pagemap(), 0));
  EXPECT_EQ(dev->free_pages(), kDevicePages);
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_F(SimDeviceTest, UnpopulatedRangeMigratesAsHoles) {
  constexpr std::size_t n = 64;
  const VirtAddr base = map_bytes(n * kPageSize);
  auto to = dev->migrate_to_device(*as, base, n * kPageSize);
  ASSERT_TRUE(to.is_ok());
  EXPECT_EQ(to->holes, n);
  EXPECT_EQ(to->pages_migrated, n);
  EXPECT_EQ(counter(Counter::migrate_holes), n);
  EXPECT_EQ(count_states(*as, base, n).device, n);
  // Device memory of a hole is zero, seen from the device.
  std::vector<std::byte> buf(n * kPageSize, std::byte{0x5A});
  ASSERT_TRUE(dev->device_read(*as, base, buf).is_ok());
  EXPECT_TRUE(std::all_of(buf.begin(), buf.end(), [](std::byte b) { return b == std::byte{0}; }));
  auto back = dev->migrate_to_system(*as, base, n * kPageSize);
  ASSERT_TRUE(back.is_ok());
  EXPECT_EQ(back->pages_migrated, n);
  for (std::size_t i = 0; i < n * test::kWordsPerPage; ++i) ASSERT_EQ(base.as<volatile std::uint64_t>()[i], 0u) << i;
  UHMM_EXPECT_INVARIANTS(*as);
}

// ---- bad input -------------------------------------------------------------------

TEST_F(SimDeviceTest, BadRangesAreEinvalAndTouchNothing) {
  constexpr std::size_t n = 32;
  const VirtAddr base = map_bytes(n * kPageSize);
  const VirtAddr other = map_bytes(n * kPageSize);
  fill(base, n);
  fill(other, n, 100);
  void* plain = ::mmap(nullptr, n * kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(plain, MAP_FAILED);
  const VirtAddr unmanaged = VirtAddr::of(plain);
  fill_range(unmanaged, n, 200);

  struct Case {
    const char* what;
    VirtAddr addr;
    std::size_t len;
  };
  const Case cases[] = {
      {"zero length", base, 0},
      {"unaligned address", base + 8, kPageSize},
      {"unaligned length", base, kPageSize + 1},
      {"length not a page multiple", base, 100},
      {"unmanaged range", unmanaged, 4 * kPageSize},
      {"runs past the region's end", base + (n - 2) * kPageSize, 4 * kPageSize},
      {"address 0", VirtAddr{0}, kPageSize},
  };
  for (bool to_device : {true, false}) {
    for (const Case& c : cases) {
      SCOPED_TRACE(std::string(c.what) + (to_device ? " (to device)" : " (to system)"));
      auto r = to_device ? dev->migrate_to_device(*as, c.addr, c.len) : dev->migrate_to_system(*as, c.addr, c.len);
      EXPECT_EQ(r.code(), EINVAL) << r.status().to_string();
    }
  }
  EXPECT_EQ(dev->free_pages(), kDevicePages);
  EXPECT_EQ(count_states(*as, base, n).system, n);
  EXPECT_EQ(count_states(*as, other, n).system, n);
  EXPECT_EQ(counter(Counter::pgmigrate_success) + counter(Counter::pgmigrate_fail), 0u);
  EXPECT_TRUE(range_has_pattern(base, n));
  EXPECT_TRUE(range_has_pattern(other, n, 100));
  EXPECT_TRUE(range_has_pattern(unmanaged, n, 200));
  UHMM_EXPECT_INVARIANTS(*as);
  ::munmap(plain, n * kPageSize);
}

TEST_F(SimDeviceTest, RangeCrossingTwoAdjacentRegionsIsEinval) {
  constexpr std::size_t half = 16;
  void* raw = ::mmap(nullptr, 2 * half * kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(raw, MAP_FAILED);
  const VirtAddr a = VirtAddr::of(raw);
  const VirtAddr b = a + half * kPageSize;
  fill(a, 2 * half);
  ASSERT_TRUE(as->adopt(a, half * kPageSize).is_ok());
  ASSERT_TRUE(as->adopt(b, half * kPageSize).is_ok());
  const VirtAddr across{b.value - 4 * kPageSize};
  EXPECT_EQ(dev->migrate_to_device(*as, across, 8 * kPageSize).code(), EINVAL);
  EXPECT_EQ(dev->migrate_to_system(*as, across, 8 * kPageSize).code(), EINVAL);
  EXPECT_EQ(count_states(*as, a, 2 * half).system, 2 * half);
  EXPECT_EQ(dev->free_pages(), kDevicePages);
  // Each region alone works; adopted regions migrate like mapped ones.
  auto r1 = dev->migrate_to_device(*as, across, 4 * kPageSize);
  ASSERT_TRUE(r1.is_ok());
  EXPECT_EQ(r1->pages_migrated, 4u);
  EXPECT_TRUE(range_has_pattern(a, 2 * half));
  ASSERT_TRUE(as->unmap(a).is_ok());
  ASSERT_TRUE(as->unmap(b).is_ok());
  EXPECT_TRUE(range_has_pattern(a, 2 * half));
  ::munmap(raw, 2 * half * kPageSize);
}

// ---- device memory exhaustion and injected failures ---------------------------

TEST_F(SimDeviceTest, DeviceSmallerThanRangeMigratesWhatFits) {
  make_device(1 << 20);  // 256 pages
  constexpr std::size_t n = 512;
  const VirtAddr base = map_bytes(n * kPageSize);
  fill(base, n);
  auto to = dev->migrate_to_device(*as, base, n * kPageSize);
  ASSERT_TRUE(to.is_ok()) << to.status().to_string();
  EXPECT_EQ(to->pages_requested, n);
  EXPECT_EQ(to->pages_migrated, 256u);
  EXPECT_EQ(to->pages_skipped, n - 256);
  EXPECT_EQ(dev->free_pages(), 0u);
  const auto st = count_states(*as, base, n);
  EXPECT_EQ(st.device, 256u);
  EXPECT_EQ(st.system, n - 256);
  EXPECT_GE(dev->stats().get(Counter::device_alloc_fail), 1u);
  UHMM_EXPECT_INVARIANTS(*as);
  // The pages left behind are readable without any fault.
  for (std::size_t i = 0; i < n; ++i) {
    const VirtAddr a = base + i * kPageSize;
    if (as->page_info(a).state == PageInfo::State::kSystem) {
      ASSERT_TRUE(page_has_pattern(a.ptr(), i)) << i;
    }
  }
  EXPECT_EQ(counter(Counter::device_private_faults), 0u);
  // Everything is readable; the device pages come back by faults.
  EXPECT_TRUE(range_has_pattern(base, n));
  ASSERT_TRUE(test::settles_to(dev->pagemap(), 0));
  EXPECT_EQ(dev->free_pages(), 256u);
  EXPECT_EQ(count_states(*as, base, n).system, n);
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_F(SimDeviceTest, FailAllAllocsLeavesEverythingOnTheCpu) {
  constexpr std::size_t n = 700;
  const VirtAddr base = map_bytes(n * kPageSize);
  fill(base, n);
  dev->faults().fail_all_allocs(true);
  auto to = dev->migrate_to_device(*as, base, n * kPageSize);
  ASSERT_TRUE(to.is_ok());
  EXPECT_EQ(to->pages_migrated, 0u);
  EXPECT_EQ(to->pages_skipped, n);
  EXPECT_EQ(count_states(*as, base, n).system, n);
  EXPECT_EQ(dev->free_pages(), kDevicePages);
  EXPECT_EQ(counter(Counter::pgmigrate_fail), n);
  UHMM_EXPECT_INVARIANTS(*as);
  EXPECT_TRUE(range_has_pattern(base, n));
  EXPECT_EQ(counter(Counter::device_private_faults), 0u);
  // Once the device has memory again the same range migrates.
  dev->faults().fail_all_allocs(false);
  auto again = dev->migrate_to_device(*as, base, n * kPageSize);
  ASSERT_TRUE(again.is_ok());
  EXPECT_EQ(again->pages_migrated, n);
  EXPECT_TRUE(range_has_pattern(base, n));
}

// ---- large pages (SimDeviceOptions::large_pages) ----------------------------

// Whether the device pages at [base, base + 512 pages) are one large page:
// consecutive pfns from a 2 MiB-aligned head.
bool one_large_page(const AddressSpace& as, VirtAddr base) {
  const DevicePage* head = as.page_info(base).device_page;
  if (head == nullptr || head->pfn().value % kPagesPerHugePage != 0) return false;
  for (std::size_t k = 1; k < kPagesPerHugePage; ++k) {
    const DevicePage* p = as.page_info(base + k * kPageSize).device_page;
    if (p == nullptr || p->pfn() != head->pfn() + k) return false;
  }
  return true;
}

TEST_F(SimDeviceTest, LargePagesTakeWholeUnitsAndRoundTripsKeepEveryByte) {
  make_device(kDeviceBytes, /*large_pages=*/true);
  constexpr std::size_t kRegionPages = 1536;  // three units
  const VirtAddr base = map_bytes(kRegionPages * kPageSize);
  ASSERT_TRUE(base.huge_aligned());
  fill(base, kRegionPages, 77);
  // Unaligned at both ends: a piece of unit 0, unit 1 whole, a piece of unit 2.
  const VirtAddr start = base + 17 * kPageSize;
  const std::size_t pages = 1300;
  auto to = dev->migrate_to_device(*as, start, pages * kPageSize);
  ASSERT_TRUE(to.is_ok()) << to.status().to_string();
  EXPECT_EQ(to->pages_migrated, pages);
  EXPECT_EQ(count_states(*as, base, kRegionPages).device, pages);
  EXPECT_TRUE(one_large_page(*as, base + kHugePageSize)) << "the whole unit went to one large page";
  EXPECT_EQ(dev->free_pages(), kDevicePages - pages);
  EXPECT_EQ(dev->stats().get(Counter::device_large_fallback), 0u);
  EXPECT_EQ(dev->stats().get(Counter::dma_bytes_to_device), pages * kPageSize);
  UHMM_EXPECT_INVARIANTS(*as);

  auto back = dev->migrate_to_system(*as, start, pages * kPageSize);
  ASSERT_TRUE(back.is_ok()) << back.status().to_string();
  EXPECT_EQ(back->pages_migrated, pages);
  EXPECT_EQ(count_states(*as, base, kRegionPages).system, kRegionPages);
  EXPECT_EQ(dev->free_pages(), kDevicePages);
  EXPECT_EQ(dev->stats().get(Counter::dma_bytes_from_device), pages * kPageSize);
  EXPECT_EQ(dev->stats().get(Counter::device_page_free), pages) << "page_free once per page";
  EXPECT_EQ(counter(Counter::device_private_faults), 0u);
  UHMM_EXPECT_INVARIANTS(*as);
  EXPECT_TRUE(range_has_pattern(base, kRegionPages, 77));
}

TEST_F(SimDeviceTest, AFailedLargeAllocationFallsBackToBasePages) {
  make_device(kDeviceBytes, /*large_pages=*/true);
  const VirtAddr base = map_bytes(kHugePageSize);
  fill(base, kPagesPerHugePage, 5);
  dev->faults().fail_alloc_after(0);  // the large page's allocation
  auto to = dev->migrate_to_device(*as, base, kHugePageSize);
  ASSERT_TRUE(to.is_ok());
  EXPECT_EQ(to->pages_migrated, kPagesPerHugePage) << "a large source falls back to small pages";
  EXPECT_EQ(count_states(*as, base, kPagesPerHugePage).device, kPagesPerHugePage);
  EXPECT_EQ(dev->stats().get(Counter::device_alloc_fail), 1u);
  EXPECT_EQ(dev->stats().get(Counter::device_large_fallback), 1u);
  EXPECT_EQ(counter(Counter::thp_migration_split), 1u);
  UHMM_EXPECT_INVARIANTS(*as);
  EXPECT_TRUE(range_has_pattern(base, kPagesPerHugePage, 5));
}

TEST_F(SimDeviceTest, WithoutAnAlignedFree2MiBAUnitGoesToBasePages) {
  make_device(3 << 20, /*large_pages=*/true);  // 768 pages: one aligned 2 MiB
  const VirtAddr base = map_bytes(2 * kHugePageSize);
  fill(base, 2 * kPagesPerHugePage, 9);
  ASSERT_TRUE(dev->migrate_to_device(*as, base + kHugePageSize, kPageSize).is_ok());  // takes device page 0
  auto to = dev->migrate_to_device(*as, base, kHugePageSize);
  ASSERT_TRUE(to.is_ok());
  EXPECT_EQ(to->pages_migrated, kPagesPerHugePage);
  EXPECT_EQ(dev->stats().get(Counter::device_large_fallback), 1u);
  EXPECT_EQ(dev->stats().get(Counter::device_alloc_fail), 0u);
  EXPECT_EQ(dev->free_pages(), 768u - 1 - kPagesPerHugePage);
  UHMM_EXPECT_INVARIANTS(*as);
  EXPECT_TRUE(range_has_pattern(base, 2 * kPagesPerHugePage, 9));
}

TEST_F(SimDeviceTest, ACopyFailureInALargePageLeavesTheWholeUnitIntact) {
  make_device(kDeviceBytes, /*large_pages=*/true);
  const VirtAddr base = map_bytes(kHugePageSize);
  fill(base, kPagesPerHugePage, 31);
  dev->faults().fail_copy_after(100);
  auto to = dev->migrate_to_device(*as, base, kHugePageSize);
  ASSERT_TRUE(to.is_ok());
  EXPECT_EQ(to->pages_migrated, 0u);
  EXPECT_EQ(count_states(*as, base, kPagesPerHugePage).system, kPagesPerHugePage);
  EXPECT_EQ(dev->stats().get(Counter::dma_copy_fail), 1u);
  ASSERT_TRUE(test::settles_to(dev->pagemap(), 0));
  EXPECT_EQ(dev->free_pages(), kDevicePages);
  EXPECT_EQ(counter(Counter::device_private_faults), 0u);
  UHMM_EXPECT_INVARIANTS(*as);
  EXPECT_TRUE(range_has_pattern(base, kPagesPerHugePage, 31));
}

TEST_F(SimDeviceTest, FailAllocAfterNSkipsExactlyOnePageMidBatch) {
  constexpr std::size_t n = 512;
  const VirtAddr base = map_bytes(n * kPageSize);
  fill(base, n);
  dev->faults().fail_alloc_after(100);
  auto to = dev->migrate_to_device(*as, base, n * kPageSize);
  ASSERT_TRUE(to.is_ok());
  EXPECT_EQ(to->pages_migrated, n - 1);
  EXPECT_EQ(to->pages_skipped, 1u);
  const auto st = count_states(*as, base, n);
  EXPECT_EQ(st.device, n - 1);
  EXPECT_EQ(st.system, 1u);
  EXPECT_EQ(dev->free_pages(), kDevicePages - (n - 1));
  EXPECT_EQ(dev->stats().get(Counter::device_alloc_fail), 1u);
  UHMM_EXPECT_INVARIANTS(*as);
  // The knob fired once: the next migration takes the straggler.
  auto rest = dev->migrate_to_device(*as, base, n * kPageSize);
  ASSERT_TRUE(rest.is_ok());
  EXPECT_EQ(rest->pages_migrated, 1u);
  EXPECT_EQ(count_states(*as, base, n).device, n);
  EXPECT_TRUE(range_has_pattern(base, n));
  ASSERT_TRUE(test::settles_to(dev->pagemap(), 0));
  EXPECT_EQ(dev->free_pages(), kDevicePages);
}

TEST_F(SimDeviceTest, FailCopyAfterNKeepsThatPageOnTheCpuAndAccountsItsDevicePage) {
  constexpr std::size_t n = 1024;  // two batches; the failure lands in the second
  const VirtAddr base = map_bytes(n * kPageSize);
  fill(base, n);
  const std::uint64_t free0 = dev->free_pages();
  dev->faults().fail_copy_after(700);
  auto to = dev->migrate_to_device(*as, base, n * kPageSize);
  ASSERT_TRUE(to.is_ok());
  EXPECT_EQ(to->pages_migrated, n - 1);
  const auto st = count_states(*as, base, n);
  EXPECT_EQ(st.device, n - 1);
  EXPECT_EQ(st.system, 1u);
  EXPECT_EQ(dev->stats().get(Counter::dma_copy_fail), 1u);
  // The device page of the failed copy went back to the free list.
  EXPECT_EQ(dev->free_pages(), free0 - (n - 1));
  UHMM_EXPECT_INVARIANTS(*as);
  // The page that stayed is intact and readable without a fault.
  for (std::size_t i = 0; i < n; ++i) {
    const VirtAddr a = base + i * kPageSize;
    if (as->page_info(a).state == PageInfo::State::kSystem) {
      EXPECT_TRUE(page_has_pattern(a.ptr(), i)) << i;
    }
  }
  EXPECT_EQ(counter(Counter::device_private_faults), 0u);
  auto back = dev->migrate_to_system(*as, base, n * kPageSize);
  ASSERT_TRUE(back.is_ok());
  EXPECT_EQ(back->pages_migrated, n - 1);
  EXPECT_EQ(dev->free_pages(), free0);
  EXPECT_EQ(dev->stats().get(Counter::device_page_free), n);  // n - 1 migrated back + the failed copy
  EXPECT_TRUE(range_has_pattern(base, n));
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_F(SimDeviceTest, CopyFailureOnTheWayBackLeavesThePageOnTheDevice) {
  constexpr std::size_t n = 64;
  const VirtAddr base = map_bytes(n * kPageSize);
  fill(base, n);
  ASSERT_EQ(dev->migrate_to_device(*as, base, n * kPageSize)->pages_migrated, n);
  dev->faults().fail_copy_after(10);
  auto back = dev->migrate_to_system(*as, base, n * kPageSize);
  ASSERT_TRUE(back.is_ok());
  EXPECT_EQ(back->pages_migrated, n - 1);
  EXPECT_EQ(count_states(*as, base, n).device, 1u);
  EXPECT_EQ(dev->free_pages(), kDevicePages - 1);
  UHMM_EXPECT_INVARIANTS(*as);
  // The data was not lost: the CPU faults the last page back.
  EXPECT_TRUE(range_has_pattern(base, n));
  ASSERT_TRUE(test::settles_to(dev->pagemap(), 0));
  EXPECT_EQ(count_states(*as, base, n).system, n);
}

// ---- pages shared with a forked child ------------------------------------------

// The kernel migrates a page shared copy-on-write with a child (mapped
// twice, not pinned); so does uhmm, giving the parent its own copy first.
// The skip path for pages that stay busy: e2e fork_test
// (PagesSharedByAnUnseenForkMigrateOnTheNextAttempt).
TEST_F(SimDeviceTest, PagesSharedWithForkedChildMigrate) {
  constexpr std::size_t n = 16;
  const VirtAddr base = map_bytes(n * kPageSize);
  fill(base, n);
  {
    test::SleepingChild child;
    ASSERT_TRUE(child.started());
    auto to = dev->migrate_to_device(*as, base, n * kPageSize);
    ASSERT_TRUE(to.is_ok());
    EXPECT_EQ(to->pages_migrated, n);
    EXPECT_EQ(to->pages_skipped, 0u);
    EXPECT_EQ(counter(Counter::migrate_skipped_pinned), 0u);
    EXPECT_EQ(count_states(*as, base, n).device, n);
    EXPECT_EQ(dev->free_pages(), kDevicePages - n);
    UHMM_EXPECT_INVARIANTS(*as);
    EXPECT_TRUE(range_has_pattern(base, n));
    child.stop();
  }
  // Brought back by the reads above, they migrate again, child gone.
  auto to = dev->migrate_to_device(*as, base, n * kPageSize);
  ASSERT_TRUE(to.is_ok());
  EXPECT_EQ(to->pages_migrated, n);
  EXPECT_TRUE(range_has_pattern(base, n));
}

// ---- device-side access ----------------------------------------------------------

TEST_F(SimDeviceTest, DeviceReadWriteWorkOnDeviceAndCpuPagesWithoutMigrating) {
  constexpr std::size_t n = 4;
  const VirtAddr base = map_bytes(n * kPageSize);
  fill(base, n);
  ASSERT_EQ(dev->migrate_to_device(*as, base, 2 * kPageSize)->pages_migrated, 2u);  // pages 0-1 on device

  // The expected contents, kept in a private buffer.
  std::vector<std::byte> expect(n * kPageSize);
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t k = 0; k < test::kWordsPerPage; ++k) {
      const std::uint64_t w = test::pattern_word(i, k);
      std::memcpy(expect.data() + i * kPageSize + k * 8, &w, 8);
    }
  // A write crossing from a device page (1) into a CPU page (2), unaligned.
  std::vector<std::byte> patch(3000);
  for (std::size_t i = 0; i < patch.size(); ++i) patch[i] = std::byte(i * 13 + 1);
  const std::size_t at = 2 * kPageSize - 1234;
  ASSERT_TRUE(dev->device_write(*as, base + at, patch).is_ok());
  std::memcpy(expect.data() + at, patch.data(), patch.size());

  std::vector<std::byte> got(n * kPageSize);
  ASSERT_TRUE(dev->device_read(*as, base, got).is_ok());
  EXPECT_EQ(std::memcmp(got.data(), expect.data(), got.size()), 0);
  // Device access neither migrated nor faulted anything.
  EXPECT_EQ(as->page_info(base).state, PageInfo::State::kDevicePrivate);
  EXPECT_EQ(as->page_info(base + kPageSize).state, PageInfo::State::kDevicePrivate);
  EXPECT_EQ(as->page_info(base + 2 * kPageSize).state, PageInfo::State::kSystem);
  EXPECT_EQ(counter(Counter::device_private_faults), 0u);
  // The CPU sees the device's write after the pages come back.
  EXPECT_EQ(std::memcmp(base.ptr(), expect.data(), expect.size()), 0);
  // Outside managed memory: EFAULT.
  std::vector<std::byte> small(16);
  EXPECT_EQ(dev->device_read(*as, VirtAddr{0x1000}, small).code(), EFAULT);
  EXPECT_EQ(dev->device_write(*as, VirtAddr{0x1000}, small).code(), EFAULT);
  ASSERT_TRUE(test::settles_to(dev->pagemap(), 0));
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_F(SimDeviceTest, RunKernelSeesAndChangesDeviceMemory) {
  constexpr std::size_t n = 8;
  const VirtAddr base = map_bytes(n * kPageSize);
  fill(base, n);
  ASSERT_EQ(dev->migrate_to_device(*as, base, n * kPageSize)->pages_migrated, n);
  std::vector<VirtAddr> seen;
  bool data_ok = true;
  ASSERT_TRUE(dev->run_kernel(*as, base, n * kPageSize, [&](std::span<std::byte> page, VirtAddr va) {
                   const std::size_t i = (va - base) / kPageSize;
                   seen.push_back(va);
                   data_ok = data_ok && page.size() == kPageSize && test::buffer_has_pattern(page.data(), i);
                   test::fill_page(page.data(), 900 + i);  // the "kernel" rewrites the page
                 }).is_ok());
  ASSERT_EQ(seen.size(), n);
  for (std::size_t i = 0; i < n; ++i) EXPECT_EQ(seen[i], base + i * kPageSize);
  EXPECT_TRUE(data_ok);
  EXPECT_EQ(count_states(*as, base, n).device, n);
  EXPECT_EQ(counter(Counter::device_private_faults), 0u);
  EXPECT_TRUE(range_has_pattern(base, n, 900));

  // A range with a CPU-resident page: EFAULT.  Unaligned or empty: EINVAL.
  ASSERT_TRUE(test::settles_to(dev->pagemap(), 0));
  ASSERT_EQ(dev->migrate_to_device(*as, base, kPageSize)->pages_migrated, 1u);
  auto noop = [](std::span<std::byte>, VirtAddr) {};
  EXPECT_EQ(dev->run_kernel(*as, base, 2 * kPageSize, noop).code(), EFAULT);
  EXPECT_EQ(dev->run_kernel(*as, base + 1, kPageSize, noop).code(), EINVAL);
  EXPECT_EQ(dev->run_kernel(*as, base, 0, noop).code(), EINVAL);
  EXPECT_TRUE(range_has_pattern(base, n, 900));
}

// ---- eviction and teardown -------------------------------------------------------

TEST_F(SimDeviceTest, EvictAllBringsEverythingBackWithoutFaults) {
  constexpr std::size_t n = 1024 + 37;
  const VirtAddr base = map_bytes(n * kPageSize);
  const VirtAddr other = map_bytes(64 * kPageSize);
  fill(base, n);
  fill(other, 64, 5000);
  ASSERT_EQ(dev->migrate_to_device(*as, base, n * kPageSize)->pages_migrated, n);
  ASSERT_EQ(dev->migrate_to_device(*as, other, 64 * kPageSize)->pages_migrated, 64u);
  auto ev = dev->evict_all();
  ASSERT_TRUE(ev.is_ok()) << ev.status().to_string();
  EXPECT_EQ(ev->pages_requested, n + 64);
  EXPECT_EQ(ev->pages_migrated, n + 64);
  EXPECT_EQ(dev->free_pages(), kDevicePages);
  EXPECT_EQ(dev->pagemap().pages_in_use(), 0u);
  EXPECT_EQ(count_states(*as, base, n).system, n);
  EXPECT_EQ(count_states(*as, other, 64).system, 64u);
  EXPECT_EQ(counter(Counter::pgmigrate_to_ram), n + 64);
  UHMM_EXPECT_INVARIANTS(*as);
  EXPECT_TRUE(range_has_pattern(base, n));
  EXPECT_TRUE(range_has_pattern(other, 64, 5000));
  EXPECT_EQ(counter(Counter::device_private_faults), 0u);
}

TEST_F(SimDeviceTest, EvictAllServesSeveralAddressSpaces) {
  auto as2_r = AddressSpace::create();
  ASSERT_TRUE(as2_r.is_ok());
  auto as2 = std::move(*as2_r);
  const VirtAddr a = map_bytes(32 * kPageSize);
  auto b_r = as2->map(32 * kPageSize);
  ASSERT_TRUE(b_r.is_ok());
  const VirtAddr b = *b_r;
  fill(a, 32, 1);
  fill_range(b, 32, 2);
  ASSERT_EQ(dev->migrate_to_device(*as, a, 32 * kPageSize)->pages_migrated, 32u);
  ASSERT_EQ(dev->migrate_to_device(*as2, b, 32 * kPageSize)->pages_migrated, 32u);
  auto ev = dev->evict_all();
  ASSERT_TRUE(ev.is_ok());
  EXPECT_EQ(ev->pages_migrated, 64u);
  EXPECT_EQ(count_states(*as, a, 32).system, 32u);
  EXPECT_EQ(count_states(*as2, b, 32).system, 32u);
  EXPECT_TRUE(range_has_pattern(a, 32, 1));
  EXPECT_TRUE(range_has_pattern(b, 32, 2));
  UHMM_EXPECT_INVARIANTS(*as);
  UHMM_EXPECT_INVARIANTS(*as2);
  EXPECT_EQ(as2->stats().get(Counter::device_private_faults), 0u);
}

TEST_F(SimDeviceTest, DestroyingTheDeviceBringsItsPagesBack) {
  constexpr std::size_t n = 300;
  const VirtAddr base = map_bytes(n * kPageSize);
  fill(base, n);
  ASSERT_EQ(dev->migrate_to_device(*as, base, n * kPageSize)->pages_migrated, n);
  dev.reset();
  EXPECT_EQ(count_states(*as, base, n).system, n);
  UHMM_EXPECT_INVARIANTS(*as);
  EXPECT_TRUE(range_has_pattern(base, n));
  EXPECT_EQ(counter(Counter::device_private_faults), 0u);
}

TEST_F(SimDeviceTest, DestroyingTheAddressSpaceFreesItsDevicePages) {
  constexpr std::size_t n = 300;
  const VirtAddr base = map_bytes(n * kPageSize);
  fill(base, n);
  ASSERT_EQ(dev->migrate_to_device(*as, base, n * kPageSize)->pages_migrated, n);
  EXPECT_EQ(dev->free_pages(), kDevicePages - n);
  as.reset();
  EXPECT_EQ(dev->free_pages(), kDevicePages);
  EXPECT_EQ(dev->pagemap().pages_in_use(), 0u);
  EXPECT_EQ(dev->stats().get(Counter::device_page_free), n);
}

TEST_F(SimDeviceTest, UnmapWithPagesOnTheDeviceFreesThem) {
  constexpr std::size_t n = 100;
  const VirtAddr base = map_bytes(n * kPageSize);
  fill(base, n);
  ASSERT_EQ(dev->migrate_to_device(*as, base, n * kPageSize)->pages_migrated, n);
  ASSERT_TRUE(as->unmap(base).is_ok());
  EXPECT_EQ(dev->free_pages(), kDevicePages);
  EXPECT_FALSE(as->find_region(base).has_value());
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_F(SimDeviceTest, UnregisterWithPagesInUseIsEbusyAndLosesNothing) {
  constexpr std::size_t n = 16;
  const VirtAddr base = map_bytes(n * kPageSize);
  fill(base, n);
  ASSERT_EQ(dev->migrate_to_device(*as, base, n * kPageSize)->pages_migrated, n);
  const Status s = dev->pagemap().unregister(std::chrono::milliseconds(10));
  EXPECT_EQ(s.code(), EBUSY) << s.to_string();
  EXPECT_TRUE(dev->pagemap().registered());
  EXPECT_EQ(dev->pagemap().pages_in_use(), n);
  EXPECT_EQ(count_states(*as, base, n).device, n);
  // The device still works: it reads its pages, and they come back intact.
  std::vector<std::byte> got(n * kPageSize);
  ASSERT_TRUE(dev->device_read(*as, base, got).is_ok());
  for (std::size_t i = 0; i < n; ++i) EXPECT_TRUE(test::buffer_has_pattern(got.data() + i * kPageSize, i)) << i;
  auto back = dev->migrate_to_system(*as, base, n * kPageSize);
  ASSERT_TRUE(back.is_ok());
  EXPECT_EQ(back->pages_migrated, n);
  EXPECT_TRUE(range_has_pattern(base, n));
  UHMM_EXPECT_INVARIANTS(*as);
}

// BUG (staging slots left populated): a hole fault on a run of >= 64 but
// fewer than 512 never-populated pages fills it from staging:
// Regression: resolve_missing() used to take `run` empty slots and
// MADV_POPULATE_WRITE them,
// but the staging reserve is MADV_HUGEPAGE, so populating a 2 MiB-aligned
// slot run allocates a whole huge page.  Only `run` pages are moved into the
// managed range; the other slots of that huge page stay populated while the
// pool counts them empty.  A later migration's UFFDIO_MOVE into such a slot
// fails with EEXIST, which migrate_vma_setup reports as "pinned" and skips.
// Expected: every page of the range migrates; nothing is pinned.
TEST(SimDeviceRegression, PartialBlockHoleFillLeavesNoStagingSlotPopulated) {
  auto as_r = AddressSpace::create();  // default options: hole fault-around of 512 pages
  ASSERT_TRUE(as_r.is_ok());
  auto as = std::move(*as_r);
  sim::SimDeviceOptions o;
  o.memory_bytes = kDeviceBytes;
  o.warm_memory = false;
  auto dev_r = sim::SimDevice::create(o);
  ASSERT_TRUE(dev_r.is_ok());
  auto dev = std::move(*dev_r);
  constexpr std::size_t n = 700;  // one whole 2 MiB block and a 188-page tail
  auto base = as->map(n * kPageSize);
  ASSERT_TRUE(base.is_ok());
  fill_range(*base, n);  // two hole faults: a 512-page run and a 188-page run
  ASSERT_TRUE(test::settles(*as));
  auto to = dev->migrate_to_device(*as, *base, n * kPageSize);
  ASSERT_TRUE(to.is_ok());
  EXPECT_EQ(to->pages_migrated, n);
  EXPECT_EQ(as->stats().get(Counter::migrate_skipped_pinned), 0u) << "nothing here is pinned or shared";
  EXPECT_EQ(count_states(*as, *base, n).device, n);
  EXPECT_TRUE(range_has_pattern(*base, n));
  EXPECT_TRUE(test::settles_to(dev->pagemap(), 0));
}

}  // namespace
}  // namespace uhmm
