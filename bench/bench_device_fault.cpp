// bench_device_fault: device-fault service throughput.  The simulated
// device streams over 256 MiB of CPU-resident managed memory with
// device_read in 2 MiB requests, starting each pass with an empty mirror
// (every page is a device fault, serviced in batches with
// hmm_range_fault); the figure is bytes read per second.
//   baseline  memcpy of the same bytes in the same 2 MiB pieces, measured
//             in the same iteration.
// The mirror is emptied between passes with AddressSpace::protect to the
// same protection (a PROTECTION_VMA invalidation that moves no page).
// Counters: device_GBps, memcpy_GBps, device_x_memcpy, and the device's
// faults per pass.
//
// Environment: UHMM_BENCH_BYTES (default 256MiB), UHMM_BENCH_ITERS (10).
#include <benchmark/benchmark.h>
#include <sys/mman.h>

#include <cstring>
#include <vector>

#include "bench_util.hpp"
#include "uhmm/uhmm.hpp"

namespace uhmm::bench {
namespace {

void BM_DeviceFaultStream(benchmark::State& state) {
  const std::size_t bytes = (env_size("UHMM_BENCH_BYTES", std::size_t{256} << 20) + kHugePageSize - 1) /
                            kHugePageSize * kHugePageSize;
  auto as = check(AddressSpace::create(), "AddressSpace::create");
  sim::SimDeviceOptions o;
  o.memory_bytes = kHugePageSize * 4;
  auto dev = check(sim::SimDevice::create(o), "SimDevice::create");
  const VirtAddr base = check(as->map(bytes), "map");
  for (std::size_t i = 0; i < bytes / 8; ++i) base.as<std::uint64_t>()[i] = i;
  std::vector<std::byte> sink(kHugePageSize);
  std::vector<unsigned char> src(bytes, 1);
  double device_s = 0, memcpy_s = 0;
  std::uint64_t faults = 0, passes = 0;
  for (auto _ : state) {
    check(as->protect(base, bytes, PROT_READ | PROT_WRITE), "protect (empties the mirror)");
    const std::uint64_t before = dev->mirror_stats().device_faults;
    auto t0 = Clock::now();
    for (std::size_t off = 0; off < bytes; off += kHugePageSize)
      check(dev->device_read(*as, base + off, sink), "device_read");
    const double d = seconds_since(t0);
    faults += dev->mirror_stats().device_faults - before;
    // The last request read the last 2 MiB: word k there is its index.
    if (reinterpret_cast<const std::uint64_t*>(sink.data())[7] != (bytes - kHugePageSize) / 8 + 7) {
      state.SkipWithError("device read the wrong data");
      break;
    }
    t0 = Clock::now();
    for (std::size_t off = 0; off < bytes; off += kHugePageSize) {
      std::memcpy(sink.data(), src.data() + off, kHugePageSize);
      benchmark::DoNotOptimize(sink.data());
    }
    const double m = seconds_since(t0);
    device_s += d;
    memcpy_s += m;
    ++passes;
    state.SetIterationTime(d);
  }
  if (passes == 0) return;
  const double gb = static_cast<double>(bytes) * static_cast<double>(passes) / 1e9;
  state.counters["device_GBps"] = gb / device_s;
  state.counters["memcpy_GBps"] = gb / memcpy_s;
  state.counters["device_x_memcpy"] = memcpy_s / device_s;
  state.counters["device_faults_per_pass"] = static_cast<double>(faults) / static_cast<double>(passes);
}

BENCHMARK(BM_DeviceFaultStream)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(static_cast<benchmark::IterationCount>(env_count("UHMM_BENCH_ITERS", 10)));

}  // namespace
}  // namespace uhmm::bench

BENCHMARK_MAIN();
