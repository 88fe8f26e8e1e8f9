#include "uhmm/stats.hpp"

#include <bit>

namespace uhmm {

namespace {
struct CounterText {
  std::string_view name;
  std::string_view doc;
};
constexpr CounterText kCounterText[] = {
#define UHMM_COUNTER_TEXT(name, doc) {#name, doc},
    UHMM_COUNTERS(UHMM_COUNTER_TEXT)
#undef UHMM_COUNTER_TEXT
};
}  // namespace

std::string_view counter_name(Counter c) { return kCounterText[static_cast<unsigned>(c)].name; }
std::string_view counter_doc(Counter c) { return kCounterText[static_cast<unsigned>(c)].doc; }

// Buckets: values below kSubBuckets map to themselves; above, each power of
// two is split into kSubBuckets equal parts.
unsigned LatencyHistogram::bucket_of(std::uint64_t ns) {
  if (ns < kSubBuckets) return static_cast<unsigned>(ns);
  const unsigned log2 = 63 - static_cast<unsigned>(std::countl_zero(ns));  // >= 5
  const unsigned shift = log2 - 5;                                          // kSubBuckets = 2^5
  const unsigned sub = static_cast<unsigned>((ns >> shift) - kSubBuckets);
  const unsigned b = (shift + 1) * kSubBuckets + sub;
  return b < kBuckets ? b : kBuckets - 1;
}

std::uint64_t LatencyHistogram::upper_bound_of(unsigned bucket) {
  if (bucket < kSubBuckets) return bucket;
  const unsigned shift = bucket / kSubBuckets - 1;
  const std::uint64_t sub = bucket % kSubBuckets;
  return ((kSubBuckets + sub + 1) << shift) - 1;
}

void LatencyHistogram::record(std::chrono::nanoseconds ns) {
  const auto v = ns.count() < 0 ? 0 : static_cast<std::uint64_t>(ns.count());
  buckets_[bucket_of(v)].fetch_add(1, std::memory_order_relaxed);
}

std::uint64_t LatencyHistogram::count() const {
  std::uint64_t n = 0;
  for (const auto& b : buckets_) n += b.load(std::memory_order_relaxed);
  return n;
}

std::chrono::nanoseconds LatencyHistogram::quantile(double q) const {
  const std::uint64_t total = count();
  if (total == 0) return std::chrono::nanoseconds{0};
  if (q < 0) q = 0;
  if (q > 1) q = 1;
  auto rank = static_cast<std::uint64_t>(q * static_cast<double>(total));
  if (rank >= total) rank = total - 1;
  std::uint64_t seen = 0;
  for (unsigned i = 0; i < kBuckets; ++i) {
    seen += buckets_[i].load(std::memory_order_relaxed);
    if (seen > rank) return std::chrono::nanoseconds{static_cast<std::int64_t>(upper_bound_of(i))};
  }
  return std::chrono::nanoseconds{static_cast<std::int64_t>(upper_bound_of(kBuckets - 1))};
}

void LatencyHistogram::reset() {
  for (auto& b : buckets_) b.store(0, std::memory_order_relaxed);
}

Stats::Snapshot Stats::snapshot() const {
  Snapshot s;
  for (unsigned i = 0; i < s.values.size(); ++i) s.values[i] = counters_[i].load(std::memory_order_relaxed);
  return s;
}

void Stats::reset() {
  for (auto& c : counters_) c.store(0, std::memory_order_relaxed);
  fault_latency_.reset();
}

}  // namespace uhmm
