// StagingPool: slot accounting, the keep limit, exhaustion.
#include <gtest/gtest.h>

#include <sys/mman.h>

#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include "mm/staging_pool.hpp"
#include "platform/uffd.hpp"

namespace uhmm::mm {
namespace {

std::size_t total_pages(const std::vector<SlotRun>& runs, std::size_t from = 0) {
  std::size_t n = 0;
  for (std::size_t i = from; i < runs.size(); ++i) n += runs[i].pages;
  return n;
}

// Resident pages of a run, from mincore().
std::size_t resident(const SlotRun& r) {
  std::vector<unsigned char> v(r.pages);
  if (!platform::resident_pages(r.start, r.pages * kPageSize, v.data()).is_ok()) return ~std::size_t{0};
  std::size_t n = 0;
  for (unsigned char c : v) n += c & 1;
  return n;
}

bool runs_disjoint(const std::vector<SlotRun>& runs) {
  for (std::size_t i = 0; i < runs.size(); ++i) {
    for (std::size_t j = i + 1; j < runs.size(); ++j) {
      const auto a0 = runs[i].start.value, a1 = a0 + runs[i].pages * kPageSize;
      const auto b0 = runs[j].start.value, b1 = b0 + runs[j].pages * kPageSize;
      if (a0 < b1 && b0 < a1) return false;
    }
  }
  return true;
}

struct StagingPoolTest : ::testing::Test {
  // 2 MiB of slots (512 pages), keep 64 pages warm.
  static constexpr std::size_t kReservePages = 512;
  static constexpr std::size_t kKeepPages = 64;
  void SetUp() override {
    Status s = pool.init(kReservePages * kPageSize, kKeepPages * kPageSize);
    ASSERT_TRUE(s.is_ok()) << s.to_string();
  }
  void give_back_all_empty(const std::vector<SlotRun>& runs) {
    for (const auto& r : runs) pool.give_back_empty(r.start, r.pages);
  }
  void give_back_all_ready(const std::vector<SlotRun>& runs) {
    for (const auto& r : runs) pool.give_back_ready(r.start, r.pages);
  }
  StagingPool pool;
};

TEST_F(StagingPoolTest, StartsWithNothingTaken) {
  EXPECT_EQ(pool.taken_pages(), 0u);
  EXPECT_EQ(pool.ready_pages(), 0u);
  std::vector<SlotRun> out;
  EXPECT_TRUE(pool.take_empty(0, out).is_ok());
  EXPECT_TRUE(pool.take_ready(0, out).is_ok());
  EXPECT_TRUE(out.empty());
  EXPECT_EQ(pool.taken_pages(), 0u);
}

TEST_F(StagingPoolTest, TakeEmptyAndGiveBack) {
  std::vector<SlotRun> out;
  out.push_back(SlotRun{VirtAddr{0x1000}, 1});  // take_* appends; existing entries stay
  ASSERT_TRUE(pool.take_empty(10, out).is_ok());
  ASSERT_GE(out.size(), 2u);
  EXPECT_EQ(out[0].start, VirtAddr{0x1000});
  EXPECT_EQ(total_pages(out, 1), 10u);
  out.erase(out.begin());
  for (const auto& r : out) {
    EXPECT_TRUE(r.start.page_aligned());
    EXPECT_TRUE(pool.contains(r.start));
    EXPECT_TRUE(pool.contains(r.start + (r.pages - 1) * kPageSize));
    EXPECT_EQ(resident(r), 0u) << "empty slots hold no page";
  }
  EXPECT_EQ(pool.taken_pages(), 10u);
  EXPECT_EQ(pool.ready_pages(), 0u);
  std::vector<SlotRun> more;
  ASSERT_TRUE(pool.take_empty(5, more).is_ok());
  EXPECT_EQ(pool.taken_pages(), 15u);
  std::vector<SlotRun> both = out;
  both.insert(both.end(), more.begin(), more.end());
  EXPECT_TRUE(runs_disjoint(both)) << "a slot was handed out twice";
  give_back_all_empty(out);
  EXPECT_EQ(pool.taken_pages(), 5u);
  give_back_all_empty(more);
  EXPECT_EQ(pool.taken_pages(), 0u);
  EXPECT_EQ(pool.ready_pages(), 0u);
}

TEST_F(StagingPoolTest, TakeReadyGivesWritableMemory) {
  std::vector<SlotRun> out;
  ASSERT_TRUE(pool.take_ready(8, out).is_ok());
  EXPECT_EQ(total_pages(out), 8u);
  EXPECT_EQ(pool.taken_pages(), 8u);
  for (const auto& r : out) {
    EXPECT_TRUE(pool.contains(r.start));
    EXPECT_EQ(resident(r), r.pages) << "ready slots are populated";
    for (std::size_t i = 0; i < r.pages; ++i) {
      auto* p = (r.start + i * kPageSize).as<unsigned char>();
      std::memset(p, static_cast<int>(0xA0 + i), kPageSize);
    }
    for (std::size_t i = 0; i < r.pages; ++i) {
      auto* p = (r.start + i * kPageSize).as<unsigned char>();
      EXPECT_EQ(p[0], static_cast<unsigned char>(0xA0 + i));
      EXPECT_EQ(p[kPageSize - 1], static_cast<unsigned char>(0xA0 + i));
    }
  }
  give_back_all_ready(out);
  EXPECT_EQ(pool.taken_pages(), 0u);
  EXPECT_EQ(pool.ready_pages(), 8u);
}

TEST_F(StagingPoolTest, TakeReadyPrefersWarmPages) {
  std::vector<SlotRun> first;
  ASSERT_TRUE(pool.take_ready(10, first).is_ok());
  give_back_all_ready(first);
  ASSERT_EQ(pool.ready_pages(), 10u);
  std::vector<SlotRun> again;
  ASSERT_TRUE(pool.take_ready(4, again).is_ok());
  EXPECT_EQ(total_pages(again), 4u);
  EXPECT_EQ(pool.ready_pages(), 6u);
  EXPECT_EQ(pool.taken_pages(), 4u);
  // They came from the warm set.
  for (const auto& r : again) {
    bool inside = false;
    for (const auto& f : first)
      inside |= r.start >= f.start && r.start + r.pages * kPageSize <= f.start + f.pages * kPageSize;
    EXPECT_TRUE(inside);
  }
  // Asking for more than is warm tops up with fresh slots.
  std::vector<SlotRun> big;
  ASSERT_TRUE(pool.take_ready(20, big).is_ok());
  EXPECT_EQ(total_pages(big), 20u);
  EXPECT_EQ(pool.ready_pages(), 0u);
  EXPECT_EQ(pool.taken_pages(), 24u);
  for (const auto& r : big) EXPECT_EQ(resident(r), r.pages);
  std::vector<SlotRun> all = again;
  all.insert(all.end(), big.begin(), big.end());
  EXPECT_TRUE(runs_disjoint(all));
  give_back_all_ready(again);
  EXPECT_EQ(pool.ready_pages(), 4u);
  give_back_all_ready(big);  // 24 warm pages: within the keep limit
  EXPECT_EQ(pool.taken_pages(), 0u);
  EXPECT_EQ(pool.ready_pages(), 24u);
}

TEST_F(StagingPoolTest, ReadyPagesBeyondTheKeepLimitAreDropped) {
  std::vector<SlotRun> a, b;
  ASSERT_TRUE(pool.take_ready(40, a).is_ok());
  ASSERT_TRUE(pool.take_ready(40, b).is_ok());
  EXPECT_EQ(pool.taken_pages(), 80u);
  give_back_all_ready(a);
  EXPECT_EQ(pool.ready_pages(), 40u);
  give_back_all_ready(b);  // 80 > keep (64)
  EXPECT_LE(pool.ready_pages(), kKeepPages);
  EXPECT_GE(pool.ready_pages(), 40u) << "pages within the keep limit stay warm";
  EXPECT_EQ(pool.taken_pages(), 0u);
  // The dropped memory went back to the kernel.
  std::size_t resident_pages = 0;
  for (const auto& r : a) resident_pages += resident(r);
  for (const auto& r : b) resident_pages += resident(r);
  EXPECT_EQ(resident_pages, pool.ready_pages());
}

TEST_F(StagingPoolTest, ExhaustionIsEnomemAndTakesNothing) {
  std::vector<SlotRun> out;
  Status s = pool.take_empty(kReservePages + 1, out);
  EXPECT_EQ(s.code(), ENOMEM);
  EXPECT_TRUE(out.empty());
  EXPECT_EQ(pool.taken_pages(), 0u);

  ASSERT_TRUE(pool.take_empty(kReservePages - 10, out).is_ok());
  EXPECT_EQ(pool.taken_pages(), kReservePages - 10);
  const std::size_t runs_before = out.size();
  EXPECT_EQ(pool.take_empty(11, out).code(), ENOMEM);
  EXPECT_EQ(out.size(), runs_before) << "a failed take appends nothing";
  EXPECT_EQ(pool.take_ready(11, out).code(), ENOMEM);
  EXPECT_EQ(out.size(), runs_before);
  EXPECT_EQ(pool.taken_pages(), kReservePages - 10);
  EXPECT_EQ(pool.ready_pages(), 0u);
  // The last 10 are still there, for either kind of take.
  std::vector<SlotRun> rest_ready, rest;
  ASSERT_TRUE(pool.take_ready(4, rest_ready).is_ok());
  ASSERT_TRUE(pool.take_empty(6, rest).is_ok());
  EXPECT_EQ(pool.taken_pages(), kReservePages);
  std::vector<SlotRun> none;
  EXPECT_EQ(pool.take_empty(1, none).code(), ENOMEM);
  EXPECT_EQ(pool.take_ready(1, none).code(), ENOMEM);
  EXPECT_TRUE(none.empty());
  // Giving back makes slots available again.
  give_back_all_empty(out);
  give_back_all_empty(rest);
  give_back_all_ready(rest_ready);
  EXPECT_EQ(pool.taken_pages(), 0u);
  EXPECT_EQ(pool.ready_pages(), 4u);
  std::vector<SlotRun> whole;
  ASSERT_TRUE(pool.take_ready(kReservePages, whole).is_ok());
  EXPECT_EQ(pool.ready_pages(), 0u);
  EXPECT_EQ(total_pages(whole), kReservePages);
  give_back_all_ready(whole);
  EXPECT_EQ(pool.taken_pages(), 0u);
}

TEST_F(StagingPoolTest, FailedTakeReadyKeepsWarmPagesWarm) {
  std::vector<SlotRun> warm;
  ASSERT_TRUE(pool.take_ready(30, warm).is_ok());
  give_back_all_ready(warm);
  ASSERT_EQ(pool.ready_pages(), 30u);
  std::vector<SlotRun> out;
  EXPECT_EQ(pool.take_ready(kReservePages + 1, out).code(), ENOMEM);
  EXPECT_TRUE(out.empty());
  EXPECT_EQ(pool.ready_pages(), 30u);
  EXPECT_EQ(pool.taken_pages(), 0u);
  // And the whole reservation can still be taken.
  ASSERT_TRUE(pool.take_ready(kReservePages, out).is_ok());
  EXPECT_EQ(total_pages(out), kReservePages);
  EXPECT_TRUE(runs_disjoint(out));
  EXPECT_EQ(pool.ready_pages(), 0u);
  give_back_all_ready(out);
  EXPECT_EQ(pool.taken_pages(), 0u);
  EXPECT_LE(pool.ready_pages(), kKeepPages);
}

TEST_F(StagingPoolTest, ConcurrentTakesNeverShareSlots) {
  constexpr int kThreads = 4;
  constexpr int kRounds = 200;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  // Each thread stamps its slots with its id and checks the stamp survives
  // until it gives them back: a slot handed out twice gets overwritten.
  for (int th = 0; th < kThreads; ++th) {
    threads.emplace_back([&, th] {
      for (int round = 0; round < kRounds; ++round) {
        std::vector<SlotRun> runs;
        const std::size_t n = 1 + static_cast<std::size_t>((th * 7 + round) % 16);
        if (round % 3 == 2) {  // empty slots: taken and given back untouched
          if (!pool.take_empty(n, runs).is_ok()) failures.fetch_add(1);
          for (const auto& r : runs) pool.give_back_empty(r.start, r.pages);
          continue;
        }
        if (!pool.take_ready(n, runs).is_ok()) {
          failures.fetch_add(1);
          continue;
        }
        for (const auto& r : runs)
          for (std::size_t i = 0; i < r.pages; ++i) *(r.start + i * kPageSize).as<volatile int>() = th;
        std::this_thread::yield();
        for (const auto& r : runs)
          for (std::size_t i = 0; i < r.pages; ++i)
            if (*(r.start + i * kPageSize).as<volatile int>() != th) failures.fetch_add(1);
        for (const auto& r : runs) pool.give_back_ready(r.start, r.pages);
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(pool.taken_pages(), 0u);
  EXPECT_LE(pool.ready_pages(), kKeepPages);
}

// The huge lane: whole 2 MiB blocks, taken back in parts.
struct StagingHugeLaneTest : ::testing::Test {
  // 8 MiB: a huge lane of 4 MiB (two blocks) and a small lane of 4 MiB.
  void SetUp() override {
    Status s = pool.init(std::size_t{8} << 20, std::size_t{4} << 20);
    ASSERT_TRUE(s.is_ok()) << s.to_string();
  }
  StagingPool pool;
};

TEST_F(StagingHugeLaneTest, BlocksAreAlignedDistinctAndRunOut) {
  VirtAddr a, b, c;
  ASSERT_TRUE(pool.take_block(false, &a).is_ok());
  ASSERT_TRUE(pool.take_block(false, &b).is_ok());
  EXPECT_TRUE(a.huge_aligned());
  EXPECT_TRUE(b.huge_aligned());
  EXPECT_NE(a, b);
  EXPECT_EQ(pool.taken_pages(), 2 * kPagesPerHugePage);
  EXPECT_EQ(pool.take_block(false, &c).code(), ENOMEM);
  EXPECT_EQ(resident(SlotRun{a, kPagesPerHugePage}), 0u);  // empty blocks hold no page
  pool.give_back_empty(a, kPagesPerHugePage);
  pool.give_back_empty(b, kPagesPerHugePage);
  EXPECT_EQ(pool.taken_pages(), 0u);
  ASSERT_TRUE(pool.take_block(false, &c).is_ok());  // reusable
  pool.give_back_empty(c, kPagesPerHugePage);
}

TEST_F(StagingHugeLaneTest, ReadyBlockIsPopulatedAndComesBackReady) {
  VirtAddr a;
  ASSERT_TRUE(pool.take_block(true, &a).is_ok());
  EXPECT_EQ(resident(SlotRun{a, kPagesPerHugePage}), kPagesPerHugePage);
  std::memset(a.ptr(), 0x3c, kHugePageSize);  // writable
  pool.give_back_ready(a, kPagesPerHugePage);
  EXPECT_EQ(pool.ready_pages(), kPagesPerHugePage);
  VirtAddr again;
  ASSERT_TRUE(pool.take_block(true, &again).is_ok());
  EXPECT_EQ(again, a);  // the warm block is reused first
  EXPECT_EQ(*a.as<unsigned char>(), 0x3c);
  pool.give_back_ready(again, kPagesPerHugePage);
}

TEST_F(StagingHugeLaneTest, PartsComeBackAndAMixedBlockIsEmptied) {
  VirtAddr a;
  ASSERT_TRUE(pool.take_block(true, &a).is_ok());
  // Part of the block moved away (empty), part is still populated (ready),
  // returned in pieces and out of order.
  pool.give_back_ready(a + 100 * kPageSize, 412);
  EXPECT_EQ(pool.taken_pages(), 100u);
  pool.give_back_empty(a, 100);
  EXPECT_EQ(pool.taken_pages(), 0u);
  EXPECT_EQ(pool.ready_pages(), 0u);  // a mixed block is not kept warm...
  EXPECT_EQ(resident(SlotRun{a, kPagesPerHugePage}), 0u);  // ...it is emptied whole
  VirtAddr b;
  ASSERT_TRUE(pool.take_block(false, &b).is_ok());
  EXPECT_EQ(b, a);
  pool.give_back_empty(b, kPagesPerHugePage);
}

// A block noted as split (populated with 4 KiB pages) is not kept warm:
// its pages go, and the next ready block is populated afresh.  The note
// lasts for that one loan.
TEST_F(StagingHugeLaneTest, ASplitBlockComesBackEmptyNotReady) {
  VirtAddr a;
  ASSERT_TRUE(pool.take_block(true, &a).is_ok());
  std::memset(a.ptr(), 0x5a, kHugePageSize);
  pool.note_split_block(a + 3 * kPageSize);  // any address in the block
  pool.give_back_ready(a, kPagesPerHugePage);
  EXPECT_EQ(pool.taken_pages(), 0u);
  EXPECT_EQ(pool.ready_pages(), 0u);
  EXPECT_EQ(resident(SlotRun{a, kPagesPerHugePage}), 0u);
  VirtAddr again;
  ASSERT_TRUE(pool.take_block(true, &again).is_ok());
  EXPECT_EQ(resident(SlotRun{again, kPagesPerHugePage}), kPagesPerHugePage);
  if (again == a) {
    EXPECT_EQ(*a.as<unsigned char>(), 0);  // populated afresh, not the old pages
  }
  pool.give_back_ready(again, kPagesPerHugePage);
  EXPECT_EQ(pool.ready_pages(), kPagesPerHugePage);  // no note this time: kept warm
  // A note for a block not taken, or outside the huge lane, changes nothing.
  pool.note_split_block(a);
  pool.note_split_block(VirtAddr{0x1000});
  EXPECT_EQ(pool.ready_pages(), kPagesPerHugePage);
}

TEST_F(StagingHugeLaneTest, ARunAcrossTwoAdjacentBlocksIsAccountedPerBlock) {
  VirtAddr a, b;
  ASSERT_TRUE(pool.take_block(false, &a).is_ok());
  ASSERT_TRUE(pool.take_block(false, &b).is_ok());
  const VirtAddr lo = std::min(a, b);
  const VirtAddr hi = std::max(a, b);
  ASSERT_EQ(hi, lo + kHugePageSize) << "fresh blocks are handed out in order";
  pool.give_back_empty(lo + 256 * kPageSize, 512);  // the second half of one, the first half of the other
  EXPECT_EQ(pool.taken_pages(), 512u);
  pool.give_back_empty(lo, 256);
  pool.give_back_empty(hi + 256 * kPageSize, 256);
  EXPECT_EQ(pool.taken_pages(), 0u);
  VirtAddr c, d;
  ASSERT_TRUE(pool.take_block(false, &c).is_ok());
  ASSERT_TRUE(pool.take_block(false, &d).is_ok());
  pool.give_back_empty(c, kPagesPerHugePage);
  pool.give_back_empty(d, kPagesPerHugePage);
}

}  // namespace
}  // namespace uhmm::mm
