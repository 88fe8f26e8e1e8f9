// uhmm/stats.hpp: counters and latency histograms, readable from the API.
//
// Counter names follow the kernel's vmstat style (pgmigrate_success, ...).
// Every counter is one relaxed atomic, bumped where the event happens; there
// is no hand-kept total that could drift from its parts.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <string_view>
#include <vector>

namespace uhmm {

// X-macro: one place lists every counter, its name and its meaning.
#define UHMM_COUNTERS(X)                                                                  \
  X(pgmigrate_success, "pages whose migration committed (either direction)")             \
  X(pgmigrate_fail, "pages collected for migration that were restored instead")         \
  X(pgmigrate_to_device, "pages that moved from system memory to a device")            \
  X(pgmigrate_to_ram, "pages that moved from a device back to system memory")          \
  X(thp_migration_success, "2 MiB units moved whole")                                   \
  X(thp_migration_split, "COMPOUND entries split for base-page destinations")            \
  X(thp_split_staged, "2 MiB units that left the CPU as 4 KiB pages; their staging block is not reused as is, so they come back whole") \
  X(empty_table_zaps, "2 MiB blocks whose empty page table uhmm dropped so a huge page could move in") \
  X(migrate_skipped_pinned, "pages skipped because they were pinned or shared")        \
  X(migrate_skipped_locked, "pages skipped because another migration held them")       \
  X(transit_copies, "pages the kernel refused to move on into staging (EBUSY), copied there instead") \
  X(migrate_holes, "unpopulated pages collected as holes")                              \
  X(uffd_faults, "page faults on managed memory served")                                \
  X(hole_faults, "faults on never-populated pages, zero-filled")                        \
  X(device_private_faults, "CPU faults on device-private pages (migrate_to_ram calls)") \
  X(migrate_to_ram_fail, "migrate_to_ram calls that failed; the access got SIGBUS")    \
  X(device_exclusive_made, "pages made exclusive to a device (make_device_exclusive)")  \
  X(device_exclusive_revoked, "exclusive pages given back to the CPU (an access, fork, ...)") \
  X(faults_parked, "faults that waited for a migration in progress")                    \
  X(fault_service_requeues, "service threads that moved behind the one on a faulting thread's CPU") \
  X(faults_spurious, "faults found already resolved by another thread")                 \
  X(uffd_events, "changes behind uhmm's back processed (munmap, madvise, mremap)")     \
  X(device_pages_dropped, "device pages released because their range was unmapped or discarded") \
  X(device_page_free, "device pages freed (page_free calls)")                           \
  X(device_alloc_fail, "device page allocations that failed")                           \
  X(device_large_fallback, "2 MiB units a device took as base pages (no large page)")   \
  X(dma_copy_fail, "device copies that failed")                                         \
  X(prefetch_migrations, "migrations back a device's prefetch thread started (blocks queued meanwhile join the one running)") \
  X(prefetch_blocks, "2 MiB blocks a device's prefetch thread took to bring back")      \
  X(dma_bytes_to_device, "bytes copied by DMA into device memory")                      \
  X(dma_bytes_from_device, "bytes copied by DMA out of device memory")                  \
  X(file_pages_copied_back, "device pages of shared or file-backed objects a lookup copied back (migrate_to_pagecache)") \
  X(file_pages_reread, "device pages of files a lookup brought back by re-reading the file")

enum class Counter : unsigned {
#define UHMM_COUNTER_ENUM(name, doc) name,
  UHMM_COUNTERS(UHMM_COUNTER_ENUM)
#undef UHMM_COUNTER_ENUM
      kCount
};

std::string_view counter_name(Counter c);
std::string_view counter_doc(Counter c);

/// Log-linear latency histogram in nanoseconds (about 3 % resolution), lock free.
class LatencyHistogram {
 public:
  void record(std::chrono::nanoseconds ns);
  std::uint64_t count() const;
  /// Quantile in [0, 1]; 0 when empty.  Reports the upper bound of the bucket.
  std::chrono::nanoseconds quantile(double q) const;
  void reset();

 private:
  static constexpr unsigned kSubBuckets = 32;  // per power of two
  static constexpr unsigned kBuckets = 64 * kSubBuckets;
  static unsigned bucket_of(std::uint64_t ns);
  static std::uint64_t upper_bound_of(unsigned bucket);
  std::array<std::atomic<std::uint64_t>, kBuckets> buckets_{};
};

/// A set of counters plus the CPU fault latency histogram.
class Stats {
 public:
  void add(Counter c, std::uint64_t n = 1) {
    counters_[static_cast<unsigned>(c)].fetch_add(n, std::memory_order_relaxed);
  }
  std::uint64_t get(Counter c) const {
    return counters_[static_cast<unsigned>(c)].load(std::memory_order_relaxed);
  }
  struct Snapshot {
    std::array<std::uint64_t, static_cast<unsigned>(Counter::kCount)> values{};
    std::uint64_t operator[](Counter c) const { return values[static_cast<unsigned>(c)]; }
  };
  Snapshot snapshot() const;
  void reset();

  /// Time from the faulting access to the fault's resolution, as seen by the
  /// fault service (device-private faults only).
  LatencyHistogram& fault_latency() { return fault_latency_; }
  const LatencyHistogram& fault_latency() const { return fault_latency_; }

 private:
  std::array<std::atomic<std::uint64_t>, static_cast<unsigned>(Counter::kCount)> counters_{};
  LatencyHistogram fault_latency_;
};

}  // namespace uhmm
