// Lock-rank checking of core/sync.hpp (debug and sanitizer builds).
#include <gtest/gtest.h>

#include <thread>

#include "core/assert.hpp"
#include "core/sync.hpp"

namespace uhmm {
namespace {

#if UHMM_DCHECK_ENABLED
#define SKIP_WITHOUT_DCHECKS() \
  do {                         \
  } while (0)
#else
#define SKIP_WITHOUT_DCHECKS() GTEST_SKIP() << "lock ranks are checked only with UHMM_DCHECK enabled"
#endif

class LockRankDeathTest : public ::testing::Test {
 protected:
  void SetUp() override { GTEST_FLAG_SET(death_test_style, "threadsafe"); }
};

TEST(LockRank, AscendingOrderIsAllowed) {
  Mutex regions(LockRank::kRegions);
  Mutex staging(LockRank::kStaging);
  Mutex registry(LockRank::kPfnRegistry);
  Mutex leaf(LockRank::kLeaf);
  {
    MutexLock a(regions);
    MutexLock b(staging);
    MutexLock c(registry);
    MutexLock d(leaf);
  }
  // Everything released: the low rank may be taken again.
  MutexLock again(regions);
  SUCCEED();
}

// A try-lock never waits, so it may be taken against the order (a
// non-blockable invalidation under any lock); it fails when the mutex is
// held, and releasing it keeps the bookkeeping straight.
TEST(LockRank, TryLockIgnoresTheOrderAndFailsWhenHeld) {
  Mutex staging(LockRank::kStaging);
  Mutex driver(LockRank::kDeviceDriver);
  staging.lock();
  ASSERT_TRUE(driver.try_lock());  // below staging: allowed, it did not wait
  std::thread other([&] { EXPECT_FALSE(driver.try_lock()); });
  other.join();
  driver.unlock();
  staging.unlock();
  MutexLock again(driver);  // nothing left recorded as held
  SUCCEED();
}

TEST(LockRank, OutOfOrderReleaseKeepsTheRest) {
  Mutex regions(LockRank::kRegions);
  Mutex driver(LockRank::kDeviceDriver);
  Mutex staging(LockRank::kStaging);
  regions.lock();
  driver.lock();
  regions.unlock();  // released out of order: driver is still held
  staging.lock();    // above driver: fine
  staging.unlock();
  driver.unlock();
  regions.lock();  // nothing held any more
  regions.unlock();
  SUCCEED();
}

TEST(LockRank, RanksArePerThread) {
  Mutex notifiers(LockRank::kNotifierTable);
  Mutex regions(LockRank::kRegions);
  MutexLock hold(notifiers);
  bool done = false;
  // Another thread holds nothing: it may take the lowest rank.
  std::thread t([&] {
    MutexLock l(regions);
    done = true;
  });
  t.join();
  EXPECT_TRUE(done);
}

TEST_F(LockRankDeathTest, LowerRankUnderHigherAborts) {
  SKIP_WITHOUT_DCHECKS();
  Mutex regions(LockRank::kRegions);
  Mutex staging(LockRank::kStaging);
  EXPECT_DEATH(
      {
        MutexLock high(staging);
        MutexLock low(regions);
      },
      "lock order violated");
}

TEST_F(LockRankDeathTest, EqualRankNestingAborts) {
  SKIP_WITHOUT_DCHECKS();
  Mutex a(LockRank::kStaging);
  Mutex b(LockRank::kStaging);
  EXPECT_DEATH(
      {
        MutexLock la(a);
        MutexLock lb(b);
      },
      "lock order violated");
}

TEST_F(LockRankDeathTest, NothingNestsUnderALeaf) {
  SKIP_WITHOUT_DCHECKS();
  Mutex leaf(LockRank::kLeaf);
  Mutex notifiers(LockRank::kNotifierTable);
  EXPECT_DEATH(
      {
        MutexLock l(leaf);
        MutexLock n(notifiers);
      },
      "lock order violated");
}

TEST_F(LockRankDeathTest, SharedMutexIsRankedToo) {
  SKIP_WITHOUT_DCHECKS();
  SharedMutex regions(LockRank::kRegions);
  Mutex staging(LockRank::kStaging);
  EXPECT_DEATH(
      {
        MutexLock high(staging);
        ReaderLock low(regions);
      },
      "lock order violated");
  EXPECT_DEATH(
      {
        MutexLock high(staging);
        WriterLock low(regions);
      },
      "lock order violated");
}

TEST_F(LockRankDeathTest, ViolationAfterOutOfOrderReleaseAborts) {
  SKIP_WITHOUT_DCHECKS();
  Mutex regions(LockRank::kRegions);
  Mutex staging(LockRank::kStaging);
  Mutex driver(LockRank::kDeviceDriver);
  EXPECT_DEATH(
      {
        regions.lock();
        staging.lock();
        regions.unlock();
        driver.lock();  // below staging, which is still held
      },
      "lock order violated");
}

}  // namespace
}  // namespace uhmm
