// The emulated devices' memory grows in chunks on demand, as the kernel's
// test driver's does (dmirror-abi.md, "Device memory model"): the devices
// are made with the library's own options (dmirror_device_options), with a
// small chunk through the test knob, and filled well past their first
// chunk.  Every page lands on the device and keeps its data, in every
// chunk, both ways, for private and coherent memory.
#include <gtest/gtest.h>

#include <sys/resource.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "compat/dmirror_device.hpp"
#include "e2e/test_support.hpp"
#include "uhmm/uhmm.hpp"

namespace uhmm::compat {
namespace {

constexpr std::size_t kChunkPages = 256;  // 1 MiB chunks
constexpr std::size_t kPages = 5 * kChunkPages + 37;  // into a sixth chunk

struct Knob {
  explicit Knob(const char* value) { ::setenv("UHMM_DMIRROR_CHUNK_BYTES", value, 1); }
  ~Knob() { ::unsetenv("UHMM_DMIRROR_CHUNK_BYTES"); }
};

TEST(DmirrorDeviceOptions, ChunksOf256MiBUnlessTheKnobSaysOtherwise) {
  for (const int minor : {0, 2}) {
    const sim::SimDeviceOptions o = dmirror_device_options(minor);
    EXPECT_EQ(o.memory_bytes, std::size_t{256} << 20);
    EXPECT_EQ(o.grow_bytes, std::size_t{256} << 20);
    EXPECT_EQ(o.memory_type, minor == 0 ? PagemapType::kPrivate : PagemapType::kCoherent);
  }
  {
    Knob knob("8192");
    EXPECT_EQ(dmirror_device_options(0).grow_bytes, 8192u);
  }
  for (const char* bad : {"", "12", "4097", "1MiB", "-4096"}) {
    Knob knob(bad);
    EXPECT_EQ(dmirror_device_options(1).grow_bytes, std::size_t{256} << 20) << '"' << bad << '"';
  }
}

class DmirrorDeviceMemory : public ::testing::TestWithParam<int> {};

TEST_P(DmirrorDeviceMemory, GrowsPastItsFirstChunkAndEveryChunkKeepsItsPages) {
  const int minor = GetParam();
  const std::string chunk_bytes = std::to_string(kChunkPages * kPageSize);
  Knob knob(chunk_bytes.c_str());
  AddressSpaceOptions ao;
  ao.hole_fault_around_pages = 1;
  auto as = AddressSpace::create(ao);
  ASSERT_TRUE(as.is_ok()) << as.status().to_string();
  auto dev = sim::SimDevice::create(dmirror_device_options(minor));
  ASSERT_TRUE(dev.is_ok()) << dev.status().to_string();
  EXPECT_EQ((*dev)->memory_bytes(), kChunkPages * kPageSize);
  EXPECT_EQ((*dev)->free_pages(), kChunkPages);

  auto base = (*as)->map(kPages * kPageSize);
  ASSERT_TRUE(base.is_ok()) << base.status().to_string();
  test::fill_range(*base, kPages, 7);
  ASSERT_TRUE(test::settles(**as));

  // Batches of 512 pages (the library's migration step), each needing more
  // than a chunk's worth of pages.
  auto moved = (*dev)->migrate_to_device(**as, *base, kPages * kPageSize);
  ASSERT_TRUE(moved.is_ok()) << moved.status().to_string();
  EXPECT_EQ(moved->pages_migrated, kPages);
  EXPECT_EQ((*dev)->memory_bytes(), 6 * kChunkPages * kPageSize);
  EXPECT_EQ((*dev)->free_pages(), 6 * kChunkPages - kPages);
  const test::StateCounts on = test::count_states(**as, *base, kPages);
  EXPECT_EQ(minor < 2 ? on.device : on.coherent, kPages);

  // The device reads each page from its chunk's memory (private) or where
  // the CPU maps it (coherent): the data the CPU wrote.
  std::vector<std::byte> got(kPages * kPageSize);
  ASSERT_TRUE((*dev)->device_read(**as, *base, got).is_ok());
  for (std::size_t i = 0; i < kPages; ++i)
    ASSERT_TRUE(test::page_has_pattern(got.data() + i * kPageSize, 7 + i)) << "page " << i;

  // Back to system memory, every byte; the chunks stay, all free.
  auto back = (*dev)->migrate_to_system(**as, *base, kPages * kPageSize);
  ASSERT_TRUE(back.is_ok()) << back.status().to_string();
  EXPECT_EQ(back->pages_migrated, kPages);
  ASSERT_TRUE(test::settles(**as));
  EXPECT_TRUE(test::range_has_pattern(*base, kPages, 7));
  EXPECT_TRUE(test::eventually([&] { return (*dev)->free_pages() == 6 * kChunkPages; }));

  // Again, from a device write: pages of the later chunks are reused and
  // hold what the device wrote.
  ASSERT_TRUE((*dev)->migrate_to_device(**as, *base, kPages * kPageSize).is_ok());
  std::vector<std::byte> page(kPageSize, std::byte{0x5c});
  const VirtAddr last = *base + (kPages - 1) * kPageSize;
  ASSERT_TRUE((*dev)->device_write(**as, last, page).is_ok());
  ASSERT_TRUE((*dev)->evict_all().is_ok());
  ASSERT_TRUE(test::settles(**as));
  EXPECT_TRUE(test::range_has_pattern(*base, kPages - 1, 7));
  EXPECT_EQ(std::memcmp(last.ptr(), page.data(), kPageSize), 0);
  EXPECT_EQ((*dev)->memory_bytes(), 6 * kChunkPages * kPageSize);
  dev->reset();
}

// The process's address space now (VmSize in /proc/self/status).
[[maybe_unused]] std::size_t address_space_bytes() {
  std::FILE* f = std::fopen("/proc/self/status", "r");
  if (f == nullptr) return 0;
  char line[256];
  std::size_t kib = 0;
  while (std::fgets(line, sizeof line, f) != nullptr)
    if (std::sscanf(line, "VmSize: %zu kB", &kib) == 1) break;
  std::fclose(f);
  return kib * 1024;
}

// The child of the test below: 0, or the number of the step that failed.
[[maybe_unused]] int refused_chunk_child() {
  const std::string chunk_bytes = std::to_string(kChunkPages * kPageSize);
  Knob knob(chunk_bytes.c_str());
  auto as = AddressSpace::create();
  auto dev = sim::SimDevice::create(dmirror_device_options(0));
  if (!as.is_ok() || !dev.is_ok()) return 2;
  constexpr std::size_t n = 2 * kChunkPages;
  auto base = (*as)->map(n * kPageSize);
  if (!base.is_ok()) return 3;
  test::fill_range(*base, n, 11);
  if (!test::settles(**as)) return 4;
  // A first migration warms every path (heap, staging), then back.
  auto warm = (*dev)->migrate_to_device(**as, *base, kChunkPages * kPageSize);
  if (!warm.is_ok() || warm->pages_migrated != kChunkPages) return 5;
  if (!(*dev)->migrate_to_system(**as, *base, kChunkPages * kPageSize).is_ok()) return 6;
  if (!test::settles(**as)) return 7;
  rlimit old{};
  if (::getrlimit(RLIMIT_AS, &old) != 0) return 8;
  // Room for less than one more arena.
  const rlimit tight{address_space_bytes() + kChunkPages * kPageSize / 2, old.rlim_max};
  if (::setrlimit(RLIMIT_AS, &tight) != 0) return 9;
  auto moved = (*dev)->migrate_to_device(**as, *base, n * kPageSize);
  ::setrlimit(RLIMIT_AS, &old);
  if (!moved.is_ok()) return 10;
  if (moved->pages_migrated != kChunkPages || (*dev)->memory_bytes() != kChunkPages * kPageSize) return 11;
  if (test::count_states(**as, *base, n).device != kChunkPages) return 12;
  // The limit is gone: the device grows for the rest.
  auto rest = (*dev)->migrate_to_device(**as, *base, n * kPageSize);
  if (!rest.is_ok() || rest->pages_migrated != kChunkPages || (*dev)->memory_bytes() != n * kPageSize) return 13;
  if (!(*dev)->evict_all().is_ok() || !test::settles(**as) || !test::range_has_pattern(*base, n, 11)) return 14;
  return 0;
}

// When the host cannot give the device another chunk (here: the address
// space limit), the pages that needed one stay on the CPU with their data,
// as on a full device; once it can again, the device grows.
TEST(DmirrorDeviceMemoryDeathTest, AChunkTheHostRefusesLeavesPagesOnTheCpu) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "sanitizers reserve address space without limit";
#else
  // In a child, so that the limit never reaches the test runner; "fast"
  // forks before anything of uhmm exists in this process.
  GTEST_FLAG_SET(death_test_style, "fast");
  EXPECT_EXIT(std::_Exit(refused_chunk_child()), ::testing::ExitedWithCode(0), "");
#endif
}

INSTANTIATE_TEST_SUITE_P(PrivateAndCoherent, DmirrorDeviceMemory, ::testing::Values(0, 2),
                         [](const auto& p) { return p.param < 2 ? "Private" : "Coherent"; });

}  // namespace
}  // namespace uhmm::compat
