// End-to-end: uhmm's own changes of the address space reach interval
// notifiers: migrations in both directions (MIGRATE, with the migrating
// device's owner), unmap (UNMAP) and address-space destruction (RELEASE).
// Changes made behind uhmm's back (munmap, madvise, mremap, fork) come with
// the userfaultfd events of issue 3's next steps.
#include <gtest/gtest.h>

#include <mutex>
#include <vector>

#include "e2e/test_support.hpp"
#include "uhmm/uhmm.hpp"

namespace uhmm {
namespace {

constexpr std::size_t kBlock = kPagesPerHugePage;

using Recorder = test::RecordingNotifierOps;

struct NotifierEvents : ::testing::Test {
  void SetUp() override {
    auto as_r = AddressSpace::create();
    ASSERT_TRUE(as_r.is_ok()) << as_r.status().to_string();
    as = std::move(*as_r);
    sim::SimDeviceOptions o;
    o.memory_bytes = 16 << 20;
    o.warm_memory = false;
    o.prefetch_blocks = 0;
    auto dev_r = sim::SimDevice::create(o);
    ASSERT_TRUE(dev_r.is_ok());
    dev = std::move(*dev_r);
    auto r = as->map(2 * kBlock * kPageSize);
    ASSERT_TRUE(r.is_ok());
    base = *r;
    test::fill_range(base, 2 * kBlock);
    ASSERT_TRUE(test::settles(*as));
  }
  void TearDown() override {
    interval_notifier_remove(first_block);
    interval_notifier_remove(second_block);
    dev.reset();
    as.reset();
  }
  void subscribe() {
    ASSERT_TRUE(interval_notifier_insert(first_block, *as, base, kBlock * kPageSize, first_ops).is_ok());
    ASSERT_TRUE(interval_notifier_insert(second_block, *as, base + kBlock * kPageSize, kBlock * kPageSize,
                                         second_ops)
                    .is_ok());
  }

  std::unique_ptr<AddressSpace> as;
  std::unique_ptr<sim::SimDevice> dev;
  VirtAddr base;
  Recorder first_ops, second_ops;
  IntervalNotifier first_block, second_block;
};

TEST_F(NotifierEvents, MigrationsCarryTheEventAndTheDevicesOwner) {
  subscribe();
  const std::uint64_t seq = first_block.read_begin();
  ASSERT_TRUE(dev->migrate_to_device(*as, base + 4 * kPageSize, 8 * kPageSize).is_ok());
  auto got = first_ops.take();
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].event, NotifyEvent::kMigrate);
  EXPECT_EQ(got[0].owner, dev->owner());
  EXPECT_EQ(got[0].start, base + 4 * kPageSize);
  EXPECT_EQ(got[0].end, base + 12 * kPageSize);
  EXPECT_TRUE(first_block.read_retry(seq));  // a mirror walk begun before must start over
  EXPECT_TRUE(second_ops.take().empty());    // the other block was not touched

  // The CPU fault that brings a page back migrates too.
  EXPECT_TRUE(test::page_has_pattern((base + 5 * kPageSize).ptr(), 5));
  ASSERT_TRUE(test::settles(*as));
  got = first_ops.take();
  ASSERT_FALSE(got.empty());
  for (const NotifyRange& r : got) {
    EXPECT_EQ(r.event, NotifyEvent::kMigrate);
    EXPECT_EQ(r.owner, dev->owner());
    EXPECT_TRUE(r.overlaps(base + 5 * kPageSize, base + 6 * kPageSize) ||
                r.overlaps(base, base + kBlock * kPageSize));
  }
  EXPECT_TRUE(second_ops.take().empty());
}

TEST_F(NotifierEvents, DeviceEvictionClearsEachCollectedPageForEveryMirror) {
  ASSERT_TRUE(dev->migrate_to_device(*as, base + 2 * kPageSize, 3 * kPageSize).is_ok());
  subscribe();
  // The device's own mirror holds the pages too: eviction must drop them
  // there as well (it skips nothing: no owner).
  std::uint64_t word = 0;
  ASSERT_TRUE(dev->device_read(*as, base + 2 * kPageSize, std::as_writable_bytes(std::span(&word, 1))).is_ok());
  ASSERT_EQ(dev->mirrored_pages(*as, base + 2 * kPageSize, kPageSize), 1u);
  const std::uint64_t seq = first_block.read_begin();
  auto report = dev->evict_all();
  ASSERT_TRUE(report.is_ok());
  EXPECT_EQ(report->pages_migrated, 3u);
  const auto got = first_ops.take();
  ASSERT_EQ(got.size(), 3u);
  for (std::size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].event, NotifyEvent::kClear);
    EXPECT_EQ(got[i].owner, nullptr);
    EXPECT_EQ(got[i].end - got[i].start, kPageSize);
  }
  EXPECT_TRUE(first_block.read_retry(seq));
  EXPECT_TRUE(second_ops.take().empty());
  EXPECT_EQ(dev->mirrored_pages(*as, base + 2 * kPageSize, 3 * kPageSize), 0u);
  EXPECT_TRUE(test::range_has_pattern(base, 2 * kBlock));
}

TEST_F(NotifierEvents, UnmapSendsUnmapForTheWholeRange) {
  subscribe();
  ASSERT_TRUE(as->unmap(base).is_ok());
  for (Recorder* ops : {&first_ops, &second_ops}) {
    const auto got = ops->take();
    ASSERT_EQ(got.size(), 1u);
    EXPECT_EQ(got[0].event, NotifyEvent::kUnmap);
    EXPECT_EQ(got[0].start, base);
    EXPECT_EQ(got[0].end, base + 2 * kBlock * kPageSize);
  }
}

TEST_F(NotifierEvents, DestroyingTheAddressSpaceSendsRelease) {
  subscribe();
  dev.reset();
  as.reset();
  for (Recorder* ops : {&first_ops, &second_ops}) {
    const auto got = ops->take();
    ASSERT_FALSE(got.empty());
    EXPECT_EQ(got.front().event, NotifyEvent::kRelease);
  }
  // The table is gone with the address space: removing now does nothing.
  interval_notifier_remove(first_block);
  EXPECT_FALSE(first_block.inserted());
}

}  // namespace
}  // namespace uhmm
