// bench_fault_readback: fault-driven sequential read-back of a device-resident
// buffer, against explicit migrate_to_system of the same bytes, measured
// interleaved in the same iteration.
//
// Each iteration (the order of the two halves alternates between iterations):
//   migrate_to_device (not timed)
//   baseline: migrate_to_system of the whole buffer (timed)
//   migrate_to_device (not timed)
//   subject:  sequential CPU read of the whole buffer with a checksum; each
//             first access to a device page faults (the sim brings back the
//             aligned 2 MiB block around it) (timed).  With read:0 the CPU
//             touches one word per page instead: fault-driven migration
//             alone, as NVIDIA measured it (fault-driven vs explicit
//             migration throughput, hmm-semantics section 8).
// Counters:
//   fault_read_GBps, explicit_GBps      GB/s of each
//   fault_x_explicit = fault_read_GBps / explicit_GBps   (target >= 0.8)
//   fault_x_explicit_read: the same against explicit migrate_to_system
//             followed by the same CPU access (both end with the same work
//             done by the CPU; informational)
//   explicit_cpus, fault_cpus: the process's CPU time over each timed
//             section divided by its wall time (how many CPUs were busy)
//   faults_per_iter, parked_per_iter, split_per_iter: per pass, device
//             faults, faults that waited for a migration in flight, and
//             2 MiB units that had come back split
//
// Run with both fault modes (in_thread:0 = FaultMode::kServiceThreads, the
// default; in_thread:1 = FaultMode::kInThread, docs/adr/0004) and both
// subjects (read:1 every word, read:0 one word per page).
//
// Environment: UHMM_BENCH_BYTES (default 256MiB, rounded up to 2 MiB),
//              UHMM_BENCH_FAULT_THREADS (AddressSpaceOptions::fault_threads;
//              unset: the library's default),
//              UHMM_BENCH_ITERS (default 10),
//              UHMM_BENCH_BATCH_PAGES (SimDeviceOptions::batch_pages, for the
//              explicit migrations and the prefetcher's alike; unset: the
//              device's default),
//              UHMM_BENCH_LINK_MBPS (SimDeviceOptions::link.bytes_per_second
//              in MB/s: a device behind a link slower than memory, whose
//              copies then leave the CPUs idle part of the time, as a real
//              device's DMA leaves them all of it; unset or 0: none).
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdlib>
#include <thread>

#include "bench_util.hpp"
#include "uhmm/uhmm.hpp"

