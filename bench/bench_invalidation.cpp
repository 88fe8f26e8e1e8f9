// bench_invalidation: what mirroring costs an munmap.  A populated 2 MiB
// managed range is unmapped by the application (::munmap, behind uhmm's
// back) while 0, 1 or 16 interval notifiers cover it; the time runs until
// the change is complete for the mirrors: every notifier's invalidate() has
// returned (with none: until uhmm has processed the UNMAP event).
//   baseline  ::munmap of a populated, 2 MiB-aligned private anonymous
//             mapping that uhmm does not manage, backed by a huge page as
//             uhmm backs a managed 2 MiB hole, measured in the same iteration.
// Counters: p50_us, baseline_p50_us, p50_x_munmap = p50 / baseline p50.
//
// Environment: UHMM_BENCH_SAMPLES (default 2000).
#include <benchmark/benchmark.h>
#include <sys/mman.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "bench_util.hpp"
#include "uhmm/uhmm.hpp"

namespace uhmm::bench {
namespace {

struct CountingOps : IntervalNotifierOps {
  bool invalidate(IntervalNotifier& sub, const NotifyRange&, std::uint64_t cur_seq) override {
    sub.set_seq(cur_seq);  // a driver does this under its page-table lock
    calls.fetch_add(1, std::memory_order_release);
    return true;
  }
  std::atomic<std::uint64_t> calls{0};
};

void BM_MunmapInvalidation(benchmark::State& state) {
  const auto notifiers = static_cast<std::size_t>(state.range(0));
  auto as = check(AddressSpace::create(), "AddressSpace::create");
  CountingOps ops;
  std::vector<std::unique_ptr<IntervalNotifier>> subs;
  std::vector<double> subject_us, baseline_us;
  for (auto _ : state) {
    // Baseline: a plain 2 MiB-aligned mapping, populated like uhmm
    // populates a whole hole (one huge page), unmapped.
    void* raw = ::mmap(nullptr, 2 * kHugePageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) {
      state.SkipWithError("mmap failed");
      break;
    }
    auto* plain = reinterpret_cast<unsigned char*>((reinterpret_cast<std::uintptr_t>(raw) + kHugePageSize - 1) &
                                                   ~(std::uintptr_t{kHugePageSize} - 1));
    ::madvise(plain, kHugePageSize, MADV_HUGEPAGE);
    std::memset(plain, 1, kHugePageSize);
    auto t0 = Clock::now();
    ::munmap(plain, kHugePageSize);
    baseline_us.push_back(seconds_since(t0) * 1e6);
    ::munmap(raw, 2 * kHugePageSize);  // what is left of it

    // Subject: a managed range, populated, mirrored by `notifiers`.
    const VirtAddr base = check(as->map(kHugePageSize), "map");
    std::memset(base.ptr(), 1, kHugePageSize);
    subs.clear();
    for (std::size_t i = 0; i < notifiers; ++i) {
      subs.push_back(std::make_unique<IntervalNotifier>());
      // Overlapping subscriptions of different sizes, as drivers make them.
      const std::size_t len = kHugePageSize >> (i % 4);
      check(interval_notifier_insert(*subs.back(), *as, base, len, ops), "interval_notifier_insert");
    }
    const std::uint64_t before = ops.calls.load(std::memory_order_acquire);
    t0 = Clock::now();
    ::munmap(base.ptr(), kHugePageSize);
    // Waiting must leave the CPU to uhmm's threads: on 2 vCPUs a busy loop
    // keeps the event worker off this CPU until the next scheduler tick.
    if (notifiers > 0) {
      while (ops.calls.load(std::memory_order_acquire) < before + notifiers) std::this_thread::yield();
    } else {
      while (as->find_region(base).has_value()) std::this_thread::yield();
    }
    const double us = seconds_since(t0) * 1e6;
    subject_us.push_back(us);
    state.SetIterationTime(us * 1e-6);
    for (auto& s : subs) interval_notifier_remove(*s);
    while (as->find_region(base).has_value()) std::this_thread::yield();
  }
  if (subject_us.empty()) return;
  const double p50 = percentile(subject_us, 0.5), base50 = percentile(baseline_us, 0.5);
  state.counters["p50_us"] = p50;
  state.counters["p99_us"] = percentile(subject_us, 0.99);
  state.counters["baseline_p50_us"] = base50;
  state.counters["p50_x_munmap"] = p50 / base50;
  state.counters["notifier_calls"] = static_cast<double>(ops.calls.load());
  // Changes processed per iteration: 1 (the munmap) unless something else
  // (say, one of uhmm's own zaps taken for the application's) got in.
  state.counters["events_per_iter"] =
      static_cast<double>(as->stats().get(Counter::uffd_events)) / static_cast<double>(subject_us.size());
}

BENCHMARK(BM_MunmapInvalidation)
    ->ArgName("notifiers")
    ->Arg(0)
    ->Arg(1)
    ->Arg(16)
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond)
    ->Iterations(static_cast<benchmark::IterationCount>(env_count("UHMM_BENCH_SAMPLES", 2000)));

}  // namespace
}  // namespace uhmm::bench

BENCHMARK_MAIN();
