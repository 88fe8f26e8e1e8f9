// End-to-end: changes the application makes to managed memory directly,
// behind uhmm's back, reach uhmm (userfaultfd events) and the notifiers:
// munmap (whole or partial: device pages released, page_free called, the
// rest stays managed and intact), MADV_DONTNEED and MADV_FREE (device pages
// discarded: the next access reads zeros, even right after the call),
// mremap (device pages and the registration move with the range), and
// mremap with MREMAP_DONTUNMAP (the old range stays managed, empty).
// Each test runs with both fault modes.
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "e2e/test_support.hpp"
#include "uhmm/uhmm.hpp"

extern "C" const char* __tsan_default_options() { return "report_signal_unsafe=0"; }  // kInThread: ADR 0004

namespace uhmm {
namespace {

using test::count_states;
using test::range_has_pattern;

constexpr std::size_t kBlock = kPagesPerHugePage;
constexpr std::size_t kPages = 2 * kBlock;
constexpr std::size_t kLen = kPages * kPageSize;

using Recorder = test::RecordingNotifierOps;

class AddressSpaceEvents : public ::testing::TestWithParam<FaultMode> {
 protected:
  void SetUp() override {
    as = test::make_address_space(GetParam());
    dev = test::make_device(kLen + kHugePageSize);
    ASSERT_TRUE(as && dev);
    auto r = as->map(kLen);
    ASSERT_TRUE(r.is_ok());
    base = *r;
    test::fill_range(base, kPages);
    ASSERT_TRUE(test::settles(*as));
    auto rep = dev->migrate_to_device(*as, base, kLen);
    ASSERT_TRUE(rep.is_ok() && rep->pages_migrated == kPages);
    ASSERT_TRUE(interval_notifier_insert(watch, *as, base, kLen, recorder).is_ok());
  }
  void TearDown() override {
    interval_notifier_remove(watch);
    dev.reset();
    as.reset();
  }
  VirtAddr page(std::size_t i) const { return base + i * kPageSize; }
  bool device_pages_become(std::uint64_t n) {
    return test::eventually([&] { return dev->pagemap().pages_in_use() == n; });
  }
  std::uint64_t counter(Counter c) const { return as->stats().get(c); }

