// tools/uhmm: `uhmm demo`.
//
//   1. map a managed buffer and fill it on the CPU with a deterministic
//      pattern (word i = i * kStep);
//   2. migrate it to the simulated device in 2 MiB batches (progress bar);
//   3. run a device kernel over it: x -> (x ^ kMask) + 1 for every word;
//   4. read it back on the CPU -- every first access to a device page faults
//      and the page comes back -- checking every word;
//   5. print the figures (a table, or JSON with --json).
#include "demo.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>

#include "size.hpp"
#include "uhmm/uhmm.hpp"

namespace uhmm::tool {
namespace {

using Clock = std::chrono::steady_clock;

constexpr std::uint64_t kStep = 0x9E3779B97F4A7C15ull;
constexpr std::uint64_t kMask = 0xA5A5A5A55A5A5A5Aull;

constexpr std::uint64_t initial_word(std::uint64_t i) { return i * kStep; }
constexpr std::uint64_t kernel_op(std::uint64_t x) { return (x ^ kMask) + 1; }

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }
double gbps(std::uint64_t bytes, double seconds) {
  return seconds > 0 ? static_cast<double>(bytes) / seconds / 1e9 : 0.0;
}

// One clear line on stderr, exit code 2.
int fail(const std::string& what, const Status& s) {
  std::fprintf(stderr, "uhmm: error: %s: %s\n", what.c_str(), s.to_string().c_str());
  return kExitError;
}

// A text progress bar on stderr: redrawn in place (\r) every 2 % when
// stderr is a terminal; otherwise one line at every quarter.
class Progress {
 public:
  Progress(std::string label, std::uint64_t total, bool enabled)
      : label_(std::move(label)), total_(total), enabled_(enabled && total > 0), tty_(::isatty(2) == 1),
        started_(Clock::now()), next_(tty_ ? 0 : 25) {}

  void update(std::uint64_t done) {
    if (!enabled_) return;
    const unsigned pct = static_cast<unsigned>(done * 100 / total_);
    const unsigned step = tty_ ? 2 : 25;
    if (pct < next_ && done != total_) return;
    next_ = (pct / step + 1) * step;
    const double s = seconds_since(started_);
    const double rate = gbps(done, s);
    if (tty_) {
      constexpr unsigned kWidth = 40;
      const unsigned fill = pct * kWidth / 100;
      std::string bar(fill, '#');
      bar.append(kWidth - fill, '.');
      std::fprintf(stderr, "\r%s [%s] %3u%%  %s / %s  %.2f GB/s  ", label_.c_str(), bar.c_str(), pct,
                   format_size(done).c_str(), format_size(total_).c_str(), rate);
      if (done == total_) std::fputc('\n', stderr);
    } else {
      std::fprintf(stderr, "%s: %3u%%  %s / %s  %.2f GB/s\n", label_.c_str(), pct, format_size(done).c_str(),
                   format_size(total_).c_str(), rate);
    }
    std::fflush(stderr);
  }

