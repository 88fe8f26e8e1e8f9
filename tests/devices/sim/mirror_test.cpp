// The simulated device's mirrored page table (docs/mirroring.md, "The
// simulated device's mirror"): misses are one device fault per access,
// hits use the mirror, every kind of change of the address space removes
// entries, and device and CPU stay coherent while migrations race accesses.
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include "e2e/test_support.hpp"
#include "mm/address_space_impl.hpp"
#include "uhmm/uhmm.hpp"

namespace uhmm {
namespace {

using test::pattern_word;

struct SimMirror : ::testing::Test {
  void SetUp() override {
    auto as_r = AddressSpace::create();
    ASSERT_TRUE(as_r.is_ok()) << as_r.status().to_string();
    as = std::move(*as_r);
    sim::SimDeviceOptions o;
    o.memory_bytes = 16 << 20;
    o.warm_memory = false;
    o.prefetch_blocks = 0;
    auto dev_r = sim::SimDevice::create(o);
    ASSERT_TRUE(dev_r.is_ok()) << dev_r.status().to_string();
    dev = std::move(*dev_r);
  }
  void TearDown() override {
    dev.reset();
    as.reset();
  }
  VirtAddr map_filled(std::size_t pages, std::uint64_t salt = 0) {
    auto r = as->map(pages * kPageSize);
    EXPECT_TRUE(r.is_ok()) << r.status().to_string();
    if (!r.is_ok()) return {};
    test::fill_range(*r, pages, salt);
    EXPECT_TRUE(test::settles(*as));
    return *r;
  }
  // Reads [base, +pages) through the device and checks the pattern.
  ::testing::AssertionResult device_has_pattern(VirtAddr base, std::size_t pages, std::uint64_t salt = 0) {
    std::vector<std::byte> buf(pages * kPageSize);
    const Status s = dev->device_read(*as, base, buf);
    if (!s) return ::testing::AssertionFailure() << s.to_string();
    for (std::size_t i = 0; i < pages; ++i)
      if (!test::buffer_has_pattern(buf.data() + i * kPageSize, salt + i))
        return ::testing::AssertionFailure() << "page " << i;
    return ::testing::AssertionSuccess();
  }
  std::size_t mirrored(VirtAddr base, std::size_t pages) { return dev->mirrored_pages(*as, base, pages * kPageSize); }

