// End-to-end: AddressSpace::protect, the way to change the protection of
// managed memory (userfaultfd reports no event for mprotect).  Notifiers
// get PROTECTION_VMA; device entries of a range that loses PROT_WRITE lose
// their write bit; hmm_range_fault then answers EPERM for a write request,
// ERROR / EFAULT for PROT_NONE; the CPU keeps its data and the kernel's
// protection; restoring read-write makes everything work as before.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>

#include <mutex>
#include <vector>

#include "e2e/test_support.hpp"
#include "uhmm/uhmm.hpp"

namespace uhmm {
namespace {

using test::count_states;
using test::range_has_pattern;

constexpr std::size_t kPages = kPagesPerHugePage;
constexpr std::size_t kLen = kPages * kPageSize;

using Recorder = test::RecordingNotifierOps;

struct ProtectTest : ::testing::Test {
  void SetUp() override {
    as = test::make_address_space();
    dev = test::make_device(2 * kLen);
    ASSERT_TRUE(as && dev);
    auto r = as->map(kLen);
    ASSERT_TRUE(r.is_ok());
    base = *r;
    test::fill_range(base, kPages);
    ASSERT_TRUE(test::settles(*as));
  }
  void TearDown() override {
    interval_notifier_remove(watch);
    dev.reset();
    as.reset();
  }
  VirtAddr page(std::size_t i) const { return base + i * kPageSize; }
  // One-page hmm_range_fault with the given request; returns the status and the output word.
  std::pair<int, std::uint64_t> mirror(std::size_t i, std::uint64_t request) { return mirror_at(page(i), request); }
  std::pair<int, std::uint64_t> mirror_at(VirtAddr at, std::uint64_t request) {
    std::uint64_t pfn = 0;
    HmmRange range;
    range.address_space = as.get();
    range.start = at;
    range.end = at + kPageSize;
    range.hmm_pfns = &pfn;
    range.default_flags = request;
    range.dev_private_owner = dev->owner();
    const Status s = hmm_range_fault(range);
    return {s.code(), pfn};
  }