 private:
  std::string label_;
  std::uint64_t total_;
  bool enabled_;
  bool tty_;
  Clock::time_point started_;
  unsigned next_;
};

struct Figures {
  std::uint64_t bytes = 0;
  std::uint64_t device_memory = 0;
  double fill_s = 0, to_device_s = 0, kernel_s = 0, back_s = 0;
  std::uint64_t latency_p50_ns = 0, latency_p99_ns = 0, latency_count = 0;
  std::uint64_t pages_to_device = 0, pages_to_ram = 0, device_private_faults = 0;
  std::uint64_t mismatches = 0;
  std::uint64_t first_offset = 0, first_expected = 0, first_actual = 0;
  bool settled = true;
  Stats::Snapshot counters;         // the address space's
  Stats::Snapshot device_counters;  // the simulated device's (DMA, page frees)
};

void print_table(const Figures& f) {
  auto row = [](const char* name, const std::string& value) { fmt::print("  {:<28} {}\n", name, value); };
  fmt::print("uhmm demo: {} through the simulated device ({} device memory)\n", format_size(f.bytes),
             format_size(f.device_memory));
  row("bytes", fmt::format("{} ({})", f.bytes, format_size(f.bytes)));
  row("fill on CPU (first touch)", fmt::format("{:.2f} GB/s", gbps(f.bytes, f.fill_s)));
  row("to device (2 MiB batches)", fmt::format("{:.2f} GB/s", gbps(f.bytes, f.to_device_s)));
  row("device kernel", fmt::format("{:.2f} GB/s", gbps(f.bytes, f.kernel_s)));
  row("back to CPU by fault", fmt::format("{:.2f} GB/s", gbps(f.bytes, f.back_s)));
  row("fault latency p50 / p99",
      fmt::format("{:.1f} us / {:.1f} us ({} faults)", static_cast<double>(f.latency_p50_ns) / 1e3,
                  static_cast<double>(f.latency_p99_ns) / 1e3, f.latency_count));
  row("pages to device", fmt::format("{}", f.pages_to_device));
  row("pages to ram", fmt::format("{}", f.pages_to_ram));
  row("device_private_faults", fmt::format("{}", f.device_private_faults));
  if (f.mismatches == 0) {
    row("verified", "OK");
  } else {
    row("verified",
        fmt::format("FAILED: {} mismatched words; first at byte offset {:#x}: expected {:#018x}, got {:#018x}",
                    f.mismatches, f.first_offset, f.first_expected, f.first_actual));
  }
}

void print_json(const Figures& f) {
  nlohmann::ordered_json j;
  j["bytes"] = f.bytes;
  j["device_memory_bytes"] = f.device_memory;
  j["fill_gbps"] = gbps(f.bytes, f.fill_s);
  j["to_device_gbps"] = gbps(f.bytes, f.to_device_s);
  j["kernel_gbps"] = gbps(f.bytes, f.kernel_s);
  j["back_by_fault_gbps"] = gbps(f.bytes, f.back_s);
  j["seconds"] = {{"fill", f.fill_s}, {"to_device", f.to_device_s}, {"kernel", f.kernel_s}, {"back_by_fault", f.back_s}};
  j["fault_latency_p50_ns"] = f.latency_p50_ns;
  j["fault_latency_p99_ns"] = f.latency_p99_ns;
  j["fault_latency_count"] = f.latency_count;
  j["pages_to_device"] = f.pages_to_device;
  j["pages_to_ram"] = f.pages_to_ram;
  j["device_private_faults"] = f.device_private_faults;
  j["verified"] = f.mismatches == 0;
  j["mismatches"] = f.mismatches;
  if (f.mismatches == 0) {
    j["first_mismatch"] = nullptr;
  } else {
    j["first_mismatch"] = {{"offset", f.first_offset}, {"expected", f.first_expected}, {"actual", f.first_actual}};
  }
  j["settled"] = f.settled;
  nlohmann::ordered_json counters = nlohmann::ordered_json::object();
  for (unsigned c = 0; c < static_cast<unsigned>(Counter::kCount); ++c)
    counters[std::string(counter_name(static_cast<Counter>(c)))] = f.counters.values[c];
  j["counters"] = std::move(counters);
  nlohmann::ordered_json dev = nlohmann::ordered_json::object();
  for (unsigned c = 0; c < static_cast<unsigned>(Counter::kCount); ++c)
    if (f.device_counters.values[c] != 0)
      dev[std::string(counter_name(static_cast<Counter>(c)))] = f.device_counters.values[c];
  j["device_counters"] = std::move(dev);
  fmt::print("{}\n", j.dump(2));
}

}  // namespace

