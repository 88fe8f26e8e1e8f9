// bench_fault_latency: latency of a CPU read that faults ONE 4 KiB device
// page back to system memory, against a raw userfaultfd round trip resolved
// by the faulting thread itself (the floor on this platform).
//
// Each iteration takes one sample of each, interleaved:
//   raw      an anonymous page registered (MISSING) with a userfaultfd opened
//            with UFFD_FEATURE_SIGBUS is dropped (MADV_DONTNEED, untimed),
//            then read (timed): the read raises SIGBUS and the handler
//            UFFDIO_COPYs a 4 KiB page in.
//   uhmm     one page of a managed range migrated to the simulated device
//            (fault_around_pages = 1; untimed), then one timed read.
//   raw_warm the raw round trip of a page dropped an iteration earlier,
//            right after uhmm's fault: what this benchmark used as its
//            baseline before 2026-11-22 (bench/README.md says why it moved).
//   raw_handler  the same as raw, but with a userfaultfd without
//            UFFD_FEATURE_SIGBUS, resolved by a handler thread on the
//            faulting thread's CPU: the floor of any design that serves
//            faults on another thread, as kServiceThreads must to serve
//            syscalls; measured with pinned:1 only (below).
// Both raw and uhmm thus fault right after their page left the CPU's page
// table, which on this machine costs the next fault about 1 us by itself.
// Run twice: with the default FaultMode::kServiceThreads (the fault goes to
// a service thread; syscalls on device buffers work) and with
// FaultMode::kInThread (the faulting thread serves it in uhmm's SIGBUS
// handler, like the raw baseline; syscalls on device buffers get EFAULT),
// each with the benchmark thread left to the scheduler (pinned:0) and
// kept on its CPU (pinned:1).
// All are timed with steady_clock around a single volatile load.  The
// counters give p50 and p99 of each (microseconds) and
//   p50_x_raw = uhmm p50 / raw p50      (target <= 2)
//   p50_x_raw_warm = uhmm p50 / raw_warm p50
//   p50_x_raw_handler = uhmm p50 / raw_handler p50
// plus uhmm's own service-time histogram (fault service's view) for
// comparison.
//
// Environment: UHMM_BENCH_SAMPLES (default 20000), UHMM_BENCH_PAGES (pages
// cycled through per side, default 1024), UHMM_BENCH_FAULT_THREADS
// (AddressSpaceOptions::fault_threads; unset: the library's default).
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <signal.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "bench_util.hpp"
#include "platform/threads.hpp"
#include "uhmm/uhmm.hpp"

namespace uhmm::bench {
namespace {

// ---- raw userfaultfd regions ----------------------------------------------

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "bench_fault_latency: %s: %s\n", what, std::strerror(errno));
  std::exit(3);
}

// Installs one 4 KiB page of `src` at the page holding `addr`; false if the
// kernel refused (EEXIST, someone was first, is success).  Async-signal-safe.
bool copy_page_in(int fd, std::uintptr_t addr, const unsigned char* src) {
  struct uffdio_copy c;
  c.dst = addr & ~(std::uintptr_t{kPageSize} - 1);
  c.src = reinterpret_cast<std::uintptr_t>(src);
  c.len = kPageSize;
  c.mode = 0;
  c.copy = 0;
  return ::ioctl(fd, UFFDIO_COPY, &c) == 0 || errno == EEXIST;
}

// An anonymous region of `npages` registered (MISSING) with a userfaultfd
// of its own opened with `features`, and the page its faults are filled
// from.  Samples time one read of a page.
struct RawRegion {
  RawRegion(std::size_t npages, std::uint64_t features) : len(npages * kPageSize) {
    fd = static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
    if (fd < 0) die("userfaultfd");
    struct uffdio_api api;
    std::memset(&api, 0, sizeof api);
    api.api = UFFD_API;
    api.features = features;
    if (::ioctl(fd, UFFDIO_API, &api) != 0) die("UFFDIO_API");
    void* p = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) die("mmap");
    region = static_cast<unsigned char*>(p);
    (void)::madvise(region, len, MADV_NOHUGEPAGE);
    struct uffdio_register reg;
    std::memset(&reg, 0, sizeof reg);
    reg.range.start = reinterpret_cast<std::uintptr_t>(region);
    reg.range.len = len;
    reg.mode = UFFDIO_REGISTER_MODE_MISSING;
    if (::ioctl(fd, UFFDIO_REGISTER, &reg) != 0) die("UFFDIO_REGISTER");
    void* s = ::mmap(nullptr, kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (s == MAP_FAILED) die("mmap");
    src = static_cast<unsigned char*>(s);
    for (std::size_t i = 0; i < kPageSize / 8; ++i) reinterpret_cast<std::uint64_t*>(src)[i] = kFirstWord + i;
  }
  ~RawRegion() {
    ::munmap(region, len);
    ::munmap(src, kPageSize);
    ::close(fd);
  }
  RawRegion(const RawRegion&) = delete;
  RawRegion& operator=(const RawRegion&) = delete;

