// Stats counters, counter names and the latency histogram.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <limits>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "uhmm/stats.hpp"

namespace uhmm {
namespace {

using std::chrono::microseconds;
using std::chrono::nanoseconds;

constexpr unsigned kNumCounters = static_cast<unsigned>(Counter::kCount);

Counter counter_at(unsigned i) { return static_cast<Counter>(i); }

TEST(CounterName, KernelStyleNames) {
  EXPECT_EQ(counter_name(Counter::pgmigrate_success), "pgmigrate_success");
  EXPECT_EQ(counter_name(Counter::pgmigrate_fail), "pgmigrate_fail");
  EXPECT_EQ(counter_name(Counter::pgmigrate_to_device), "pgmigrate_to_device");
  EXPECT_EQ(counter_name(Counter::pgmigrate_to_ram), "pgmigrate_to_ram");
  EXPECT_EQ(counter_name(Counter::thp_migration_success), "thp_migration_success");
  EXPECT_EQ(counter_name(Counter::hole_faults), "hole_faults");
  EXPECT_EQ(counter_name(Counter::uffd_faults), "uffd_faults");
  EXPECT_EQ(counter_name(Counter::device_page_free), "device_page_free");
  EXPECT_EQ(counter_name(Counter::dma_bytes_from_device), "dma_bytes_from_device");
}

TEST(CounterName, EveryCounterHasAUniqueLowercaseNameAndADoc) {
  std::set<std::string> seen;
  for (unsigned i = 0; i < kNumCounters; ++i) {
    const std::string name{counter_name(counter_at(i))};
    ASSERT_FALSE(name.empty()) << i;
    for (char ch : name) EXPECT_TRUE((ch >= 'a' && ch <= 'z') || ch == '_') << name;
    EXPECT_TRUE(seen.insert(name).second) << "duplicate name " << name;
    EXPECT_FALSE(counter_doc(counter_at(i)).empty()) << name;
  }
  EXPECT_EQ(seen.size(), kNumCounters);
}

TEST(Stats, StartsAtZero) {
  Stats s;
  for (unsigned i = 0; i < kNumCounters; ++i) EXPECT_EQ(s.get(counter_at(i)), 0u) << i;
  EXPECT_EQ(s.fault_latency().count(), 0u);
}

TEST(Stats, AddAndGet) {
  Stats s;
  s.add(Counter::pgmigrate_success);
  s.add(Counter::pgmigrate_success);
  s.add(Counter::dma_bytes_to_device, 4096);
  s.add(Counter::dma_bytes_to_device, 8192);
  EXPECT_EQ(s.get(Counter::pgmigrate_success), 2u);
  EXPECT_EQ(s.get(Counter::dma_bytes_to_device), 12288u);
  // Nothing else moved.
  for (unsigned i = 0; i < kNumCounters; ++i) {
    const Counter c = counter_at(i);
    if (c == Counter::pgmigrate_success || c == Counter::dma_bytes_to_device) continue;
    EXPECT_EQ(s.get(c), 0u) << counter_name(c);
  }
}

TEST(Stats, SnapshotIsACopy) {
  Stats s;
  s.add(Counter::hole_faults, 3);
  s.add(Counter::uffd_faults, 5);
  const Stats::Snapshot snap = s.snapshot();
  s.add(Counter::hole_faults, 100);
  EXPECT_EQ(snap[Counter::hole_faults], 3u);
  EXPECT_EQ(snap[Counter::uffd_faults], 5u);
  EXPECT_EQ(snap[Counter::pgmigrate_fail], 0u);
  EXPECT_EQ(s.get(Counter::hole_faults), 103u);
  for (unsigned i = 0; i < kNumCounters; ++i) {
    const Counter c = counter_at(i);
    if (c != Counter::hole_faults) {
      EXPECT_EQ(snap[c], s.get(c)) << counter_name(c);
    }
  }
}

TEST(Stats, ResetClearsCountersAndLatency) {
  Stats s;
  for (unsigned i = 0; i < kNumCounters; ++i) s.add(counter_at(i), i + 1);
  s.fault_latency().record(microseconds(5));
  s.reset();
  for (unsigned i = 0; i < kNumCounters; ++i) EXPECT_EQ(s.get(counter_at(i)), 0u) << i;
  EXPECT_EQ(s.fault_latency().count(), 0u);
  EXPECT_EQ(s.fault_latency().quantile(0.5), nanoseconds(0));
}

TEST(Stats, ConcurrentAddsAreExact) {
  Stats s;
  constexpr int kThreads = 4;
  constexpr int kIters = 20000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < kIters; ++i) {
        s.add(Counter::uffd_faults);
        s.add(Counter::dma_bytes_to_device, 2);
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(s.get(Counter::uffd_faults), std::uint64_t{kThreads} * kIters);
  EXPECT_EQ(s.get(Counter::dma_bytes_to_device), std::uint64_t{kThreads} * kIters * 2);
}

// ---- LatencyHistogram -------------------------------------------------------

// The reported quantile is the upper bound of a bucket about 1/32 wide.
void expect_close_above(nanoseconds got, nanoseconds truth) {
  EXPECT_GE(got.count(), truth.count());
  EXPECT_LE(got.count(), truth.count() + truth.count() / 32 + 1) << "truth " << truth.count();
}

TEST(LatencyHistogram, EmptyIsZero) {
  auto h = std::make_unique<LatencyHistogram>();
  EXPECT_EQ(h->count(), 0u);
  EXPECT_EQ(h->quantile(0.0), nanoseconds(0));
  EXPECT_EQ(h->quantile(0.5), nanoseconds(0));
  EXPECT_EQ(h->quantile(1.0), nanoseconds(0));
}

TEST(LatencyHistogram, UniformOneToThousandMicroseconds) {
  auto h = std::make_unique<LatencyHistogram>();
  for (int i = 1; i <= 1000; ++i) h->record(microseconds(i));
  EXPECT_EQ(h->count(), 1000u);
  // Rank q * n (0-based): p50 is the 501st sample, p99 the 991st.
  expect_close_above(h->quantile(0.50), microseconds(501));
  expect_close_above(h->quantile(0.99), microseconds(991));
  expect_close_above(h->quantile(0.0), microseconds(1));
  expect_close_above(h->quantile(1.0), microseconds(1000));
  // Within 3 % of the textbook values.
  EXPECT_NEAR(static_cast<double>(h->quantile(0.5).count()), 500e3, 500e3 * 0.03);
  EXPECT_NEAR(static_cast<double>(h->quantile(0.99).count()), 990e3, 990e3 * 0.03);
  // Monotone in q.
  nanoseconds prev{0};
  for (double q = 0.0; q <= 1.0; q += 0.01) {
    const nanoseconds v = h->quantile(q);
    EXPECT_GE(v, prev) << q;
    prev = v;
  }
}

TEST(LatencyHistogram, QuantileOutOfRangeIsClamped) {
  auto h = std::make_unique<LatencyHistogram>();
  for (int i = 1; i <= 100; ++i) h->record(microseconds(i));
  EXPECT_EQ(h->quantile(-1.0), h->quantile(0.0));
  EXPECT_EQ(h->quantile(7.0), h->quantile(1.0));
}

TEST(LatencyHistogram, SmallValuesAreExact) {
  auto h = std::make_unique<LatencyHistogram>();
  for (std::int64_t v = 0; v < 32; ++v) {
    h->reset();
    h->record(nanoseconds(v));
    EXPECT_EQ(h->quantile(0.5), nanoseconds(v));
  }
}

TEST(LatencyHistogram, BucketResolutionIsAboutThreePercentEverywhere) {
  auto h = std::make_unique<LatencyHistogram>();
  for (double v = 1; v < 1e15; v *= 1.37) {
    h->reset();
    const nanoseconds truth(static_cast<std::int64_t>(v));
    h->record(truth);
    ASSERT_EQ(h->count(), 1u);
    expect_close_above(h->quantile(0.5), truth);
  }
}

TEST(LatencyHistogram, NegativeDurationsCountAsZero) {
  auto h = std::make_unique<LatencyHistogram>();
  h->record(nanoseconds(-50));
  EXPECT_EQ(h->count(), 1u);
  EXPECT_EQ(h->quantile(1.0), nanoseconds(0));
}

TEST(LatencyHistogram, HugeValuesClampAndStayPositive) {
  auto h = std::make_unique<LatencyHistogram>();
  h->record(nanoseconds::max());
  h->record(nanoseconds(std::int64_t{1} << 62));
  EXPECT_EQ(h->count(), 2u);
  const nanoseconds top = h->quantile(1.0);
  EXPECT_GT(top.count(), 0);
  EXPECT_GE(top.count(), std::int64_t{1} << 62);
  expect_close_above(h->quantile(0.0), nanoseconds(std::int64_t{1} << 62));
  // A mix: the outlier does not drag the median.
  h->reset();
  for (int i = 0; i < 999; ++i) h->record(microseconds(10));
  h->record(nanoseconds::max());
  expect_close_above(h->quantile(0.5), microseconds(10));
  EXPECT_GT(h->quantile(1.0).count(), std::int64_t{1} << 62);
}

TEST(LatencyHistogram, ResetEmpties) {
  auto h = std::make_unique<LatencyHistogram>();
  for (int i = 0; i < 10; ++i) h->record(microseconds(3));
  h->reset();
  EXPECT_EQ(h->count(), 0u);
  EXPECT_EQ(h->quantile(0.9), nanoseconds(0));
}

TEST(LatencyHistogram, ConcurrentRecordsAreAllCounted) {
  auto h = std::make_unique<LatencyHistogram>();
  constexpr int kThreads = 4;
  constexpr int kIters = 10000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kIters; ++i) h->record(nanoseconds(1000 * (t + 1)));
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(h->count(), std::uint64_t{kThreads} * kIters);
  expect_close_above(h->quantile(0.0), nanoseconds(1000));
  expect_close_above(h->quantile(1.0), nanoseconds(4000));
}

}  // namespace
}  // namespace uhmm
