// Sequential prefetch: a stream of CPU faults over device-resident blocks
// brings the next block back in the background; other access patterns do not.
#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "uhmm/uhmm.hpp"

namespace uhmm::sim {
namespace {

constexpr std::size_t kBlocks = 6;
constexpr std::size_t kLen = kBlocks * kHugePageSize;

struct PrefetchTest : ::testing::TestWithParam<std::size_t> {
  void SetUp() override {
    as = std::move(*AddressSpace::create());
    SimDeviceOptions o;
    o.memory_bytes = kLen + kHugePageSize;
    o.warm_memory = false;
    o.prefetch_blocks = GetParam();
    dev = std::move(*SimDevice::create(o));
    base = *as->map(kLen);
    for (std::size_t i = 0; i < kLen / 8; ++i) base.as<std::uint64_t>()[i] = i * 3 + 1;
    ASSERT_TRUE(dev->migrate_to_device(*as, base, kLen).is_ok());
  }
  std::uint64_t read_word(std::size_t block, std::size_t word = 7) {
    return (base + block * kHugePageSize).as<volatile std::uint64_t>()[word];
  }
  PageInfo::State state_of(std::size_t block) { return as->page_info(base + block * kHugePageSize).state; }
  // Waits (bounded) until no page of the range is locked: background work done.
  void settle() {
    for (int i = 0; i < 2000; ++i) {
      bool busy = false;
      for (std::size_t b = 0; b < kBlocks; ++b) busy = busy || as->page_info(base + b * kHugePageSize).locked;
      if (!busy && dev->pagemap().pages_in_use() == count_device_pages()) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
  // Waits (bounded) until the prefetch thread has nothing queued or in
  // flight, then for the rest of the background work.
  void wait_for_prefetch() {
    for (int i = 0; i < 2000 && dev->prefetch_pending() != 0; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    EXPECT_EQ(dev->prefetch_pending(), 0u);
    settle();
  }
  std::uint64_t count_device_pages() {
    std::uint64_t n = 0;
    for (std::size_t p = 0; p < kLen / kPageSize; ++p)
      n += as->page_info(base + p * kPageSize).state == PageInfo::State::kDevicePrivate;
    return n;
  }
  std::unique_ptr<AddressSpace> as;
  std::unique_ptr<SimDevice> dev;
  VirtAddr base;
};

TEST_P(PrefetchTest, SequentialFaultsBringTheNextBlocksBackAhead) {
  const std::size_t depth = GetParam();
  const std::size_t block_word = kHugePageSize / 8;
  EXPECT_EQ(read_word(0), 7u * 3 + 1);
  EXPECT_EQ(read_word(1), (block_word + 7) * 3 + 1);  // the block after the last fault: a stream
  // The prefetch runs in the background: wait (bounded) for it to land.
  for (int i = 0; i < 2000; ++i) {
    bool done = true;
    for (std::size_t b = 2; b < 2 + depth && b < kBlocks; ++b) done = done && state_of(b) == PageInfo::State::kSystem;
    if (done) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  settle();
  for (std::size_t b = 2; b < kBlocks; ++b) {
    const bool prefetched = b < 2 + depth;
    EXPECT_EQ(state_of(b), prefetched ? PageInfo::State::kSystem : PageInfo::State::kDevicePrivate)
        << "block " << b << " depth " << depth;
  }
  const auto faults = as->stats().get(Counter::device_private_faults);
  EXPECT_EQ(faults, 2u);
  // Reading the prefetched blocks costs no fault, and every byte is right.
  for (std::size_t b = 2; b < 2 + depth && b < kBlocks; ++b) EXPECT_EQ(read_word(b), (b * block_word + 7) * 3 + 1);
  EXPECT_EQ(as->stats().get(Counter::device_private_faults), faults);
  for (std::size_t i = 0; i < kLen / 8; ++i) ASSERT_EQ(base.as<std::uint64_t>()[i], i * 3 + 1) << i;
  wait_for_prefetch();  // the read's own faults queue more: invariants hold at rest
  EXPECT_TRUE(as->check_invariants().is_ok());
}

TEST_P(PrefetchTest, NonSequentialFaultsPrefetchNothing) {
  EXPECT_EQ(read_word(3), (3 * kHugePageSize / 8 + 7) * 3 + 1);
  EXPECT_EQ(read_word(1), (1 * kHugePageSize / 8 + 7) * 3 + 1);  // backwards
  EXPECT_EQ(read_word(5), (5 * kHugePageSize / 8 + 7) * 3 + 1);  // a jump
  settle();
  for (std::size_t b : {0, 2, 4}) EXPECT_EQ(state_of(b), PageInfo::State::kDevicePrivate) << b;
  EXPECT_EQ(count_device_pages(), 3 * kPagesPerHugePage);
}

TEST_P(PrefetchTest, UnmapWithPrefetchQueuedLosesNothingAndHangsNot) {
  EXPECT_EQ(read_word(0), 7u * 3 + 1);
  EXPECT_EQ(read_word(1), (kHugePageSize / 8 + 7) * 3 + 1);
  ASSERT_TRUE(as->unmap(base).is_ok());  // races with the prefetch of block 2
  EXPECT_FALSE(as->find_region(base).has_value());
  for (int i = 0; i < 2000 && dev->pagemap().pages_in_use() != 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_EQ(dev->pagemap().pages_in_use(), 0u);  // every device page freed
}

// A reader streams back blocks 0 and 1, which queues the next ones; before
// the prefetch thread gets to them the application moves the whole range
// to the device.  The queued blocks are dropped: they would only come back
// to the CPU that just gave them away.  A prefetch queued for blocks
// outside the migrated range still runs.
TEST_P(PrefetchTest, AMigrationToTheDeviceDropsThePrefetchQueuedInItsRange) {
  const std::size_t depth = GetParam();
  dev->hold_prefetch_for_test(true);
  EXPECT_EQ(read_word(0), 7u * 3 + 1);
  EXPECT_EQ(read_word(1), (kHugePageSize / 8 + 7) * 3 + 1);  // queues blocks 2 .. 1 + depth
  EXPECT_EQ(dev->prefetch_pending(), depth);
  auto rep = dev->migrate_to_device(*as, base, kLen);
  ASSERT_TRUE(rep.is_ok());
  EXPECT_EQ(rep->pages_migrated, 2 * kPagesPerHugePage);
  EXPECT_EQ(dev->prefetch_pending(), 0u);
  dev->hold_prefetch_for_test(false);
  wait_for_prefetch();
  for (std::size_t b = 0; b < kBlocks; ++b) EXPECT_EQ(state_of(b), PageInfo::State::kDevicePrivate) << b;

  // The same with a migration of blocks 0 and 1 only: the queued blocks
  // (2 .. 1 + depth) lie outside it and still come back.
  dev->hold_prefetch_for_test(true);
  EXPECT_EQ(read_word(0), 7u * 3 + 1);
  EXPECT_EQ(read_word(1), (kHugePageSize / 8 + 7) * 3 + 1);
  EXPECT_EQ(dev->prefetch_pending(), depth);
  rep = dev->migrate_to_device(*as, base, 2 * kHugePageSize);
  ASSERT_TRUE(rep.is_ok());
  EXPECT_EQ(rep->pages_migrated, 2 * kPagesPerHugePage);
  EXPECT_EQ(dev->prefetch_pending(), depth);
  dev->hold_prefetch_for_test(false);
  wait_for_prefetch();
  for (std::size_t b = 0; b < 2; ++b) EXPECT_EQ(state_of(b), PageInfo::State::kDevicePrivate) << b;
  for (std::size_t b = 2; b < kBlocks; ++b)
    EXPECT_EQ(state_of(b), b < 2 + depth ? PageInfo::State::kSystem : PageInfo::State::kDevicePrivate) << b;
  // Reading blocks still on the device faults, and the stream queues more
  // prefetches: the invariants hold once those have run.
  for (std::size_t i = 0; i < kLen / 8; ++i) ASSERT_EQ(base.as<std::uint64_t>()[i], i * 3 + 1) << i;
  wait_for_prefetch();
  EXPECT_TRUE(as->check_invariants().is_ok());
}

// A cold device with room for `len` bytes whose prefetch window starts at
// `first` blocks and doubles up to `max`.
SimDeviceOptions streaming_device(std::size_t len, std::size_t first, std::size_t max) {
  SimDeviceOptions o;
  o.memory_bytes = len + kHugePageSize;
  o.warm_memory = false;
  o.prefetch_blocks = first;
  o.prefetch_max_blocks = max;
  return o;
}

// The window ramps up while the stream goes on: 1, 2, 4, then 4 (the cap).
// Each step waits for the background work, so the faults are exactly those
// on blocks nobody prefetched.
TEST(PrefetchRamp, WindowDoublesUpToTheCapAndRestartsOutOfSequence) {
  constexpr std::size_t kRampBlocks = 20;
  constexpr std::size_t len = kRampBlocks * kHugePageSize;
  auto as = std::move(*AddressSpace::create());
  auto dev = std::move(*SimDevice::create(streaming_device(len, 1, 4)));
  const VirtAddr base = *as->map(len);
  for (std::size_t i = 0; i < len / 8; ++i) base.as<std::uint64_t>()[i] = i * 5 + 2;
  ASSERT_TRUE(dev->migrate_to_device(*as, base, len).is_ok());
  auto state_of = [&](std::size_t b) { return as->page_info(base + b * kHugePageSize + kPageSize).state; };
  auto device_blocks = [&] {
    std::size_t n = 0;
    for (std::size_t b = 0; b < kRampBlocks; ++b) n += state_of(b) == PageInfo::State::kDevicePrivate;
    return n;
  };
  // Reads block b's first word; `window_end`, if given, is the last block
  // the read should make the device prefetch: wait (bounded) until it and
  // everything before it are back and nothing is in flight.
  auto read_block = [&](std::size_t b, std::size_t window_end = 0) {
    const std::uint64_t v = (base + b * kHugePageSize).as<volatile std::uint64_t>()[0];
    EXPECT_EQ(v, b * kHugePageSize / 8 * 5 + 2) << "block " << b;
    for (int i = 0; i < 5000; ++i) {
      bool landed = true;
      for (std::size_t w = b + 1; w <= window_end; ++w) landed = landed && state_of(w) == PageInfo::State::kSystem;
      if (landed && dev->pagemap().pages_in_use() == device_blocks() * kPagesPerHugePage &&
          as->check_invariants().is_ok())
        break;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  };
  auto faults = [&] { return as->stats().get(Counter::device_private_faults); };

  read_block(0);  // no stream yet
  read_block(1, 2);  // a stream: window 1 -> block 2
  EXPECT_EQ(state_of(2), PageInfo::State::kSystem);
  EXPECT_EQ(state_of(3), PageInfo::State::kDevicePrivate);
  read_block(2);  // prefetched: no fault
  EXPECT_EQ(faults(), 2u);
  read_block(3, 5);  // window 2 -> blocks 4, 5
  EXPECT_EQ(state_of(5), PageInfo::State::kSystem);
  EXPECT_EQ(state_of(6), PageInfo::State::kDevicePrivate);
  for (std::size_t b : {4, 5}) read_block(b);
  EXPECT_EQ(faults(), 3u);
  read_block(6, 10);  // window 4 -> blocks 7..10
  EXPECT_EQ(state_of(10), PageInfo::State::kSystem);
  EXPECT_EQ(state_of(11), PageInfo::State::kDevicePrivate);
  for (std::size_t b = 7; b <= 10; ++b) read_block(b);
  read_block(11, 15);  // capped at 4 -> blocks 12..15
  EXPECT_EQ(state_of(15), PageInfo::State::kSystem);
  EXPECT_EQ(state_of(16), PageInfo::State::kDevicePrivate);
  EXPECT_EQ(faults(), 5u);
  // Out of sequence: the ramp starts over.
  read_block(18);
  read_block(17);  // backwards: still no stream
  EXPECT_EQ(state_of(16), PageInfo::State::kDevicePrivate);
  EXPECT_EQ(state_of(19), PageInfo::State::kDevicePrivate);
  read_block(16);
  read_block(17);  // already back: no fault, no step
  EXPECT_EQ(faults(), 8u);
  for (std::size_t i = 0; i < len / 8; ++i) ASSERT_EQ(base.as<std::uint64_t>()[i], i * 5 + 2) << i;
  EXPECT_TRUE(as->check_invariants().is_ok());
}

// A reader that waits for a block the prefetch thread is migrating did not
// fault into the driver, yet it shows where the stream stands: the stream
// goes on from there (MigrateVma::last_waited), so the queue does not run
// dry before the reader's next fault.  What that queues joins the migration
// in flight (SimDevice::Continuation): one migration brings the stream back,
// with no gap where the reader could fault on a block queued but not taken.
// A slow device (50 ms a transfer, one block each) makes the reader find
// its block in flight.
TEST(PrefetchWait, AReaderWaitingForAPrefetchedBlockContinuesTheStream) {
  constexpr std::size_t kWaitBlocks = 8;
  constexpr std::size_t len = kWaitBlocks * kHugePageSize;
  auto as = std::move(*AddressSpace::create());
  SimDeviceOptions o = streaming_device(len, 2, 2);
  o.batch_pages = kPagesPerHugePage;
  o.link.setup_latency = std::chrono::milliseconds(50);
  auto dev = std::move(*SimDevice::create(o));
  const VirtAddr base = *as->map(len);
  for (std::size_t i = 0; i < len / 8; ++i) base.as<std::uint64_t>()[i] = i * 7 + 3;
  ASSERT_TRUE(dev->migrate_to_device(*as, base, len).is_ok());
  auto block = [&](std::size_t b) { return base + b * kHugePageSize; };
  auto read_first = [&](std::size_t b) { return block(b).as<volatile std::uint64_t>()[0]; };
  auto faults = [&] { return as->stats().get(Counter::device_private_faults); };

  dev->hold_prefetch_for_test(true);
  EXPECT_EQ(read_first(0), 3u);
  EXPECT_EQ(read_first(1), kHugePageSize / 8 * 7 + 3);  // a stream: blocks 2 and 3 are queued
  ASSERT_EQ(dev->prefetch_pending(), 2u);
  dev->hold_prefetch_for_test(false);
  // Read block 2 once its migration holds it (its transfer then takes
  // 50 ms): the read waits for it.
  for (int i = 0; i < 5000 && !as->page_info(block(2)).locked; ++i)
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  ASSERT_TRUE(as->page_info(block(2)).locked) << "the prefetch of block 2 never started";
  const std::uint64_t parked = as->stats().get(Counter::faults_parked);
  EXPECT_EQ(read_first(2), 2 * kHugePageSize / 8 * 7 + 3);
  EXPECT_EQ(as->stats().get(Counter::faults_parked), parked + 1);  // it waited,
  EXPECT_EQ(faults(), 2u);                                           // and did not fault into the driver
  // The stream went on from block 2: block 4 comes back too, with no fault.
  for (int i = 0; i < 5000 && as->page_info(block(4)).state != PageInfo::State::kSystem; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_EQ(as->page_info(block(4)).state, PageInfo::State::kSystem);
  EXPECT_EQ(faults(), 2u);
  for (int i = 0; i < 5000 && dev->prefetch_pending() != 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_EQ(dev->stats().get(Counter::prefetch_blocks), 3u);      // blocks 2, 3, 4
  EXPECT_EQ(dev->stats().get(Counter::prefetch_migrations), 1u);  // block 4 joined the migration of 2 and 3
  for (std::size_t i = 0; i < len / 8; ++i) ASSERT_EQ(base.as<std::uint64_t>()[i], i * 7 + 3) << i;
  EXPECT_TRUE(as->check_invariants().is_ok());
}

INSTANTIATE_TEST_SUITE_P(Depths, PrefetchTest, ::testing::Values(std::size_t{0}, std::size_t{1}, std::size_t{2}));

}  // namespace
}  // namespace uhmm::sim