  // Drops the page (untimed), then times its first read: like uhmm's
  // sample, the fault comes right after the page left the page table.
  double sample_after_drop(std::size_t page, std::uint64_t* value) {
    drop(page);
    return timed_read(page, value);
  }
  // Times the first read of a page dropped earlier, then drops it again.
  double sample_then_drop(std::size_t page, std::uint64_t* value) {
    const double us = timed_read(page, value);
    drop(page);
    return us;
  }
  void drop(std::size_t page) { (void)::madvise(region + page * kPageSize, kPageSize, MADV_DONTNEED); }
  double timed_read(std::size_t page, std::uint64_t* value) {
    auto* p = reinterpret_cast<volatile std::uint64_t*>(region + page * kPageSize);
    const auto t0 = Clock::now();
    const std::uint64_t v = *p;
    const auto t1 = Clock::now();
    *value = v;
    return std::chrono::duration<double, std::micro>(t1 - t0).count();
  }

  static constexpr std::uint64_t kFirstWord = 0xabcdef01u;  // what a sample reads
  std::size_t len;
  int fd = -1;
  unsigned char* region = nullptr;
  unsigned char* src = nullptr;
};

// ---- raw: resolved in the faulting thread's SIGBUS handler -----------------

const RawRegion* g_raw = nullptr;
struct sigaction g_raw_previous;

void raw_sigbus(int sig, siginfo_t* si, void* uc) {
  const auto a = reinterpret_cast<std::uintptr_t>(si->si_addr);
  const RawRegion* raw = g_raw;
  const auto lo = raw == nullptr ? 0 : reinterpret_cast<std::uintptr_t>(raw->region);
  if (raw == nullptr || a < lo || a >= lo + raw->len) {
    // Not ours: uhmm's in-thread handler (installed first), or the default.
    if (g_raw_previous.sa_flags & SA_SIGINFO) {
      g_raw_previous.sa_sigaction(sig, si, uc);
    } else {
      signal(sig, SIG_DFL);
    }
    return;
  }
  const int saved = errno;
  if (!copy_page_in(raw->fd, a, raw->src)) {
    static const char msg[] = "bench_fault_latency: UFFDIO_COPY in SIGBUS handler failed\n";
    (void)!::write(2, msg, sizeof msg - 1);
    _exit(4);
  }
  errno = saved;
}

struct RawUffd : RawRegion {
  explicit RawUffd(std::size_t npages) : RawRegion(npages, UFFD_FEATURE_SIGBUS) {
    g_raw = this;
    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = raw_sigbus;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    if (::sigaction(SIGBUS, &sa, &g_raw_previous) != 0) die("sigaction");
  }
  ~RawUffd() {
    (void)::sigaction(SIGBUS, &g_raw_previous, nullptr);
    g_raw = nullptr;
  }
};

// Keeps the calling thread on `cpu` while it lives, then lets it run where
// it could before.
class ScopedPin {
 public:
  explicit ScopedPin(unsigned cpu) {
    if (::pthread_getaffinity_np(::pthread_self(), sizeof previous_, &previous_) != 0) return;
    pinned_ = platform::pin_this_thread(cpu).is_ok();
  }
  ~ScopedPin() {
    if (pinned_) (void)::pthread_setaffinity_np(::pthread_self(), sizeof previous_, &previous_);
  }
  ScopedPin(const ScopedPin&) = delete;
  ScopedPin& operator=(const ScopedPin&) = delete;
  bool pinned() const { return pinned_; }

