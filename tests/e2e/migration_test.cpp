// End-to-end: real data through migrate_to_device, CPU faults and back.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "e2e/test_support.hpp"
#include "mm/address_space_impl.hpp"
#include "uhmm/uhmm.hpp"

namespace uhmm {
namespace {

struct Fixture : ::testing::Test {
  void SetUp() override {
    auto as_r = AddressSpace::create();
    ASSERT_TRUE(as_r.is_ok()) << as_r.status().to_string();
    as = std::move(*as_r);
    sim::SimDeviceOptions o;
    o.memory_bytes = 64 << 20;
    auto dev_r = sim::SimDevice::create(o);
    ASSERT_TRUE(dev_r.is_ok()) << dev_r.status().to_string();
    dev = std::move(*dev_r);
  }
  void TearDown() override {
    dev.reset();
    as.reset();
  }
  std::unique_ptr<AddressSpace> as;
  std::unique_ptr<sim::SimDevice> dev;
};

TEST_F(Fixture, RoundTripKeepsEveryByte) {
  const std::size_t len = 8 << 20;
  auto base = as->map(len);
  ASSERT_TRUE(base.is_ok());
  auto* p = base->as<std::uint64_t>();
  for (std::size_t i = 0; i < len / 8; ++i) p[i] = i * 0x9E3779B97F4A7C15ull;
  // The last hole fault may still be finishing when the store returns.
  ASSERT_TRUE(test::settles(*as));
  auto rep = dev->migrate_to_device(*as, *base, len);
  ASSERT_TRUE(rep.is_ok()) << rep.status().to_string();
  EXPECT_EQ(rep->pages_migrated, len / kPageSize);
  EXPECT_EQ(as->page_info(*base).state, PageInfo::State::kDevicePrivate);
  EXPECT_EQ(dev->free_pages(), (64u << 20) / kPageSize - len / kPageSize);
  ASSERT_TRUE(as->check_invariants().is_ok()) << as->check_invariants().to_string();
  // CPU reads fault the pages back.
  for (std::size_t i = 0; i < len / 8; ++i) ASSERT_EQ(p[i], i * 0x9E3779B97F4A7C15ull) << i;
  // The last fault's migration may still be finishing when the load returns.
  ASSERT_TRUE(test::settles_to(dev->pagemap(), 0));
  EXPECT_EQ(as->page_info(*base).state, PageInfo::State::kSystem);
  EXPECT_GT(as->stats().get(Counter::device_private_faults), 0u);
  EXPECT_EQ(dev->free_pages(), (64u << 20) / kPageSize);
  ASSERT_TRUE(as->check_invariants().is_ok()) << as->check_invariants().to_string();
}

TEST_F(Fixture, HolesMigrateAsZeros) {
  const std::size_t len = 2 << 20;
  auto base = as->map(len);
  ASSERT_TRUE(base.is_ok());
  auto rep = dev->migrate_to_device(*as, *base, len);
  ASSERT_TRUE(rep.is_ok());
  EXPECT_EQ(rep->holes, len / kPageSize);
  auto* p = base->as<unsigned char>();
  for (std::size_t i = 0; i < len; i += 997) ASSERT_EQ(p[i], 0);
}

// The kernel can refuse a page's second hop out of the CPU's hands, from
// the transit area into staging (EBUSY, seen rarely under load).  That
// used to abort the process ("a page stuck in transit"); now the page goes
// back where it was and stays on the CPU, and a refusal that passes costs
// nothing but a retry.
TEST_F(Fixture, AStagingMoveTheKernelRefusesLeavesThePageOnTheCpuIntact) {
  const std::size_t len = 4 << 20;  // two huge blocks: the huge and the 4 KiB paths
  auto base = as->map(len);
  ASSERT_TRUE(base.is_ok());
  auto* p = base->as<std::uint64_t>();
  for (std::size_t i = 0; i < len / 8; ++i) p[i] = i * 7 + 3;
  ASSERT_TRUE(test::settles(*as));
  const std::uint64_t skipped_before = as->stats().get(Counter::migrate_skipped_locked);

  as->impl().refuse_staging_moves_for_test = 1u << 30;  // every try of every page
  auto rep = dev->migrate_to_device(*as, *base, len);
  as->impl().refuse_staging_moves_for_test = 0;
  ASSERT_TRUE(rep.is_ok()) << rep.status().to_string();
  EXPECT_EQ(rep->pages_migrated, 0u);
  EXPECT_EQ(as->stats().get(Counter::migrate_skipped_locked) - skipped_before, len / kPageSize);
  for (std::size_t off = 0; off < len; off += kPageSize)
    ASSERT_EQ(as->page_info(*base + off).state, PageInfo::State::kSystem) << off;
  EXPECT_EQ(dev->pagemap().pages_in_use(), 0u);
  ASSERT_TRUE(as->check_invariants().is_ok()) << as->check_invariants().to_string();
  for (std::size_t i = 0; i < len / 8; ++i) ASSERT_EQ(p[i], i * 7 + 3) << i;

  // A few refusals in a row: the retries get every page through.
  as->impl().refuse_staging_moves_for_test = 5;
  rep = dev->migrate_to_device(*as, *base, len);
  ASSERT_TRUE(rep.is_ok()) << rep.status().to_string();
  EXPECT_EQ(rep->pages_migrated, len / kPageSize);
  EXPECT_EQ(as->impl().refuse_staging_moves_for_test.load(), 0u);
  ASSERT_TRUE(as->check_invariants().is_ok()) << as->check_invariants().to_string();
  for (std::size_t i = 0; i < len / 8; ++i) ASSERT_EQ(p[i], i * 7 + 3) << i;
  ASSERT_TRUE(test::settles_to(dev->pagemap(), 0));
}

}  // namespace
}  // namespace uhmm
