// bench_file_read: sequential read of a file through a FileCache mapping,
// against the kernel's own mmap(MAP_SHARED) of the same file, measured
// interleaved in the same iteration (the order of the two alternates).
//
// cache:0 (cold)  kernel: the file's page cache dropped (fsync, then
//                 posix_fadvise(POSIX_FADV_DONTNEED)), a fresh mapping;
//                 uhmm: the same drop, then a fresh FileCache and mapping,
//                 so every page comes from the disk through a fault.
// cache:1 (warm)  a second pass over a mapping that has read every page:
//                 both page caches hold the file and the page tables map it.
// cache:2 (warm cache, new mapping)  both page caches hold the file, the
//                 mapping is new: every page is a minor fault (the kernel
//                 maps the cached page; for uhmm it is in the memfd, so no
//                 userfaultfd message either).
// cache:3 (uhmm cache empty, kernel page cache warm)  the kernel's side as
//                 for cache:2; uhmm: a fresh FileCache over the file, which
//                 the kernel's page cache holds: every page goes through
//                 uhmm's fault path (pread, UFFDIO_COPY) with no disk I/O,
//                 the noisiest part of cache:0 on a shared machine.
// Only the pass is timed; opening, mapping, unmapping and closing are not.
// read:1 sums every 8-byte word; read:0 loads one word per page (the fault
// path alone).  in_thread: the AddressSpace's FaultMode (0: service
// threads, the default; 1: kInThread).
//
// Counters: kernel_GBps, uhmm_GBps and
//   uhmm_x_kernel = uhmm GB/s / kernel GB/s  (a throughput ratio: 1 is
//                   parity, 0.5 means uhmm takes twice the kernel's time)
//   resident_after_drop: fraction of the file still in the kernel's page
//                   cache after a drop (cold runs; should be ~0)
//
// Environment: UHMM_BENCH_FILE_BYTES (default 1GiB, rounded up to 2 MiB),
//              UHMM_BENCH_DIR (where the file goes; default /var/tmp: it
//              must be a disk file system, the drop does nothing on tmpfs),
//              UHMM_BENCH_ITERS (default 3),
//              UHMM_BENCH_FAULT_THREADS, UHMM_BENCH_FAULT_AROUND
//              (FileCacheOptions::fault_around_pages; unset: its default).
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "bench_util.hpp"
#include "uhmm/uhmm.hpp"

namespace uhmm::bench {
namespace {

std::size_t file_bytes() {
  const std::size_t b = env_size("UHMM_BENCH_FILE_BYTES", std::size_t{1} << 30);
  return (b + kHugePageSize - 1) / kHugePageSize * kHugePageSize;
}

[[noreturn]] void die(const char* what) {
  std::perror(what);
  std::exit(3);
}

// One file for the whole program, written once with round_trip_word(i) in
// word i and removed at exit.
struct BenchFile {
  BenchFile() {
    const char* dir = std::getenv("UHMM_BENCH_DIR");
    path = std::string(dir != nullptr && *dir != '\0' ? dir : "/var/tmp") + "/uhmm-bench-file-XXXXXX";
    const int fd = ::mkstemp(path.data());
    if (fd < 0) die("mkstemp");
    std::vector<std::uint64_t> chunk(kHugePageSize / 8);
    for (std::size_t off = 0; off < bytes; off += kHugePageSize) {
      for (std::size_t i = 0; i < chunk.size(); ++i) chunk[i] = round_trip_word(off / 8 + i);
      if (::pwrite(fd, chunk.data(), kHugePageSize, static_cast<off_t>(off)) != static_cast<ssize_t>(kHugePageSize))
        die("pwrite of the benchmark file");
    }
    if (::fsync(fd) != 0) die("fsync");
    ::close(fd);
  }
  ~BenchFile() { ::unlink(path.c_str()); }
  BenchFile(const BenchFile&) = delete;
  BenchFile& operator=(const BenchFile&) = delete;

