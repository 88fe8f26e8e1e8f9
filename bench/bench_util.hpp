// bench/bench_util.hpp: small helpers shared by the benchmark programs
// (environment overrides, size parsing, percentiles, failing loudly).
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <string_view>
#include <vector>

#include "platform/copy.hpp"
#include "uhmm/status.hpp"
#include "uhmm/types.hpp"

namespace uhmm::bench {

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

/// CPU time of the whole process (every thread, user and system), in
/// seconds: over a timed section, its growth divided by the wall time says
/// how many CPUs the library kept busy.
inline double process_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

/// "256MiB", "2M", "1GiB", "4096", "64KiB" -> bytes (binary units; KB/MB/GB
/// are decimal).  0 on a malformed string.
inline std::size_t parse_size(std::string_view s) {
  std::size_t i = 0;
  std::uint64_t v = 0;
  while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) {
    v = v * 10 + static_cast<std::uint64_t>(s[i] - '0');
    ++i;
  }
  if (i == 0) return 0;
  std::string unit;
  for (; i < s.size(); ++i) unit += static_cast<char>(std::tolower(static_cast<unsigned char>(s[i])));
  if (unit.empty() || unit == "b") return v;
  if (unit == "k" || unit == "kib") return v << 10;
  if (unit == "m" || unit == "mib") return v << 20;
  if (unit == "g" || unit == "gib") return v << 30;
  if (unit == "kb") return v * 1000;
  if (unit == "mb") return v * 1000 * 1000;
  if (unit == "gb") return v * 1000 * 1000 * 1000;
  return 0;
}

/// A size from the environment variable `name`, or `fallback`.
inline std::size_t env_size(const char* name, std::size_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  const std::size_t s = parse_size(v);
  if (s == 0) {
    std::fprintf(stderr, "%s=%s: not a size (e.g. 256MiB)\n", name, v);
    std::exit(2);
  }
  return s;
}

/// The buffer size of the benchmarks that move a buffer: UHMM_BENCH_BYTES
/// (default 256 MiB), rounded up to whole 2 MiB blocks.
inline std::size_t bench_bytes() {
  const std::size_t b = env_size("UHMM_BENCH_BYTES", std::size_t{256} << 20);
  return (b + kHugePageSize - 1) / kHugePageSize * kHugePageSize;
}

/// A count from the environment variable `name`, or `fallback`.
inline std::uint64_t env_count(const char* name, std::uint64_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const unsigned long long n = std::strtoull(v, &end, 10);
  if (end == v || *end != '\0') {
    std::fprintf(stderr, "%s=%s: not a count\n", name, v);
    std::exit(2);
  }
  return n;
}

/// Aborts the benchmark run with a clear message when a library call fails.
inline void check(const Status& s, const char* what) {
  if (!s.is_ok()) {
    std::fprintf(stderr, "bench: %s failed: %s\n", what, s.to_string().c_str());
    std::exit(3);
  }
}
template <class T>
T check(Result<T> r, const char* what) {
  check(r.status(), what);
  return std::move(r).value();
}

/// Quantile q in [0,1] of `v` (sorted in place), nearest rank.
inline double percentile(std::vector<double>& v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  std::size_t k = static_cast<std::size_t>(q * static_cast<double>(v.size()));
  if (k >= v.size()) k = v.size() - 1;
  return v[k];
}

/// `copy` (memcpy's signature) in `chunk`-byte pieces.
template <typename Copy>
void chunked_copy(Copy copy, void* dst, const void* src, std::size_t len, std::size_t chunk) {
  auto* d = static_cast<unsigned char*>(dst);
  const auto* s = static_cast<const unsigned char*>(src);
  for (std::size_t off = 0; off < len; off += chunk) copy(d + off, s + off, std::min(chunk, len - off));
  benchmark::ClobberMemory();
}

/// memcpy in `chunk`-byte pieces (the copy bandwidth baseline).
inline void chunked_memcpy(void* dst, const void* src, std::size_t len, std::size_t chunk) {
  chunked_copy([](void* d, const void* s, std::size_t n) { std::memcpy(d, s, n); }, dst, src, len, chunk);
}

/// The same with the copy the sim device's DMA engine uses for long runs
/// (platform::copy_streaming: non-temporal stores, no read-for-ownership).
inline void chunked_stream_copy(void* dst, const void* src, std::size_t len, std::size_t chunk) {
  chunked_copy(platform::copy_streaming, dst, src, len, chunk);
}

/// Reads every word (a real read, not one load per page).
inline std::uint64_t checksum_words(const std::uint64_t* w, std::size_t nwords) {
  std::uint64_t a = 0, b = 0;
  for (std::size_t i = 0; i < nwords; i += 2) {
    a += w[i];
    b ^= w[i + 1];
  }
  return a + b;
}

/// One load per page, in order: each first touch of a missing page faults.
inline std::uint64_t touch_pages(const std::uint64_t* w, std::size_t nwords) {
  std::uint64_t a = 0;
  for (std::size_t i = 0; i < nwords; i += kPageSize / sizeof(std::uint64_t))
    a += static_cast<const volatile std::uint64_t*>(w)[i];
  return a;
}

/// The round-trip benchmarks' data: a word pattern written before the
/// first migration and checked after the last.
inline std::uint64_t round_trip_word(std::size_t i) { return i * 0x9E3779B97F4A7C15ull; }
inline void fill_round_trip(std::uint64_t* words, std::size_t bytes) {
  for (std::size_t i = 0; i < bytes / 8; ++i) words[i] = round_trip_word(i);
}
inline bool round_trip_intact(const std::uint64_t* words, std::size_t bytes) {
  for (std::size_t i = 0; i < bytes / 8; ++i)
    if (words[i] != round_trip_word(i)) return false;
  return true;
}

/// The counters of a migration round trip, `n` times over `bytes`, against a
/// memcpy baseline timed in the same run (one memcpy each way), and, if
/// `t_stream` is given, against the streaming copy timed the same way.
inline void report_round_trip(benchmark::State& state, std::size_t bytes, std::uint64_t n, double t_memcpy,
                              double t_to_dev, double t_to_sys, double t_stream = 0) {
  const double gb = static_cast<double>(bytes) * static_cast<double>(n) / 1e9;
  const double memcpy_gbps = 2 * gb / t_memcpy;
  const double to_dev_gbps = gb / t_to_dev;
  const double to_sys_gbps = gb / t_to_sys;
  state.counters["MiB"] = static_cast<double>(bytes >> 20);
  state.counters["memcpy_GBps"] = memcpy_gbps;
  state.counters["to_device_GBps"] = to_dev_gbps;
  state.counters["to_system_GBps"] = to_sys_gbps;
  state.counters["to_device_x_memcpy"] = to_dev_gbps / memcpy_gbps;
  state.counters["to_system_x_memcpy"] = to_sys_gbps / memcpy_gbps;
  if (t_stream > 0) {
    const double stream_gbps = 2 * gb / t_stream;
    state.counters["stream_GBps"] = stream_gbps;
    state.counters["to_device_x_stream"] = to_dev_gbps / stream_gbps;
    state.counters["to_system_x_stream"] = to_sys_gbps / stream_gbps;
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(2 * bytes * n));
}

}  // namespace uhmm::bench
