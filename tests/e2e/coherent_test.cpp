// End-to-end: device-coherent memory (hmm-semantics section 6) on the
// simulated device with memory_type = kCoherent.  Pages migrated to it stay
// mapped for the CPU: CPU reads and writes take no fault and no migration;
// the device and the CPU see each other's writes; the driver brings pages
// back only explicitly (SELECT_DEVICE_COHERENT, or eviction); munmap,
// MADV_DONTNEED and mremap by the application release or move them; fork
// copies them; hmm_range_fault reports them as present device pages.  Each
// test runs with both fault modes.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <span>
#include <thread>
#include <vector>

#include "e2e/test_support.hpp"
#include "migrate/test_driver.hpp"
#include "mm/address_space_impl.hpp"
#include "uhmm/uhmm.hpp"

extern "C" const char* __tsan_default_options() { return "report_signal_unsafe=0"; }  // kInThread: ADR 0004

namespace uhmm {
namespace {

using test::count_states;
using test::fill_range;
using test::pattern_word;
using test::range_has_pattern;

constexpr std::size_t kPages = 64;
constexpr std::size_t kLen = kPages * kPageSize;
constexpr std::size_t kDevicePages = 256;

std::unique_ptr<sim::SimDevice> make_coherent_device(std::size_t pages) {
  sim::SimDeviceOptions o;
  o.memory_bytes = pages * kPageSize;
  o.memory_type = PagemapType::kCoherent;
  o.warm_memory = false;
  o.prefetch_blocks = 0;
  auto r = sim::SimDevice::create(o);
  EXPECT_TRUE(r.is_ok()) << r.status().to_string();
  return r.is_ok() ? std::move(*r) : nullptr;
}

// The counters a CPU access to a device page would move.
struct FaultCounts {
  std::uint64_t uffd_faults, device_private_faults, hole_faults, parked, spurious;
  explicit FaultCounts(const AddressSpace& as)
      : uffd_faults(as.stats().get(Counter::uffd_faults)),
        device_private_faults(as.stats().get(Counter::device_private_faults)),
        hole_faults(as.stats().get(Counter::hole_faults)),
        parked(as.stats().get(Counter::faults_parked)),
        spurious(as.stats().get(Counter::faults_spurious)) {}
  bool operator==(const FaultCounts&) const = default;
};

class CoherentTest : public ::testing::TestWithParam<FaultMode> {
 protected:
  void SetUp() override {
    as = test::make_address_space(GetParam());
    dev = make_coherent_device(kDevicePages);
    ASSERT_TRUE(as && dev);
    ASSERT_EQ(dev->pagemap().type(), PagemapType::kCoherent);
    auto r = as->map(kLen);
    ASSERT_TRUE(r.is_ok());
    base = *r;
    fill_range(base, kPages);
    ASSERT_TRUE(test::settles(*as));
  }
  void TearDown() override {
    dev.reset();
    as.reset();
  }
  VirtAddr page(std::size_t i) const { return base + i * kPageSize; }
  std::uint64_t counter(Counter c) const { return as->stats().get(c); }
  std::uint64_t page_frees() const { return dev->stats().get(Counter::device_page_free); }
  void to_device() {
    auto rep = dev->migrate_to_device(*as, base, kLen);
    ASSERT_TRUE(rep.is_ok()) << rep.status().to_string();
    ASSERT_EQ(rep->pages_migrated, kPages);
    ASSERT_EQ(count_states(*as, base, kPages).coherent, kPages);
  }