 private:
  cpu_set_t previous_;
  bool pinned_ = false;
};

// ---- raw_handler: resolved by a handler thread on the same CPU -------------

struct RawHandlerUffd : RawRegion {
  RawHandlerUffd(std::size_t npages, unsigned cpu) : RawRegion(npages, 0) {
    stop_fd = ::eventfd(0, EFD_CLOEXEC);
    if (stop_fd < 0) die("eventfd");
    handler = std::thread([this, cpu] { serve(cpu); });
  }
  ~RawHandlerUffd() {
    const std::uint64_t one = 1;
    (void)!::write(stop_fd, &one, sizeof one);
    handler.join();
    ::close(stop_fd);
  }

  void serve(unsigned cpu) {
    const ScopedPin pin(cpu);
    for (;;) {
      struct pollfd fds[2] = {{fd, POLLIN, 0}, {stop_fd, POLLIN, 0}};
      if (::poll(fds, 2, -1) < 0) continue;
      if (fds[1].revents != 0) return;
      struct uffd_msg msg;
      if (::read(fd, &msg, sizeof msg) != static_cast<ssize_t>(sizeof msg)) continue;
      if (msg.event != UFFD_EVENT_PAGEFAULT) continue;
      if (!copy_page_in(fd, msg.arg.pagefault.address, src)) die("UFFDIO_COPY in the handler thread");
    }
  }

  int stop_fd = -1;
  std::thread handler;
};

// ---- the benchmark -------------------------------------------------------

