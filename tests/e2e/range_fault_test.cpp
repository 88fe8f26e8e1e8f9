// End-to-end: hmm_range_fault, one test per row of its behaviour table
// (hmm-semantics section 4; docs/mirroring.md): present pages, holes,
// the driver's own device pages, another device's pages, pages under
// migration, unmanaged addresses, poisoned pages, the request encoding
// (default_flags and pfn_flags_mask), EBUSY from the notifier sequence, and
// bad input.  Every test runs with both fault modes.
//
// Fault-around is off (one page per hole fill and per migrate_to_ram), so
// that a fault requested for one page never makes its neighbours present
// and every result word can be predicted exactly.
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "e2e/test_support.hpp"
#include "migrate/test_driver.hpp"
#include "uhmm/uhmm.hpp"

// FaultMode::kInThread serves faults (which allocate) in a SIGBUS handler;
// see in_thread_faults_test.cpp.
extern "C" const char* __tsan_default_options() { return "report_signal_unsafe=0"; }

namespace uhmm {
namespace {

using test::fill_range;
using test::range_has_pattern;

constexpr std::uint64_t kReqFault = HMM_PFN_REQ_FAULT;
constexpr std::uint64_t kReqWrite = HMM_PFN_REQ_WRITE;

/// The result word of a present, writable system page at `a`.
std::uint64_t system_word(VirtAddr a) { return a.vpn().value | HMM_PFN_VALID | HMM_PFN_WRITE; }

/// The result word of a device page as the page table holds it.
std::uint64_t device_word(const PageInfo& info) {
  return info.device_page->pfn().value | HMM_PFN_VALID | (info.writable ? std::uint64_t{HMM_PFN_WRITE} : 0);
}

/// A driver's invalidate(): records the sequence under its lock.
struct Mirror : IntervalNotifierOps {
  bool invalidate(IntervalNotifier& sub, const NotifyRange&, std::uint64_t cur_seq) override {
    std::lock_guard lock(mutex);
    sub.set_seq(cur_seq);
    ++calls;
    return true;
  }
  std::mutex mutex;
  int calls = 0;
};

class RangeFault : public ::testing::TestWithParam<FaultMode> {
 protected:
  void SetUp() override {
    AddressSpaceOptions o;
    o.fault_mode = GetParam();
    o.hole_fault_around_pages = 1;
    auto as_r = AddressSpace::create(o);
    ASSERT_TRUE(as_r.is_ok()) << as_r.status().to_string();
    as = std::move(*as_r);
    dev = make_device();
    other = make_device();
    ASSERT_TRUE(dev && other);
  }
  void TearDown() override {
    interval_notifier_remove(sub);
    other.reset();
    dev.reset();
    as.reset();
  }

  static std::unique_ptr<sim::SimDevice> make_device() {
    sim::SimDeviceOptions o;
    o.memory_bytes = 64 << 20;
    o.warm_memory = false;
    o.fault_around_pages = 1;
    o.prefetch_blocks = 0;
    auto r = sim::SimDevice::create(o);
    EXPECT_TRUE(r.is_ok()) << r.status().to_string();
    return r.is_ok() ? std::move(*r) : nullptr;
  }

  /// A managed range of `pages`, pages [0, filled) written with the
  /// pattern (seed = page index), the rest never touched.
  VirtAddr mapped(std::size_t pages, std::size_t filled) {
    auto r = as->map(pages * kPageSize);
    EXPECT_TRUE(r.is_ok()) << r.status().to_string();
    if (!r.is_ok()) return VirtAddr{};
    fill_range(*r, filled);
    EXPECT_TRUE(test::settles(*as));
    return *r;
  }

  /// Runs hmm_range_fault over `pfns.size()` pages from `start`.
  Status walk(VirtAddr start, std::vector<std::uint64_t>& pfns, std::uint64_t default_flags,
              std::uint64_t mask = 0, const void* owner = nullptr, IntervalNotifier* notifier = nullptr,
              std::uint64_t seq = 0) {
    HmmRange range;
    range.address_space = as.get();
    range.notifier = notifier;
    range.notifier_seq = seq;
    range.start = start;
    range.end = start + pfns.size() * kPageSize;
    range.hmm_pfns = pfns.data();
    range.default_flags = default_flags;
    range.pfn_flags_mask = mask;
    range.dev_private_owner = owner;
    return hmm_range_fault(range);
  }

  std::uint64_t counter(Counter c) const { return as->stats().get(c); }

