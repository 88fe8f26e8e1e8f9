// End-to-end: real data through migrate_to_device, CPU faults and back.
#include <gtest/gtest.h>

#include <cstring>
#include <span>
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
// used to abort the process ("a page stuck in transit"); now the data goes
// on as a copy, the transit is cleared without an event (inside the
// install window nobody would read one: a zap there would hang), and the
// migration completes.
TEST_F(Fixture, AStagingMoveTheKernelRefusesGoesOnAsACopy) {
  const std::size_t len = 4 << 20;  // two huge blocks: the huge and the 4 KiB paths
  auto base = as->map(len);
  ASSERT_TRUE(base.is_ok());
  auto* p = base->as<std::uint64_t>();
  for (std::size_t i = 0; i < len / 8; ++i) p[i] = i * 7 + 3;
  ASSERT_TRUE(test::settles(*as));
  // One page of the second block moves alone first, so that the block no
  // longer moves whole: its pages go through the shared transit.
  const VirtAddr lone = *base + (2 << 20) + 5 * kPageSize;
  auto one = dev->migrate_to_device(*as, lone, kPageSize);
  ASSERT_TRUE(one.is_ok());
  ASSERT_EQ(one->pages_migrated, 1u);
  const std::uint64_t copies_before = as->stats().get(Counter::transit_copies);

  as->impl().refuse_staging_moves_for_test = 1u << 30;  // every try of every page
  auto rep = dev->migrate_to_device(*as, *base, len);
  as->impl().refuse_staging_moves_for_test = 0;
  ASSERT_TRUE(rep.is_ok()) << rep.status().to_string();
  EXPECT_EQ(rep->pages_migrated, len / kPageSize - 1);
  EXPECT_EQ(as->stats().get(Counter::transit_copies) - copies_before, len / kPageSize - 1);
  for (std::size_t off = 0; off < len; off += kPageSize)
    ASSERT_EQ(as->page_info(*base + off).state, PageInfo::State::kDevicePrivate) << off;
  ASSERT_TRUE(as->check_invariants().is_ok()) << as->check_invariants().to_string();
  // The device holds the data: read through the device, then on the CPU.
  std::vector<std::uint64_t> seen(len / 8);
  ASSERT_TRUE(dev->device_read(*as, *base, std::as_writable_bytes(std::span(seen))).is_ok());
  for (std::size_t i = 0; i < len / 8; ++i) ASSERT_EQ(seen[i], i * 7 + 3) << i;
  for (std::size_t i = 0; i < len / 8; ++i) ASSERT_EQ(p[i], i * 7 + 3) << i;

  // The transit areas were cleared and registered again: later migrations
  // move pages out through them as before, with no copy.
  const std::uint64_t copies_after = as->stats().get(Counter::transit_copies);
  for (int round = 0; round < 2; ++round) {
    rep = dev->migrate_to_device(*as, *base, len);
    ASSERT_TRUE(rep.is_ok()) << rep.status().to_string();
    EXPECT_EQ(rep->pages_migrated, len / kPageSize) << round;
    for (std::size_t i = 0; i < len / 8; ++i) ASSERT_EQ(p[i], i * 7 + 3) << i;
  }
  EXPECT_EQ(as->stats().get(Counter::transit_copies), copies_after);
  EXPECT_EQ(as->impl().refuse_staging_moves_for_test.load(), 0u);
  ASSERT_TRUE(as->check_invariants().is_ok()) << as->check_invariants().to_string();
  ASSERT_TRUE(test::settles_to(dev->pagemap(), 0));
}

// A refusal that passes costs nothing but a retry: nothing is copied.
TEST_F(Fixture, AStagingMoveRefusedOnceIsRetried) {
  const std::size_t len = 2 << 20;
  auto base = as->map(len);
  ASSERT_TRUE(base.is_ok());
  auto* p = base->as<std::uint64_t>();
  for (std::size_t i = 0; i < len / 8; ++i) p[i] = ~i;
  ASSERT_TRUE(test::settles(*as));
  as->impl().refuse_staging_moves_for_test = 1;
  auto rep = dev->migrate_to_device(*as, *base, len);
  ASSERT_TRUE(rep.is_ok()) << rep.status().to_string();
  EXPECT_EQ(rep->pages_migrated, len / kPageSize);
  EXPECT_EQ(as->impl().refuse_staging_moves_for_test.load(), 0u);
  EXPECT_EQ(as->stats().get(Counter::transit_copies), 0u);
  for (std::size_t i = 0; i < len / 8; ++i) ASSERT_EQ(p[i], ~i) << i;
  ASSERT_TRUE(test::settles_to(dev->pagemap(), 0));
}

}  // namespace
}  // namespace uhmm
