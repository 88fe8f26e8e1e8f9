// bench_first_touch: the first touch of managed memory (every page a hole:
// uhmm fills it on the fault, a 2 MiB block at a time), against the first
// touch of plain anonymous memory, measured interleaved in the same
// iteration.
//
// Each iteration (the order of the three alternates between iterations):
//   uhmm      AddressSpace::map of the buffer, one 8-byte store per 4 KiB
//             page (timed), AddressSpace::unmap
//   raw       mmap (MAP_PRIVATE | MAP_ANONYMOUS) of the buffer with the
//             system's default huge-page policy, the same stores (timed),
//             munmap
//   raw_huge  the same with MADV_HUGEPAGE: the kernel's fastest first touch
//             (one zeroed 2 MiB page per block, no page table)
// All three sides zero fresh memory; none is populated in advance.
// Counters:
//   uhmm_GBps, raw_GBps, raw_huge_GBps
//   x_raw      = raw time / uhmm time       (1 = parity, higher is faster)
//   x_raw_huge = raw_huge time / uhmm time
//   hole_faults_per_iter, zaps_per_iter (uhmm's empty-page-table zaps)
//
// Environment: UHMM_BENCH_BYTES (default 256MiB, rounded up to 2 MiB),
//              UHMM_BENCH_ITERS (default 10),
//              UHMM_BENCH_FAULT_THREADS (AddressSpaceOptions::fault_threads).
#include <benchmark/benchmark.h>
#include <sys/mman.h>

#include <cstdint>

#include "bench_util.hpp"
#include "uhmm/uhmm.hpp"

namespace uhmm::bench {
namespace {

std::uint64_t word_for(std::size_t page) { return 0x5eed0000'00000000ull + page; }

// One store per page, then a check of every stored word (untimed).
double touch(unsigned char* base, std::size_t bytes, bool* intact) {
  const std::size_t pages = bytes / kPageSize;
  const auto t0 = Clock::now();
  for (std::size_t p = 0; p < pages; ++p)
    *reinterpret_cast<volatile std::uint64_t*>(base + p * kPageSize) = word_for(p);
  const double t = seconds_since(t0);
  *intact = true;
  for (std::size_t p = 0; p < pages && *intact; ++p)
    *intact = *reinterpret_cast<const std::uint64_t*>(base + p * kPageSize) == word_for(p);
  return t;
}

double touch_plain(std::size_t bytes, bool huge, bool* intact) {
  void* p = ::mmap(nullptr, bytes + kHugePageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    *intact = false;
    return 0;
  }
  // Aligned like uhmm's mapping, so that huge pages can form.
  const auto aligned = (reinterpret_cast<std::uintptr_t>(p) + kHugePageSize - 1) & ~(kHugePageSize - 1);
  auto* base = reinterpret_cast<unsigned char*>(aligned);
  if (huge) (void)::madvise(base, bytes, MADV_HUGEPAGE);
  const double t = touch(base, bytes, intact);
  ::munmap(p, bytes + kHugePageSize);
  return t;
}

void BM_FirstTouch(benchmark::State& state) {
  const std::size_t bytes = bench_bytes();
  AddressSpaceOptions aopt;
  aopt.fault_threads = static_cast<unsigned>(env_count("UHMM_BENCH_FAULT_THREADS", 0));
  auto as = check(AddressSpace::create(aopt), "AddressSpace::create");

  auto touch_managed = [&](bool* intact) {
    const VirtAddr base = check(as->map(bytes), "map");
    const double t = touch(base.as<unsigned char>(), bytes, intact);
    check(as->unmap(base), "unmap");
    return t;
  };
  // Warm-up: one of each, not timed (uhmm's staging pool, the first
  // allocations of the kernel's page tables).
  bool intact = true;
  (void)touch_managed(&intact);
  (void)touch_plain(bytes, false, &intact);
  as->stats().reset();

  double t_uhmm = 0, t_raw = 0, t_raw_huge = 0;
  std::uint64_t n = 0;
  for (auto _ : state) {
    double iteration_uhmm = 0;
    for (int k = 0; k < 3; ++k) {
      const int side = static_cast<int>((static_cast<std::uint64_t>(k) + n) % 3);
      bool ok = true;
      if (side == 0) {
        iteration_uhmm = touch_managed(&ok);
        t_uhmm += iteration_uhmm;
      } else if (side == 1) {
        t_raw += touch_plain(bytes, false, &ok);
      } else {
        t_raw_huge += touch_plain(bytes, true, &ok);
      }
      if (!ok) {
        state.SkipWithError(side == 0 ? "managed memory lost a store" : "plain memory failed");
        return;
      }
    }
    state.SetIterationTime(iteration_uhmm);
    ++n;
  }
  if (n == 0) return;

  const double gb = static_cast<double>(bytes) * static_cast<double>(n) / 1e9;
  state.counters["MiB"] = static_cast<double>(bytes >> 20);
  state.counters["uhmm_GBps"] = gb / t_uhmm;
  state.counters["raw_GBps"] = gb / t_raw;
  state.counters["raw_huge_GBps"] = gb / t_raw_huge;
  state.counters["x_raw"] = t_raw / t_uhmm;
  state.counters["x_raw_huge"] = t_raw_huge / t_uhmm;
  state.counters["hole_faults_per_iter"] =
      static_cast<double>(as->stats().get(Counter::hole_faults)) / static_cast<double>(n);
  state.counters["zaps_per_iter"] =
      static_cast<double>(as->stats().get(Counter::empty_table_zaps)) / static_cast<double>(n);
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes * n));
}

BENCHMARK(BM_FirstTouch)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(static_cast<benchmark::IterationCount>(env_count("UHMM_BENCH_ITERS", 10)));

}  // namespace
}  // namespace uhmm::bench

BENCHMARK_MAIN();