  std::unique_ptr<AddressSpace> as;
  std::unique_ptr<sim::SimDevice> dev;
  VirtAddr base;
  Recorder recorder;
  IntervalNotifier watch;
};

TEST_P(AddressSpaceEvents, MunmapReleasesTheDevicePagesAndTheRange) {
  ASSERT_EQ(::munmap(base.ptr(), kLen), 0);
  EXPECT_TRUE(device_pages_become(0));  // page_free ran for every page
  EXPECT_TRUE(test::eventually([&] { return !as->find_region(base).has_value(); }));
  EXPECT_EQ(counter(Counter::device_pages_dropped), kPages);
  EXPECT_TRUE(recorder.saw(NotifyEvent::kUnmap));
  EXPECT_EQ(as->unmap(base).code(), EINVAL);  // nothing left to unmap
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_P(AddressSpaceEvents, AwaitChangesReturnsOnceTheChangeIsApplied) {
  // No polling: everything below must hold the moment await_changes returns.
  for (int round = 0; round < 20; ++round) {
    const std::size_t first = 16 * static_cast<std::size_t>(round);
    ASSERT_EQ(::madvise(page(first).ptr(), 8 * kPageSize, MADV_DONTNEED), 0);
    as->await_changes();
    const auto states = count_states(*as, page(first), 8);
    EXPECT_EQ(states.device, 0u) << "round " << round;
    EXPECT_EQ(states.locked, 0u) << "round " << round;
    EXPECT_EQ(dev->pagemap().pages_in_use(), kPages - 8 * (round + 1u)) << "round " << round;
  }
  ASSERT_EQ(::munmap(base.ptr(), kLen), 0);
  as->await_changes();
  EXPECT_FALSE(as->find_region(base).has_value());
  EXPECT_EQ(dev->pagemap().pages_in_use(), 0u);
  EXPECT_TRUE(recorder.saw(NotifyEvent::kUnmap));
}

TEST_P(AddressSpaceEvents, PartialMunmapOfA2MiBDeviceBlockKeepsTheRest) {
  // The middle half of the first 2 MiB block goes.
  const std::size_t lo = 128, hi = 384;
  ASSERT_EQ(::munmap(page(lo).ptr(), (hi - lo) * kPageSize), 0);
  EXPECT_TRUE(device_pages_become(kPages - (hi - lo)));
  ASSERT_TRUE(test::eventually([&] { return !as->find_region(page(lo)).has_value(); }));
  const auto left = as->find_region(base);
  const auto right = as->find_region(page(hi));
  ASSERT_TRUE(left && right);
  EXPECT_EQ(left->start, base);
  EXPECT_EQ(left->length, lo * kPageSize);
  EXPECT_EQ(right->start, page(hi));
  EXPECT_EQ(right->end(), base + kLen);
  // What is left still faults back with its data, and migrates again.
  EXPECT_TRUE(range_has_pattern(base, lo));
  EXPECT_TRUE(range_has_pattern(page(hi), kPages - hi, hi));
  ASSERT_TRUE(dev->migrate_to_device(*as, page(hi), (kPages - hi) * kPageSize).is_ok());
  EXPECT_TRUE(range_has_pattern(page(hi), kPages - hi, hi));
  ASSERT_TRUE(test::settles(*as));
  UHMM_EXPECT_INVARIANTS(*as);
}

// Regression (a CI crash): right after munmap returns, its event is read
// but may not be processed yet, so the range is still one region in uhmm's
// books.  A fault on a device page next to the hole then asked the device
// to bring back a fault-around window spanning the hole; by the time the
// device set up the migration the region was split, setup failed, and the
// access ended in SIGBUS.  The window is the device's choice; the faulting
// page must come back whatever happens around it.
TEST_P(AddressSpaceEvents, AccessRightAfterAPartialMunmapBringsBackItsNeighbours) {
  for (int round = 0; round < 40; ++round) {
    auto r = as->map(kLen);
    ASSERT_TRUE(r.is_ok());
    const VirtAddr scratch = *r;
    test::fill_range(scratch, kPages, 7000);
    // The second block goes to the device (the fixture's pages fill the rest).
    ASSERT_TRUE(dev->migrate_to_device(*as, scratch + kBlock * kPageSize, kBlock * kPageSize).is_ok());
    const std::size_t hole = kBlock + 64 + round, hole_pages = 100;
    ASSERT_EQ(::munmap((scratch + hole * kPageSize).ptr(), hole_pages * kPageSize), 0);
    const std::size_t after = hole + hole_pages;
    ASSERT_TRUE(test::page_has_pattern((scratch + after * kPageSize).ptr(), 7000 + after)) << "round " << round;
    ASSERT_TRUE(test::page_has_pattern((scratch + (hole - 1) * kPageSize).ptr(), 7000 + hole - 1));
    ASSERT_EQ(::munmap(scratch.ptr(), kLen), 0);
    ASSERT_TRUE(device_pages_become(kPages));
    // Both pieces gone: the munmap is processed (its sweeps lock entries).
    ASSERT_TRUE(test::eventually([&] {
      return !as->find_region(scratch).has_value() && !as->find_region(scratch + after * kPageSize).has_value();
    }));
  }
  EXPECT_EQ(counter(Counter::migrate_to_ram_fail), 0u);
  ASSERT_TRUE(test::settles(*as));
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_P(AddressSpaceEvents, DontneedDiscardsDevicePagesEvenForTheVeryNextAccess) {
  ASSERT_EQ(::madvise(page(10).ptr(), 20 * kPageSize, MADV_DONTNEED), 0);
  // No waiting: the access right after the call must not bring the
  // discarded device data back.
  for (std::size_t i = 10; i < 30; ++i) ASSERT_EQ(page(i).as<volatile std::uint64_t>()[3], 0u) << "page " << i;
  EXPECT_TRUE(range_has_pattern(base, 10));
  EXPECT_TRUE(range_has_pattern(page(30), kPages - 30, 30));
  EXPECT_TRUE(device_pages_become(0));
  EXPECT_EQ(counter(Counter::device_pages_dropped), 20u);
  EXPECT_TRUE(recorder.saw(NotifyEvent::kClear));
  ASSERT_TRUE(test::settles(*as));
  UHMM_EXPECT_INVARIANTS(*as);
}

// Pages in transit are not mapped, so a MADV_DONTNEED then zaps nothing;
// the migration must not put the old data back when it ends (the
// FaultAroundDoesNotUndo... test below met this by chance, when a late
// fault's fault-around migration overlapped the discard).
TEST_P(AddressSpaceEvents, DontneedOfPagesInTransitKeepsThemDiscarded) {
  constexpr std::size_t kSmall = 16;
  auto r = as->map(kSmall * kPageSize);
  ASSERT_TRUE(r.is_ok());
  const VirtAddr small = *r;
  test::fill_range(small, kSmall, 1000);
  ScopedMigrateVma mig(*as, small, small + kSmall * kPageSize, dev->owner(), MIGRATE_VMA_SELECT_SYSTEM);
  ASSERT_TRUE(mig.setup().is_ok());
  ASSERT_EQ(mig.args().cpages, kSmall);
  // dst stays 0: every page is restored at finalize, except those the
  // application discards meanwhile.
  ASSERT_EQ(::madvise((small + 4 * kPageSize).ptr(), 4 * kPageSize, MADV_DONTNEED), 0);
  mig.pages();
  mig.finalize();
  for (std::size_t i = 0; i < kSmall; ++i) {
    const std::uint64_t w = (small + i * kPageSize).as<volatile std::uint64_t>()[0];
    if (i >= 4 && i < 8) {
      EXPECT_EQ(w, 0u) << "discarded page " << i << " came back";
    } else {
      EXPECT_EQ(w, test::pattern_word(1000 + i, 0)) << "page " << i;
    }
  }
  ASSERT_TRUE(test::settles(*as));
  UHMM_EXPECT_INVARIANTS(*as);
}

// Regression (found by a stress test): a fault next to the discarded part,
// in the same 2 MiB block, brings back the block around it (fault-around);
// it must not bring back the discarded pages.  It did, twice over: the
// application's REMOVE event, lying inside a 2 MiB zap of uhmm's own whose
// event was still queued, was taken for uhmm's (and dropped), and uhmm's
// then for the application's (dropping the whole block's entries).
// mremap of pages a migration holds: the kernel moves an empty range (the
// pages are in transit), so finalize must put them where the range went,
// not back at the old address (gone, or left empty by MREMAP_DONTUNMAP).
TEST_P(AddressSpaceEvents, MremapOfPagesInTransitTakesThemAlong) {
  for (const int extra_flags : {0, MREMAP_DONTUNMAP}) {
    constexpr std::size_t kSmall = 16;
    auto r = as->map(kSmall * kPageSize);
    ASSERT_TRUE(r.is_ok());
    const VirtAddr small = *r;
    test::fill_range(small, kSmall, 2000);
    ScopedMigrateVma mig(*as, small, small + kSmall * kPageSize, dev->owner(), MIGRATE_VMA_SELECT_SYSTEM);
    ASSERT_TRUE(mig.setup().is_ok());
    ASSERT_EQ(mig.args().cpages, kSmall);
    // dst stays 0 for the first half (restored at finalize); the second
    // half goes to fresh system pages the "driver" filled.
    std::vector<std::uint64_t> pfns(kSmall / 2);
    ASSERT_TRUE(alloc_system_pages(*as, pfns).is_ok());
    for (std::size_t i = kSmall / 2; i < kSmall; ++i) {
      auto* to = static_cast<std::uint64_t*>(reinterpret_cast<void*>(pfns[i - kSmall / 2] << kPageShift));
      for (std::size_t k = 0; k < test::kWordsPerPage; ++k) to[k] = test::pattern_word(3000 + i, k);
      mig.args().dst[i] = migrate_pfn(pfns[i - kSmall / 2]);
    }
    // (MREMAP_FIXED: a move to the same size would otherwise stay put.)
    void* target = ::mmap(nullptr, kSmall * kPageSize, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ASSERT_NE(target, MAP_FAILED);
    void* moved = ::mremap(small.ptr(), kSmall * kPageSize, kSmall * kPageSize,
                           MREMAP_MAYMOVE | MREMAP_FIXED | extra_flags, target);
    ASSERT_EQ(moved, target) << "flags " << extra_flags << ": " << std::strerror(errno);
    const VirtAddr to = VirtAddr::of(moved);
    mig.pages();
    mig.finalize();
    EXPECT_TRUE(range_has_pattern(to, kSmall / 2, 2000)) << "flags " << extra_flags;
    EXPECT_TRUE(range_has_pattern(to + kSmall / 2 * kPageSize, kSmall / 2, 3000 + kSmall / 2)) << "flags " << extra_flags;
    if (extra_flags == MREMAP_DONTUNMAP) {
      // The old range stays managed and empty: zeros, not the data.
      for (std::size_t i = 0; i < kSmall; ++i)
        EXPECT_EQ((small + i * kPageSize).as<volatile std::uint64_t>()[0], 0u) << "old page " << i;
      ASSERT_EQ(::munmap(small.ptr(), kSmall * kPageSize), 0);
    }
    ASSERT_EQ(::munmap(moved, kSmall * kPageSize), 0);
    ASSERT_TRUE(test::settles(*as));
    UHMM_EXPECT_INVARIANTS(*as);
  }
}

TEST_P(AddressSpaceEvents, FaultAroundDoesNotUndoADontneedNextToIt) {
  for (int round = 0; round < 20; ++round) {
    const std::size_t first = 40 + round;
    ASSERT_TRUE(dev->migrate_to_device(*as, base, kLen).is_ok());
    ASSERT_EQ(::madvise(page(first).ptr(), 30 * kPageSize, MADV_DONTNEED), 0);
    // First touch a page of the same block outside the discarded part.
    EXPECT_TRUE(test::page_has_pattern(page(first - 1).ptr(), first - 1));
    for (std::size_t i = first; i < first + 30; ++i) {
      const auto st = as->page_info(page(i)).state;
      ASSERT_EQ(page(i).as<volatile std::uint64_t>()[0], 0u) << "round " << round << " page " << i << " state before " << static_cast<int>(st) << " events " << as->stats().get(Counter::uffd_events);
    }
    EXPECT_TRUE(test::page_has_pattern(page(first + 30).ptr(), first + 30));
    test::fill_range(page(first), 30, first);  // restore for the next round
  }
  ASSERT_TRUE(test::settles(*as));
  UHMM_EXPECT_INVARIANTS(*as);
}

// MADV_FREE looks like MADV_DONTNEED to userfaultfd; uhmm discards the
// device pages, which MADV_FREE allows (docs/address-space-events.md).
TEST_P(AddressSpaceEvents, MadvFreeDiscardsDevicePagesAndKeepsLaterWrites) {
  ASSERT_EQ(::madvise(page(0).ptr(), 8 * kPageSize, MADV_FREE), 0);
  EXPECT_EQ(page(2).as<volatile std::uint64_t>()[0], 0u);
  page(3).as<volatile std::uint64_t>()[0] = 99;
  EXPECT_EQ(page(3).as<volatile std::uint64_t>()[0], 99u);
  EXPECT_TRUE(range_has_pattern(page(8), kPages - 8, 8));
  EXPECT_TRUE(device_pages_become(0));
  ASSERT_TRUE(test::settles(*as));
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_P(AddressSpaceEvents, MremapMovesDevicePagesAndTheRegistration) {
  void* target = ::mmap(nullptr, kLen + kHugePageSize, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(target, MAP_FAILED);
  const VirtAddr to{(reinterpret_cast<std::uintptr_t>(target) + kHugePageSize - 1) & ~(kHugePageSize - 1)};
  void* moved = ::mremap(base.ptr(), kLen, kLen, MREMAP_MAYMOVE | MREMAP_FIXED, to.ptr());
  ASSERT_EQ(moved, to.ptr());
  // Straight away: the data is there at the new address.
  EXPECT_TRUE(range_has_pattern(to, kBlock));
  ASSERT_TRUE(test::eventually([&] { return !as->find_region(base).has_value(); }));
  const auto region = as->find_region(to);
  ASSERT_TRUE(region);
  EXPECT_EQ(region->start, to);
  EXPECT_EQ(region->length, kLen);
  // The second block is still on the device, now mapped at the new place.
  EXPECT_EQ(count_states(*as, to + kBlock * kPageSize, kBlock).device, kBlock);
  EXPECT_TRUE(range_has_pattern(to + kBlock * kPageSize, kBlock, kBlock));
  EXPECT_TRUE(recorder.saw(NotifyEvent::kUnmap));
  EXPECT_TRUE(device_pages_become(0));
  ASSERT_TRUE(test::settles(*as));
  UHMM_EXPECT_INVARIANTS(*as);
  EXPECT_TRUE(as->unmap(to).is_ok());
  ::munmap(target, kLen + kHugePageSize);
}

TEST_P(AddressSpaceEvents, MremapDontunmapLeavesTheOldRangeManagedAndEmpty) {
  void* moved = ::mremap(base.ptr(), kBlock * kPageSize, kBlock * kPageSize, MREMAP_MAYMOVE | MREMAP_DONTUNMAP, nullptr);
  ASSERT_NE(moved, MAP_FAILED);
  const VirtAddr to = VirtAddr::of(moved);
  EXPECT_TRUE(range_has_pattern(to, kBlock));
  for (std::size_t i = 0; i < kBlock; i += 64) EXPECT_EQ(page(i).as<volatile std::uint64_t>()[1], 0u) << i;
  EXPECT_TRUE(as->find_region(base).has_value());
  EXPECT_TRUE(as->find_region(to).has_value());
  EXPECT_TRUE(range_has_pattern(page(kBlock), kBlock, kBlock));  // the block that did not move
  EXPECT_TRUE(device_pages_become(0));
  ASSERT_TRUE(test::settles(*as));
  UHMM_EXPECT_INVARIANTS(*as);
  EXPECT_TRUE(as->unmap(to).is_ok());
}

// mremap growing a range in place reports no event: the first access to
// the new part tells uhmm, which takes it into the range.
TEST_P(AddressSpaceEvents, MremapGrowingInPlaceExtendsTheManagedRange) {
  void* p = ::mmap(nullptr, 16 * kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(p, MAP_FAILED);
  const VirtAddr mine = VirtAddr::of(p);
  ASSERT_EQ(::munmap((mine + 8 * kPageSize).ptr(), 8 * kPageSize), 0);  // room to grow into
  test::fill_range(mine, 8, 500);
  ASSERT_TRUE(as->adopt(mine, 8 * kPageSize).is_ok());
  ASSERT_TRUE(dev->migrate_to_device(*as, mine, 8 * kPageSize).is_ok());
  void* grown = ::mremap(p, 8 * kPageSize, 16 * kPageSize, 0);
  if (grown == MAP_FAILED) GTEST_SKIP() << "something was mapped right after the range meanwhile";
  ASSERT_EQ(grown, p);
  // The new part reads as zeros and takes writes, in both fault modes.
  EXPECT_EQ((mine + 12 * kPageSize).as<volatile std::uint64_t>()[0], 0u);
  test::fill_range(mine + 8 * kPageSize, 8, 508);
  const auto region = as->find_region(mine + 12 * kPageSize);
  ASSERT_TRUE(region.has_value());
  EXPECT_EQ(region->start, mine);
  EXPECT_EQ(region->length, 16 * kPageSize);
  // It is managed memory like the rest: it migrates and comes back.
  auto rep = dev->migrate_to_device(*as, mine, 16 * kPageSize);
  ASSERT_TRUE(rep.is_ok());
  EXPECT_EQ(rep->pages_migrated, 8u);  // the first half is there already
  EXPECT_TRUE(range_has_pattern(mine, 16, 500));
  ASSERT_TRUE(test::settles(*as));
  UHMM_EXPECT_INVARIANTS(*as);
  EXPECT_TRUE(as->unmap(mine).is_ok());
  ::munmap(p, 16 * kPageSize);
}

// Migrations both ways on a range that the application keeps moving with
// mremap: every move must take every byte along, whether the pages are on
// the device, in the page tables or in transit when the range moves.
// `extra_flags` MREMAP_DONTUNMAP moves the range between two places, each
// move leaving its old place mapped and empty.
enum class Racer { kMigrations, kExclusive };

void migrations_racing_mremap_keep_every_byte(AddressSpace& as, sim::SimDevice& dev, int extra_flags,
                                              Racer racer = Racer::kMigrations) {
  constexpr std::size_t kMoved = 64;
  constexpr std::size_t kBytes = kMoved * kPageSize;
  auto r = as.map(kBytes);
  ASSERT_TRUE(r.is_ok());
  test::fill_range(*r, kMoved, 5000);
  void* other = ::mmap(nullptr, kBytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(other, MAP_FAILED);
  std::atomic<std::uintptr_t> current{r->value};
  std::atomic<bool> done{false};
  std::thread migrator([&] {
    for (int i = 0; !done.load(); ++i) {
      const VirtAddr at{current.load()};
      if (racer == Racer::kExclusive) {
        (void)dev.make_exclusive(as, at + (i % kMoved) * kPageSize, kPageSize);  // frames leave for the device
      } else {
        (void)(i % 2 ? dev.migrate_to_system(as, at, kBytes) : dev.migrate_to_device(as, at, kBytes));
      }
    }
  });
  int bad_rounds = 0;
  std::uint64_t events = as.stats().get(Counter::uffd_events);
  for (int round = 0; round < 200; ++round) {
    void* to = other;
    if (extra_flags == MREMAP_DONTUNMAP) {
      other = reinterpret_cast<void*>(current.load());
    } else {
      to = ::mmap(nullptr, kBytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      ASSERT_NE(to, MAP_FAILED);
    }
    void* moved = ::mremap(reinterpret_cast<void*>(current.load()), kBytes, kBytes,
                           MREMAP_MAYMOVE | MREMAP_FIXED | extra_flags, to);
    ASSERT_EQ(moved, to) << std::strerror(errno);
    // A REMAP, and an UNMAP: of the old place, or with MREMAP_DONTUNMAP of
    // the target, once that is the managed old place of the move before.
    events += (extra_flags == MREMAP_DONTUNMAP && round == 0) ? 1 : 2;
    current.store(reinterpret_cast<std::uintptr_t>(moved));
    if (!range_has_pattern(VirtAddr::of(moved), kMoved, 5000)) ++bad_rounds;
  }
  done.store(true);
  migrator.join();
  EXPECT_EQ(bad_rounds, 0);
  const VirtAddr last{current.load()};
  EXPECT_TRUE(range_has_pattern(last, kMoved, 5000));
  std::vector<void*> managed{last.ptr()};
  if (extra_flags == MREMAP_DONTUNMAP) {
    managed.push_back(other);  // the last move's old place, left managed
  } else {
    ASSERT_EQ(::munmap(other, kBytes), 0);  // never managed: no event
  }
  for (void* p : managed) ASSERT_EQ(::munmap(p, kBytes), 0);
  // The invariants hold once every change is processed.  The kernel reuses
  // the addresses, so no region there or gone says that: count the events.
  ASSERT_TRUE(test::eventually([&] { return as.stats().get(Counter::uffd_events) >= events + managed.size(); }));
  ASSERT_TRUE(test::settles(as));
  UHMM_EXPECT_INVARIANTS(as);
}

TEST_P(AddressSpaceEvents, MigrationsRacingMremapKeepEveryByte) {
  migrations_racing_mremap_keep_every_byte(*as, *dev, 0);
}

TEST_P(AddressSpaceEvents, MigrationsRacingMremapDontunmapKeepEveryByte) {
  migrations_racing_mremap_keep_every_byte(*as, *dev, MREMAP_DONTUNMAP);
}

// The same with exclusive access: frames leave the range for the device's
// atomics (and come back on the CPU's next access) while it moves.
TEST_P(AddressSpaceEvents, ExclusiveAccessRacingMremapKeepsEveryByte) {
  migrations_racing_mremap_keep_every_byte(*as, *dev, 0, Racer::kExclusive);
}

// With MREMAP_DONTUNMAP ping-ponging between two places: an exclusive frame
// goes back only where the queued changes say its page is (it was once given
// back to an address whose change was still unread, and the data was lost).
TEST_P(AddressSpaceEvents, ExclusiveAccessRacingMremapDontunmapKeepsEveryByte) {
  migrations_racing_mremap_keep_every_byte(*as, *dev, MREMAP_DONTUNMAP, Racer::kExclusive);
}

// The same with device-coherent memory: the range's frames go home to the
// device and come back, the moves racing the application's mremap.
std::unique_ptr<sim::SimDevice> coherent_device() {
  sim::SimDeviceOptions d;
  d.memory_type = PagemapType::kCoherent;
  d.memory_bytes = 16u << 20;
  d.warm_memory = false;
  auto dev = sim::SimDevice::create(d);
  EXPECT_TRUE(dev.is_ok()) << dev.status().to_string();
  return dev.is_ok() ? std::move(*dev) : nullptr;
}

TEST_P(AddressSpaceEvents, CoherentMigrationsRacingMremapKeepEveryByte) {
  auto coherent = coherent_device();
  ASSERT_TRUE(coherent);
  migrations_racing_mremap_keep_every_byte(*as, *coherent, 0);
}

// It once hung with service threads: the sim sets up a batch while it holds
// the one before, and un-sharing the new batch's frames faulted on pages
// the application had just moved away, a fault that waited for the move to
// be processed, which waited for the entries held.
TEST_P(AddressSpaceEvents, CoherentMigrationsRacingMremapDontunmapKeepEveryByte) {
  auto coherent = coherent_device();
  ASSERT_TRUE(coherent);
  migrations_racing_mremap_keep_every_byte(*as, *coherent, MREMAP_DONTUNMAP);
}

INSTANTIATE_TEST_SUITE_P(FaultModes, AddressSpaceEvents,
                         ::testing::Values(FaultMode::kServiceThreads, FaultMode::kInThread),
                         [](const ::testing::TestParamInfo<FaultMode>& mode) { return test::fault_mode_name(mode.param); });

}  // namespace
}  // namespace uhmm

namespace uhmm {
namespace {

// Regression (a hang): a driver that pipelines its batches sets one up
// while it still holds the one before.  The application has moved the range
// meanwhile, and the move waits to be processed until the first batch's
// entries are free.  Setup of the second batch un-shares its coherent
// frames with write faults; those pages are gone, so the faults wait for
// the move too.  Setup must come back (it skips what the move covers), and
// nothing may be lost.  In a child, so that a hang ends as a failure.
TEST(AddressSpaceEventsRegression, PipelinedSetupAfterAnUnprocessedMremapComesBack) {
  const test::ChildResult r = test::run_in_child(
      [] {
        auto as = AddressSpace::create(AddressSpaceOptions{});  // service threads
        if (!as.is_ok()) return 10;
        auto dev = coherent_device();
        if (!dev) return 11;
        constexpr std::size_t kRange = 64, kHalf = 32, kBytes = kRange * kPageSize;
        auto m = (*as)->map(kBytes);
        if (!m.is_ok()) return 12;
        test::fill_range(*m, kRange, 7000);
        auto moved = dev->migrate_to_device(**as, *m, kBytes);
        if (!moved.is_ok() || moved->pages_migrated != kRange) return 13;
        const VirtAddr half = *m + kHalf * kPageSize;
        ScopedMigrateVma first(**as, *m, half, dev->owner(), MIGRATE_VMA_SELECT_DEVICE_COHERENT);
        if (!first.setup().is_ok()) return 14;
        void* other = ::mmap(nullptr, kBytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (other == MAP_FAILED) return 15;
        // Returns once its REMAP is read; processing it waits for `first`.
        std::thread application([&] {
          (void)::mremap(m->ptr(), kBytes, kBytes, MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP, other);
        });
        application.join();
        ScopedMigrateVma second(**as, half, *m + kBytes, dev->owner(), MIGRATE_VMA_SELECT_DEVICE_COHERENT);
        (void)second.setup();
        second.pages();
        second.finalize();
        first.pages();  // every dst is 0: nothing migrates, the frames go back
        first.finalize();
        if (!test::range_has_pattern(VirtAddr::of(other), kRange, 7000)) return 16;
        return 0;
      },
      30);
  EXPECT_TRUE(r.exited && r.exit_code == 0) << "child " << r.describe();
}

// Regression (a CI hang): uhmm's own MADV_DONTNEED waits until a reader
// reads its REMOVE event.  With one service thread, that thread itself is
// the one waiting (filling a whole 2 MiB hole with a huge page drops the
// block's page table first); the backup reader must step in.  In a child,
// so that a hang ends as a failure.
TEST(AddressSpaceEventsRegression, OwnZapNeverWaitsForABlockedServiceThread) {
  const test::ChildResult r = test::run_in_child([] {
    AddressSpaceOptions o;
    o.fault_threads = 1;
    auto as = AddressSpace::create(o);
    if (!as.is_ok()) return 10;
    auto m = (*as)->map(8 * kHugePageSize);
    if (!m.is_ok()) return 11;
    for (std::size_t b = 0; b < 8; ++b)
      if ((*m + b * kHugePageSize).as<volatile std::uint64_t>()[7] != 0) return 12;
    if ((*as)->stats().get(Counter::hole_faults) < 8) return 13;
    return 0;
  });
  EXPECT_TRUE(r.exited && r.exit_code == 0) << "child " << r.describe();
}

// Regression (the stress test's rare hang): while an application's munmap
// waits in the kernel for its UNMAP event to be read, the kernel refuses
// UFFDIO_COPY and UFFDIO_MOVE on the managed uffd with EAGAIN.  A service
// thread installing a page must then read the uffd itself: here it is the
// only reader, busy in a slow migrate_to_ram when the munmap comes.  In a
// child, so that a hang ends as a failure.
TEST(AddressSpaceEventsRegression, InstallingAPageReadsTheEventThatHoldsItBack) {
  const test::ChildResult r = test::run_in_child(
      [] {
        AddressSpaceOptions o;
        o.fault_threads = 1;
        auto as = AddressSpace::create(o);
        sim::SimDeviceOptions d;
        d.memory_bytes = 4 << 20;
        d.warm_memory = false;
        d.prefetch_blocks = 0;
        d.link.setup_latency = std::chrono::milliseconds(300);
        auto dev = sim::SimDevice::create(d);
        if (!as.is_ok() || !dev.is_ok()) return 10;
        auto m = (*as)->map(kHugePageSize);
        auto other = (*as)->map(kHugePageSize);
        if (!m.is_ok() || !other.is_ok()) return 11;
        // A few pages, installed with UFFDIO_COPY: a whole block would move
        // in after a zap of uhmm's own, whose backup reader reads the event.
        test::fill_range(*m, 4);
        auto rep = (*dev)->migrate_to_device(**as, *m, 4 * kPageSize);
        if (!rep.is_ok() || rep->pages_migrated != 4) return 12;
        bool intact = false;
        std::thread cpu([&] { intact = test::page_has_pattern(m->ptr(), 0); });  // 300 ms in migrate_to_ram
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
        ::munmap(other->ptr(), kHugePageSize);  // returns once its event is read
        cpu.join();
        return intact ? 0 : 13;
      },
      10);
  EXPECT_TRUE(r.exited && r.exit_code == 0) << "child " << r.describe();
}

}  // namespace
}  // namespace uhmm