int run_demo(const DemoOptions& o) {
  if (o.size == 0 || o.size % kPageSize != 0)
    return fail("--size", Status::error(EINVAL, fmt::format("must be a positive multiple of {} bytes (got {})",
                                                            kPageSize, o.size)));
  Figures f;
  f.bytes = o.size;
  f.device_memory = o.device_memory != 0 ? o.device_memory : o.size + kDeviceSlack;
  const std::uint64_t npages = o.size / kPageSize;
  const std::uint64_t nwords = o.size / sizeof(std::uint64_t);

  AddressSpaceOptions aopt;
  aopt.fault_threads = o.fault_threads;
  auto as_r = AddressSpace::create(aopt);
  if (!as_r) return fail("creating the address space", as_r.status());
  std::unique_ptr<AddressSpace> as = std::move(*as_r);

  sim::SimDeviceOptions dopt;
  dopt.memory_bytes = f.device_memory;
  dopt.dma_threads = o.dma_threads;
  dopt.warm_memory = true;
  auto dev_r = sim::SimDevice::create(dopt);
  if (!dev_r) return fail("creating the simulated device", dev_r.status());
  std::unique_ptr<sim::SimDevice> dev = std::move(*dev_r);
  const std::uint64_t device_pages = dev->free_pages();
  // (Declared after `as`, the device is destroyed first: its destructor
  // migrates back what it still holds.)

  auto base_r = as->map(o.size);
  if (!base_r) return fail(fmt::format("mapping {} of managed memory", format_size(o.size)), base_r.status());
  const VirtAddr base = *base_r;
  auto* words = base.as<std::uint64_t>();

  // 1. Fill on the CPU (first touch: zero-fill faults, then the pattern).
  auto t0 = Clock::now();
  for (std::uint64_t i = 0; i < nwords; ++i) words[i] = initial_word(i);
  f.fill_s = seconds_since(t0);

  // 2. To the device, one 2 MiB batch per call so progress can be shown.
  Progress bar("to device", o.size, o.progress);
  std::uint64_t moved = 0;
  t0 = Clock::now();
  for (std::uint64_t off = 0; off < o.size; off += kHugePageSize) {
    const std::uint64_t len = std::min<std::uint64_t>(kHugePageSize, o.size - off);
    // A page can be skipped because the fault service still holds it (the
    // last zero-fill fault of the fill may finish just after the store
    // returns): try the batch again for those, unless the device is full.
    std::uint64_t batch_moved = 0;
    for (int attempt = 0; attempt < 1000 && batch_moved < len / kPageSize; ++attempt) {
      if (attempt > 0) {
        if (dev->free_pages() == 0) break;
        std::this_thread::sleep_for(std::chrono::microseconds(100));
      }
      auto rep = dev->migrate_to_device(*as, base + off, len);
      if (!rep)
        return fail(fmt::format("migrating [{:#x}, +{}) to the device", (base + off).value, len), rep.status());
      batch_moved += rep->pages_migrated;
    }
    moved += batch_moved;
    bar.update(off + len);
  }
  f.to_device_s = seconds_since(t0);
  if (moved != npages)
    return fail("migrating to the device",
                Status::error(ENOMEM, fmt::format("only {} of {} pages moved ({} of device memory; see --device-memory)",
                                                  moved, npages, format_size(f.device_memory))));

  // 3. A device kernel over every word.
  t0 = Clock::now();
  Status ks = dev->run_kernel(*as, base, o.size, [](std::span<std::byte> page, VirtAddr) {
    auto* w = reinterpret_cast<std::uint64_t*>(page.data());
    const std::size_t n = page.size() / sizeof(std::uint64_t);
    for (std::size_t i = 0; i < n; ++i) w[i] = kernel_op(w[i]);
  });
  f.kernel_s = seconds_since(t0);
  if (!ks) return fail("running the device kernel", ks);

  if (o.corrupt_offset) {
    if (*o.corrupt_offset >= o.size)
      return fail("--corrupt-offset", Status::error(EINVAL, "offset beyond --size"));
    const VirtAddr at = base + (*o.corrupt_offset & ~std::uint64_t{7});
    std::uint64_t v = 0;
    if (Status s = dev->device_read(*as, at, std::as_writable_bytes(std::span(&v, 1))); !s)
      return fail("device_read", s);
    v = ~v;
    if (Status s = dev->device_write(*as, at, std::as_bytes(std::span(&v, 1))); !s)
      return fail("device_write", s);
  }

  // 4. Back on the CPU: every first access to a device page faults.
  as->stats().fault_latency().reset();
  t0 = Clock::now();
  std::uint64_t expect = initial_word(0);
  for (std::uint64_t i = 0; i < nwords; ++i, expect += kStep) {
    const std::uint64_t got = words[i];
    if (got != kernel_op(expect)) [[unlikely]] {
      if (f.mismatches++ == 0) {
        f.first_offset = i * sizeof(std::uint64_t);
        f.first_expected = kernel_op(expect);
        f.first_actual = got;
      }
    }
  }
  f.back_s = seconds_since(t0);

  // The fault service finishes a migration (frees device pages, counts them)
  // just after it has woken the reader: wait for it before reading counters.
  const auto deadline = Clock::now() + std::chrono::seconds(5);
  while (dev->free_pages() != device_pages && Clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  f.settled = dev->free_pages() == device_pages;
  if (!f.settled)
    std::fprintf(stderr, "uhmm: warning: %llu device pages still in use after the read-back\n",
                 static_cast<unsigned long long>(device_pages - dev->free_pages()));

  const Stats& st = as->stats();
  f.counters = st.snapshot();
  f.device_counters = dev->stats().snapshot();
  f.latency_p50_ns = static_cast<std::uint64_t>(st.fault_latency().quantile(0.5).count());
  f.latency_p99_ns = static_cast<std::uint64_t>(st.fault_latency().quantile(0.99).count());
  f.latency_count = st.fault_latency().count();
  f.pages_to_device = st.get(Counter::pgmigrate_to_device);
  f.pages_to_ram = st.get(Counter::pgmigrate_to_ram);
  f.device_private_faults = st.get(Counter::device_private_faults);

  if (o.json) {
    print_json(f);
  } else {
    print_table(f);
  }
  std::fflush(stdout);
  return f.mismatches == 0 ? kExitOk : kExitMismatch;
}

}  // namespace uhmm::tool
