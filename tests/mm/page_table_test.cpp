// The software page table: lazy radix tree, entry encoding, entry bit locks.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <thread>
#include <utility>
#include <vector>

#include "core/assert.hpp"
#include "mm/page_table.hpp"

namespace uhmm::mm {
namespace {

// Entries only store the pointer; any user-space address will do.
alignas(64) unsigned char fake_pages[4][128];
DevicePage* fake_page(int i) { return reinterpret_cast<DevicePage*>(&fake_pages[i][0]); }

// ---- PageEntry ----------------------------------------------------------------

TEST(PageEntry, NoneAndSystem) {
  EXPECT_EQ(PageEntry::none().state(), PageState::kNone);
  EXPECT_EQ(PageEntry::none().bits(), 0u);
  EXPECT_EQ(PageEntry{}.state(), PageState::kNone);
  const PageEntry s = PageEntry::system();
  EXPECT_EQ(s.state(), PageState::kSystem);
  EXPECT_FALSE(s.locked());
  EXPECT_FALSE(s.device_writable());
  EXPECT_FALSE(s.has_waiters());
  EXPECT_FALSE(s.poisoned());
  EXPECT_FALSE(s == PageEntry::none());
}

TEST(PageEntry, DevicePrivateRoundTrips) {
  for (int i = 0; i < 4; ++i) {
    for (bool writable : {false, true}) {
      const PageEntry e = PageEntry::device_private(fake_page(i), writable);
      EXPECT_EQ(e.state(), PageState::kDevicePrivate);
      EXPECT_EQ(e.device_page(), fake_page(i));
      EXPECT_EQ(e.device_writable(), writable);
      EXPECT_FALSE(e.locked());
      EXPECT_FALSE(e.has_waiters());
      EXPECT_FALSE(e.poisoned());
      // Flags never disturb the pointer.
      const PageEntry all = e.with(PageEntry::kLocked | PageEntry::kWaiters | PageEntry::kPoisoned);
      EXPECT_EQ(all.device_page(), fake_page(i));
      EXPECT_EQ(all.state(), PageState::kDevicePrivate);
      EXPECT_EQ(all.device_writable(), writable);
      EXPECT_TRUE(all.locked());
      EXPECT_TRUE(all.has_waiters());
      EXPECT_TRUE(all.poisoned());
      // Round trip through the raw word.
      EXPECT_EQ(PageEntry{all.bits()}, all);
    }
  }
  EXPECT_FALSE(PageEntry::device_private(fake_page(0), true) == PageEntry::device_private(fake_page(1), true));
  EXPECT_FALSE(PageEntry::device_private(fake_page(0), true) == PageEntry::device_private(fake_page(0), false));
}

TEST(PageEntry, WithWithoutAndSettled) {
  const PageEntry base = PageEntry::device_private(fake_page(2), true);
  const PageEntry locked = base.with(PageEntry::kLocked);
  EXPECT_TRUE(locked.locked());
  EXPECT_EQ(locked.without(PageEntry::kLocked), base);
  const PageEntry busy = base.with(PageEntry::kLocked).with(PageEntry::kWaiters).with(PageEntry::kPoisoned);
  const PageEntry settled = busy.settled();
  EXPECT_FALSE(settled.locked());
  EXPECT_FALSE(settled.has_waiters());
  EXPECT_TRUE(settled.poisoned()) << "settled() keeps the poison marker";
  EXPECT_TRUE(settled.device_writable());
  EXPECT_EQ(settled.device_page(), fake_page(2));
  EXPECT_EQ(PageEntry::system().with(PageEntry::kLocked).settled(), PageEntry::system());
}

// ---- PageTable ----------------------------------------------------------------

TEST(PageTable, StartsEmptyAndLazy) {
  PageTable t;
  EXPECT_EQ(t.bytes(), 0u);
  EXPECT_EQ(t.slot(Vpn{0}, false), nullptr);
  EXPECT_EQ(t.slot(Vpn{123456789}, false), nullptr);
  EXPECT_EQ(t.load(Vpn{42}), PageEntry::none());
  EXPECT_EQ(t.bytes(), 0u) << "lookups must not allocate";
}

TEST(PageTable, SlotsAllocateOnDemand) {
  PageTable t;
  const Vpn v{0x12345};
  EntrySlot* s = t.slot(v, true);
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->load(), 0u) << "fresh entries are none";
  const std::size_t one_path = t.bytes();
  EXPECT_GT(one_path, 0u);
  EXPECT_EQ(t.slot(v, false), s);
  EXPECT_EQ(t.slot(v, true), s);
  // A neighbour in the same leaf: same leaf, no allocation.
  EntrySlot* n = t.slot(v + 1, true);
  EXPECT_EQ(n, s + 1);
  EXPECT_EQ(t.bytes(), one_path);
  // The leaf exists now, so looking up its other entries without creating works.
  EXPECT_NE(t.slot(Vpn{v.value & ~std::uint64_t{511}}, false), nullptr);
  // The next leaf (512 pages on) costs one node; a far-away vpn (another
  // top-level slot) costs a whole path of three.
  const Vpn next_leaf{(v.value | 511) + 1};
  EXPECT_EQ(t.slot(next_leaf, false), nullptr);
  ASSERT_NE(t.slot(next_leaf, true), nullptr);
  const std::size_t leaf_bytes = t.bytes() - one_path;
  EXPECT_GT(leaf_bytes, 0u);
  const Vpn far{v.value + (std::uint64_t{1} << 27)};
  EXPECT_EQ(t.slot(far, false), nullptr);
  ASSERT_NE(t.slot(far, true), nullptr);
  EXPECT_EQ(t.bytes(), one_path + leaf_bytes + one_path) << "a far vpn costs a whole path again";
  EXPECT_GT(one_path, 2 * leaf_bytes) << "a path is two inner nodes and a leaf";
}

TEST(PageTable, AKernelTableKnownGoneIsKnownOnceAndPerBlock) {
  PageTable t;
  const Vpn block{512 * 7};
  EXPECT_FALSE(t.take_no_kernel_table(block)) << "no leaf: nothing is known";
  ASSERT_NE(t.slot(block + 3, true), nullptr);
  EXPECT_FALSE(t.take_no_kernel_table(block)) << "a new leaf knows nothing";
  t.note_no_kernel_table(block + 5, 0);  // any page of the block names it
  EXPECT_FALSE(t.take_no_kernel_table(block + 512)) << "the next block is another";
  EXPECT_TRUE(t.take_no_kernel_table(block + 511));
  EXPECT_FALSE(t.take_no_kernel_table(block)) << "taking it forgets it: pages go in next";
  // A fault or a small install anywhere in the block makes it unknown.
  t.note_no_kernel_table(block, 0);
  t.note_kernel_table_maybe(block + 100, 1);
  EXPECT_FALSE(t.take_no_kernel_table(block));
  // A range reaching into the block from the one before does too.
  const Vpn before{block.value - 1};
  ASSERT_NE(t.slot(before, true), nullptr);
  t.note_no_kernel_table(block, 0);
  t.note_no_kernel_table(before, 0);
  t.note_kernel_table_maybe(Vpn{block.value - 2}, 3);
  EXPECT_FALSE(t.take_no_kernel_table(before));
  EXPECT_FALSE(t.take_no_kernel_table(block));
  // Nor does it reach a block it does not touch.
  t.note_no_kernel_table(block, 0);
  t.note_kernel_table_maybe(Vpn{block.value - 2}, 2);
  EXPECT_TRUE(t.take_no_kernel_table(block));
}

TEST(PageTable, AFaultKeepsTheBlockTableFreeOnlyInTheWindowItLeftIn) {
  PageTable t;
  const Vpn block{512 * 9};
  ASSERT_NE(t.slot(block, true), nullptr);
  const std::uint64_t window = PageTable::kFirstHugeFaultWindow + 4;
  // Outside any window the kernel's 4 KiB path builds a table.
  t.note_no_kernel_table(block, 0);
  t.note_fault(block + 17, window);
  EXPECT_FALSE(t.take_no_kernel_table(block));
  // In the window the unit left in, the huge-page path leaves none.
  t.note_no_kernel_table(block, window);
  t.note_fault(block + 17, window);
  t.note_fault(block + 400, window);
  EXPECT_TRUE(t.take_no_kernel_table(block)) << "faults in the unit's own window";
  // A window closed since (a later epoch): the fault may have built one.
  t.note_no_kernel_table(block, window);
  t.note_fault(block, window + 1);
  EXPECT_FALSE(t.take_no_kernel_table(block));
  // An install still makes it unknown, window or not.
  t.note_no_kernel_table(block, window);
  t.note_kernel_table_maybe(block + 3, 1);
  EXPECT_FALSE(t.take_no_kernel_table(block));
  // A fault on a block with nothing known leaves it unknown.
  t.note_fault(block, window);
  EXPECT_FALSE(t.take_no_kernel_table(block));
  // And a fault where uhmm has no leaf is harmless.
  t.note_fault(Vpn{512 * 1000}, window);
}

TEST(PageTable, LoadSeesStores) {
  PageTable t;
  const Vpn a{7}, b{1ull << 30};
  t.slot(a, true)->store(PageEntry::system().bits());
  t.slot(b, true)->store(PageEntry::device_private(fake_page(1), true).bits());
  EXPECT_EQ(t.load(a), PageEntry::system());
  EXPECT_EQ(t.load(b), PageEntry::device_private(fake_page(1), true));
  EXPECT_EQ(t.load(Vpn{8}), PageEntry::none());
  EXPECT_EQ(t.load(Vpn{(1ull << 30) + 1}), PageEntry::none());
}

TEST(PageTable, ConcurrentSlotCreationAgrees) {
  PageTable t;
  constexpr int kThreads = 4;
  constexpr std::uint64_t kVpns = 64;
  std::vector<std::vector<EntrySlot*>> seen(kThreads, std::vector<EntrySlot*>(kVpns));
  std::atomic<int> ready{0};
  std::vector<std::thread> threads;
  for (int th = 0; th < kThreads; ++th) {
    threads.emplace_back([&, th] {
      ready.fetch_add(1);
      while (ready.load() < kThreads) std::this_thread::yield();
      // Every vpn in its own top-level subtree: each creates a full path.
      for (std::uint64_t i = 0; i < kVpns; ++i) seen[th][i] = t.slot(Vpn{i << 27}, true);
    });
  }
  for (auto& th : threads) th.join();
  for (std::uint64_t i = 0; i < kVpns; ++i) {
    ASSERT_NE(seen[0][i], nullptr);
    for (int th = 1; th < kThreads; ++th) EXPECT_EQ(seen[th][i], seen[0][i]) << i;
  }
  PageTable single;
  for (std::uint64_t i = 0; i < kVpns; ++i) (void)single.slot(Vpn{i << 27}, true);
  EXPECT_EQ(t.bytes(), single.bytes()) << "losing racers' nodes must not be counted";
}

TEST(PageTable, ForEachPopulatedVisitsExactlyTheNonNoneEntriesInOrder) {
  PageTable t;
  const std::vector<std::pair<Vpn, PageEntry>> entries = {
      {Vpn{5}, PageEntry::system()},
      {Vpn{6}, PageEntry::device_private(fake_page(0), true)},
      {Vpn{511}, PageEntry::system()},
      {Vpn{512}, PageEntry::device_private(fake_page(1), false)},
      {Vpn{1000}, PageEntry::device_private(fake_page(2), true).with(PageEntry::kPoisoned)},
      {Vpn{1ull << 20}, PageEntry::system()},
      {Vpn{(1ull << 27) + 3}, PageEntry::system()},
  };
  for (const auto& [v, e] : entries) t.slot(v, true)->store(e.bits());
  // Slots that exist but hold none are skipped.
  t.slot(Vpn{7}, true)->store(PageEntry::none().bits());
  (void)t.slot(Vpn{513}, true);

  auto walk = [&](std::uint64_t first, std::uint64_t count) {
    std::vector<std::pair<Vpn, PageEntry>> got;
    t.for_each_populated(Vpn{first}, count, [&](Vpn v, PageEntry e) { got.emplace_back(v, e); });
    return got;
  };
  auto expect_walk = [&](std::uint64_t first, std::uint64_t count, std::vector<std::size_t> want) {
    const auto got = walk(first, count);
    ASSERT_EQ(got.size(), want.size()) << first << "+" << count;
    for (std::size_t i = 0; i < want.size(); ++i) {
      EXPECT_EQ(got[i].first, entries[want[i]].first) << first << "+" << count << " #" << i;
      EXPECT_EQ(got[i].second, entries[want[i]].second) << first << "+" << count << " #" << i;
    }
  };
  const std::size_t bytes_before = t.bytes();
  expect_walk(0, 1ull << 28, {0, 1, 2, 3, 4, 5, 6});
  expect_walk(6, 506, {1, 2});         // [6, 512): stops at the leaf boundary
  expect_walk(511, 2, {2, 3});         // straddles two leaves
  expect_walk(512, 1, {3});
  expect_walk(513, (1ull << 20) - 513, {4});  // [513, 2^20): excludes 2^20
  expect_walk(7, 0, {});
  expect_walk(2000, 1000, {});         // inside an allocated leaf, nothing set
  expect_walk(1ull << 21, 1ull << 25, {});  // no leaves at all
  EXPECT_EQ(t.bytes(), bytes_before) << "walking must not allocate";
}

// ---- entry locks --------------------------------------------------------------

TEST(EntryLock, TryLockReturnsThePreviousValue) {
  EntrySlot slot{PageEntry::device_private(fake_page(3), true).bits()};
  PageEntry before;
  ASSERT_TRUE(try_lock_entry(slot, &before));
  EXPECT_EQ(before, PageEntry::device_private(fake_page(3), true));
  EXPECT_EQ(PageEntry{slot.load()}, before.with(PageEntry::kLocked));
  // A second attempt fails and leaves `out` alone.
  PageEntry untouched = PageEntry::system();
  EXPECT_FALSE(try_lock_entry(slot, &untouched));
  EXPECT_EQ(untouched, PageEntry::system());
  EXPECT_FALSE(unlock_entry(slot, PageEntry::system()));
  EXPECT_EQ(PageEntry{slot.load()}, PageEntry::system());
  // Unlocked again: lockable again.
  ASSERT_TRUE(try_lock_entry(slot, &before));
  EXPECT_EQ(before, PageEntry::system());
  EXPECT_FALSE(unlock_entry(slot, before));
}

TEST(EntryLock, UnlockReportsAndClearsWaiters) {
  EntrySlot slot{PageEntry::system().bits()};
  PageEntry before;
  ASSERT_TRUE(try_lock_entry(slot, &before));
  // What a parked CPU fault does: set the waiters bit on the locked entry.
  std::uint64_t expected = slot.load();
  ASSERT_TRUE(slot.compare_exchange_strong(expected, expected | PageEntry::kWaiters));
  EXPECT_TRUE(PageEntry{slot.load()}.has_waiters());
  EXPECT_TRUE(unlock_entry(slot, PageEntry::none())) << "the caller must be told to wake the fault";
  EXPECT_EQ(PageEntry{slot.load()}, PageEntry::none());
  // A stale waiters bit in the new value is not stored.
  ASSERT_TRUE(try_lock_entry(slot, &before));
  EXPECT_FALSE(unlock_entry(slot, PageEntry::system().with(PageEntry::kWaiters)));
  EXPECT_EQ(PageEntry{slot.load()}, PageEntry::system());
}

TEST(EntryLock, UpdateLockedEntryKeepsLockAndWaiters) {
  EntrySlot slot{PageEntry::system().bits()};
  PageEntry before;
  ASSERT_TRUE(try_lock_entry(slot, &before));
  update_locked_entry(slot, PageEntry::device_private(fake_page(1), false));
  PageEntry now{slot.load()};
  EXPECT_TRUE(now.locked());
  EXPECT_FALSE(now.has_waiters());
  EXPECT_EQ(now.settled(), PageEntry::device_private(fake_page(1), false));
  // With a waiter parked, the update keeps the waiters bit.
  std::uint64_t expected = slot.load();
  ASSERT_TRUE(slot.compare_exchange_strong(expected, expected | PageEntry::kWaiters));
  update_locked_entry(slot, PageEntry::device_private(fake_page(2), true));
  now = PageEntry{slot.load()};
  EXPECT_TRUE(now.locked());
  EXPECT_TRUE(now.has_waiters());
  EXPECT_EQ(now.settled(), PageEntry::device_private(fake_page(2), true));
  EXPECT_TRUE(unlock_entry(slot, now.settled()));
  EXPECT_EQ(PageEntry{slot.load()}, PageEntry::device_private(fake_page(2), true));
}

TEST(EntryLock, MutualExclusionUnderContention) {
  // The entry's pointer bits carry a counter that only the lock holder bumps.
  EntrySlot slot{PageEntry::system().bits()};
  constexpr int kThreads = 4;
  constexpr int kIters = 5000;
  std::atomic<bool> inside{false};
  std::atomic<int> wins{0};
  std::atomic<int> overlaps{0};
  std::vector<std::thread> threads;
  for (int th = 0; th < kThreads; ++th) {
    threads.emplace_back([&] {
      int done = 0;
      while (done < kIters) {
        PageEntry before;
        if (!try_lock_entry(slot, &before)) {
          std::this_thread::yield();
          continue;
        }
        if (inside.exchange(true)) overlaps.fetch_add(1);
        const std::uint64_t n = before.bits() >> PageEntry::kPointerShift;
        inside.store(false);
        (void)unlock_entry(slot, PageEntry{((n + 1) << PageEntry::kPointerShift) |
                                           static_cast<std::uint64_t>(PageState::kSystem)});
        wins.fetch_add(1);
        ++done;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(overlaps.load(), 0);
  EXPECT_EQ(wins.load(), kThreads * kIters);
  const PageEntry last{slot.load()};
  EXPECT_FALSE(last.locked());
  EXPECT_EQ(last.bits() >> PageEntry::kPointerShift, static_cast<std::uint64_t>(kThreads * kIters));
}

#if UHMM_DCHECK_ENABLED
class EntryLockDeathTest : public ::testing::Test {
 protected:
  void SetUp() override { GTEST_FLAG_SET(death_test_style, "threadsafe"); }
};

TEST_F(EntryLockDeathTest, UnlockOfAnUnlockedEntryAborts) {
  EntrySlot slot{PageEntry::system().bits()};
  EXPECT_DEATH((void)unlock_entry(slot, PageEntry::none()), "unlock_entry on an unlocked entry");
}

TEST_F(EntryLockDeathTest, UnlockWithALockedValueAborts) {
  EntrySlot slot{PageEntry::system().with(PageEntry::kLocked).bits()};
  EXPECT_DEATH((void)unlock_entry(slot, PageEntry::system().with(PageEntry::kLocked)),
               "unlock_entry with a locked value");
}

TEST_F(EntryLockDeathTest, UpdateOfAnUnlockedEntryAborts) {
  EntrySlot slot{PageEntry::system().bits()};
  EXPECT_DEATH(update_locked_entry(slot, PageEntry::none()), "update_locked_entry on an unlocked entry");
}
#endif

}  // namespace
}  // namespace uhmm::mm