  std::unique_ptr<AddressSpace> as;
  std::unique_ptr<sim::SimDevice> dev;
  VirtAddr base;
  Recorder recorder;
  IntervalNotifier watch;
};

TEST_F(ProtectTest, ReadOnlyDropsTheDeviceWriteBitAndKeepsTheData) {
  ASSERT_TRUE(dev->migrate_to_device(*as, base, kLen).is_ok());
  EXPECT_TRUE(as->page_info(page(3)).writable);
  ASSERT_TRUE(interval_notifier_insert(watch, *as, base, kLen, recorder).is_ok());
  ASSERT_TRUE(as->protect(page(0), 16 * kPageSize, PROT_READ).is_ok());
  ASSERT_EQ(recorder.events.size(), 1u);
  EXPECT_EQ(recorder.events[0].event, NotifyEvent::kProtectionVma);
  EXPECT_EQ(recorder.events[0].start, page(0));
  EXPECT_EQ(recorder.events[0].end, page(16));
  EXPECT_FALSE(as->page_info(page(3)).writable);
  EXPECT_TRUE(as->page_info(page(16)).writable);  // outside the range
  UHMM_EXPECT_INVARIANTS(*as);                    // no writable device entry in a read-only range
  // The device's own page is mirrored without WRITE (and, as in the kernel,
  // never faulted, so a write request does not change that).
  auto [code, pfn] = mirror(3, HMM_PFN_REQ_FAULT);
  EXPECT_EQ(code, 0);
  EXPECT_TRUE(pfn & HMM_PFN_VALID);
  EXPECT_FALSE(pfn & HMM_PFN_WRITE);
  // The CPU reads the data back into the read-only range.
  EXPECT_TRUE(range_has_pattern(base, kPages));
  // A system page of the read-only range: a write request is refused.
  EXPECT_EQ(mirror(3, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE).first, EPERM);
  EXPECT_FALSE(mirror(3, HMM_PFN_REQ_FAULT).second & HMM_PFN_WRITE);
  const auto region = as->find_region(page(0));
  ASSERT_TRUE(region);
  EXPECT_EQ(region->prot, PROT_READ);
  EXPECT_EQ(region->length, 16 * kPageSize);
  ASSERT_TRUE(test::settles(*as));
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_F(ProtectTest, WriteToAReadOnlyRangeRaisesSigsegv) {
  ASSERT_TRUE(as->protect(page(0), kPageSize, PROT_READ).is_ok());
  // The child inherits the mapping with its protection (and starts no
  // thread: sanitizers refuse that after a multi-threaded fork).
  const test::ChildResult r = test::run_in_child([&] {
    if (!test::page_has_pattern(page(0).ptr(), 0)) return 13;
    ::signal(SIGSEGV, SIG_DFL);
    page(0).as<volatile std::uint64_t>()[0] = 2;
    return 14;
  });
  EXPECT_TRUE(r.signaled && r.signal == SIGSEGV) << "child " << r.describe();
  EXPECT_TRUE(test::page_has_pattern(page(0).ptr(), 0));
}

TEST_F(ProtectTest, ProtNoneIsAnErrorForTheMirrorAndReadWriteRestoresAll) {
  ASSERT_TRUE(dev->migrate_to_device(*as, page(0), 8 * kPageSize).is_ok());
  ASSERT_TRUE(as->protect(page(0), 32 * kPageSize, PROT_NONE).is_ok());
  auto [code, pfn] = mirror(20, 0);
  EXPECT_EQ(code, 0);
  EXPECT_EQ(pfn, std::uint64_t{HMM_PFN_ERROR});
  EXPECT_EQ(mirror(20, HMM_PFN_REQ_FAULT).first, EFAULT);
  ASSERT_TRUE(as->protect(page(0), 32 * kPageSize, PROT_READ | PROT_WRITE).is_ok());
  EXPECT_EQ(as->find_region(page(40))->start, base);  // one range again
  EXPECT_EQ(as->find_region(page(0))->length, kLen);
  EXPECT_TRUE(range_has_pattern(base, kPages));
  page(5).as<volatile std::uint64_t>()[0] = 77;
  auto again = dev->migrate_to_device(*as, base, kLen);
  ASSERT_TRUE(again.is_ok());
  EXPECT_EQ(again->pages_migrated, kPages);
  EXPECT_EQ(page(5).as<volatile std::uint64_t>()[0], 77u);
  ASSERT_TRUE(test::settles(*as));
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_F(ProtectTest, ReadOnlyPagesStayOnTheCpuWhenAskedToMigrate) {
  ASSERT_TRUE(as->protect(base, kLen, PROT_READ).is_ok());
  auto rep = dev->migrate_to_device(*as, base, kLen);
  ASSERT_TRUE(rep.is_ok());
  EXPECT_EQ(rep->pages_migrated, 0u);
  EXPECT_EQ(count_states(*as, base, kPages).device, 0u);
  EXPECT_TRUE(range_has_pattern(base, kPages));
  ASSERT_TRUE(test::settles(*as));
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_F(ProtectTest, ARangeMappedReadOnlyReadsZerosAndMovesOnceReadWrite) {
  constexpr std::size_t kFew = 4;
  auto r = as->map(kFew * kPageSize, PROT_READ);
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_EQ(r->as<volatile std::uint64_t>()[kPageSize / 8], 0u);  // a hole fault in a read-only range
  auto stays = dev->migrate_to_device(*as, *r, kFew * kPageSize);
  ASSERT_TRUE(stays.is_ok()) << stays.status().to_string();
  EXPECT_EQ(stays->pages_migrated, 0u);
  EXPECT_EQ(mirror_at(*r, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE).first, EPERM);
  ASSERT_TRUE(as->protect(*r, kFew * kPageSize, PROT_READ | PROT_WRITE).is_ok());
  test::fill_range(*r, kFew, 11);
  auto moved = dev->migrate_to_device(*as, *r, kFew * kPageSize);
  ASSERT_TRUE(moved.is_ok()) << moved.status().to_string();
  EXPECT_EQ(moved->pages_migrated, kFew);
  EXPECT_TRUE(range_has_pattern(*r, kFew, 11));  // back on fault
}

TEST_F(ProtectTest, BadInputIsRefused) {
  EXPECT_EQ(as->protect(base + 1, kPageSize, PROT_READ).code(), EINVAL);
  EXPECT_EQ(as->protect(base, 0, PROT_READ).code(), EINVAL);
  EXPECT_EQ(as->protect(base, kPageSize + 1, PROT_READ).code(), EINVAL);
  EXPECT_EQ(as->protect(base, kLen + kPageSize, PROT_READ).code(), EINVAL);  // past the range
  EXPECT_EQ(as->protect(base, kPageSize, PROT_READ | PROT_EXEC).code(), EINVAL);
  EXPECT_EQ(as->protect(VirtAddr{kPageSize}, kPageSize, PROT_READ).code(), EINVAL);  // not managed
  EXPECT_TRUE(range_has_pattern(base, kPages));
  EXPECT_EQ(as->find_region(base)->prot, PROT_READ | PROT_WRITE);
}

}  // namespace
}  // namespace uhmm