void BM_FaultLatency(benchmark::State& state) {
  const std::size_t pages = env_count("UHMM_BENCH_PAGES", 1024);
  const std::size_t len = pages * kPageSize;

  AddressSpaceOptions aopt;
  aopt.fault_mode = state.range(0) != 0 ? FaultMode::kInThread : FaultMode::kServiceThreads;
  // 0 (the library's default): one fault-service thread per CPU.
  aopt.fault_threads = static_cast<unsigned>(env_count("UHMM_BENCH_FAULT_THREADS", 0));
  auto as = check(AddressSpace::create(aopt), "AddressSpace::create");
  sim::SimDeviceOptions dopt;
  dopt.memory_bytes = len + kHugePageSize;
  dopt.warm_memory = true;
  dopt.fault_around_pages = 1;  // exactly one page comes back per fault
  auto dev = check(sim::SimDevice::create(dopt), "SimDevice::create");
  const VirtAddr base = check(as->map(len), "map");
  auto* words = base.as<std::uint64_t>();
  auto expected = [](std::size_t page) { return 0x1234567800000000ull + page; };
  for (std::size_t p = 0; p < pages; ++p) words[p * (kPageSize / 8)] = expected(p);

  // Pages [0, pages) for raw, [pages, 2 * pages) for raw_warm.
  RawUffd raw(2 * pages);
  // pinned:1 keeps this thread on its CPU, as a latency-minded application
  // would; the raw handler thread shares that CPU (and uhmm's service
  // thread of that CPU serves uhmm's faults).  pinned:0 leaves placement to
  // the scheduler, and raw_handler is not measured.
  const bool pinned = state.range(1) != 0;
  const int cpu = pinned ? ::sched_getcpu() : -1;
  std::optional<ScopedPin> pin;
  if (pinned && cpu >= 0) pin.emplace(static_cast<unsigned>(cpu));
  if (pinned && (!pin || !pin->pinned())) {
    state.SkipWithError("cannot pin the benchmark thread");
    return;
  }
  std::unique_ptr<RawHandlerUffd> raw_handler;
  if (pinned) raw_handler = std::make_unique<RawHandlerUffd>(pages, static_cast<unsigned>(cpu));

  // Warm-up pass over every page on both sides, not timed.
  std::uint64_t v = 0;
  for (std::size_t p = 0; p < pages; ++p) {
    (void)raw.sample_after_drop(p, &v);
    (void)raw.sample_then_drop(pages + p, &v);
    if (raw_handler) (void)raw_handler->sample_after_drop(p, &v);
    check(dev->migrate_to_device(*as, base + p * kPageSize, kPageSize), "warm-up migrate_to_device");
    v = *reinterpret_cast<volatile std::uint64_t*>(words + p * (kPageSize / 8));
  }
  as->stats().reset();

  std::vector<double> raw_us, raw_warm_us, raw_handler_us, uhmm_us;
  raw_us.reserve(static_cast<std::size_t>(state.max_iterations));
  raw_handler_us.reserve(static_cast<std::size_t>(state.max_iterations));
  raw_warm_us.reserve(static_cast<std::size_t>(state.max_iterations));
  uhmm_us.reserve(static_cast<std::size_t>(state.max_iterations));
  std::size_t i = 0;
  for (auto _ : state) {
    const std::size_t p = i++ % pages;

    raw_us.push_back(raw.sample_after_drop(p, &v));
    if (v != RawRegion::kFirstWord) {
      state.SkipWithError("raw userfaultfd page has the wrong data");
      break;
    }

    const VirtAddr page = base + p * kPageSize;
    auto rep = dev->migrate_to_device(*as, page, kPageSize);
    if (!rep.is_ok() || rep->pages_migrated != 1) {
      // A page still in transit from the previous fault (finalize runs
      // after the access is woken): not a sample.
      state.SkipWithError(rep.is_ok() ? "page did not move to the device" : rep.status().to_string().c_str());
      break;
    }
    auto* w = reinterpret_cast<volatile std::uint64_t*>(page.as<std::uint64_t>());
    const auto t0 = Clock::now();
    const std::uint64_t got = *w;
    const auto t1 = Clock::now();
    const double us = std::chrono::duration<double, std::micro>(t1 - t0).count();
    uhmm_us.push_back(us);
    state.SetIterationTime(us * 1e-6);
    if (got != expected(p)) {
      state.SkipWithError("device page came back with the wrong data");
      break;
    }

    raw_warm_us.push_back(raw.sample_then_drop(pages + p, &v));
    if (v != RawRegion::kFirstWord) {
      state.SkipWithError("raw userfaultfd page has the wrong data");
      break;
    }

    if (raw_handler) {
      raw_handler_us.push_back(raw_handler->sample_after_drop(p, &v));
      if (v != RawRegion::kFirstWord) {
        state.SkipWithError("raw handler-thread page has the wrong data");
        break;
      }
    }
  }
  if (uhmm_us.empty()) return;

  const double raw_p50 = percentile(raw_us, 0.50), raw_p99 = percentile(raw_us, 0.99);
  const double p50 = percentile(uhmm_us, 0.50), p99 = percentile(uhmm_us, 0.99);
  const auto& h = as->stats().fault_latency();
  state.counters["p50_us"] = p50;
  state.counters["p99_us"] = p99;
  state.counters["raw_p50_us"] = raw_p50;
  state.counters["raw_p99_us"] = raw_p99;
  state.counters["p50_x_raw"] = p50 / raw_p50;
  state.counters["p99_x_raw"] = p99 / raw_p99;
  const double raw_warm_p50 = percentile(raw_warm_us, 0.50);
  state.counters["raw_warm_p50_us"] = raw_warm_p50;
  state.counters["p50_x_raw_warm"] = p50 / raw_warm_p50;
  if (!raw_handler_us.empty()) {
    const double raw_handler_p50 = percentile(raw_handler_us, 0.50);
    state.counters["raw_handler_p50_us"] = raw_handler_p50;
    state.counters["p50_x_raw_handler"] = p50 / raw_handler_p50;
  }
  state.counters["svc_p50_us"] = static_cast<double>(h.quantile(0.5).count()) / 1e3;
  state.counters["svc_p99_us"] = static_cast<double>(h.quantile(0.99).count()) / 1e3;
  state.counters["faults"] = static_cast<double>(as->stats().get(Counter::device_private_faults));
  // kServiceThreads: how often a service thread moved behind the one on
  // the faulting thread's CPU.
  state.counters["requeues"] = static_cast<double>(as->stats().get(Counter::fault_service_requeues));
}

BENCHMARK(BM_FaultLatency)
    ->ArgNames({"in_thread", "pinned"})
    ->ArgsProduct({{0, 1}, {0, 1}})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond)
    ->Iterations(static_cast<benchmark::IterationCount>(env_count("UHMM_BENCH_SAMPLES", 20000)));

}  // namespace
}  // namespace uhmm::bench

BENCHMARK_MAIN();
