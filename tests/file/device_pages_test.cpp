// Device-private pages in the file cache (seed 003): pages of a cached file
// or of shared anonymous memory move to the simulated device and back, in
// both stages, with every byte checked in the mappings, through the device,
// and on disk after the cache is closed.  Each test runs in both fault modes.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include "file_test_support.hpp"
#include "uhmm/uhmm.hpp"

// In-thread mode serves faults inside SIGBUS handlers (docs/adr/0004).
extern "C" const char* __tsan_default_options() { return "report_signal_unsafe=0"; }

namespace uhmm {
namespace {

constexpr std::uint64_t kPages = 32;
constexpr std::uint64_t kBytes = kPages * kPageSize;

std::vector<std::byte> pattern_bytes(std::uint64_t offset, std::size_t n, std::uint8_t salt) {
  std::vector<std::byte> out(n);
  for (std::size_t i = 0; i < n; ++i) out[i] = std::byte{pattern(offset + i, salt)};
  return out;
}

::testing::AssertionResult mapping_has(const void* at, std::uint64_t offset, std::size_t n, std::uint8_t salt) {
  const auto* p = static_cast<const volatile std::uint8_t*>(at);
  for (std::size_t i = 0; i < n; ++i)
    if (p[i] != pattern(offset + i, salt))
      return ::testing::AssertionFailure() << "byte " << offset + i << " is " << int{p[i]} << ", expected "
                                           << int{pattern(offset + i, salt)};
  return ::testing::AssertionSuccess();
}

class DevicePagesTest : public ::testing::TestWithParam<FaultMode> {
 protected:
  void SetUp() override {
    as = address_space_for(GetParam());
    ASSERT_TRUE(as);
    dev = make_device(sim::FilePages::kCopiedBack);
    ASSERT_TRUE(dev);
  }
  void TearDown() override {
    dev.reset();
    as.reset();
  }

  static std::unique_ptr<sim::SimDevice> make_device(sim::FilePages file_pages) {
    sim::SimDeviceOptions o;
    o.memory_bytes = 16u << 20;
    o.warm_memory = false;
    o.file_pages = file_pages;
    auto d = sim::SimDevice::create(o);
    EXPECT_TRUE(d.is_ok()) << d.status().to_string();
    return d.is_ok() ? std::move(*d) : nullptr;
  }

  // The file `name` of kBytes filled with `salt`, cached, flushed only when asked.
  std::unique_ptr<FileCache> open_file(const std::string& name, std::uint8_t salt) {
    path = dir.file(name);
    write_file(path, kBytes, salt);
    FileCacheOptions o;
    o.flush_interval = std::chrono::milliseconds(0);
    auto r = FileCache::open(*as, path, O_RDWR, 0600, o);
    EXPECT_TRUE(r.is_ok()) << r.status().to_string();
    return r.is_ok() ? std::move(*r) : nullptr;
  }

  // Maps the whole object and reads it in through the mapping.
  VirtAddr map_loaded(FileCache& cache, std::uint8_t salt) {
    auto m = cache.map(0, kBytes);
    EXPECT_TRUE(m.is_ok()) << m.status().to_string();
    if (!m.is_ok()) return VirtAddr{0};
    EXPECT_TRUE(mapping_has(m->ptr(), 0, kBytes, salt));
    return *m;
  }

  std::uint64_t to_device(sim::SimDevice& d, VirtAddr at, std::size_t len = kBytes) {
    auto r = d.migrate_to_device(*as, at, len);
    EXPECT_TRUE(r.is_ok()) << r.status().to_string();
    return r.is_ok() ? r->pages_migrated : 0;
  }

  std::uint64_t counter(Counter c) const { return as->stats().get(c); }

