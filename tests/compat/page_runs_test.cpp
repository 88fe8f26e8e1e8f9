// compat/page_runs.hpp: the run set that remembers a converted private file
// mapping's clean pages.
#include <gtest/gtest.h>

#include "compat/page_runs.hpp"

namespace uhmm::compat {
namespace {

using Runs = std::vector<PageRuns::Run>;

TEST(PageRuns, AddMergesOverlappingAndTouchingRuns) {
  PageRuns r;
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

TEST(PageRuns, EraseSplitsAndTrims) {
  PageRuns r;
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

TEST(PageRuns, ContainsIsHalfOpen) {
  PageRuns r;
  r.add(10, 12);
  EXPECT_FALSE(r.contains(9));
  EXPECT_TRUE(r.contains(10));
  EXPECT_TRUE(r.contains(11));
  EXPECT_FALSE(r.contains(12));
}

TEST(PageRuns, InsideAndOutsideSplitARange) {
  PageRuns r;
  r.add(10, 20);
  r.add(30, 40);
  EXPECT_EQ(r.inside(15, 35), (Runs{{15, 20}, {30, 35}}));
  EXPECT_EQ(r.outside(15, 35), (Runs{{20, 30}}));
  EXPECT_EQ(r.outside(0, 50), (Runs{{0, 10}, {20, 30}, {40, 50}}));
  EXPECT_EQ(r.inside(20, 30), Runs{});
  EXPECT_EQ(r.outside(12, 18), Runs{});
  EXPECT_EQ(r.outside(5, 5), Runs{});
}

}  // namespace
}  // namespace uhmm::compat