  std::unique_ptr<AddressSpace> as;
  std::unique_ptr<sim::SimDevice> dev;
};

TEST_F(SimMirror, ReadOfCpuPagesIsOneDeviceFaultThenHits) {
  constexpr std::size_t n = 100;
  const VirtAddr base = map_filled(n);
  const sim::MirrorStats s0 = dev->mirror_stats();
  ASSERT_TRUE(device_has_pattern(base, n));
  const sim::MirrorStats s1 = dev->mirror_stats();
  EXPECT_EQ(s1.device_faults - s0.device_faults, 1u);
  EXPECT_EQ(s1.pages_faulted - s0.pages_faulted, n);
  EXPECT_EQ(mirrored(base, n), n);
  EXPECT_EQ(test::count_states(*as, base, n).system, n);  // nothing moved

  ASSERT_TRUE(device_has_pattern(base, n));
  const sim::MirrorStats s2 = dev->mirror_stats();
  EXPECT_EQ(s2.device_faults, s1.device_faults);
  EXPECT_EQ(s2.mirror_hits - s1.mirror_hits, n);

  // A read that straddles mirrored and unmirrored pages faults only the new ones.
  const VirtAddr more = map_filled(8, 500);
  (void)more;
  std::vector<std::byte> small(3 * kPageSize);
  ASSERT_TRUE(dev->device_read(*as, base + (n - 2) * kPageSize, std::span(small).first(2 * kPageSize)).is_ok());
  EXPECT_EQ(dev->mirror_stats().device_faults, s2.device_faults);
}

TEST_F(SimMirror, CpuWriteIsSeenByTheNextDeviceReadWithoutAFault) {
  constexpr std::size_t n = 4;
  const VirtAddr base = map_filled(n);
  ASSERT_TRUE(device_has_pattern(base, n));
  const std::uint64_t faults = dev->mirror_stats().device_faults;
  const std::uint64_t v = 0x5eed'cafe'f00dull;
  (base + 2 * kPageSize + 40).as<volatile std::uint64_t>()[0] = v;
  std::uint64_t got = 0;
  ASSERT_TRUE(dev->device_read(*as, base + 2 * kPageSize + 40, std::as_writable_bytes(std::span(&got, 1))).is_ok());
  EXPECT_EQ(got, v);
  EXPECT_EQ(dev->mirror_stats().device_faults, faults);
}

TEST_F(SimMirror, DeviceWriteThroughTheMirrorIsSeenByTheCpu) {
  constexpr std::size_t n = 4;
  const VirtAddr base = map_filled(n);
  std::vector<std::byte> patch(kPageSize + 100);
  for (std::size_t i = 0; i < patch.size(); ++i) patch[i] = std::byte(i * 7 + 3);
  ASSERT_TRUE(dev->device_write(*as, base + (kPageSize - 50), patch).is_ok());
  EXPECT_EQ(dev->mirror_stats().device_faults, 1u);
  EXPECT_EQ(std::memcmp((base + (kPageSize - 50)).ptr(), patch.data(), patch.size()), 0);
  EXPECT_EQ(test::count_states(*as, base, n).system, n);
  // A second write hits.
  ASSERT_TRUE(dev->device_write(*as, base + kPageSize, std::span(patch).first(8)).is_ok());
  EXPECT_EQ(dev->mirror_stats().device_faults, 1u);
  EXPECT_EQ(std::memcmp((base + kPageSize).ptr(), patch.data(), 8), 0);
}

TEST_F(SimMirror, MigrationsBothWaysInvalidateTheMirror) {
  constexpr std::size_t n = 64;
  const VirtAddr base = map_filled(n);
  ASSERT_TRUE(device_has_pattern(base, n));
  ASSERT_EQ(mirrored(base, n), n);

  // To the device: the system-page entries are stale and go.
  ASSERT_EQ(dev->migrate_to_device(*as, base, n * kPageSize)->pages_migrated, n);
  EXPECT_EQ(mirrored(base, n), 0u);
  std::uint64_t faults = dev->mirror_stats().device_faults;
  ASSERT_TRUE(device_has_pattern(base, n));
  EXPECT_EQ(dev->mirror_stats().device_faults, faults + 1);
  EXPECT_EQ(test::count_states(*as, base, n).device, n);  // reached in device memory, not brought back
  EXPECT_EQ(as->stats().get(Counter::device_private_faults), 0u);

  // The device writes device memory through its entries; back to the CPU
  // the entries go again and the data comes along.
  const std::uint64_t v = 0xd1'ce;
  ASSERT_TRUE(dev->device_write(*as, base + 5 * kPageSize, std::as_bytes(std::span(&v, 1))).is_ok());
  ASSERT_EQ(dev->migrate_to_system(*as, base, n * kPageSize)->pages_migrated, n);
  EXPECT_EQ(mirrored(base, n), 0u);
  EXPECT_EQ((base + 5 * kPageSize).as<volatile std::uint64_t>()[0], v);
  faults = dev->mirror_stats().device_faults;
  std::uint64_t got = 0;
  ASSERT_TRUE(dev->device_read(*as, base + 5 * kPageSize, std::as_writable_bytes(std::span(&got, 1))).is_ok());
  EXPECT_EQ(got, v);
  EXPECT_EQ(dev->mirror_stats().device_faults, faults + 1);
  ASSERT_TRUE(test::settles_to(dev->pagemap(), 0));
}

TEST_F(SimMirror, EvictionDropsTheEntriesOfEvictedPages) {
  constexpr std::size_t n = 16;
  const VirtAddr base = map_filled(n);
  ASSERT_EQ(dev->migrate_to_device(*as, base, n * kPageSize)->pages_migrated, n);
  ASSERT_TRUE(device_has_pattern(base, n));
  ASSERT_EQ(mirrored(base, n), n);
  ASSERT_EQ(dev->evict_all()->pages_migrated, n);
  EXPECT_EQ(mirrored(base, n), 0u);
  ASSERT_TRUE(device_has_pattern(base, n));
  EXPECT_EQ(test::count_states(*as, base, n).system, n);
}

TEST_F(SimMirror, AddressSpaceUnmapInvalidatesTheMirror) {
  constexpr std::size_t n = 16;
  const VirtAddr base = map_filled(n);
  ASSERT_TRUE(device_has_pattern(base, n));
  ASSERT_EQ(mirrored(base, n), n);
  ASSERT_TRUE(as->unmap(base).is_ok());
  EXPECT_EQ(mirrored(base, n), 0u);
  std::vector<std::byte> buf(kPageSize);
  EXPECT_EQ(dev->device_read(*as, base, buf).code(), EFAULT);
}

TEST_F(SimMirror, MunmapInvalidatesTheMirror) {
  constexpr std::size_t n = 16;
  const VirtAddr base = map_filled(n);
  ASSERT_TRUE(device_has_pattern(base, n));
  ASSERT_EQ(::munmap((base + 8 * kPageSize).ptr(), 8 * kPageSize), 0);
  EXPECT_TRUE(test::eventually([&] { return mirrored(base + 8 * kPageSize, 8) == 0; }));
  EXPECT_EQ(mirrored(base, 8), 8u);
  ASSERT_TRUE(device_has_pattern(base, 8));
}

TEST_F(SimMirror, MadvDontneedInvalidatesTheMirror) {
  constexpr std::size_t n = 16;
  const VirtAddr base = map_filled(n);
  ASSERT_TRUE(device_has_pattern(base, n));
  ASSERT_EQ(::madvise((base + 4 * kPageSize).ptr(), 4 * kPageSize, MADV_DONTNEED), 0);
  ASSERT_TRUE(test::eventually([&] { return mirrored(base + 4 * kPageSize, 4) == 0; }));
  EXPECT_EQ(mirrored(base, 4), 4u);
  const std::uint64_t faults = dev->mirror_stats().device_faults;
  std::vector<std::byte> buf(4 * kPageSize, std::byte{0x55});
  ASSERT_TRUE(dev->device_read(*as, base + 4 * kPageSize, buf).is_ok());
  EXPECT_EQ(dev->mirror_stats().device_faults, faults + 1);
  for (std::byte b : buf) ASSERT_EQ(b, std::byte{0});  // dropped pages read as zero
  ASSERT_TRUE(device_has_pattern(base, 4));
  ASSERT_TRUE(device_has_pattern(base + 8 * kPageSize, 8, 8));
}

// An invalidation that cannot wait (blockable = false) goes through when
// the device's page-table lock is free: the entries go, as for any other.
TEST_F(SimMirror, NonBlockableInvalidationDropsEntriesWhenTheLockIsFree) {
  constexpr std::size_t n = 8;
  const VirtAddr base = map_filled(n);
  ASSERT_TRUE(device_has_pattern(base, n));
  ASSERT_EQ(mirrored(base, n), n);
  NotifyRange range{base, base + 4 * kPageSize, NotifyEvent::kClear};
  range.blockable = false;
  {
    mm::ScopedInvalidation inv(as->impl().notifiers, range);
    ASSERT_TRUE(inv.ok()) << inv.status().to_string();
  }
  EXPECT_EQ(mirrored(base, 4), 0u);
  EXPECT_EQ(mirrored(base + 4 * kPageSize, 4), 4u);
  ASSERT_TRUE(device_has_pattern(base, n));
}

TEST_F(SimMirror, RunKernelUsesTheMirrorAndRefusesCpuPages) {
  constexpr std::size_t n = 8;
  const VirtAddr base = map_filled(n);
  auto noop = [](std::span<std::byte>, VirtAddr) {};
  EXPECT_EQ(dev->run_kernel(*as, base, n * kPageSize, noop).code(), EFAULT);
  EXPECT_EQ(test::count_states(*as, base, n).system, n);
  ASSERT_EQ(dev->migrate_to_device(*as, base, n * kPageSize)->pages_migrated, n);
  ASSERT_TRUE(dev->run_kernel(*as, base, n * kPageSize, [&](std::span<std::byte> page, VirtAddr va) {
                   test::fill_page(page.data(), 70 + (va - base) / kPageSize);
                 }).is_ok());
  const std::uint64_t faults = dev->mirror_stats().device_faults;
  ASSERT_TRUE(dev->run_kernel(*as, base, n * kPageSize, noop).is_ok());
  EXPECT_EQ(dev->mirror_stats().device_faults, faults);
  EXPECT_TRUE(test::range_has_pattern(base, n, 70));
}

// A device thread writes and reads the first half of every page through the
// mirror while a migrator moves the range back and forth and the CPU writes
// the second halves.  Every byte is checked at the end.
TEST_F(SimMirror, AccessesRaceMigrationsAndCpuWritesCoherently) {
  constexpr std::size_t n = 64;
  constexpr std::size_t kHalf = kPageSize / 2;
  const VirtAddr base = map_filled(n);
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> errors{0}, device_rounds{0};
  std::vector<std::uint64_t> cpu_value(n, 0);  // written by the CPU thread only

  std::thread device([&] {
    std::vector<std::byte> buf(kHalf), back(kHalf);
    for (std::uint64_t round = 1; !stop.load(); ++round) {
      for (std::size_t i = 0; i < n; ++i) {
        std::memset(buf.data(), static_cast<int>((round + i) & 0xff), kHalf);
        if (!dev->device_write(*as, base + i * kPageSize, buf).is_ok()) errors.fetch_add(1);
        if (!dev->device_read(*as, base + i * kPageSize, back).is_ok()) errors.fetch_add(1);
        if (std::memcmp(buf.data(), back.data(), kHalf) != 0) errors.fetch_add(1);
      }
      device_rounds.store(round);
    }
  });
  std::thread migrator([&] {
    for (int k = 0; !stop.load(); ++k) {
      auto r = (k % 2 == 0) ? dev->migrate_to_device(*as, base, n * kPageSize)
                            : dev->migrate_to_system(*as, base, n * kPageSize);
      if (!r.is_ok()) errors.fetch_add(1);
    }
  });
  std::thread cpu([&] {
    for (std::uint64_t v = 1; !stop.load(); ++v)
      for (std::size_t i = 0; i < n; ++i) {
        auto* w = (base + i * kPageSize + kHalf).as<volatile std::uint64_t>();
        for (std::size_t k = 0; k < kHalf / 8; k += 64) w[k] = v * 1000 + i;
        cpu_value[i] = v * 1000 + i;
      }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(700));
  stop.store(true);
  device.join();
  migrator.join();
  cpu.join();
  EXPECT_EQ(errors.load(), 0u);
  EXPECT_GT(device_rounds.load(), 0u);
  const std::uint64_t last = device_rounds.load();
  for (std::size_t i = 0; i < n; ++i) {
    const auto* p = (base + i * kPageSize).as<const volatile std::uint8_t>();
    for (std::size_t b = 0; b < kHalf; ++b)
      ASSERT_EQ(p[b], static_cast<std::uint8_t>((last + i) & 0xff)) << "page " << i << " byte " << b;
    const auto* w = (base + i * kPageSize + kHalf).as<const volatile std::uint64_t>();
    for (std::size_t k = 0; k < kHalf / 8; ++k) {
      const std::uint64_t want = (k % 64 == 0) ? cpu_value[i] : pattern_word(i, kHalf / 8 + k);
      ASSERT_EQ(w[k], want) << "page " << i << " word " << k;
    }
  }
  EXPECT_GT(dev->mirror_stats().invalidations, 0u);
}

TEST_F(SimMirror, AddressSpaceDestroyedBeforeTheDevice) {
  const VirtAddr base = map_filled(8);
  ASSERT_TRUE(device_has_pattern(base, 8));
  const std::uint64_t inv = dev->mirror_stats().invalidations;
  as.reset();  // RELEASE: the mirror drops everything and forgets the space
  EXPECT_GT(dev->mirror_stats().invalidations, inv);
  // A new address space (possibly at the same address) gets a fresh mirror.
  auto as_r = AddressSpace::create();
  ASSERT_TRUE(as_r.is_ok());
  as = std::move(*as_r);
  const VirtAddr again = map_filled(8, 40);
  ASSERT_TRUE(device_has_pattern(again, 8, 40));
  EXPECT_EQ(mirrored(again, 8), 8u);
  as.reset();
  dev.reset();
}

TEST_F(SimMirror, DeviceDestroyedBeforeTheAddressSpace) {
  const VirtAddr base = map_filled(8);
  ASSERT_TRUE(device_has_pattern(base, 8));
  ASSERT_EQ(dev->migrate_to_device(*as, base, 4 * kPageSize)->pages_migrated, 4u);
  ASSERT_TRUE(device_has_pattern(base, 8));
  dev.reset();  // unsubscribes, evicts: the space lives on without a mirror
  EXPECT_TRUE(test::range_has_pattern(base, 8));
  ASSERT_TRUE(as->unmap(base).is_ok());
  as.reset();
}

}  // namespace
}  // namespace uhmm