  std::unique_ptr<AddressSpace> as;
  std::unique_ptr<sim::SimDevice> dev;    // "our" device: dev_private_owner in most walks
  std::unique_ptr<sim::SimDevice> other;  // another driver's device
  Mirror mirror;
  IntervalNotifier sub;
};

// ---- present system pages -------------------------------------------------

TEST_P(RangeFault, PresentPageReportsItsOwnPageNumberWithoutFaulting) {
  constexpr std::size_t kPages = 8;
  const VirtAddr base = mapped(kPages, kPages);
  const std::uint64_t faults = counter(Counter::uffd_faults);
  for (std::uint64_t flags : {std::uint64_t{0}, kReqFault}) {
    std::vector<std::uint64_t> pfns(kPages, 0);
    ASSERT_TRUE(walk(base, pfns, flags).is_ok());
    for (std::size_t i = 0; i < kPages; ++i) {
      const VirtAddr a = base + i * kPageSize;
      EXPECT_EQ(pfns[i], system_word(a)) << "page " << i << " flags " << flags;
      EXPECT_EQ(hmm_pfn_to_map_order(pfns[i]), 0u);
      EXPECT_FALSE(is_device_pfn(hmm_pfn_to_pfn(pfns[i])));
      EXPECT_EQ(hmm_pfn_to_device_page(pfns[i]), nullptr);
      // What the device reads through the pfn is the page's data.
      ASSERT_EQ(hmm_pfn_to_host(pfns[i]), a.ptr());
      EXPECT_TRUE(test::page_has_pattern(hmm_pfn_to_host(pfns[i]), i));
    }
  }
  EXPECT_EQ(counter(Counter::uffd_faults), faults);
}

TEST_P(RangeFault, PresentPageWithWriteRequestIsWritableAndNotFaulted) {
  constexpr std::size_t kPages = 8;
  const VirtAddr base = mapped(kPages, kPages);
  const std::uint64_t faults = counter(Counter::uffd_faults);
  std::vector<std::uint64_t> pfns(kPages, 0);
  ASSERT_TRUE(walk(base, pfns, kReqFault | kReqWrite).is_ok());
  for (std::size_t i = 0; i < kPages; ++i) EXPECT_EQ(pfns[i], system_word(base + i * kPageSize)) << i;
  EXPECT_EQ(counter(Counter::uffd_faults), faults);
  EXPECT_TRUE(range_has_pattern(base, kPages));
}

// ---- the request: (entry & pfn_flags_mask) | default_flags ------------------

TEST_P(RangeFault, PerEntryRequestsFaultOnlyTheEntriesThatAskThroughTheMask) {
  constexpr std::size_t kPages = 16;
  const VirtAddr base = mapped(kPages, 0);
  std::vector<std::uint64_t> pfns(kPages);
  for (std::size_t i = 0; i < kPages; ++i) {
    // Bits outside the mask (a stale pfn, ERROR) must not matter.
    pfns[i] = (i % 2 == 0 ? kReqFault : 0) | 0x1234 | HMM_PFN_ERROR;
    if (i % 4 == 2) pfns[i] |= kReqWrite;
  }
  // REQ_WRITE alone (odd entries with i % 4 == 3) asks for nothing.
  for (std::size_t i = 3; i < kPages; i += 4) pfns[i] = kReqWrite;
  ASSERT_TRUE(walk(base, pfns, 0, kReqFault | kReqWrite).is_ok());
  for (std::size_t i = 0; i < kPages; ++i) {
    const VirtAddr a = base + i * kPageSize;
    if (i % 2 == 0) {
      EXPECT_EQ(pfns[i], system_word(a)) << i;
      EXPECT_EQ(as->page_info(a).state, PageInfo::State::kSystem) << i;
    } else {
      EXPECT_EQ(pfns[i], 0u) << i;
      EXPECT_EQ(as->page_info(a).state, PageInfo::State::kNone) << i;
    }
  }
}

TEST_P(RangeFault, MaskZeroIgnoresEveryEntrysRequest) {
  constexpr std::size_t kPages = 8;
  const VirtAddr base = mapped(kPages, 0);
  std::vector<std::uint64_t> pfns(kPages, kReqFault | kReqWrite);
  ASSERT_TRUE(walk(base, pfns, 0, 0).is_ok());
  for (std::size_t i = 0; i < kPages; ++i) EXPECT_EQ(pfns[i], 0u) << i;
  EXPECT_EQ(test::count_states(*as, base, kPages).none, kPages);
}

TEST_P(RangeFault, DefaultFlagsFaultEveryEntryWhateverItHolds) {
  constexpr std::size_t kPages = 8;
  const VirtAddr base = mapped(kPages, 0);
  std::vector<std::uint64_t> pfns(kPages, 0);
  pfns[3] = 0xdead;  // garbage input, masked away
  ASSERT_TRUE(walk(base, pfns, kReqFault, 0).is_ok());
  for (std::size_t i = 0; i < kPages; ++i) EXPECT_EQ(pfns[i], system_word(base + i * kPageSize)) << i;
  EXPECT_EQ(test::count_states(*as, base, kPages).system, kPages);
}

// ---- holes -----------------------------------------------------------------

TEST_P(RangeFault, HoleWithoutFaultRequestIsZeroAndStaysAHole) {
  constexpr std::size_t kPages = 8;
  const VirtAddr base = mapped(kPages, 2);
  const std::uint64_t holes = counter(Counter::hole_faults);
  std::vector<std::uint64_t> pfns(kPages, 0xffff);
  ASSERT_TRUE(walk(base, pfns, 0).is_ok());
  for (std::size_t i = 0; i < kPages; ++i)
    EXPECT_EQ(pfns[i], i < 2 ? system_word(base + i * kPageSize) : 0u) << i;
  EXPECT_EQ(test::count_states(*as, base, kPages).none, kPages - 2);
  EXPECT_EQ(counter(Counter::hole_faults), holes);
}

TEST_P(RangeFault, HoleWithFaultRequestIsZeroFilledAndPresent) {
  constexpr std::size_t kPages = 8;
  const VirtAddr base = mapped(kPages, 0);
  const std::uint64_t holes = counter(Counter::hole_faults);
  std::vector<std::uint64_t> pfns(kPages, 0);
  ASSERT_TRUE(walk(base, pfns, kReqFault).is_ok());
  for (std::size_t i = 0; i < kPages; ++i) EXPECT_EQ(pfns[i], system_word(base + i * kPageSize)) << i;
  EXPECT_EQ(counter(Counter::hole_faults), holes + kPages);
  EXPECT_EQ(test::count_states(*as, base, kPages).system, kPages);
  // The pages are really there: reading them faults no more, and they are zero.
  const std::uint64_t faults = counter(Counter::uffd_faults);
  for (std::size_t i = 0; i < kPages * test::kWordsPerPage; ++i)
    ASSERT_EQ(base.as<volatile std::uint64_t>()[i], 0u) << "word " << i;
  EXPECT_EQ(counter(Counter::uffd_faults), faults);
  UHMM_EXPECT_INVARIANTS(*as);
}

// ---- device-private pages ----------------------------------------------------

TEST_P(RangeFault, OwnDevicePageReportsItsDevicePfnAndIsNeverFaulted) {
  constexpr std::size_t kPages = 8;
  const VirtAddr base = mapped(kPages, kPages);
  auto rep = dev->migrate_to_device(*as, base, kPages * kPageSize);
  ASSERT_TRUE(rep.is_ok() && rep->pages_migrated == kPages);
  const std::uint64_t device_faults = counter(Counter::device_private_faults);
  for (std::uint64_t flags : {std::uint64_t{0}, kReqFault, kReqFault | kReqWrite}) {
    std::vector<std::uint64_t> pfns(kPages, 0);
    ASSERT_TRUE(walk(base, pfns, flags, 0, dev->owner()).is_ok());
    for (std::size_t i = 0; i < kPages; ++i) {
      const PageInfo info = as->page_info(base + i * kPageSize);
      ASSERT_EQ(info.state, PageInfo::State::kDevicePrivate) << i;
      EXPECT_TRUE(info.writable);
      EXPECT_EQ(pfns[i], device_word(info)) << i;
      EXPECT_TRUE(is_device_pfn(hmm_pfn_to_pfn(pfns[i])));
      EXPECT_EQ(hmm_pfn_to_device_page(pfns[i]), info.device_page);
      EXPECT_EQ(hmm_pfn_to_host(pfns[i]), nullptr);
      EXPECT_TRUE(test::page_has_pattern(dev->page_memory(*info.device_page), i));
    }
  }
  EXPECT_EQ(counter(Counter::device_private_faults), device_faults);
  EXPECT_EQ(test::count_states(*as, base, kPages).device, kPages);
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_P(RangeFault, OtherOwnersDevicePageWithoutFaultRequestIsZero) {
  constexpr std::size_t kPages = 8;
  const VirtAddr base = mapped(kPages, kPages);
  auto rep = other->migrate_to_device(*as, base, kPages * kPageSize);
  ASSERT_TRUE(rep.is_ok() && rep->pages_migrated == kPages);
  const std::uint64_t device_faults = counter(Counter::device_private_faults);
  std::vector<std::uint64_t> pfns(kPages, kReqFault);
  ASSERT_TRUE(walk(base, pfns, 0, 0, dev->owner()).is_ok());
  for (std::size_t i = 0; i < kPages; ++i) EXPECT_EQ(pfns[i], 0u) << i;
  EXPECT_EQ(counter(Counter::device_private_faults), device_faults);
  EXPECT_EQ(test::count_states(*as, base, kPages).device, kPages);
}

TEST_P(RangeFault, OtherOwnersDevicePageWithFaultRequestComesBackIntact) {
  constexpr std::size_t kPages = 8;
  const VirtAddr base = mapped(kPages, kPages);
  auto rep = other->migrate_to_device(*as, base, kPages * kPageSize);
  ASSERT_TRUE(rep.is_ok() && rep->pages_migrated == kPages);
  const std::uint64_t device_faults = counter(Counter::device_private_faults);
  std::vector<std::uint64_t> pfns(kPages, 0);
  ASSERT_TRUE(walk(base, pfns, kReqFault, 0, dev->owner()).is_ok());
  for (std::size_t i = 0; i < kPages; ++i) EXPECT_EQ(pfns[i], system_word(base + i * kPageSize)) << i;
  EXPECT_EQ(counter(Counter::device_private_faults), device_faults + kPages);  // one migrate_to_ram per page
  EXPECT_EQ(test::count_states(*as, base, kPages).system, kPages);
  EXPECT_TRUE(test::settles_to(other->pagemap(), 0));
  EXPECT_TRUE(range_has_pattern(base, kPages));
  UHMM_EXPECT_INVARIANTS(*as);
}

// ---- device-exclusive entries ----------------------------------------------

TEST_P(RangeFault, ExclusiveEntryIsZeroWithoutFaultEvenForItsOwner) {
  constexpr std::size_t kPages = 4;
  const VirtAddr base = mapped(kPages, kPages);
  ASSERT_TRUE(other->make_exclusive(*as, base, kPages * kPageSize).is_ok());
  for (const void* owner : {static_cast<const void*>(nullptr), other->owner(), dev->owner()}) {
    std::vector<std::uint64_t> pfns(kPages, kReqFault);
    ASSERT_TRUE(walk(base, pfns, 0, 0, owner).is_ok());
    for (std::size_t i = 0; i < kPages; ++i) EXPECT_EQ(pfns[i], 0u) << i;
  }
  EXPECT_EQ(test::count_states(*as, base, kPages).exclusive, kPages);
  EXPECT_EQ(counter(Counter::device_exclusive_revoked), 0u);
}

TEST_P(RangeFault, ExclusiveEntryWithFaultRequestIsRevokedAndPresent) {
  constexpr std::size_t kPages = 4;
  const VirtAddr base = mapped(kPages, kPages);
  ASSERT_TRUE(other->make_exclusive(*as, base, kPages * kPageSize).is_ok());
  std::vector<std::uint64_t> pfns(kPages, 0);
  ASSERT_TRUE(walk(base, pfns, kReqFault | kReqWrite, 0, dev->owner()).is_ok());
  for (std::size_t i = 0; i < kPages; ++i) EXPECT_EQ(pfns[i], system_word(base + i * kPageSize)) << i;
  EXPECT_EQ(counter(Counter::device_exclusive_revoked), kPages);
  EXPECT_EQ(other->exclusive_pages(*as, base, kPages * kPageSize), 0u);
  EXPECT_TRUE(range_has_pattern(base, kPages));
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_P(RangeFault, NoOwnerMeansEveryDevicePageIsAnotherOwners) {
  constexpr std::size_t kPages = 4;
  const VirtAddr base = mapped(kPages, kPages);
  ASSERT_TRUE(dev->migrate_to_device(*as, base, kPages * kPageSize).is_ok());
  std::vector<std::uint64_t> pfns(kPages, 0x5a5a);
  ASSERT_TRUE(walk(base, pfns, 0, 0, nullptr).is_ok());
  for (std::size_t i = 0; i < kPages; ++i) EXPECT_EQ(pfns[i], 0u) << i;
  ASSERT_TRUE(walk(base, pfns, kReqFault, 0, nullptr).is_ok());
  for (std::size_t i = 0; i < kPages; ++i) EXPECT_EQ(pfns[i], system_word(base + i * kPageSize)) << i;
  EXPECT_TRUE(range_has_pattern(base, kPages));
}

// ---- pages under migration ----------------------------------------------------

TEST_P(RangeFault, PageUnderMigrationIsZeroWithoutFaultAndWaitedOutWithIt) {
  constexpr std::size_t kPages = 4;
  const VirtAddr base = mapped(kPages, kPages);
  const VirtAddr page = base + kPageSize;
  // Collect page 1 and hold it: its entry stays locked until finalize.
  ScopedMigrateVma mig(*as, page, page + kPageSize, dev->owner(), MIGRATE_VMA_SELECT_SYSTEM);
  ASSERT_TRUE(mig.setup().is_ok());
  ASSERT_TRUE(mig.src()[0] & MIGRATE_PFN_MIGRATE);
  ASSERT_TRUE(as->page_info(page).locked);

  std::vector<std::uint64_t> pfns(kPages, 0x5a5a);  // no mask: the input is ignored
  ASSERT_TRUE(walk(base, pfns, 0).is_ok());
  EXPECT_EQ(pfns[0], system_word(base));
  EXPECT_EQ(pfns[1], 0u);  // in transit: not present
  EXPECT_EQ(pfns[2], system_word(base + 2 * kPageSize));

  std::atomic<bool> done{false};
  Status faulting;
  std::vector<std::uint64_t> waited(kPages, 0);
  std::thread t([&] {
    faulting = walk(base, waited, kReqFault);
    done.store(true);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_FALSE(done.load()) << "the faulting walk did not wait for the migration";
  // The driver gives up on the page (dst = 0): it is restored in place.
  mig.pages();
  mig.finalize();
  t.join();
  ASSERT_TRUE(faulting.is_ok()) << faulting.to_string();
  for (std::size_t i = 0; i < kPages; ++i) EXPECT_EQ(waited[i], system_word(base + i * kPageSize)) << i;
  EXPECT_TRUE(range_has_pattern(base, kPages));
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_P(RangeFault, WaitedOutMigrationToOwnDeviceIsReportedNotBroughtBack) {
  constexpr std::size_t kPages = 4;
  const VirtAddr base = mapped(kPages, kPages);
  auto driver = test::TestDriver::create(kPages);
  ASSERT_TRUE(driver);
  test::RawMigration mig(*as, base, base + kPages * kPageSize, driver->owner(), MIGRATE_VMA_SELECT_SYSTEM);
  ASSERT_TRUE(mig.setup().is_ok());
  ASSERT_EQ(mig.migrating(), kPages);

  std::atomic<bool> done{false};
  Status faulting;
  std::vector<std::uint64_t> pfns(kPages, 0);
  std::thread t([&] {
    faulting = walk(base, pfns, kReqFault | kReqWrite, 0, driver->owner());
    done.store(true);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_FALSE(done.load()) << "the faulting walk did not wait for the migration";
  ASSERT_EQ(driver->copy_to_device(mig.src.data(), mig.dst.data(), kPages), kPages);
  mig.pages_and_finalize();
  t.join();
  ASSERT_TRUE(faulting.is_ok()) << faulting.to_string();
  for (std::size_t i = 0; i < kPages; ++i) {
    const PageInfo info = as->page_info(base + i * kPageSize);
    ASSERT_EQ(info.state, PageInfo::State::kDevicePrivate) << i;
    EXPECT_EQ(pfns[i], device_word(info)) << i;
    EXPECT_TRUE(test::buffer_has_pattern(driver->memory(*info.device_page), i));
  }
  EXPECT_EQ(driver->migrate_to_ram_calls(), 0u);
  // The pages go with the range, before the driver does.
  ASSERT_TRUE(as->unmap(base).is_ok());
  EXPECT_TRUE(driver->books_balanced());
}

// ---- no usable mapping ---------------------------------------------------------

TEST_P(RangeFault, UnmanagedAddressIsErrorWithoutFaultAndEfaultWithIt) {
  constexpr std::size_t kPages = 4;
  // Ordinary memory the process has but uhmm does not manage, and a
  // PROT_NONE reservation: neither is a managed mapping.
  for (int prot : {PROT_READ | PROT_WRITE, PROT_NONE}) {
    void* p = ::mmap(nullptr, kPages * kPageSize, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ASSERT_NE(p, MAP_FAILED);
    const VirtAddr base = VirtAddr::of(p);
    std::vector<std::uint64_t> pfns(kPages, 0);
    ASSERT_TRUE(walk(base, pfns, 0).is_ok());
    for (std::size_t i = 0; i < kPages; ++i) EXPECT_EQ(pfns[i], std::uint64_t{HMM_PFN_ERROR}) << i;
    std::vector<std::uint64_t> faulting(kPages, 0);
    EXPECT_EQ(walk(base, faulting, kReqFault).code(), EFAULT);
    // One entry asking is enough.
    std::vector<std::uint64_t> one(kPages, 0);
    one[2] = kReqFault;
    EXPECT_EQ(walk(base, one, 0, kReqFault).code(), EFAULT);
    ::munmap(p, kPages * kPageSize);
  }
  // A managed PROT_NONE range (ERROR / EFAULT) and REQ_WRITE on a managed
  // read-only range (EPERM) are tested with AddressSpace::protect in
  // protect_test.cpp.
}

TEST_P(RangeFault, RangeSpanningTwoRegionsAndAGap) {
  constexpr std::size_t kPart = 8;  // pages in each region and in the gap
  void* p = ::mmap(nullptr, 3 * kPart * kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(p, MAP_FAILED);
  const VirtAddr first = VirtAddr::of(p);
  const VirtAddr gap = first + kPart * kPageSize;
  const VirtAddr second = gap + kPart * kPageSize;
  ASSERT_EQ(::mprotect(gap.ptr(), kPart * kPageSize, PROT_NONE), 0);
  ASSERT_TRUE(as->adopt(first, kPart * kPageSize).is_ok());
  ASSERT_TRUE(as->adopt(second, kPart * kPageSize).is_ok());
  fill_range(first, kPart, 0);
  fill_range(second, kPart / 2, 100);  // the second half stays holes
  ASSERT_TRUE(test::settles(*as));

  std::vector<std::uint64_t> pfns(3 * kPart, 0);
  ASSERT_TRUE(walk(first, pfns, 0).is_ok());
  for (std::size_t i = 0; i < 3 * kPart; ++i) {
    const VirtAddr a = first + i * kPageSize;
    std::uint64_t want = 0;
    if (i < kPart || (i >= 2 * kPart && i < 2 * kPart + kPart / 2)) want = system_word(a);
    if (i >= kPart && i < 2 * kPart) want = HMM_PFN_ERROR;
    EXPECT_EQ(pfns[i], want) << "page " << i;
  }

  // Asking for a fault everywhere fails on the gap.
  std::vector<std::uint64_t> all(3 * kPart, 0);
  EXPECT_EQ(walk(first, all, kReqFault).code(), EFAULT);

  // Asking only for managed pages succeeds: the holes are filled, the gap
  // stays ERROR.
  std::vector<std::uint64_t> managed(3 * kPart, 0);
  for (std::size_t i = 0; i < 3 * kPart; ++i)
    if (i < kPart || i >= 2 * kPart) managed[i] = kReqFault;
  ASSERT_TRUE(walk(first, managed, 0, kReqFault).is_ok());
  for (std::size_t i = 0; i < 3 * kPart; ++i) {
    const VirtAddr a = first + i * kPageSize;
    EXPECT_EQ(managed[i], (i >= kPart && i < 2 * kPart) ? std::uint64_t{HMM_PFN_ERROR} : system_word(a))
        << "page " << i;
  }
  EXPECT_TRUE(range_has_pattern(first, kPart, 0));
  EXPECT_TRUE(range_has_pattern(second, kPart / 2, 100));
  ASSERT_TRUE(as->unmap(first).is_ok());
  ASSERT_TRUE(as->unmap(second).is_ok());
  ::munmap(p, 3 * kPart * kPageSize);
}

// ---- a device that cannot bring its page back ------------------------------------

TEST_P(RangeFault, PoisonedPageIsEfaultWhenAskedForAndTheOwnerStillSeesIt) {
  constexpr std::size_t kPages = 4;
  const VirtAddr base = mapped(kPages, kPages);
  ASSERT_TRUE(other->migrate_to_device(*as, base, kPages * kPageSize).is_ok());
  other->faults().fail_migrate_to_ram(true);

  // The fault hmm_range_fault makes fails: EFAULT, and the page is poisoned
  // (the CPU would get SIGBUS).  Nothing here touches the page.
  std::vector<std::uint64_t> pfns(kPages, 0);
  EXPECT_EQ(walk(base, pfns, kReqFault, 0, dev->owner()).code(), EFAULT);
  ASSERT_TRUE(as->page_info(base).poisoned);
  const std::uint64_t failures = counter(Counter::migrate_to_ram_fail);
  EXPECT_GE(failures, 1u);

  // Asked again: EFAULT at once, without calling the broken device again.
  EXPECT_EQ(walk(base, pfns, kReqFault, 0, dev->owner()).code(), EFAULT);
  EXPECT_EQ(counter(Counter::migrate_to_ram_fail), failures);

  // Without a fault request it is another owner's device page: 0, as the
  // kernel reports a device-private entry it is not asked to fault.
  std::vector<std::uint64_t> snapshot(kPages, 0xffff);
  ASSERT_TRUE(walk(base, snapshot, 0, 0, dev->owner()).is_ok());
  for (std::size_t i = 0; i < kPages; ++i) EXPECT_EQ(snapshot[i], 0u) << i;

  // Its owner still has the data and still mirrors it.
  std::vector<std::uint64_t> own(kPages, 0);
  ASSERT_TRUE(walk(base, own, kReqFault, 0, other->owner()).is_ok());
  for (std::size_t i = 0; i < kPages; ++i) {
    const PageInfo info = as->page_info(base + i * kPageSize);
    ASSERT_EQ(info.state, PageInfo::State::kDevicePrivate);
    EXPECT_EQ(own[i], device_word(info)) << i;
  }

  // The device recovers; an explicit migration brings everything back.
  other->faults().fail_migrate_to_ram(false);
  auto back = other->migrate_to_system(*as, base, kPages * kPageSize);
  ASSERT_TRUE(back.is_ok() && back->pages_migrated == kPages);
  ASSERT_FALSE(as->page_info(base).poisoned);
  std::vector<std::byte> buf(kPages * kPageSize);
  ASSERT_TRUE(as->read(base, buf).is_ok());  // a syscall: EFAULT rather than SIGBUS if still poisoned
  for (std::size_t i = 0; i < kPages; ++i) EXPECT_TRUE(test::buffer_has_pattern(buf.data() + i * kPageSize, i));
  ASSERT_TRUE(walk(base, pfns, kReqFault, 0, dev->owner()).is_ok());
  for (std::size_t i = 0; i < kPages; ++i) EXPECT_EQ(pfns[i], system_word(base + i * kPageSize)) << i;
}

// ---- the notifier sequence ---------------------------------------------------------

TEST_P(RangeFault, InvalidationAfterReadBeginIsEbusy) {
  constexpr std::size_t kPages = 8;
  const VirtAddr base = mapped(kPages, kPages);
  ASSERT_TRUE(interval_notifier_insert(sub, *as, base, kPages * kPageSize, mirror).is_ok());

  std::uint64_t seq = sub.read_begin();
  std::vector<std::uint64_t> pfns(kPages, 0);
  ASSERT_TRUE(walk(base, pfns, kReqFault, 0, dev->owner(), &sub, seq).is_ok());  // nothing happened: ok

  seq = sub.read_begin();
  ASSERT_TRUE(dev->migrate_to_device(*as, base + 2 * kPageSize, 2 * kPageSize).is_ok());  // invalidates
  std::vector<std::uint64_t> stale(kPages, 0x77);
  EXPECT_EQ(walk(base, stale, kReqFault, 0, dev->owner(), &sub, seq).code(), EBUSY);
  for (std::size_t i = 0; i < kPages; ++i) EXPECT_EQ(stale[i], 0x77u) << "EBUSY before walking leaves entries alone";

  // A new read section sees the migration.
  seq = sub.read_begin();
  ASSERT_TRUE(walk(base, pfns, kReqFault, 0, dev->owner(), &sub, seq).is_ok());
  for (std::size_t i = 0; i < kPages; ++i) {
    const PageInfo info = as->page_info(base + i * kPageSize);
    EXPECT_EQ(pfns[i], (i == 2 || i == 3) ? device_word(info) : system_word(base + i * kPageSize)) << i;
  }
}

TEST_P(RangeFault, DriverLoopRetriesWhenItsOwnFaultInvalidatesTheRange) {
  // Faulting another device's page back migrates it, which invalidates the
  // range: the walk that asked for it returns EBUSY and the driver retries,
  // as with the kernel.  The loop of docs/mirroring.md.
  constexpr std::size_t kPages = 4;
  const VirtAddr base = mapped(kPages, kPages);
  ASSERT_TRUE(other->migrate_to_device(*as, base, kPages * kPageSize).is_ok());
  ASSERT_TRUE(interval_notifier_insert(sub, *as, base, kPages * kPageSize, mirror).is_ok());

  std::vector<std::uint64_t> pfns(kPages);
  std::vector<std::uint64_t> programmed;
  std::vector<int> codes;
  for (int attempt = 0; attempt < 100 && programmed.empty(); ++attempt) {
    const std::uint64_t seq = sub.read_begin();
    std::fill(pfns.begin(), pfns.end(), std::uint64_t{0});
    const Status s = walk(base, pfns, kReqFault, 0, dev->owner(), &sub, seq);
    codes.push_back(s.code());
    if (s.code() == EBUSY) continue;
    ASSERT_TRUE(s.is_ok()) << s.to_string();
    std::lock_guard lock(mirror.mutex);
    if (sub.read_retry(seq)) continue;
    programmed = pfns;  // "program the device", under the driver lock
  }
  ASSERT_EQ(programmed.size(), kPages);
  ASSERT_GE(codes.size(), 2u);
  EXPECT_EQ(codes.front(), EBUSY);  // the first fault moved a page: stale
  EXPECT_LE(codes.size(), kPages + 1);  // each retry makes progress (fault-around is off)
  for (std::size_t i = 0; i < kPages; ++i) EXPECT_EQ(programmed[i], system_word(base + i * kPageSize)) << i;
  EXPECT_TRUE(range_has_pattern(base, kPages));
}

// ---- bad input -------------------------------------------------------------------

TEST_P(RangeFault, BadInputIsEinval) {
  const VirtAddr base = mapped(4, 4);
  std::vector<std::uint64_t> pfns(4, 0);
  HmmRange good;
  good.address_space = as.get();
  good.start = base;
  good.end = base + 4 * kPageSize;
  good.hmm_pfns = pfns.data();
  ASSERT_TRUE(hmm_range_fault(good).is_ok());

  HmmRange r = good;
  r.address_space = nullptr;
  EXPECT_EQ(hmm_range_fault(r).code(), EINVAL);
  r = good;
  r.hmm_pfns = nullptr;
  EXPECT_EQ(hmm_range_fault(r).code(), EINVAL);
  r = good;
  r.start = base + 8;
  EXPECT_EQ(hmm_range_fault(r).code(), EINVAL);
  r = good;
  r.end = good.end + 8;
  EXPECT_EQ(hmm_range_fault(r).code(), EINVAL);
  r = good;
  r.end = base;
  EXPECT_EQ(hmm_range_fault(r).code(), EINVAL);
  r = good;
  r.start = good.end;
  r.end = base;
  EXPECT_EQ(hmm_range_fault(r).code(), EINVAL);
}

// ---- a large walk, word by word ------------------------------------------------------

TEST_P(RangeFault, SixtyFourMiBAcrossTwoRegionsEveryWordChecked) {
  // Two 32 MiB regions with a 2 MiB PROT_NONE gap.  Per region, in 2 MiB
  // blocks: system pages, pages on our device, pages on the other device,
  // holes, and one block mixing all four page by page.
  constexpr std::size_t kRegionPages = (32u << 20) / kPageSize;
  constexpr std::size_t kGapPages = kPagesPerHugePage;
  constexpr std::size_t kTotal = 2 * kRegionPages + kGapPages;
  void* p = ::mmap(nullptr, kTotal * kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
  ASSERT_NE(p, MAP_FAILED);
  const VirtAddr start = VirtAddr::of(p);
  const VirtAddr second = start + (kRegionPages + kGapPages) * kPageSize;
  ASSERT_EQ(::mprotect((start + kRegionPages * kPageSize).ptr(), kGapPages * kPageSize, PROT_NONE), 0);
  ASSERT_TRUE(as->adopt(start, kRegionPages * kPageSize).is_ok());
  ASSERT_TRUE(as->adopt(second, kRegionPages * kPageSize).is_ok());

  enum Kind { kSystem, kOurs, kTheirs, kHole, kGap };
  auto kind_of = [&](std::size_t i) -> Kind {
    if (i >= kRegionPages && i < kRegionPages + kGapPages) return kGap;
    const std::size_t in_region = i < kRegionPages ? i : i - kRegionPages - kGapPages;
    const std::size_t block = in_region / kPagesPerHugePage;
    if (block == 5) return static_cast<Kind>(in_region % 4);  // the mixed block
    switch (block % 4) {
      case 0: return kSystem;
      case 1: return kOurs;
      case 2: return kTheirs;
      default: return kHole;
    }
  };
  for (std::size_t i = 0; i < kTotal; ++i)
    if (kind_of(i) != kHole && kind_of(i) != kGap) test::fill_page((start + i * kPageSize).ptr(), i);
  ASSERT_TRUE(test::settles(*as));
  // Move runs of each device's pages.
  for (std::size_t i = 0; i < kTotal;) {
    const Kind k = kind_of(i);
    std::size_t j = i + 1;
    while (j < kTotal && kind_of(j) == k) ++j;
    if (k == kOurs || k == kTheirs) {
      auto rep = (k == kOurs ? dev : other)->migrate_to_device(*as, start + i * kPageSize, (j - i) * kPageSize);
      ASSERT_TRUE(rep.is_ok() && rep->pages_migrated == j - i) << "pages " << i << ".." << j;
    }
    i = j;
  }

  auto check = [&](const std::vector<std::uint64_t>& pfns, bool faulted) {
    std::size_t bad = 0;
    for (std::size_t i = 0; i < kTotal && bad < 10; ++i) {
      const VirtAddr a = start + i * kPageSize;
      std::uint64_t want = 0;
      switch (kind_of(i)) {
        case kSystem: want = system_word(a); break;
        case kOurs: want = device_word(as->page_info(a)); break;
        case kTheirs:
        case kHole: want = faulted ? system_word(a) : 0; break;
        case kGap: want = HMM_PFN_ERROR; break;
      }
      if (pfns[i] != want) {
        ++bad;
        ADD_FAILURE() << "page " << i << " (kind " << kind_of(i) << "): " << std::hex << pfns[i] << ", expected "
                      << want;
      }
    }
  };

  std::vector<std::uint64_t> pfns(kTotal, 0x5a5a);  // no mask: the input is ignored
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(walk(start, pfns, 0, 0, dev->owner()).is_ok());
  const auto t1 = std::chrono::steady_clock::now();
  check(pfns, false);
  RecordProperty("snapshot_walk_us",
                 static_cast<int>(std::chrono::duration_cast<std::chrono::microseconds>(t1 - t0).count()));

  // Fault every managed page (the gap asks for nothing).
  for (std::size_t i = 0; i < kTotal; ++i) pfns[i] = kind_of(i) == kGap ? 0 : kReqFault;
  ASSERT_TRUE(walk(start, pfns, 0, kReqFault, dev->owner()).is_ok());
  check(pfns, true);
  EXPECT_TRUE(test::settles_to(other->pagemap(), 0));
  for (std::size_t i = 0; i < kTotal; ++i) {
    const Kind k = kind_of(i);
    const VirtAddr a = start + i * kPageSize;
    if (k == kSystem || k == kTheirs) {
      ASSERT_TRUE(test::page_has_pattern(a.ptr(), i)) << "page " << i;
    } else if (k == kHole) {
      ASSERT_EQ(a.as<volatile std::uint64_t>()[7], 0u) << "page " << i;
    }
  }
  UHMM_EXPECT_INVARIANTS(*as);
  ASSERT_TRUE(as->unmap(start).is_ok());  // adopted: our device's pages come back first
  ASSERT_TRUE(as->unmap(second).is_ok());
  ::munmap(p, kTotal * kPageSize);
}

TEST_P(RangeFault, WalkOf256MiBPresentPagesFaultsNothing) {
  // An adopted range whose pages the application populated before: a
  // snapshot walk of it is pure page-table reading.
  constexpr std::size_t kPages = (256u << 20) / kPageSize;
  void* p = ::mmap(nullptr, kPages * kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(p, MAP_FAILED);
  ASSERT_EQ(::madvise(p, kPages * kPageSize, MADV_POPULATE_WRITE), 0);
  const VirtAddr base = VirtAddr::of(p);
  ASSERT_TRUE(as->adopt(base, kPages * kPageSize).is_ok());
  const std::uint64_t faults = counter(Counter::uffd_faults);
  std::vector<std::uint64_t> pfns(kPages, 0);
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(walk(base, pfns, kReqFault, 0, dev->owner()).is_ok());
  const auto t1 = std::chrono::steady_clock::now();
  for (std::size_t i = 0; i < kPages; ++i) ASSERT_EQ(pfns[i], system_word(base + i * kPageSize)) << i;
  EXPECT_EQ(counter(Counter::uffd_faults), faults);
  const auto us = std::chrono::duration_cast<std::chrono::microseconds>(t1 - t0).count();
  RecordProperty("walk_256mib_us", static_cast<int>(us));
  std::printf("hmm_range_fault over 256 MiB of present pages: %lld us\n", static_cast<long long>(us));
  ASSERT_TRUE(as->unmap(base).is_ok());
  ::munmap(p, kPages * kPageSize);
}

INSTANTIATE_TEST_SUITE_P(FaultModes, RangeFault, ::testing::Values(FaultMode::kServiceThreads, FaultMode::kInThread),
                         [](const ::testing::TestParamInfo<FaultMode>& mode) {
                           return mode.param == FaultMode::kInThread ? "InThread" : "ServiceThreads";
                         });

}  // namespace
}  // namespace uhmm
