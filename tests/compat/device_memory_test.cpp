// The emulated devices' memory grows in chunks on demand, as the kernel's
// test driver's does (dmirror-abi.md, "Device memory model"): the devices
// are made with the library's own options (dmirror_device_options), with a
// small chunk through the test knob, and filled well past their first
// chunk.  Every page lands on the device and keeps its data, in every
// chunk, both ways, for private and coherent memory.
#include <gtest/gtest.h>

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

INSTANTIATE_TEST_SUITE_P(PrivateAndCoherent, DmirrorDeviceMemory, ::testing::Values(0, 2),
                         [](const auto& p) { return p.param < 2 ? "Private" : "Coherent"; });

}  // namespace
}  // namespace uhmm::compat