  /// Drops the file from the kernel's page cache; returns the fraction of
  /// its pages still resident afterwards.
  double drop() const {
    const int fd = ::open(path.c_str(), O_RDONLY);
    if (fd < 0) die("open");
    if (::fsync(fd) != 0 || ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) != 0) die("fsync/fadvise");
    void* p = ::mmap(nullptr, bytes, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) die("mmap");
    std::vector<unsigned char> vec(bytes / kPageSize);
    if (::mincore(p, bytes, vec.data()) != 0) die("mincore");
    std::size_t resident = 0;
    for (unsigned char v : vec) resident += v & 1;
    ::munmap(p, bytes);
    ::close(fd);
    return static_cast<double>(resident) / static_cast<double>(vec.size());
  }

  std::size_t bytes = file_bytes();
  std::string path;
};

const BenchFile& bench_file() {
  static const BenchFile f;
  return f;
}

std::uint64_t expected_sum(std::size_t bytes, bool every_word) {
  // checksum_words and touch_pages over round_trip_word(i), without the buffer.
  std::uint64_t a = 0, b = 0;
  const std::size_t nwords = bytes / 8;
  if (!every_word) {
    for (std::size_t i = 0; i < nwords; i += kPageSize / 8) a += round_trip_word(i);
    return a;
  }
  for (std::size_t i = 0; i < nwords; i += 2) {
    a += round_trip_word(i);
    b ^= round_trip_word(i + 1);
  }
  return a + b;
}

// The kernel's side: the file mapped MAP_SHARED, read-only.
struct KernelMapping {
  explicit KernelMapping(const BenchFile& f) : bytes(f.bytes) {
    fd = ::open(f.path.c_str(), O_RDONLY);
    if (fd < 0) die("open");
    void* p = ::mmap(nullptr, bytes, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) die("mmap");
    words = static_cast<const std::uint64_t*>(p);
  }
  ~KernelMapping() {
    ::munmap(const_cast<std::uint64_t*>(words), bytes);
    ::close(fd);
  }
  KernelMapping(const KernelMapping&) = delete;
  KernelMapping& operator=(const KernelMapping&) = delete;
  std::size_t bytes;
  int fd = -1;
  const std::uint64_t* words = nullptr;
};

// uhmm's side: a FileCache of the file and one read-only mapping of it.
struct UhmmMapping {
  UhmmMapping(AddressSpace& as, const BenchFile& f) : bytes(f.bytes) {
    FileCacheOptions o;
    o.flush_interval = std::chrono::milliseconds(0);
    o.fault_around_pages = env_count("UHMM_BENCH_FAULT_AROUND", o.fault_around_pages);
    cache = check(FileCache::open(as, f.path, O_RDONLY, 0600, o), "FileCache::open");
    remap();
  }
  ~UhmmMapping() { check(cache->close(), "FileCache::close"); }
  UhmmMapping(const UhmmMapping&) = delete;
  UhmmMapping& operator=(const UhmmMapping&) = delete;
  void remap() {
    if (words != nullptr) check(cache->unmap(VirtAddr::of(words)), "FileCache::unmap");
    words = check(cache->map(0, bytes, PROT_READ), "FileCache::map").as<std::uint64_t>();
  }
  std::size_t bytes;
  std::unique_ptr<FileCache> cache;
  const std::uint64_t* words = nullptr;
};

enum Cache : int { kCold = 0, kWarm = 1, kWarmNewMapping = 2, kUhmmCold = 3 };

void BM_FileRead(benchmark::State& state) {
  const bool in_thread = state.range(0) != 0;
  const auto cache_state = static_cast<Cache>(state.range(1));
  const bool every_word = state.range(2) != 0;
  const BenchFile& file = bench_file();
  const std::size_t nwords = file.bytes / 8;
  const std::uint64_t expect = expected_sum(file.bytes, every_word);
  auto pass = [&](const std::uint64_t* w) { return every_word ? checksum_words(w, nwords) : touch_pages(w, nwords); };

  AddressSpaceOptions aopt;
  aopt.fault_mode = in_thread ? FaultMode::kInThread : FaultMode::kServiceThreads;
  aopt.fault_threads = static_cast<unsigned>(env_count("UHMM_BENCH_FAULT_THREADS", 0));
  auto as = check(AddressSpace::create(aopt), "AddressSpace::create");

  // Warm states keep one of each across iterations, read once untimed.
  std::unique_ptr<KernelMapping> kernel_warm;
  std::unique_ptr<UhmmMapping> uhmm_warm;
  if (cache_state == kWarm || cache_state == kWarmNewMapping) {
    kernel_warm = std::make_unique<KernelMapping>(file);
    uhmm_warm = std::make_unique<UhmmMapping>(*as, file);
    if (pass(kernel_warm->words) != expect || pass(uhmm_warm->words) != expect) {
      state.SkipWithError("warm-up pass read wrong data");
      return;
    }
  }

  if (cache_state == kUhmmCold && pass(KernelMapping(file).words) != expect) {
    state.SkipWithError("warm-up pass read wrong data");
    return;
  }

  double t_kernel = 0, t_uhmm = 0, resident = 0;
  std::uint64_t n = 0;
  bool kernel_first = true;
  for (auto _ : state) {
    double tk = 0, tu = 0;
    std::uint64_t sk = 0, su = 0;
    auto run_kernel = [&] {
      std::unique_ptr<KernelMapping> fresh;
      if (cache_state == kCold) resident += file.drop();
      if (cache_state != kWarm) fresh = std::make_unique<KernelMapping>(file);
      const std::uint64_t* w = fresh ? fresh->words : kernel_warm->words;
      const auto t0 = Clock::now();
      sk = pass(w);
      tk = seconds_since(t0);
    };
    auto run_uhmm = [&] {
      std::unique_ptr<UhmmMapping> fresh;
      if (cache_state == kCold || cache_state == kUhmmCold) {
        if (cache_state == kCold) resident += file.drop();
        fresh = std::make_unique<UhmmMapping>(*as, file);
      } else if (cache_state == kWarmNewMapping) {
        uhmm_warm->remap();
      }
      const std::uint64_t* w = fresh ? fresh->words : uhmm_warm->words;
      const auto t0 = Clock::now();
      su = pass(w);
      tu = seconds_since(t0);
    };
    if (kernel_first) {
      run_kernel();
      run_uhmm();
    } else {
      run_uhmm();
      run_kernel();
    }
    kernel_first = !kernel_first;
    if (sk != expect || su != expect) {
      state.SkipWithError(sk != expect ? "the kernel's mapping read wrong data" : "uhmm's mapping read wrong data");
      return;
    }
    t_kernel += tk;
    t_uhmm += tu;
    state.SetIterationTime(tu);
    ++n;
  }
  if (n == 0) return;
  const double gb = static_cast<double>(file.bytes) * static_cast<double>(n) / 1e9;
  state.counters["MiB"] = static_cast<double>(file.bytes >> 20);
  state.counters["kernel_GBps"] = gb / t_kernel;
  state.counters["uhmm_GBps"] = gb / t_uhmm;
  state.counters["uhmm_x_kernel"] = t_kernel / t_uhmm;
  if (cache_state == kCold) state.counters["resident_after_drop"] = resident / static_cast<double>(2 * n);
  state.SetBytesProcessed(static_cast<std::int64_t>(file.bytes * n));
}

BENCHMARK(BM_FileRead)
    ->ArgNames({"in_thread", "cache", "read"})
    ->ArgsProduct({{0, 1}, {kCold, kWarm, kWarmNewMapping, kUhmmCold}, {1, 0}})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(static_cast<benchmark::IterationCount>(env_count("UHMM_BENCH_ITERS", 3)));

}  // namespace
}  // namespace uhmm::bench

BENCHMARK_MAIN();
