// bench_migrate: explicit migration bandwidth, both directions, as a ratio to
// memcpy of the same bytes measured in the same iteration.
//
// Each iteration times, interleaved:
//   memcpy   (baseline)  src -> dst, two warm buffers, 2 MiB chunks
//   migrate_to_device    the whole managed buffer (2 MiB batches)
//   memcpy   (baseline)  again
//   migrate_to_system    the whole buffer back
// and the counters report GB/s of each and
//   to_device_x_memcpy = GB/s to device / GB/s memcpy   (target >= 0.6)
//   to_system_x_memcpy = GB/s to system / GB/s memcpy   (target >= 0.6)
// and, informational, the same against the copy the DMA engine itself uses
// for long runs (platform::copy_streaming, 2 MiB chunks, one thread, timed
// each way in the same iteration): stream_GBps, to_*_x_stream.
//
// Environment: UHMM_BENCH_BYTES (default 256MiB, rounded up to 2 MiB),
//              UHMM_BENCH_FAULT_THREADS (AddressSpaceOptions::fault_threads;
//              unset: the library's default),
//              UHMM_BENCH_ITERS (default 20),
//              UHMM_BENCH_BATCH_PAGES (SimDeviceOptions::batch_pages; default
//              512, the 2 MiB batches the target is stated for),
//              UHMM_BENCH_LARGE_PAGES (0 or 1: SimDeviceOptions::large_pages;
//              unset: the device's default).
#include <benchmark/benchmark.h>
#include <sys/mman.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "bench_util.hpp"
#include "uhmm/uhmm.hpp"

namespace uhmm::bench {
namespace {

constexpr std::size_t kChunk = kHugePageSize;

// A warm, huge-page-advised anonymous buffer for the memcpy baseline.
struct WarmBuffer {
  explicit WarmBuffer(std::size_t bytes) : len(bytes) {
    void* p = ::mmap(nullptr, len + kHugePageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      std::perror("mmap");
      std::exit(3);
    }
    raw = p;
    const auto a = (reinterpret_cast<std::uintptr_t>(p) + kHugePageSize - 1) & ~(kHugePageSize - 1);
    data = reinterpret_cast<unsigned char*>(a);
    (void)::madvise(data, len, MADV_HUGEPAGE);
    std::memset(data, 0x5a, len);
  }
  ~WarmBuffer() { ::munmap(raw, len + kHugePageSize); }
  WarmBuffer(const WarmBuffer&) = delete;
  WarmBuffer& operator=(const WarmBuffer&) = delete;
  std::size_t len;
  void* raw;
  unsigned char* data;
};

void BM_ExplicitMigration(benchmark::State& state) {
  const std::size_t bytes = bench_bytes();
  const std::uint64_t npages = bytes / kPageSize;

  AddressSpaceOptions aopt;
  // 0 (the library's default): one fault-service thread per CPU.
  aopt.fault_threads = static_cast<unsigned>(env_count("UHMM_BENCH_FAULT_THREADS", 0));
  auto as = check(AddressSpace::create(aopt), "AddressSpace::create");
  sim::SimDeviceOptions dopt;
  dopt.memory_bytes = bytes + kHugePageSize;
  dopt.warm_memory = true;
  dopt.batch_pages = env_count("UHMM_BENCH_BATCH_PAGES", kPagesPerHugePage);  // the target's 2 MiB batches
  dopt.large_pages = env_count("UHMM_BENCH_LARGE_PAGES", dopt.large_pages ? 1 : 0) != 0;
  auto dev = check(sim::SimDevice::create(dopt), "SimDevice::create");

  const VirtAddr base = check(as->map(bytes), "map");
  auto* words = base.as<std::uint64_t>();
  fill_round_trip(words, bytes);  // touch: populate

  WarmBuffer src(bytes), dst(bytes);

  // Warm-up round trip (staging pool, device arena, page tables), not timed.
  check(dev->migrate_to_device(*as, base, bytes), "warm-up migrate_to_device");
  check(dev->migrate_to_system(*as, base, bytes), "warm-up migrate_to_system");
  chunked_memcpy(dst.data, src.data, bytes, kChunk);

  double t_memcpy = 0, t_stream = 0, t_to_dev = 0, t_to_sys = 0;
  std::uint64_t n = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    chunked_memcpy(dst.data, src.data, bytes, kChunk);
    t_memcpy += seconds_since(t0);
    t0 = Clock::now();
    chunked_stream_copy(dst.data, src.data, bytes, kChunk);
    t_stream += seconds_since(t0);

    t0 = Clock::now();
    auto to_dev = dev->migrate_to_device(*as, base, bytes);
    const double d = seconds_since(t0);
    t_to_dev += d;
    if (!to_dev.is_ok() || to_dev->pages_migrated != npages) {
      state.SkipWithError(to_dev.is_ok() ? "not every page moved to the device"
                                         : to_dev.status().to_string().c_str());
      break;
    }

    t0 = Clock::now();
    chunked_memcpy(src.data, dst.data, bytes, kChunk);
    t_memcpy += seconds_since(t0);
    t0 = Clock::now();
    chunked_stream_copy(src.data, dst.data, bytes, kChunk);
    t_stream += seconds_since(t0);

    t0 = Clock::now();
    auto to_sys = dev->migrate_to_system(*as, base, bytes);
    const double s = seconds_since(t0);
    t_to_sys += s;
    if (!to_sys.is_ok() || to_sys->pages_migrated != npages) {
      state.SkipWithError(to_sys.is_ok() ? "not every page moved back to system memory"
                                         : to_sys.status().to_string().c_str());
      break;
    }
    state.SetIterationTime(d + s);
    ++n;
  }
  if (n == 0) return;

  // The data survived every round trip (not timed).
  if (!round_trip_intact(words, bytes)) {
    state.SkipWithError("data corrupted by migration");
    return;
  }

  report_round_trip(state, bytes, n, t_memcpy, t_to_dev, t_to_sys, t_stream);
}

BENCHMARK(BM_ExplicitMigration)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(static_cast<benchmark::IterationCount>(env_count("UHMM_BENCH_ITERS", 20)));

}  // namespace
}  // namespace uhmm::bench

BENCHMARK_MAIN();
