// Helpers shared by the devmem tests.
#pragma once

#include <sys/mman.h>

#include <atomic>
#include <memory>

#include "uhmm/device_memory.hpp"

namespace uhmm::testing_devmem {

/// Counts page_free calls (per map).
struct FreeCounter {
  std::atomic<int> calls{0};
  std::atomic<DevicePage*> last{nullptr};
  std::atomic<std::uint32_t> refcount_seen{~0u};
};

inline const int kOwnerA = 0;
inline const int kOwnerB = 0;

/// Private anonymous read-write memory of `npages` pages for a coherent
/// map; never unmapped (a map may outlive the test that made it, and the
/// amounts are small).
inline void* coherent_memory(std::uint64_t npages) {
  void* p = ::mmap(nullptr, npages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}

/// A complete, valid config: every op set, an owner, and for a coherent map
/// its memory.
inline PagemapConfig valid_config(PagemapType type, std::uint64_t npages, FreeCounter* counter = nullptr) {
  PagemapConfig c;
  c.type = type;
  c.npages = PageCount{npages};
  c.owner = &kOwnerA;
  c.ops.page_free = [counter](DevicePage& p) {
    if (counter == nullptr) return;
    counter->refcount_seen.store(p.refcount());
    counter->last.store(&p);
    counter->calls.fetch_add(1);
  };
  c.ops.migrate_to_ram = [](const CpuFault&) { return FaultOutcome::kSigbus; };
  if (type == PagemapType::kCoherent && npages > 0) c.coherent_memory = coherent_memory(npages);
  return c;
}

/// Explicit ranges live far above anything request_free_mem_region hands
/// out in these tests, one window per test so that tests never collide.
inline DevicePfnRange explicit_range(unsigned window, std::uint64_t offset, std::uint64_t count) {
  const std::uint64_t base = kDevicePfnBase + (std::uint64_t{1} << 36) + std::uint64_t{window} * (1u << 20);
  return DevicePfnRange{DevicePfn{base + offset}, PageCount{count}};
}

/// A private page map registered on the explicit range `r`.
inline Result<std::unique_ptr<DevicePagemap>> private_map_on(DevicePfnRange r) {
  auto c = valid_config(PagemapType::kPrivate, 0);
  c.range = r;
  return DevicePagemap::create(std::move(c));
}

}  // namespace uhmm::testing_devmem
