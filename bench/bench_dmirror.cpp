// bench_dmirror: a 256 MiB round trip to the emulated /dev/hmm_dmirror0 and
// back through the kernel test device's ABI (open + ioctl), as a ratio to
// memcpy of the same bytes measured in the same iteration.
//
// How the interposition gets in: this program is linked with the preload
// library's own source (src/compat/preload.cpp) and its static layer
// (uhmm::compat), so the interposed open/ioctl/mmap/close are the
// executable's own definitions and every call below goes through them, as
// in a program run under LD_PRELOAD=libuhmm-dmirror.so (they reach libc's
// through dlsym(RTLD_NEXT) the same way).  Chosen over LD_PRELOAD so the
// program runs as-is like the other benchmarks, with nothing to set up, and
// cannot silently measure nothing (without the preload, the open fails).
//
// Each iteration times, interleaved:
//   memcpy   (baseline)  src -> dst, two warm buffers, 2 MiB chunks
//   ioctl(HMM_DMIRROR_MIGRATE_TO_DEV)  the whole buffer
//   memcpy   (baseline)  dst -> src
//   ioctl(HMM_DMIRROR_MIGRATE_TO_SYS)  the whole buffer
// and the counters report GB/s of each and
//   to_device_x_memcpy = GB/s to device / GB/s memcpy
//   to_system_x_memcpy = GB/s to system / GB/s memcpy
// MIGRATE_TO_DEV also copies the migrated pages into the command's `ptr`
// buffer (the ABI's read-back), so its figure includes that copy: it is
// what a program pays for the command, not bench_migrate's bare migration.
//
// Environment: UHMM_BENCH_BYTES (default 256MiB, rounded up to 2 MiB),
//              UHMM_BENCH_ITERS (default 10).
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "bench_util.hpp"
#include "compat/dmirror_abi.hpp"
#include "uhmm/uhmm.hpp"

namespace uhmm::bench {
namespace {

using compat::DmirrorCmd;
using compat::DmirrorOp;
using compat::dmirror_request;

constexpr std::size_t kChunk = kHugePageSize;

// A populated, huge-page-advised private anonymous buffer: the memcpy
// baseline's two buffers, the migrated buffer (which the device adopts on
// first use, as it would a program's) and the command's read-back buffer.
struct Buffer {
  explicit Buffer(std::size_t bytes, int fill) : len(bytes) {
    void* p = ::mmap(nullptr, len + kHugePageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      std::perror("mmap");
      std::exit(3);
    }
    raw = p;
    const auto a = (reinterpret_cast<std::uintptr_t>(p) + kHugePageSize - 1) & ~(kHugePageSize - 1);
    data = reinterpret_cast<unsigned char*>(a);
    (void)::madvise(data, len, MADV_HUGEPAGE);
    std::memset(data, fill, len);
  }
  ~Buffer() { ::munmap(raw, len + kHugePageSize); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  std::size_t len;
  void* raw;
  unsigned char* data;
};

// One command; false (errno kept) if the ioctl failed or did not process
// every page.
bool migrate(int fd, DmirrorOp op, const Buffer& buf, const Buffer& out) {
  DmirrorCmd c{};
  c.addr = reinterpret_cast<std::uint64_t>(buf.data);
  c.ptr = reinterpret_cast<std::uint64_t>(out.data);
  c.npages = buf.len / kPageSize;
  if (::ioctl(fd, dmirror_request(op), &c) != 0) return false;
  if (c.cpages != c.npages) {
    errno = 0;
    return false;
  }
  return true;
}

void BM_DmirrorRoundTrip(benchmark::State& state) {
  const std::size_t bytes = bench_bytes();

  const int fd = ::open("/dev/hmm_dmirror0", O_RDWR);
  if (fd < 0) {
    state.SkipWithError((std::string("open /dev/hmm_dmirror0: ") + std::strerror(errno)).c_str());
    return;
  }
  Buffer buf(bytes, 0), out(bytes, 0), src(bytes, 0x5a), dst(bytes, 0);
  auto* words = reinterpret_cast<std::uint64_t*>(buf.data);
  fill_round_trip(words, bytes);

  // Warm-up round trip (adoption, device arena, mirror), not timed.
  if (!migrate(fd, DmirrorOp::kMigrateToDev, buf, out) || !migrate(fd, DmirrorOp::kMigrateToSys, buf, out)) {
    state.SkipWithError((std::string("warm-up round trip: ") + std::strerror(errno)).c_str());
    ::close(fd);
    return;
  }
  chunked_memcpy(dst.data, src.data, bytes, kChunk);

  double t_memcpy = 0, t_to_dev = 0, t_to_sys = 0;
  std::uint64_t n = 0;
  for (auto _ : state) {
    auto t0 = Clock::now();
    chunked_memcpy(dst.data, src.data, bytes, kChunk);
    t_memcpy += seconds_since(t0);

    t0 = Clock::now();
    const bool to_dev = migrate(fd, DmirrorOp::kMigrateToDev, buf, out);
    const double d = seconds_since(t0);
    t_to_dev += d;
    if (!to_dev) {
      state.SkipWithError(errno != 0 ? std::strerror(errno) : "not every page moved to the device");
      break;
    }

    t0 = Clock::now();
    chunked_memcpy(src.data, dst.data, bytes, kChunk);
    t_memcpy += seconds_since(t0);

    t0 = Clock::now();
    const bool to_sys = migrate(fd, DmirrorOp::kMigrateToSys, buf, out);
    const double s = seconds_since(t0);
    t_to_sys += s;
    if (!to_sys) {
      state.SkipWithError(errno != 0 ? std::strerror(errno) : "not every page moved back to system memory");
      break;
    }
    state.SetIterationTime(d + s);
    ++n;
  }
  ::close(fd);
  if (n == 0) return;

  // The data survived every round trip, and the read-back buffer holds it
  // too (not timed).
  if (!round_trip_intact(words, bytes)) {
    state.SkipWithError("data corrupted by migration");
    return;
  }
  if (std::memcmp(out.data, buf.data, bytes) != 0) {
    state.SkipWithError("MIGRATE_TO_DEV read back the wrong data");
    return;
  }

  report_round_trip(state, bytes, n, t_memcpy, t_to_dev, t_to_sys);
}

BENCHMARK(BM_DmirrorRoundTrip)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(static_cast<benchmark::IterationCount>(env_count("UHMM_BENCH_ITERS", 10)));

}  // namespace
}  // namespace uhmm::bench

BENCHMARK_MAIN();
