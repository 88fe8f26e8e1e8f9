// core/run_set.hpp: runs merge, split and are taken first-fit.
#include <gtest/gtest.h>

#include <random>
#include <set>

#include "core/run_set.hpp"

namespace uhmm {
namespace {

using Runs = std::vector<RunSet::Run>;

TEST(RunSet, AddMergesOverlappingAndTouchingRuns) {
  RunSet r;
  r.add(10, 20);
  r.add(30, 40);
  EXPECT_EQ(r.runs(), (Runs{{10, 20}, {30, 40}}));
  r.add(20, 25);  // touches the first
  EXPECT_EQ(r.runs(), (Runs{{10, 25}, {30, 40}}));
  r.add(5, 35);  // swallows both
  EXPECT_EQ(r.runs(), (Runs{{5, 40}}));
  r.add(7, 7);  // empty
  EXPECT_EQ(r.runs(), (Runs{{5, 40}}));
  EXPECT_TRUE(r.check_invariants());
}

TEST(RunSet, AddGrowsTheRunItReachesFromEitherSide) {
  RunSet r;
  for (std::uint64_t i = 100; i < 110; ++i) r.add(i, i + 1);  // one by one, upwards
  EXPECT_EQ(r.runs(), (Runs{{100, 110}}));
  for (std::uint64_t i = 99; i >= 95; --i) r.add(i, i + 1);  // and downwards
  EXPECT_EQ(r.runs(), (Runs{{95, 110}}));
  r.add(120, 130);
  r.add(112, 120);  // reaches only the run after it
  EXPECT_EQ(r.runs(), (Runs{{95, 110}, {112, 130}}));
  r.add(110, 112);  // bridges both
  EXPECT_EQ(r.runs(), (Runs{{95, 130}}));
  r.add(100, 105);  // already inside
  EXPECT_EQ(r.runs(), (Runs{{95, 130}}));
  r.add(140, 150);
  r.add(160, 170);
  r.add(135, 165);  // starts in a gap and swallows a run and part of the next
  EXPECT_EQ(r.runs(), (Runs{{95, 130}, {135, 170}}));
  EXPECT_TRUE(r.check_invariants());
}

// Random adds and erases against a plain set of members.
TEST(RunSet, AgreesWithASetOfMembers) {
  RunSet r;
  std::set<std::uint64_t> model;
  std::mt19937_64 rng(7);
  for (int step = 0; step < 20000; ++step) {
    const std::uint64_t first = rng() % 200;
    const std::uint64_t end = first + rng() % 12;
    if (rng() % 3 == 0) {
      r.erase(first, end);
      for (std::uint64_t v = first; v < end; ++v) model.erase(v);
    } else {
      r.add(first, end);
      for (std::uint64_t v = first; v < end; ++v) model.insert(v);
    }
    if (step % 97 == 0) {
      ASSERT_TRUE(r.check_invariants()) << step;
      std::set<std::uint64_t> members;
      for (auto [f, e] : r.runs())
        for (std::uint64_t v = f; v < e; ++v) members.insert(v);
      ASSERT_EQ(members, model) << step;
    }
  }
}

TEST(RunSet, EraseSplitsAndTrims) {
  RunSet r;
  r.add(0, 100);
  r.erase(40, 60);
  EXPECT_EQ(r.runs(), (Runs{{0, 40}, {60, 100}}));
  r.erase(30, 70);
  EXPECT_EQ(r.runs(), (Runs{{0, 30}, {70, 100}}));
  r.erase(0, 30);
  EXPECT_EQ(r.runs(), (Runs{{70, 100}}));
  r.erase(200, 300);  // nothing there
  EXPECT_EQ(r.runs(), (Runs{{70, 100}}));
  r.erase(0, 1000);
  EXPECT_TRUE(r.empty());
  EXPECT_TRUE(r.check_invariants());
}

TEST(RunSet, ContainsIsHalfOpen) {
  RunSet r;
  r.add(10, 12);
  EXPECT_FALSE(r.contains(9));
  EXPECT_TRUE(r.contains(10));
  EXPECT_TRUE(r.contains(11));
  EXPECT_FALSE(r.contains(12));
}

TEST(RunSet, InsideAndOutsideSplitARange) {
  RunSet r;
  r.add(10, 20);
  r.add(30, 40);
  EXPECT_EQ(r.inside(15, 35), (Runs{{15, 20}, {30, 35}}));
  EXPECT_EQ(r.outside(15, 35), (Runs{{20, 30}}));
  EXPECT_EQ(r.outside(0, 50), (Runs{{0, 10}, {20, 30}, {40, 50}}));
  EXPECT_EQ(r.inside(20, 30), Runs{});
  EXPECT_EQ(r.outside(12, 18), Runs{});
  EXPECT_EQ(r.outside(5, 5), Runs{});
}

TEST(RunSet, TakeFirstFitTakesFromTheLowestRunLongEnough) {
  RunSet r;
  r.add(0, 2);
  r.add(10, 20);
  r.add(30, 40);
  EXPECT_EQ(r.take_first_fit(5), 10u);
  EXPECT_EQ(r.runs(), (Runs{{0, 2}, {15, 20}, {30, 40}}));
  EXPECT_EQ(r.take_first_fit(2), 0u);  // a whole run goes
  EXPECT_EQ(r.runs(), (Runs{{15, 20}, {30, 40}}));
  EXPECT_EQ(r.take_first_fit(11), std::nullopt);
  EXPECT_EQ(r.take_first_fit(0), std::nullopt);
  EXPECT_EQ(r.take_first_fit(10), 30u);
  r.add(10, 15);  // touches [15, 20): merges back
  EXPECT_EQ(r.runs(), (Runs{{10, 20}}));
  EXPECT_TRUE(r.check_invariants());
}

}  // namespace
}  // namespace uhmm