namespace uhmm::bench {
namespace {

std::uint64_t pattern(std::size_t i) { return i * 0x9E3779B97F4A7C15ull; }

// Waits until the device holds no page of ours: finalize of the last
// fault-around block may still run after the reader has been woken.
bool settle(sim::SimDevice& dev, std::uint64_t total_pages) {
  for (int i = 0; i < 20000; ++i) {
    if (dev.free_pages() == total_pages) return true;
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  return false;
}

void BM_FaultReadback(benchmark::State& state) {
  const std::size_t bytes = bench_bytes();
  const std::uint64_t npages = bytes / kPageSize;
  const std::size_t nwords = bytes / 8;

  AddressSpaceOptions aopt;
  aopt.fault_mode = state.range(0) != 0 ? FaultMode::kInThread : FaultMode::kServiceThreads;
  // 0 (the library's default): one fault-service thread per CPU.
  aopt.fault_threads = static_cast<unsigned>(env_count("UHMM_BENCH_FAULT_THREADS", 0));
  auto as = check(AddressSpace::create(aopt), "AddressSpace::create");
  sim::SimDeviceOptions dopt;
  dopt.memory_bytes = bytes + kHugePageSize;
  dopt.warm_memory = true;
  if (const char* depth = std::getenv("UHMM_BENCH_PREFETCH")) dopt.prefetch_blocks = std::strtoul(depth, nullptr, 10);
  dopt.batch_pages = env_count("UHMM_BENCH_BATCH_PAGES", dopt.batch_pages);
  // A device behind a link slower than memory: its copies then take less
  // CPU than their time, as a real device's DMA takes none.
  if (const std::uint64_t mbps = env_count("UHMM_BENCH_LINK_MBPS", 0)) dopt.link.bytes_per_second = mbps * 1e6;
  auto dev = check(sim::SimDevice::create(dopt), "SimDevice::create");
  const std::uint64_t dev_pages = dev->free_pages();
  const VirtAddr base = check(as->map(bytes), "map");
  auto* words = base.as<std::uint64_t>();
  for (std::size_t i = 0; i < nwords; ++i) words[i] = pattern(i);
  const std::uint64_t want = checksum_words(words, nwords);
  const bool read_all = state.range(1) != 0;
  const std::uint64_t want_subject = read_all ? want : touch_pages(words, nwords);

  auto to_device = [&]() -> bool {
    auto r = dev->migrate_to_device(*as, base, bytes);
    return r.is_ok() && r->pages_migrated == npages;
  };

  // Warm-up: one round each way, not timed.
  check(dev->migrate_to_device(*as, base, bytes), "warm-up migrate_to_device");
  if (checksum_words(words, nwords) != want || !settle(*dev, dev_pages)) {
    state.SkipWithError("warm-up read-back failed");
    return;
  }

  const std::uint64_t zaps_before = as->stats().get(Counter::empty_table_zaps);  // the fill's
  double t_explicit = 0, t_explicit_read = 0, t_fault = 0;
  double cpu_explicit = 0, cpu_fault = 0;
  std::uint64_t n = 0;
  for (auto _ : state) {
    for (int half = 0; half < 2; ++half) {
      const bool explicit_half = (half == 0) == (n % 2 == 0);
      if (!to_device()) {
        state.SkipWithError("not every page moved to the device");
        return;
      }
      if (explicit_half) {
        const double c0 = process_cpu_seconds();
        const auto t0 = Clock::now();
        auto r = dev->migrate_to_system(*as, base, bytes);
        const double t_mig = seconds_since(t0);
        cpu_explicit += process_cpu_seconds() - c0;
        const std::uint64_t sum = read_all ? checksum_words(words, nwords) : touch_pages(words, nwords);
        t_explicit_read += seconds_since(t0);
        t_explicit += t_mig;
        if (!r.is_ok() || r->pages_migrated != npages || sum != want_subject) {
          state.SkipWithError("explicit migrate_to_system failed or lost data");
          return;
        }
      } else {
        const double c0 = process_cpu_seconds();
        const auto t0 = Clock::now();
        const std::uint64_t sum = read_all ? checksum_words(words, nwords) : touch_pages(words, nwords);
        const double t = seconds_since(t0);
        cpu_fault += process_cpu_seconds() - c0;
        t_fault += t;
        state.SetIterationTime(t);
        if (sum != want_subject || (!read_all && checksum_words(words, nwords) != want)) {
          state.SkipWithError("fault-driven read-back returned wrong data");
          return;
        }
        if (!settle(*dev, dev_pages)) {
          state.SkipWithError("device pages still in use long after the read-back");
          return;
        }
      }
    }
    ++n;
  }
  if (n == 0) return;

  const double gb = static_cast<double>(bytes) * static_cast<double>(n) / 1e9;
  state.counters["MiB"] = static_cast<double>(bytes >> 20);
  state.counters["fault_read_GBps"] = gb / t_fault;
  state.counters["explicit_GBps"] = gb / t_explicit;
  state.counters["explicit_read_GBps"] = gb / t_explicit_read;
  state.counters["fault_x_explicit"] = t_explicit / t_fault;
  state.counters["fault_x_explicit_read"] = t_explicit_read / t_fault;
  // CPUs kept busy on average (process CPU time / wall time) during each:
  // on a machine of N CPUs, N means the work itself is the limit.
  state.counters["explicit_cpus"] = cpu_explicit / t_explicit;
  state.counters["fault_cpus"] = cpu_fault / t_fault;
  state.counters["faults_per_iter"] =
      static_cast<double>(as->stats().get(Counter::device_private_faults)) / static_cast<double>(n + 1);
  // Faults that found their page in a migration (the prefetcher's, mostly)
  // and waited for it.
  state.counters["parked_per_iter"] =
      static_cast<double>(as->stats().get(Counter::faults_parked)) / static_cast<double>(n + 1);
  // Units that came back split and so left split the next time: each costs
  // a populate of a fresh staging huge page later (docs/migration.md, "A
  // unit can still come back split").
  // Empty page tables zapped so that a unit could move in whole, both
  // halves after the warm-up: explicit migration back needs none, a unit
  // faulted on outside a huge-fault window one (docs/migration.md,
  // "Batching").
  state.counters["zaps_per_iter"] =
      static_cast<double>(as->stats().get(Counter::empty_table_zaps) - zaps_before) / static_cast<double>(n);
  state.counters["split_per_iter"] =
      static_cast<double>(as->stats().get(Counter::thp_split_staged)) / static_cast<double>(n + 1);
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes * n));
}

BENCHMARK(BM_FaultReadback)
    ->ArgNames({"in_thread", "read"})
    ->ArgsProduct({{0, 1}, {1, 0}})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(static_cast<benchmark::IterationCount>(env_count("UHMM_BENCH_ITERS", 10)));

}  // namespace
}  // namespace uhmm::bench

BENCHMARK_MAIN();
