// The prefetcher's readahead ramp, as pure bookkeeping: which blocks each
// fault of a stream queues.
#include "devices/sim/prefetch_stream.hpp"

#include <gtest/gtest.h>

namespace uhmm::sim {
namespace {

const VirtAddr kBase{std::uintptr_t{1} << 40};
VirtAddr block(std::size_t n) { return kBase + n * kHugePageSize; }

// Queues the whole window, as the prefetcher does when every block is on
// the device; returns it as block numbers [from, until].
std::pair<std::size_t, std::size_t> fault_and_queue(PrefetchStream& s, std::size_t n) {
  const auto w = s.on_fault(block(n));
  if (!w) return {0, 0};
  s.queued(*w, w->until);
  return {(w->from - kBase) / kHugePageSize, (w->until - kBase) / kHugePageSize};
}

using Blocks = std::pair<std::size_t, std::size_t>;

TEST(PrefetchStream, InOrderFaultsRampTheWindowUpToTheCap) {
  PrefetchStream s(2, 8);
  EXPECT_EQ(fault_and_queue(s, 0), Blocks(0, 0));  // the first fault is no stream yet
  EXPECT_EQ(fault_and_queue(s, 1), Blocks(2, 3));
  EXPECT_EQ(fault_and_queue(s, 4), Blocks(5, 8));
  EXPECT_EQ(fault_and_queue(s, 9), Blocks(10, 17));
  EXPECT_EQ(fault_and_queue(s, 18), Blocks(19, 26));  // capped at 8
  EXPECT_EQ(s.window(), 8u);
}

TEST(PrefetchStream, AFaultOutOfSequenceStartsOver) {
  PrefetchStream s(2, 8);
  fault_and_queue(s, 0);
  fault_and_queue(s, 1);  // queued 2, 3
  EXPECT_EQ(fault_and_queue(s, 7), Blocks(0, 0));  // past the window: starts over
  EXPECT_EQ(s.window(), 0u);
  EXPECT_EQ(fault_and_queue(s, 6), Blocks(0, 0));  // backwards
  EXPECT_EQ(fault_and_queue(s, 7), Blocks(8, 9));  // in order after 6: a new stream
}

TEST(PrefetchStream, AReaderThatOvertakesTheQueuedWindowKeepsTheStream) {
  PrefetchStream s(2, 16);
  fault_and_queue(s, 0);
  fault_and_queue(s, 1);                            // 2, 3
  EXPECT_EQ(fault_and_queue(s, 4), Blocks(5, 8));   // window 4
  // The prefetcher has not started yet and the reader faults on 5 and 6
  // itself: that is the stream going on, not a new one, so the window
  // keeps ramping and what is queued reaches `window` blocks past the fault.
  EXPECT_EQ(fault_and_queue(s, 5), Blocks(9, 13));  // window 8
  EXPECT_EQ(s.window(), 8u);
  EXPECT_EQ(fault_and_queue(s, 6), Blocks(14, 22));  // window 16
  // Already queued far enough ahead of the reader: nothing more, but the
  // stream goes on.
  EXPECT_EQ(fault_and_queue(s, 7), Blocks(23, 23));
  EXPECT_EQ(fault_and_queue(s, 8), Blocks(24, 24));
  EXPECT_EQ(s.window(), 16u);
  // In order after the queued window: a new window from there.
  EXPECT_EQ(fault_and_queue(s, 25), Blocks(26, 41));
  // A block before the stream's current window is not the stream.
  EXPECT_EQ(fault_and_queue(s, 3), Blocks(0, 0));
  EXPECT_EQ(s.window(), 0u);
}

TEST(PrefetchStream, WhatWasNotQueuedIsAskedForAgain) {
  PrefetchStream s(4, 4);
  fault_and_queue(s, 0);
  auto w = s.on_fault(block(1));
  ASSERT_TRUE(w.has_value());
  EXPECT_EQ(w->from, block(2));
  EXPECT_EQ(w->until, block(5));
  s.queued(*w, block(3));  // 4 and 5 were not on the device, say
  // The stream continues after 3: a fault on 4 is in order.
  w = s.on_fault(block(4));
  ASSERT_TRUE(w.has_value());
  EXPECT_EQ(w->from, block(5));
  s.queued(*w, std::nullopt);  // nothing could be queued: 4 is the last
  w = s.on_fault(block(5));
  ASSERT_TRUE(w.has_value());
  EXPECT_EQ(w->from, block(6));
}

TEST(PrefetchStream, AConcurrentFaultAsksForWhatFollowsAClaimedWindow) {
  PrefetchStream s(2, 8);
  fault_and_queue(s, 0);
  const auto a = s.on_fault(block(1));  // claims 2, 3; not reported queued yet
  ASSERT_TRUE(a.has_value());
  const auto b = s.on_fault(block(2));  // the reader is there already
  ASSERT_TRUE(b.has_value());
  EXPECT_EQ(b->from, block(4));  // no block is proposed twice
  EXPECT_EQ(b->until, block(6));
  s.queued(*b, b->until);
  s.queued(*a, a->until);  // late: the stream has moved on and stays there
  const auto c = s.on_fault(block(7));
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->from, block(8));
}

TEST(PrefetchStream, ZeroInitialBlocksDisablesIt) {
  PrefetchStream s(0, 32);
  for (std::size_t n = 0; n < 5; ++n) EXPECT_FALSE(s.on_fault(block(n)).has_value());
}

}  // namespace
}  // namespace uhmm::sim