  std::unique_ptr<AddressSpace> as;
  std::unique_ptr<sim::SimDevice> dev;
  VirtAddr base;
};

TEST_P(CoherentTest, MigratedPagesStayMappedForTheCpuWithoutFaults) {
  const std::uint64_t free_before = dev->free_pages();
  to_device();
  EXPECT_EQ(dev->free_pages(), free_before - kPages);
  EXPECT_EQ(dev->pagemap().pages_in_use(), kPages);
  EXPECT_EQ(counter(Counter::pgmigrate_to_device), kPages);
  for (std::size_t i = 0; i < kPages; ++i) {
    const PageInfo info = as->page_info(page(i));
    ASSERT_EQ(info.state, PageInfo::State::kDeviceCoherent) << i;
    ASSERT_NE(info.device_page, nullptr);
    EXPECT_EQ(&info.device_page->pagemap(), &dev->pagemap());
    EXPECT_TRUE(info.writable);
    EXPECT_EQ(info.device_page->mapping().address, page(i));
  }
  const FaultCounts before(*as);
  // Plain loads and stores, the CPU's own: no fault, no migration.
  EXPECT_TRUE(range_has_pattern(base, kPages));
  fill_range(base, kPages, 1000);
  EXPECT_TRUE(range_has_pattern(base, kPages, 1000));
  EXPECT_TRUE(FaultCounts(*as) == before) << "a CPU access to a coherent page faulted";
  EXPECT_EQ(count_states(*as, base, kPages).coherent, kPages);
  EXPECT_EQ(counter(Counter::pgmigrate_to_ram), 0u);
  // A syscall on the buffer works in place too.
  std::vector<std::byte> copy(kPageSize);
  ASSERT_TRUE(as->read(page(3), copy).is_ok());
  EXPECT_TRUE(test::buffer_has_pattern(copy.data(), 1003));
  EXPECT_TRUE(FaultCounts(*as) == before);
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_P(CoherentTest, HolesMigrateAsZeroedCoherentPages) {
  auto r = as->map(16 * kPageSize);
  ASSERT_TRUE(r.is_ok());
  auto rep = dev->migrate_to_device(*as, *r, 16 * kPageSize);
  ASSERT_TRUE(rep.is_ok());
  EXPECT_EQ(rep->pages_migrated, 16u);
  EXPECT_EQ(rep->holes, 16u);
  EXPECT_EQ(count_states(*as, *r, 16).coherent, 16u);
  const FaultCounts before(*as);
  for (std::size_t i = 0; i < 16; ++i) EXPECT_EQ((*r + i * kPageSize).as<volatile std::uint64_t>()[7], 0u);
  EXPECT_TRUE(FaultCounts(*as) == before);
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_P(CoherentTest, DeviceAndCpuSeeEachOthersWrites) {
  to_device();
  const FaultCounts before(*as);
  // The CPU writes, the device reads.
  fill_range(page(4), 2, 500);
  std::vector<std::byte> buf(2 * kPageSize);
  ASSERT_TRUE(dev->device_read(*as, page(4), buf).is_ok());
  EXPECT_TRUE(test::buffer_has_pattern(buf.data(), 500));
  EXPECT_TRUE(test::buffer_has_pattern(buf.data() + kPageSize, 501));
  // The device writes, the CPU reads.
  const std::uint64_t word = 0xc04e7e47;
  ASSERT_TRUE(dev->device_write(*as, page(10) + 64, std::as_bytes(std::span(&word, 1))).is_ok());
  EXPECT_EQ(page(10).as<volatile std::uint64_t>()[8], word);
  EXPECT_EQ(page(10).as<volatile std::uint64_t>()[7], pattern_word(10, 7));
  // A device kernel sees the CPU's data and the CPU sees what it wrote.
  ASSERT_TRUE(dev->run_kernel(*as, page(20), 2 * kPageSize, [](std::span<std::byte> p, VirtAddr) {
                   auto* w = reinterpret_cast<std::uint64_t*>(p.data());
                   w[0] = ~w[1];
                 }).is_ok());
  EXPECT_EQ(page(20).as<volatile std::uint64_t>()[0], ~pattern_word(20, 1));
  EXPECT_EQ(page(21).as<volatile std::uint64_t>()[0], ~pattern_word(21, 1));
  EXPECT_EQ(page(21).as<volatile std::uint64_t>()[2], pattern_word(21, 2));
  EXPECT_TRUE(FaultCounts(*as) == before) << "device access to coherent pages faulted on the CPU side";
  EXPECT_EQ(count_states(*as, base, kPages).coherent, kPages);
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_P(CoherentTest, RunKernelRefusesPagesNotOnThisDevice) {
  to_device();
  auto other = make_coherent_device(16);
  ASSERT_TRUE(other);
  // On the first device: not this one's.
  EXPECT_EQ(other->run_kernel(*as, page(0), kPageSize, [](std::span<std::byte>, VirtAddr) {}).code(), EFAULT);
  ASSERT_TRUE(dev->migrate_to_system(*as, page(0), kPageSize).is_ok());
  EXPECT_EQ(dev->run_kernel(*as, page(0), kPageSize, [](std::span<std::byte>, VirtAddr) {}).code(), EFAULT);
  EXPECT_TRUE(range_has_pattern(base, kPages));
}

TEST_P(CoherentTest, MigrateBackWithSelectDeviceCoherentKeepsDataAndFreesEachPageOnce) {
  to_device();
  fill_range(base, kPages, 77);  // written in device memory
  auto rep = dev->migrate_to_system(*as, base, kLen);
  ASSERT_TRUE(rep.is_ok()) << rep.status().to_string();
  EXPECT_EQ(rep->pages_migrated, kPages);
  EXPECT_EQ(count_states(*as, base, kPages).system, kPages);
  EXPECT_TRUE(range_has_pattern(base, kPages, 77));
  EXPECT_TRUE(test::settles_to(dev->pagemap(), 0));
  EXPECT_EQ(page_frees(), kPages);
  EXPECT_EQ(counter(Counter::pgmigrate_to_ram), kPages);
  // And round again: the frames went home and are reused.
  to_device();
  EXPECT_TRUE(range_has_pattern(base, kPages, 77));
  ASSERT_TRUE(dev->migrate_to_system(*as, base, kLen).is_ok());
  EXPECT_TRUE(range_has_pattern(base, kPages, 77));
  EXPECT_TRUE(test::settles_to(dev->pagemap(), 0));
  EXPECT_EQ(page_frees(), 2 * kPages);
  UHMM_EXPECT_INVARIANTS(*as);
}

// A frame's second hop, from the transit area into its home slot, can be
// refused as a system page's can (AStagingMoveTheKernelRefusesGoesOnAsACopy
// in migration_test.cpp): the frame goes home as a copy, and the migration
// completes with every byte.
TEST_P(CoherentTest, AFrameTheKernelWillNotMoveHomeGoesHomeAsACopy) {
  to_device();
  fill_range(base, kPages, 91);
  as->impl().refuse_staging_moves_for_test = 1u << 30;
  auto rep = dev->migrate_to_system(*as, base, kLen);
  as->impl().refuse_staging_moves_for_test = 0;
  ASSERT_TRUE(rep.is_ok()) << rep.status().to_string();
  EXPECT_EQ(rep->pages_migrated, kPages);
  EXPECT_EQ(counter(Counter::transit_copies), kPages);
  EXPECT_EQ(count_states(*as, base, kPages).system, kPages);
  EXPECT_TRUE(range_has_pattern(base, kPages, 91));
  EXPECT_TRUE(test::settles_to(dev->pagemap(), 0));
  UHMM_EXPECT_INVARIANTS(*as);
  // The transit works as before: a round trip moves the frames, no copy.
  to_device();
  ASSERT_TRUE(dev->migrate_to_system(*as, base, kLen).is_ok());
  EXPECT_TRUE(range_has_pattern(base, kPages, 91));
  EXPECT_EQ(counter(Counter::transit_copies), kPages);
  EXPECT_TRUE(test::settles_to(dev->pagemap(), 0));
  UHMM_EXPECT_INVARIANTS(*as);
}

// SELECT_SYSTEM never takes a coherent page: another device (private here)
// migrating the range leaves it where it is.
TEST_P(CoherentTest, AnotherDeviceDoesNotTakeCoherentPages) {
  to_device();
  auto priv = test::make_device(kLen);
  ASSERT_TRUE(priv);
  auto rep = priv->migrate_to_device(*as, base, kLen);
  ASSERT_TRUE(rep.is_ok());
  EXPECT_EQ(rep->pages_migrated, 0u);
  EXPECT_EQ(count_states(*as, base, kPages).coherent, kPages);
  EXPECT_EQ(priv->pagemap().pages_in_use(), 0u);
  // Nor does asking the coherent device itself to move them again.
  rep = dev->migrate_to_device(*as, base, kLen);
  ASSERT_TRUE(rep.is_ok());
  EXPECT_EQ(rep->pages_migrated, 0u);
  EXPECT_EQ(dev->pagemap().pages_in_use(), kPages);
  EXPECT_TRUE(range_has_pattern(base, kPages));
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_P(CoherentTest, EvictAllBringsEveryPageBack) {
  to_device();
  fill_range(page(8), 8, 300);
  auto rep = dev->evict_all();
  ASSERT_TRUE(rep.is_ok()) << rep.status().to_string();
  EXPECT_EQ(rep->pages_migrated, kPages);
  EXPECT_EQ(count_states(*as, base, kPages).system, kPages);
  EXPECT_TRUE(range_has_pattern(base, 8));
  EXPECT_TRUE(range_has_pattern(page(8), 8, 300));
  EXPECT_TRUE(range_has_pattern(page(16), kPages - 16, 16));
  EXPECT_TRUE(test::settles_to(dev->pagemap(), 0));
  EXPECT_EQ(page_frees(), kPages);
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_P(CoherentTest, DestroyingTheDeviceKeepsTheData) {
  to_device();
  dev.reset();
  EXPECT_EQ(count_states(*as, base, kPages).system, kPages);
  EXPECT_TRUE(range_has_pattern(base, kPages));
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_P(CoherentTest, MunmapReleasesEachPageOnce) {
  to_device();
  ASSERT_EQ(::munmap(page(8).ptr(), 8 * kPageSize), 0);
  EXPECT_TRUE(test::settles_to(dev->pagemap(), kPages - 8));
  EXPECT_EQ(page_frees(), 8u);
  EXPECT_EQ(counter(Counter::device_pages_dropped), 8u);
  EXPECT_TRUE(range_has_pattern(base, 8));
  EXPECT_TRUE(range_has_pattern(page(16), kPages - 16, 16));
  // The rest still goes back on request.
  ASSERT_TRUE(dev->migrate_to_system(*as, page(16), (kPages - 16) * kPageSize).is_ok());
  EXPECT_TRUE(range_has_pattern(page(16), kPages - 16, 16));
  ASSERT_EQ(::munmap(base.ptr(), 8 * kPageSize), 0);
  EXPECT_TRUE(test::settles_to(dev->pagemap(), 0));
  EXPECT_EQ(page_frees(), kPages);
  ASSERT_TRUE(test::settles(*as));
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_P(CoherentTest, DontneedDiscardsAndReleasesEachPageOnce) {
  to_device();
  ASSERT_EQ(::madvise(page(4).ptr(), 4 * kPageSize, MADV_DONTNEED), 0);
  for (std::size_t i = 4; i < 8; ++i) EXPECT_EQ(page(i).as<volatile std::uint64_t>()[5], 0u) << i;
  EXPECT_TRUE(test::settles_to(dev->pagemap(), kPages - 4));
  EXPECT_EQ(page_frees(), 4u);
  EXPECT_EQ(count_states(*as, page(4), 4).coherent, 0u);
  EXPECT_TRUE(range_has_pattern(base, 4));
  EXPECT_TRUE(range_has_pattern(page(8), kPages - 8, 8));
  ASSERT_TRUE(test::settles(*as));
  // The freed pages' home slots are reused for new data.
  auto rep = dev->migrate_to_device(*as, page(4), 4 * kPageSize);
  ASSERT_TRUE(rep.is_ok());
  EXPECT_EQ(rep->pages_migrated, 4u);
  for (std::size_t i = 4; i < 8; ++i) EXPECT_EQ(page(i).as<volatile std::uint64_t>()[5], 0u) << i;
  ASSERT_TRUE(dev->migrate_to_system(*as, base, kLen).is_ok());
  EXPECT_TRUE(test::settles_to(dev->pagemap(), 0));
  EXPECT_EQ(page_frees(), kPages + 4);
  UHMM_EXPECT_INVARIANTS(*as);
}

// A frame on its way home is not mapped, so a MADV_DONTNEED meanwhile zaps
// nothing; when the migration puts the frame back (not migrated), the
// discard must still win.
TEST_P(CoherentTest, DontneedWhileAFrameIsAwayStillDiscardsIt) {
  to_device();
  ScopedMigrateVma mig(*as, base, base + 8 * kPageSize, dev->owner(), MIGRATE_VMA_SELECT_DEVICE_COHERENT);
  ASSERT_TRUE(mig.setup().is_ok());
  ASSERT_EQ(mig.args().cpages, 8u);
  ASSERT_EQ(::madvise(page(2).ptr(), 2 * kPageSize, MADV_DONTNEED), 0);
  mig.pages();  // dst 0: every frame goes back in
  mig.finalize();
  for (std::size_t i = 0; i < 8; ++i) {
    const std::uint64_t w = page(i).as<volatile std::uint64_t>()[5];
    if (i == 2 || i == 3) {
      EXPECT_EQ(w, 0u) << "discarded page " << i << " came back";
    } else {
      EXPECT_EQ(w, pattern_word(i, 5)) << i;
    }
  }
  EXPECT_TRUE(test::settles_to(dev->pagemap(), kPages - 2));
  EXPECT_EQ(page_frees(), 2u);
  ASSERT_TRUE(test::settles(*as));
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_P(CoherentTest, MremapMovesCoherentPagesWithTheirData) {
  to_device();
  void* target = ::mmap(nullptr, kLen, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(target, MAP_FAILED);
  const VirtAddr to = VirtAddr::of(target);
  ASSERT_EQ(::mremap(base.ptr(), kLen, kLen, MREMAP_MAYMOVE | MREMAP_FIXED, target), target);
  EXPECT_TRUE(range_has_pattern(to, kPages));
  ASSERT_TRUE(test::eventually([&] { return count_states(*as, to, kPages).coherent == kPages; }));
  const PageInfo info = as->page_info(to + 5 * kPageSize);
  ASSERT_NE(info.device_page, nullptr);
  EXPECT_EQ(info.device_page->mapping().address, to + 5 * kPageSize);
  EXPECT_EQ(page_frees(), 0u);
  UHMM_EXPECT_INVARIANTS(*as);
  // It migrates back from where it is now.
  ASSERT_TRUE(dev->migrate_to_system(*as, to, kLen).is_ok());
  EXPECT_EQ(count_states(*as, to, kPages).system, kPages);
  EXPECT_TRUE(range_has_pattern(to, kPages));
  EXPECT_TRUE(test::settles_to(dev->pagemap(), 0));
  EXPECT_EQ(page_frees(), kPages);
  EXPECT_TRUE(as->unmap(to).is_ok());
}

// fork copies coherent pages: the child reads the data; its writes stay its
// own, and the parent's pages stay coherent (fork does not evict them).
TEST_P(CoherentTest, ForkCopiesCoherentPagesAndTheParentKeepsThem) {
  to_device();
  const test::ChildResult child = test::run_in_child([&] {
    for (std::size_t i = 0; i < kPages; ++i)
      if (!test::page_has_pattern(page(i).ptr(), i)) return 1;
    fill_range(base, kPages, 900);  // the child's own copy
    return 0;
  });
  ASSERT_TRUE(child.exited) << child.describe();
  EXPECT_EQ(child.exit_code, 0);
  EXPECT_EQ(count_states(*as, base, kPages).coherent, kPages);
  EXPECT_EQ(counter(Counter::pgmigrate_to_ram), 0u);
  EXPECT_TRUE(range_has_pattern(base, kPages));
  // The frames were shared copy-on-write with the child: migrating them
  // back still works and keeps the parent's data, including a page the
  // parent wrote after the fork.
  fill_range(page(1), 1, 41);
  auto rep = dev->migrate_to_system(*as, base, kLen);
  ASSERT_TRUE(rep.is_ok());
  EXPECT_EQ(rep->pages_migrated, kPages);
  EXPECT_TRUE(range_has_pattern(base, 1));
  EXPECT_TRUE(range_has_pattern(page(1), 1, 41));
  EXPECT_TRUE(range_has_pattern(page(2), kPages - 2, 2));
  EXPECT_TRUE(test::settles_to(dev->pagemap(), 0));
  UHMM_EXPECT_INVARIANTS(*as);
}

// Eviction (migrate_device_range) of frames a fork left shared copy-on-write
// with the child: they come home with the parent's data, in one pass.
TEST_P(CoherentTest, EvictAllAfterForkBringsSharedFramesBack) {
  to_device();
  const test::ChildResult child = test::run_in_child([&] { return test::range_has_pattern(base, kPages) ? 0 : 1; });
  ASSERT_TRUE(child.exited) << child.describe();
  EXPECT_EQ(child.exit_code, 0);
  fill_range(page(3), 1, 77);
  auto rep = dev->evict_all();
  ASSERT_TRUE(rep.is_ok()) << rep.status().to_string();
  EXPECT_EQ(rep->pages_migrated, kPages);
  EXPECT_EQ(count_states(*as, base, kPages).system, kPages);
  EXPECT_TRUE(range_has_pattern(base, 3));
  EXPECT_TRUE(range_has_pattern(page(3), 1, 77));
  EXPECT_TRUE(range_has_pattern(page(4), kPages - 4, 4));
  EXPECT_TRUE(test::settles_to(dev->pagemap(), 0));
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_P(CoherentTest, RangeFaultReportsCoherentPagesAsPresentDevicePages) {
  to_device();
  const FaultCounts before(*as);
  const char other_owner = 0;
  for (const void* owner : {dev->owner(), static_cast<const void*>(&other_owner), static_cast<const void*>(nullptr)}) {
    for (std::uint64_t flags : {std::uint64_t{0}, std::uint64_t{HMM_PFN_REQ_FAULT},
                                std::uint64_t{HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE}}) {
      std::vector<std::uint64_t> pfns(kPages);
      HmmRange range;
      range.address_space = as.get();
      range.start = base;
      range.end = base + kLen;
      range.hmm_pfns = pfns.data();
      range.default_flags = flags;
      range.dev_private_owner = owner;
      ASSERT_TRUE(hmm_range_fault(range).is_ok());
      for (std::size_t i = 0; i < kPages; ++i) {
        const DevicePage* p = as->page_info(page(i)).device_page;
        ASSERT_NE(p, nullptr);
        EXPECT_EQ(pfns[i], p->pfn().value | HMM_PFN_VALID | HMM_PFN_WRITE) << "page " << i << " flags " << flags;
        EXPECT_TRUE(is_device_pfn(hmm_pfn_to_pfn(pfns[i])));
        EXPECT_EQ(hmm_pfn_to_device_page(pfns[i]), p);
      }
    }
  }
  EXPECT_TRUE(FaultCounts(*as) == before) << "hmm_range_fault faulted a coherent page";
  EXPECT_EQ(count_states(*as, base, kPages).coherent, kPages);

  // Read-only: VALID without WRITE, and a write request is EPERM.
  ASSERT_TRUE(as->protect(base, kLen, PROT_READ).is_ok());
  EXPECT_FALSE(as->page_info(page(0)).writable);
  std::vector<std::uint64_t> pfns(kPages);
  HmmRange range;
  range.address_space = as.get();
  range.start = base;
  range.end = base + kLen;
  range.hmm_pfns = pfns.data();
  range.default_flags = HMM_PFN_REQ_FAULT;
  ASSERT_TRUE(hmm_range_fault(range).is_ok());
  EXPECT_EQ(pfns[0], as->page_info(page(0)).device_page->pfn().value | HMM_PFN_VALID);
  range.default_flags = HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE;
  EXPECT_EQ(hmm_range_fault(range).code(), EPERM);
  EXPECT_EQ(count_states(*as, base, kPages).coherent, kPages);
  UHMM_EXPECT_INVARIANTS(*as);
}

// The physical frame mapped at `addr` (/proc/self/pagemap; 0 where the
// kernel hides frame numbers, as it does from unprivileged processes).
std::uint64_t frame_at(VirtAddr addr) {
  const int fd = ::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  std::uint64_t word = 0;
  const bool ok = ::pread(fd, &word, sizeof word, static_cast<off_t>((addr.value >> kPageShift) * sizeof word)) == sizeof word;
  ::close(fd);
  constexpr std::uint64_t kPresent = std::uint64_t{1} << 63;
  return ok && (word & kPresent) ? word & ((std::uint64_t{1} << 55) - 1) : 0;
}

// The kernel moves frames (UFFDIO_MOVE) only out of read-write ranges.
// Elsewhere a coherent page's frame stays where it is and becomes the
// system page: nothing is copied into the range and no address is touched,
// so a range moved or discarded meanwhile takes the frame along.  The
// driver's destination goes unused; it copied from a copy of the frame.
TEST_P(CoherentTest, ReadOnlyCoherentPagesComeBackAsTheFramesTheyWere) {
  to_device();
  fill_range(base, kPages, 40);  // written in device memory
  std::vector<std::uint64_t> frames(kPages);
  for (std::size_t i = 0; i < kPages; ++i) frames[i] = frame_at(page(i));
  ASSERT_TRUE(as->protect(base, kLen, PROT_READ).is_ok());
  const std::uint64_t frees = page_frees();
  auto rep = dev->migrate_to_system(*as, base, kLen);
  ASSERT_TRUE(rep.is_ok()) << rep.status().to_string();
  EXPECT_EQ(rep->pages_migrated, kPages);
  EXPECT_EQ(counter(Counter::pgmigrate_to_ram), kPages);
  EXPECT_EQ(count_states(*as, base, kPages).system, kPages);
  for (std::size_t i = 0; i < kPages; ++i) {
    EXPECT_FALSE(as->page_info(page(i)).writable) << i;
    if (frames[i] != 0) {
      EXPECT_EQ(frame_at(page(i)), frames[i]) << "page " << i << " got another frame";
    }
  }
  EXPECT_TRUE(range_has_pattern(base, kPages, 40));
  EXPECT_TRUE(test::settles_to(dev->pagemap(), 0));
  EXPECT_EQ(page_frees(), frees + kPages);
  // Made writable again, the range is plain memory, and the device pages
  // (their home slots emptied) are reused.
  ASSERT_TRUE(as->protect(base, kLen, PROT_READ | PROT_WRITE).is_ok());
  fill_range(base, kPages, 41);
  to_device();
  EXPECT_TRUE(range_has_pattern(base, kPages, 41));
  ASSERT_TRUE(dev->migrate_to_system(*as, base, kLen).is_ok());
  EXPECT_TRUE(range_has_pattern(base, kPages, 41));
  ASSERT_TRUE(test::settles(*as));
  UHMM_EXPECT_INVARIANTS(*as);
}

// PROT_NONE as well, where nothing can read the frame but the kernel: the
// pages come back (before, the copy home failed and they stayed).
TEST_P(CoherentTest, InaccessibleCoherentPagesComeBackToo) {
  to_device();
  ASSERT_TRUE(as->protect(base, kLen, PROT_NONE).is_ok());
  auto rep = dev->migrate_to_system(*as, base, kLen);
  ASSERT_TRUE(rep.is_ok()) << rep.status().to_string();
  EXPECT_EQ(rep->pages_migrated, kPages);
  EXPECT_EQ(count_states(*as, base, kPages).system, kPages);
  EXPECT_TRUE(test::settles_to(dev->pagemap(), 0));
  ASSERT_TRUE(as->protect(base, kLen, PROT_READ | PROT_WRITE).is_ok());
  EXPECT_TRUE(range_has_pattern(base, kPages));
  UHMM_EXPECT_INVARIANTS(*as);
}

// Eviction takes such frames the same way.
TEST_P(CoherentTest, EvictingReadOnlyCoherentPagesKeepsTheirFrames) {
  to_device();
  std::vector<std::uint64_t> frames(kPages);
  for (std::size_t i = 0; i < kPages; ++i) frames[i] = frame_at(page(i));
  ASSERT_TRUE(as->protect(base, kLen / 2, PROT_READ).is_ok());
  ASSERT_TRUE(as->protect(page(kPages / 2), kLen / 2, PROT_NONE).is_ok());
  auto rep = dev->evict_all();
  ASSERT_TRUE(rep.is_ok()) << rep.status().to_string();
  EXPECT_EQ(rep->pages_migrated, kPages);
  EXPECT_EQ(count_states(*as, base, kPages).system, kPages);
  for (std::size_t i = 0; i < kPages; ++i) {
    if (frames[i] != 0) {
      EXPECT_EQ(frame_at(page(i)), frames[i]) << "page " << i << " got another frame";
    }
  }
  EXPECT_TRUE(test::settles_to(dev->pagemap(), 0));
  ASSERT_TRUE(as->protect(base, kLen / 2, PROT_READ | PROT_WRITE).is_ok());
  ASSERT_TRUE(as->protect(page(kPages / 2), kLen / 2, PROT_READ | PROT_WRITE).is_ok());
  EXPECT_TRUE(range_has_pattern(base, kPages));
  UHMM_EXPECT_INVARIANTS(*as);
}

// A frame left in place cannot go to another device's memory (only a zap
// could take it off the address, docs/differences.md): such a page stays a
// coherent page, mapped and intact, and the migration says it failed.
TEST_P(CoherentTest, ReadOnlyCoherentPagesDoNotMoveToAnotherDevice) {
  to_device();
  ASSERT_TRUE(as->protect(base, kLen, PROT_READ).is_ok());
  std::vector<std::uint64_t> src(kPages), dst(kPages);
  MigrateVma m;
  m.address_space = as.get();
  m.start = base;
  m.end = base + kLen;
  m.src = src.data();
  m.dst = dst.data();
  m.pgmap_owner = dev->owner();
  m.flags = MIGRATE_VMA_SELECT_DEVICE_COHERENT;
  ASSERT_TRUE(migrate_vma_setup(m).is_ok());
  EXPECT_EQ(m.cpages, kPages);
  auto other = test::TestDriver::create(kPages);
  ASSERT_TRUE(other);
  for (std::size_t i = 0; i < kPages; ++i) {
    DevicePage* d = other->alloc();
    ASSERT_NE(d, nullptr);
    dst[i] = migrate_pfn(d->pfn()) | MIGRATE_PFN_WRITE;
  }
  migrate_vma_pages(m);
  for (std::size_t i = 0; i < kPages; ++i) EXPECT_FALSE(src[i] & MIGRATE_PFN_MIGRATE) << i;
  const std::uint64_t failed = counter(Counter::pgmigrate_fail);
  migrate_vma_finalize(m);
  EXPECT_EQ(counter(Counter::pgmigrate_fail), failed + kPages);
  EXPECT_EQ(count_states(*as, base, kPages).coherent, kPages);
  EXPECT_TRUE(range_has_pattern(base, kPages));
  EXPECT_TRUE(test::settles_to(other->pagemap(), 0));  // the destinations went back, unused
  EXPECT_EQ(other->bad_frees(), 0u);
  EXPECT_EQ(dev->pagemap().pages_in_use(), kPages);
  ASSERT_TRUE(as->protect(base, kLen, PROT_READ | PROT_WRITE).is_ok());
  ASSERT_TRUE(dev->migrate_to_system(*as, base, kLen).is_ok());
  EXPECT_TRUE(range_has_pattern(base, kPages));
  UHMM_EXPECT_INVARIANTS(*as);
}

// Read-only coherent pages migrating back while the application moves the
// range with mremap: the frames stay in place and so move with the range;
// every byte is where the range is, every round.
TEST_P(CoherentTest, ReadOnlyFramesComingBackWhileTheRangeMovesKeepEveryByte) {
  VirtAddr at = base;
  int bad_rounds = 0;
  for (int round = 0; round < 40; ++round) {
    ASSERT_TRUE(as->protect(at, kLen, PROT_READ | PROT_WRITE).is_ok());
    ASSERT_TRUE(dev->migrate_to_device(*as, at, kLen).is_ok());
    ASSERT_TRUE(as->protect(at, kLen, PROT_READ).is_ok());
    void* to = ::mmap(nullptr, kLen, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ASSERT_NE(to, MAP_FAILED);
    std::atomic<bool> go{false};
    std::thread migrator([&, from = at] {
      while (!go.load()) std::this_thread::yield();
      (void)dev->migrate_to_system(*as, from, kLen);
    });
    go.store(true);
    if (round % 2) std::this_thread::yield();  // vary who goes first
    void* moved = ::mremap(at.ptr(), kLen, kLen, MREMAP_MAYMOVE | MREMAP_FIXED, to);
    migrator.join();
    ASSERT_EQ(moved, to) << std::strerror(errno);
    at = VirtAddr::of(moved);
    ASSERT_TRUE(test::settles(*as));
    if (!range_has_pattern(at, kPages)) ++bad_rounds;
    // What the racing migration skipped (the range was changing) comes back
    // now, with its data.
    const auto back = dev->migrate_to_system(*as, at, kLen);
    ASSERT_TRUE(back.is_ok()) << back.status().to_string() << " round " << round;
    if (!range_has_pattern(at, kPages)) ++bad_rounds;
  }
  EXPECT_EQ(bad_rounds, 0);
  EXPECT_EQ(count_states(*as, at, kPages).system, kPages);
  EXPECT_TRUE(test::settles_to(dev->pagemap(), 0));
  UHMM_EXPECT_INVARIANTS(*as);
  EXPECT_TRUE(as->unmap(at).is_ok());
}

INSTANTIATE_TEST_SUITE_P(FaultModes, CoherentTest, ::testing::Values(FaultMode::kServiceThreads, FaultMode::kInThread),
                         [](const ::testing::TestParamInfo<FaultMode>& mode) { return test::fault_mode_name(mode.param); });

}  // namespace
}  // namespace uhmm
