// The sim's free device pages of one chunk: first fit, aligned 2 MiB runs,
// lock-free release beside a taker, and the books against a model.
#include "devices/sim/free_pages.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <random>
#include <set>
#include <thread>
#include <vector>

namespace uhmm::sim {
namespace {

// Every page of `f`, taken one by one, lowest first.
std::vector<std::uint64_t> take_all(FreePages& f) {
  std::vector<std::uint64_t> out;
  while (auto i = f.take_one()) out.push_back(*i);
  return out;
}

TEST(FreePages, PagesGoLowestFirstUntilNoneIsLeft) {
  FreePages f(200);  // not a multiple of 64: the last word is partial
  EXPECT_EQ(f.free_count(), 200u);
  const std::vector<std::uint64_t> got = take_all(f);
  ASSERT_EQ(got.size(), 200u);
  for (std::uint64_t i = 0; i < got.size(); ++i) EXPECT_EQ(got[i], i);
  EXPECT_EQ(f.free_count(), 0u);
  EXPECT_FALSE(f.take_one());
  EXPECT_FALSE(f.take_run(0));
}

TEST(FreePages, AReleasedPageIsTheNextTakenWhenLowest) {
  FreePages f(1000);
  (void)take_all(f);
  f.release(700);
  f.release(3);  // lowers the hint below pages taken since
  f.release(130);
  EXPECT_EQ(f.free_count(), 3u);
  EXPECT_EQ(f.take_one(), 3u);
  EXPECT_EQ(f.take_one(), 130u);
  EXPECT_EQ(f.take_one(), 700u);
  EXPECT_FALSE(f.take_one());
}

TEST(FreePages, RunsAreWholeAlignedAndFirstFit) {
  FreePages f(4 * FreePages::kRun);
  EXPECT_EQ(f.take_one(), 0u);  // the first run is no longer whole
  EXPECT_EQ(f.take_run(0), 512u);
  EXPECT_EQ(f.free_count(), 4 * 512u - 513u);
  EXPECT_EQ(f.take_run(0), 1024u);
  EXPECT_EQ(f.take_run(0), 1536u);
  EXPECT_FALSE(f.take_run(0));  // 511 pages are free, not a run
  EXPECT_EQ(f.take_one(), 1u);  // single pages still come from the broken run
  for (std::uint64_t i = 512; i < 1024; ++i) f.release(i);
  EXPECT_EQ(f.take_run(0), 512u);  // a run given back whole is a run again
}

TEST(FreePages, ARunStartsAtItsPhase) {
  // A chunk whose first pfn is 448 pages past a 2 MiB boundary: large pages
  // start at index 64, 576, ...
  FreePages f(64 + 2 * FreePages::kRun);
  EXPECT_EQ(f.take_run(64), 64u);
  EXPECT_EQ(f.take_run(64), 576u);
  EXPECT_FALSE(f.take_run(64));
  EXPECT_EQ(f.free_count(), 64u);
  EXPECT_EQ(take_all(f).size(), 64u);
}

TEST(FreePages, AgreesWithAModelUnderRandomTakesAndReleases) {
  constexpr std::uint64_t kPages = 3 * FreePages::kRun + 77;
  FreePages f(kPages);
  std::set<std::uint64_t> free_model;
  for (std::uint64_t i = 0; i < kPages; ++i) free_model.insert(i);
  std::vector<std::uint64_t> used;
  std::mt19937_64 rng(7);
  for (int step = 0; step < 20000; ++step) {
    const unsigned op = rng() % 8;
    if (op < 3) {
      const auto got = f.take_one();
      if (free_model.empty()) {
        ASSERT_FALSE(got);
      } else {
        ASSERT_TRUE(got);
        ASSERT_EQ(*got, *free_model.begin());  // first fit
        free_model.erase(free_model.begin());
        used.push_back(*got);
      }
    } else if (op == 3) {
      std::optional<std::uint64_t> want;
      for (std::uint64_t r = 0; r + FreePages::kRun <= kPages && !want; r += FreePages::kRun) {
        auto it = free_model.lower_bound(r);
        bool whole = true;
        for (std::uint64_t k = 0; k < FreePages::kRun && whole; ++k, ++it) whole = it != free_model.end() && *it == r + k;
        if (whole) want = r;
      }
      const auto got = f.take_run(0);
      ASSERT_EQ(got, want);
      if (got)
        for (std::uint64_t k = 0; k < FreePages::kRun; ++k) {
          free_model.erase(*got + k);
          used.push_back(*got + k);
        }
    } else if (!used.empty()) {
      const std::size_t k = rng() % used.size();
      f.release(used[k]);
      free_model.insert(used[k]);
      used[k] = used.back();
      used.pop_back();
    }
    ASSERT_EQ(f.free_count(), free_model.size());
  }
}

// Releases on other threads while one taker takes: no page is handed out
// twice, none is lost, and the count ends right.  (ThreadSanitizer checks
// the ordering.)
TEST(FreePages, ReleasesRaceWithATakerWithoutLosingAPage) {
  constexpr std::uint64_t kPages = 4096;
  constexpr int kReleasers = 2;
  constexpr int kRounds = 30;
  FreePages f(kPages);
  std::vector<std::atomic<int>> in_use(kPages);
  for (std::uint64_t i : take_all(f)) in_use[i] = 1;
  std::atomic<std::uint64_t> released{0};
  std::atomic<int> releasers_left{kReleasers};
  std::vector<std::thread> releasers;
  // Releaser r gives back the pages it owns (those congruent to r mod
  // kReleasers) that the taker has handed out again since.
  for (int r = 0; r < kReleasers; ++r) {
    releasers.emplace_back([&, r] {
      for (int round = 0; round < kRounds; ++round) {
        for (std::uint64_t i = static_cast<std::uint64_t>(r); i < kPages; i += kReleasers) {
          int one = 1;
          if (in_use[i].compare_exchange_strong(one, 0)) {
            f.release(i);
            released.fetch_add(1);
          }
        }
        std::this_thread::yield();
      }
      releasers_left.fetch_sub(1);
    });
  }
  std::uint64_t takes = 0;
  bool twice = false;
  while (releasers_left.load() > 0 || f.free_count() > 0) {
    if (auto i = f.take_one()) {
      twice |= in_use[*i].exchange(1) != 0;
      ++takes;
    } else {
      std::this_thread::yield();
    }
  }
  for (auto& t : releasers) t.join();
  EXPECT_FALSE(twice) << "a page was handed out while in use";
  EXPECT_EQ(takes, released.load());
  EXPECT_GT(takes, std::uint64_t{kPages});  // the releasers found pages handed out again
  EXPECT_EQ(f.free_count(), 0u);
  EXPECT_FALSE(f.take_one());
}

}  // namespace
}  // namespace uhmm::sim
