// bench_file_device: a device round trip of a file range through the file
// cache, as a ratio to memcpy plus pwrite of the same bytes measured in the
// same iteration (issue 5's second target).
//
// Each iteration times, interleaved:
//   baseline     memcpy of the range into a buffer, then pwrite of the
//                buffer to a second file of the same size (what a program
//                without device pages in the page cache does to hand a
//                device's result to the file)
//   round trip   migrate_to_device of a FileCache mapping of the range, a
//                device kernel that writes every word (adds 1), the range
//                back with migrate_to_system, and sync() (msync: the
//                device's data reaches the file)
// and the counters report GB/s of each and
//   round_trip_x_baseline = baseline time / round-trip time (higher is better)
// plus the share of the round trip spent in each step.
//
// Environment: UHMM_BENCH_BYTES (default 256MiB, rounded up to 2 MiB),
//              UHMM_BENCH_DIR (default /tmp: where the two files go),
//              UHMM_BENCH_ITERS (default 5).
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>

#include "bench_util.hpp"
#include "uhmm/uhmm.hpp"

namespace uhmm::bench {
namespace {

std::string bench_dir() {
  const char* d = std::getenv("UHMM_BENCH_DIR");
  return d != nullptr && *d != '\0' ? d : "/tmp";
}

// A file of `bytes` holding round_trip_word(i) at word i.
void write_pattern_file(const std::string& path, std::size_t bytes) {
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
  if (fd < 0) {
    std::perror(path.c_str());
    std::exit(3);
  }
  std::vector<std::uint64_t> chunk(kHugePageSize / 8);
  for (std::size_t off = 0; off < bytes; off += kHugePageSize) {
    for (std::size_t i = 0; i < chunk.size(); ++i) chunk[i] = round_trip_word(off / 8 + i);
    if (::pwrite(fd, chunk.data(), kHugePageSize, static_cast<off_t>(off)) != static_cast<ssize_t>(kHugePageSize)) {
      std::perror("pwrite");
      std::exit(3);
    }
  }
  ::close(fd);
}

void pwrite_all(int fd, const unsigned char* buf, std::size_t bytes) {
  for (std::size_t off = 0; off < bytes;) {
    const ssize_t n = ::pwrite(fd, buf + off, bytes - off, static_cast<off_t>(off));
    if (n <= 0) {
      std::perror("pwrite");
      std::exit(3);
    }
    off += static_cast<std::size_t>(n);
  }
}

void BM_FileDeviceRoundTrip(benchmark::State& state) {
  const std::size_t bytes = bench_bytes();
  const std::uint64_t npages = bytes / kPageSize;
  const std::string data_path = bench_dir() + "/uhmm-bench-file-device.data";
  const std::string base_path = bench_dir() + "/uhmm-bench-file-device.baseline";
  write_pattern_file(data_path, bytes);
  write_pattern_file(base_path, bytes);

  auto as = check(AddressSpace::create({}), "AddressSpace::create");
  sim::SimDeviceOptions dopt;
  dopt.memory_bytes = bytes + kHugePageSize;
  dopt.warm_memory = true;
  auto dev = check(sim::SimDevice::create(dopt), "SimDevice::create");
  FileCacheOptions copt;
  copt.flush_interval = std::chrono::milliseconds(0);  // writeback only when timed
  auto cache = check(FileCache::open(*as, data_path, O_RDWR, 0600, copt), "FileCache::open");
  const VirtAddr range = check(cache->map(0, bytes), "FileCache::map");
  auto* words = range.as<std::uint64_t>();

  // The baseline's source: a warm private buffer with the same bytes.
  std::vector<unsigned char> src(bytes), dst(bytes);
  std::memcpy(src.data(), words, bytes);  // also reads the whole range into the cache
  const int base_fd = ::open(base_path.c_str(), O_RDWR);
  if (base_fd < 0) {
    std::perror(base_path.c_str());
    std::exit(3);
  }

  auto add_one = [](std::span<std::byte> page, VirtAddr) {
    auto* w = reinterpret_cast<std::uint64_t*>(page.data());
    for (std::size_t i = 0; i < kPageSize / 8; ++i) ++w[i];
  };
  std::uint64_t kernels = 0;
  // Warm-up round trip (staging pool, device arena, page tables), not timed.
  check(dev->migrate_to_device(*as, range, bytes), "warm-up migrate_to_device");
  check(dev->run_kernel(*as, range, bytes, add_one), "warm-up kernel");
  ++kernels;
  check(dev->migrate_to_system(*as, range, bytes), "warm-up migrate_to_system");
  check(cache->sync(), "warm-up sync");

  double t_base = 0, t_to_dev = 0, t_kernel = 0, t_back = 0, t_sync = 0;
  std::uint64_t n = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    chunked_memcpy(dst.data(), src.data(), bytes, kHugePageSize);
    pwrite_all(base_fd, dst.data(), bytes);
    t_base += seconds_since(t0);

    t0 = Clock::now();
    auto to_dev = dev->migrate_to_device(*as, range, bytes);
    const double a = seconds_since(t0);
    if (!to_dev.is_ok() || to_dev->pages_migrated != npages) {
      state.SkipWithError(to_dev.is_ok() ? "not every page moved to the device" : to_dev.status().to_string().c_str());
      break;
    }
    t0 = Clock::now();
    if (Status s = dev->run_kernel(*as, range, bytes, add_one); !s) {
      state.SkipWithError(s.to_string().c_str());
      break;
    }
    ++kernels;
    const double b = seconds_since(t0);
    t0 = Clock::now();
    auto back = dev->migrate_to_system(*as, range, bytes);
    const double c = seconds_since(t0);
    if (!back.is_ok() || back->pages_migrated != npages) {
      state.SkipWithError(back.is_ok() ? "not every page came back" : back.status().to_string().c_str());
      break;
    }
    t0 = Clock::now();
    if (Status s = cache->sync(); !s) {
      state.SkipWithError(s.to_string().c_str());
      break;
    }
    const double d = seconds_since(t0);
    t_to_dev += a;
    t_kernel += b;
    t_back += c;
    t_sync += d;
    state.SetIterationTime(a + b + c + d);
    ++n;
  }
  ::close(base_fd);
  if (n > 0) {
    // Every word went up once per kernel run, in the mapping and in the file
    // (not timed).
    bool intact = true;
    for (std::size_t i = 0; i < bytes / 8 && intact; ++i) intact = words[i] == round_trip_word(i) + kernels;
    std::vector<std::uint64_t> disk(kHugePageSize / 8);
    const int fd = ::open(data_path.c_str(), O_RDONLY);
    for (std::size_t off = 0; off < bytes && intact; off += kHugePageSize) {
      intact = ::pread(fd, disk.data(), kHugePageSize, static_cast<off_t>(off)) == static_cast<ssize_t>(kHugePageSize);
      for (std::size_t i = 0; i < disk.size() && intact; ++i) intact = disk[i] == round_trip_word(off / 8 + i) + kernels;
    }
    ::close(fd);
    if (!intact) {
      state.SkipWithError("the device's writes did not reach the mapping and the file intact");
    } else {
      const double gb = static_cast<double>(bytes) * static_cast<double>(n) / 1e9;
      const double round_trip = t_to_dev + t_kernel + t_back + t_sync;
      state.counters["MiB"] = static_cast<double>(bytes >> 20);
      state.counters["baseline_GBps"] = gb / t_base;
      state.counters["round_trip_GBps"] = gb / round_trip;
      state.counters["round_trip_x_baseline"] = t_base / round_trip;
      state.counters["share_to_device"] = t_to_dev / round_trip;
      state.counters["share_kernel"] = t_kernel / round_trip;
      state.counters["share_back"] = t_back / round_trip;
      state.counters["share_sync"] = t_sync / round_trip;
      state.SetBytesProcessed(static_cast<std::int64_t>(bytes * n));
    }
  }
  check(cache->close(), "FileCache::close");
  ::unlink(data_path.c_str());
  ::unlink(base_path.c_str());
}

BENCHMARK(BM_FileDeviceRoundTrip)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(static_cast<benchmark::IterationCount>(env_count("UHMM_BENCH_ITERS", 5)));

}  // namespace
}  // namespace uhmm::bench

BENCHMARK_MAIN();