  TempDir dir;
  std::string path;
  std::unique_ptr<AddressSpace> as;
  std::unique_ptr<sim::SimDevice> dev;
};

TEST_P(DevicePagesTest, PagesMoveToTheDeviceAndComeBackOnAccessFromAnyMapping) {
  auto cache = open_file("data", 1);
  ASSERT_TRUE(cache);
  const VirtAddr a = map_loaded(*cache, 1);
  auto b = cache->map(0, kBytes);
  ASSERT_TRUE(b.is_ok());
  const std::uint64_t free_before = dev->free_pages();
  ASSERT_EQ(to_device(*dev, a), kPages);
  EXPECT_EQ(dev->free_pages(), free_before - kPages);
  EXPECT_EQ(counter(Counter::pgmigrate_to_device), kPages);
  // The device reads them in its own memory, without a CPU fault.
  std::vector<std::byte> seen(kBytes);
  const std::uint64_t faults_before = counter(Counter::device_private_faults);
  ASSERT_TRUE(dev->device_read(*as, a, seen));
  EXPECT_EQ(seen, pattern_bytes(0, kBytes, 1));
  EXPECT_EQ(counter(Counter::device_private_faults), faults_before);
  EXPECT_EQ(dev->free_pages(), free_before - kPages);
  // A CPU access through the other mapping brings them back.
  EXPECT_TRUE(mapping_has(b->ptr(), 0, kBytes, 1));
  EXPECT_GT(counter(Counter::device_private_faults), faults_before);
  EXPECT_EQ(counter(Counter::file_pages_copied_back), kPages);
  EXPECT_EQ(dev->free_pages(), free_before);
  EXPECT_TRUE(mapping_has(a.ptr(), 0, kBytes, 1));
  EXPECT_EQ(cache->dirty_pages(), 0u);  // nobody wrote: nothing to write back
}

TEST_P(DevicePagesTest, DeviceWritesReachEveryMappingAndTheFile) {
  auto cache = open_file("data", 2);
  ASSERT_TRUE(cache);
  const VirtAddr a = map_loaded(*cache, 2);
  auto b = cache->map(0, kBytes);
  ASSERT_TRUE(b.is_ok());
  ASSERT_EQ(to_device(*dev, a), kPages);
  const auto written = pattern_bytes(0, kBytes, 9);
  ASSERT_TRUE(dev->device_write(*as, a, written));
  EXPECT_EQ(counter(Counter::file_pages_copied_back), 0u);  // written in device memory
  EXPECT_TRUE(mapping_has(b->ptr(), 0, kBytes, 9));
  EXPECT_EQ(cache->dirty_pages(), kPages);
  ASSERT_TRUE(cache->close());
  EXPECT_EQ(read_file(path), std::vector<std::uint8_t>(reinterpret_cast<const std::uint8_t*>(written.data()),
                                                        reinterpret_cast<const std::uint8_t*>(written.data()) + kBytes));
}

TEST_P(DevicePagesTest, SyncWritesBackWhatTheDeviceWroteWithoutACpuAccess) {
  auto cache = open_file("data", 3);
  ASSERT_TRUE(cache);
  const VirtAddr a = map_loaded(*cache, 3);
  const std::uint64_t free_before = dev->free_pages();
  ASSERT_EQ(to_device(*dev, a), kPages);
  // The device writes half of the pages; the other half stays clean.
  const auto written = pattern_bytes(0, kBytes / 2, 10);
  ASSERT_TRUE(dev->device_write(*as, a, written));
  ASSERT_TRUE(cache->sync());
  const auto disk = read_file(path);
  ASSERT_EQ(disk.size(), kBytes);
  for (std::uint64_t i = 0; i < kBytes; ++i) ASSERT_EQ(disk[i], pattern(i, i < kBytes / 2 ? 10 : 3)) << i;
  // Only the written pages had to come back; the clean ones stay on the device.
  EXPECT_EQ(dev->free_pages(), free_before - kPages / 2);
  EXPECT_TRUE(mapping_has(a.ptr(), 0, kBytes / 2, 10));
  EXPECT_TRUE(mapping_has((a + kBytes / 2).ptr(), kBytes / 2, kBytes / 2, 3));
}

TEST_P(DevicePagesTest, CpuWritesBeforeTheMoveAreKeptAndWrittenBack) {
  auto cache = open_file("data", 4);
  ASSERT_TRUE(cache);
  const VirtAddr a = map_loaded(*cache, 4);
  auto* p = static_cast<std::uint8_t*>(a.ptr());
  for (std::uint64_t i = 0; i < kBytes; i += 512) p[i] = 0xa5;  // every page dirty
  ASSERT_EQ(to_device(*dev, a), kPages);
  EXPECT_EQ(p[512], 0xa5);  // back, with the CPU's writes
  ASSERT_TRUE(cache->close());
  const auto disk = read_file(path);
  for (std::uint64_t i = 0; i < kBytes; ++i) ASSERT_EQ(disk[i], i % 512 == 0 ? 0xa5 : pattern(i, 4)) << i;
}

TEST_P(DevicePagesTest, FirstStageWritesDirtyPagesBackFirstAndRereadsTheFile) {
  auto ro = make_device(sim::FilePages::kReadOnly);
  ASSERT_TRUE(ro);
  auto cache = open_file("data", 5);
  ASSERT_TRUE(cache);
  const VirtAddr a = map_loaded(*cache, 5);
  auto* p = static_cast<std::uint8_t*>(a.ptr());
  p[7] = 0x77;  // page 0 dirty
  ASSERT_EQ(to_device(*ro, a), kPages);
  // Clean before it left: the write is in the file already.
  EXPECT_EQ(read_file(path)[7], 0x77);
  // Coming back re-reads the file: a change made behind the cache shows.
  const int fd = ::open(path.c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  const std::uint8_t behind = 0x3c;
  ASSERT_EQ(::pwrite(fd, &behind, 1, 3 * kPageSize + 1), 1);
  ::close(fd);
  EXPECT_EQ(p[3 * kPageSize + 1], behind);
  EXPECT_EQ(p[7], 0x77);
  EXPECT_GE(counter(Counter::file_pages_reread), 1u);
  EXPECT_EQ(counter(Counter::file_pages_copied_back), 0u);
}

TEST_P(DevicePagesTest, FirstStageDeviceWriteBringsThePageBackFirst) {
  auto ro = make_device(sim::FilePages::kReadOnly);
  ASSERT_TRUE(ro);
  auto cache = open_file("data", 6);
  ASSERT_TRUE(cache);
  const VirtAddr a = map_loaded(*cache, 6);
  const std::uint64_t free_before = ro->free_pages();
  ASSERT_EQ(to_device(*ro, a), kPages);
  // Read in device memory; a write needs the page writable: on the CPU.
  std::vector<std::byte> seen(kPageSize);
  ASSERT_TRUE(ro->device_read(*as, a + kPageSize, seen));
  EXPECT_EQ(seen, pattern_bytes(kPageSize, kPageSize, 6));
  const auto written = pattern_bytes(2 * kPageSize, kPageSize, 11);
  ASSERT_TRUE(ro->device_write(*as, a + 2 * kPageSize, written));
  EXPECT_GT(ro->free_pages(), free_before - kPages);  // it came back (with its fault-around neighbours)
  EXPECT_TRUE(mapping_has((a + 2 * kPageSize).ptr(), 2 * kPageSize, kPageSize, 11));
  ASSERT_TRUE(cache->sync());
  EXPECT_EQ(read_file(path)[2 * kPageSize + 5], pattern(2 * kPageSize + 5, 11));
}

TEST_P(DevicePagesTest, ReadAndWriteCallsBringPagesBack) {
  auto cache = open_file("data", 7);
  ASSERT_TRUE(cache);
  const VirtAddr a = map_loaded(*cache, 7);
  ASSERT_EQ(to_device(*dev, a), kPages);
  ASSERT_TRUE(dev->device_write(*as, a, pattern_bytes(0, kBytes, 12)));
  std::vector<std::byte> got(3 * kPageSize);
  ASSERT_TRUE(cache->read(kPageSize + 100, got));
  EXPECT_EQ(got, pattern_bytes(kPageSize + 100, got.size(), 12));
  const auto in = pattern_bytes(10 * kPageSize, kPageSize, 13);
  ASSERT_TRUE(cache->write(10 * kPageSize, in));
  EXPECT_TRUE(mapping_has((a + 10 * kPageSize).ptr(), 10 * kPageSize, kPageSize, 13));
  EXPECT_TRUE(mapping_has((a + 11 * kPageSize).ptr(), 11 * kPageSize, kPageSize, 12));
}

TEST_P(DevicePagesTest, TruncateDropsDevicePagesPastTheEnd) {
  auto cache = open_file("data", 8);
  ASSERT_TRUE(cache);
  const VirtAddr a = map_loaded(*cache, 8);
  const std::uint64_t free_before = dev->free_pages();
  ASSERT_EQ(to_device(*dev, a, 16 * kPageSize), 16u);
  ASSERT_TRUE(dev->device_write(*as, a, pattern_bytes(0, 16 * kPageSize, 14)));
  const std::uint64_t cut = 5 * kPageSize + kPageSize / 2;
  ASSERT_TRUE(cache->truncate(cut));
  // Pages 0-4 stay on the device, page 5 came back to be cut, 6-15 are gone.
  EXPECT_EQ(dev->free_pages(), free_before - 5);
  ASSERT_TRUE(cache->truncate(kBytes));
  const auto* p = static_cast<const std::uint8_t*>(a.ptr());
  EXPECT_TRUE(mapping_has(p, 0, cut, 14));
  for (std::uint64_t i = cut; i < kBytes; ++i) ASSERT_EQ(p[i], 0) << i;
  ASSERT_TRUE(cache->close());
  const auto disk = read_file(path);
  ASSERT_EQ(disk.size(), kBytes);
  for (std::uint64_t i = 0; i < kBytes; ++i) ASSERT_EQ(disk[i], i < cut ? pattern(i, 14) : 0) << i;
  EXPECT_EQ(dev->free_pages(), free_before);
}

TEST_P(DevicePagesTest, ExplicitMigrationBackKeepsTheDevicesWrites) {
  auto cache = open_file("data", 9);
  ASSERT_TRUE(cache);
  const VirtAddr a = map_loaded(*cache, 9);
  const std::uint64_t free_before = dev->free_pages();
  ASSERT_EQ(to_device(*dev, a), kPages);
  ASSERT_TRUE(dev->device_write(*as, a + 4 * kPageSize, pattern_bytes(4 * kPageSize, 2 * kPageSize, 15)));
  auto back = dev->migrate_to_system(*as, a, kBytes);
  ASSERT_TRUE(back.is_ok());
  EXPECT_EQ(back->pages_migrated, kPages);
  EXPECT_EQ(dev->free_pages(), free_before);
  EXPECT_EQ(counter(Counter::pgmigrate_to_ram), kPages);
  EXPECT_EQ(cache->dirty_pages(), 2u);
  EXPECT_TRUE(mapping_has((a + 4 * kPageSize).ptr(), 4 * kPageSize, 2 * kPageSize, 15));
  ASSERT_TRUE(cache->sync());
  EXPECT_EQ(read_file(path)[5 * kPageSize + 3], pattern(5 * kPageSize + 3, 15));
}

TEST_P(DevicePagesTest, EvictionAndDeviceTeardownBringPagesBack) {
  auto cache = open_file("data", 10);
  ASSERT_TRUE(cache);
  const VirtAddr a = map_loaded(*cache, 10);
  ASSERT_EQ(to_device(*dev, a), kPages);
  ASSERT_TRUE(dev->device_write(*as, a, pattern_bytes(0, kPageSize, 16)));
  auto r = dev->evict_all();
  ASSERT_TRUE(r.is_ok());
  EXPECT_EQ(dev->pagemap().pages_in_use(), 0u);
  EXPECT_TRUE(mapping_has(a.ptr(), 0, kPageSize, 16));
  EXPECT_TRUE(mapping_has((a + kPageSize).ptr(), kPageSize, kBytes - kPageSize, 10));
  // Again, and this time the device goes away with the pages on it.
  ASSERT_EQ(to_device(*dev, a), kPages);
  ASSERT_TRUE(dev->device_write(*as, a + kPageSize, pattern_bytes(kPageSize, kPageSize, 17)));
  dev.reset();
  EXPECT_TRUE(mapping_has((a + kPageSize).ptr(), kPageSize, kPageSize, 17));
  ASSERT_TRUE(cache->close());
  const auto disk = read_file(path);
  EXPECT_EQ(disk[kPageSize + 9], pattern(kPageSize + 9, 17));
  EXPECT_EQ(disk[9], pattern(9, 16));
}

TEST_P(DevicePagesTest, SharedAnonymousMemoryMovesWithTheSecondStageOnly) {
  auto shared = FileCache::create_anonymous(*as, kBytes);
  ASSERT_TRUE(shared.is_ok()) << shared.status().to_string();
  auto a = (*shared)->map(0, kBytes);
  auto b = (*shared)->map(0, kBytes);
  ASSERT_TRUE(a.is_ok() && b.is_ok());
  std::memcpy(a->ptr(), pattern_bytes(0, kBytes, 18).data(), kBytes);
  // No file to read again: the first stage cannot hold these pages.
  auto ro = make_device(sim::FilePages::kReadOnly);
  ASSERT_TRUE(ro);
  EXPECT_EQ(to_device(*ro, *a), 0u);
  EXPECT_TRUE(mapping_has(b->ptr(), 0, kBytes, 18));
  ASSERT_EQ(to_device(*dev, *a), kPages);
  ASSERT_TRUE(dev->device_write(*as, *a, pattern_bytes(0, kPageSize, 19)));
  EXPECT_TRUE(mapping_has(b->ptr(), 0, kPageSize, 19));
  EXPECT_TRUE(mapping_has((*b + kPageSize).ptr(), kPageSize, kBytes - kPageSize, 18));
}

// Threads write their own pages through one mapping while another thread
// moves the range to the device and back and the device writes other pages,
// and writebacks run: every page ends with its last writer's data, in the
// mappings and on disk.
TEST_P(DevicePagesTest, ConcurrentCpuWritesMigrationsAndWritebackLoseNothing) {
  auto cache = open_file("data", 20);
  ASSERT_TRUE(cache);
  const VirtAddr a = map_loaded(*cache, 20);
  auto b = cache->map(0, kBytes);
  ASSERT_TRUE(b.is_ok());
  constexpr unsigned kWriters = 2;
  constexpr std::uint64_t kCpuPages = 16;  // pages [0, 16) the CPU writes; [16, 32) the device's
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  std::vector<std::uint64_t> last(kCpuPages, 0);
  std::atomic<std::uint64_t> device_round{0};
  for (unsigned t = 0; t < kWriters; ++t)
    threads.emplace_back([&, t] {
      // At least 300 rounds, and on until the device has done a few of its own.
      for (std::uint64_t round = 1; round <= 300 || device_round.load() < 8; ++round)
        for (std::uint64_t pg = t; pg < kCpuPages; pg += kWriters) {
          auto* word = reinterpret_cast<volatile std::uint64_t*>((*b + pg * kPageSize + 8 * round % kPageSize).ptr());
          *word = round * 1000 + pg;
          last[pg] = round;
        }
    });
  std::thread mover([&] {
    while (!stop.load()) {
      (void)dev->migrate_to_device(*as, a, kBytes);
      const std::uint64_t v = device_round.load() + 1;
      std::vector<std::byte> words(kPageSize);
      std::memcpy(words.data(), &v, sizeof v);
      for (std::uint64_t pg = kCpuPages; pg < kPages; ++pg) (void)dev->device_write(*as, a + pg * kPageSize, words);
      (void)cache->sync();
      (void)dev->migrate_to_system(*as, a, kBytes);
      device_round.store(v);
    }
  });
  for (auto& t : threads) t.join();
  stop.store(true);
  mover.join();
  for (std::uint64_t pg = 0; pg < kCpuPages; ++pg) {
    const auto* word = reinterpret_cast<const std::uint64_t*>((a + pg * kPageSize + 8 * last[pg] % kPageSize).ptr());
    ASSERT_EQ(*word, last[pg] * 1000 + pg) << "page " << pg;
  }
  for (std::uint64_t pg = kCpuPages; pg < kPages; ++pg)
    ASSERT_EQ(*reinterpret_cast<const std::uint64_t*>((a + pg * kPageSize).ptr()), device_round.load()) << "page " << pg;
  std::vector<std::uint8_t> expect(static_cast<const std::uint8_t*>(a.ptr()),
                                   static_cast<const std::uint8_t*>(a.ptr()) + kBytes);
  ASSERT_TRUE(cache->close());
  EXPECT_EQ(read_file(path), expect);
}

INSTANTIATE_TEST_SUITE_P(FaultModes, DevicePagesTest,
                         ::testing::Values(FaultMode::kServiceThreads, FaultMode::kInThread), fault_mode_suffix);

}  // namespace
}  // namespace uhmm
