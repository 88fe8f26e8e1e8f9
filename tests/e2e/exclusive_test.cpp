// End-to-end: exclusive device access for atomics (make_device_exclusive).
// A page a device holds exclusively is unreachable for the CPU; the first
// CPU access (code or syscall), another device, fork, mprotect, munmap,
// madvise and mremap each revoke it through an invalidation, and the data
// (the device's atomics included) is never lost.  Each test runs with both
// fault modes.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include "e2e/test_support.hpp"
#include "uhmm/uhmm.hpp"

extern "C" const char* __tsan_default_options() { return "report_signal_unsafe=0"; }  // kInThread: ADR 0004

namespace uhmm {
namespace {

using test::pattern_word;

constexpr std::size_t kPages = 64;
constexpr std::size_t kLen = kPages * kPageSize;

class ExclusiveTest : public ::testing::TestWithParam<FaultMode> {
 protected:
  void SetUp() override {
    as = test::make_address_space(GetParam());
    dev = test::make_device(std::size_t{8} << 20);
    ASSERT_TRUE(as && dev);
    auto r = as->map(kLen);
    ASSERT_TRUE(r.is_ok());
    base = *r;
    test::fill_range(base, kPages);
    ASSERT_TRUE(interval_notifier_insert(sub, *as, base, kLen, recorder).is_ok());
  }
  void TearDown() override {
    interval_notifier_remove(sub);
    dev.reset();
    as.reset();
  }
  VirtAddr page(std::size_t i) const { return base + i * kPageSize; }
  volatile std::uint64_t* word(std::size_t i) const { return page(i).as<volatile std::uint64_t>(); }
  std::uint64_t counter(Counter c) const { return as->stats().get(c); }

  std::unique_ptr<AddressSpace> as;
  std::unique_ptr<sim::SimDevice> dev;
  VirtAddr base;
  IntervalNotifier sub;
  test::RecordingNotifierOps recorder;
};

TEST_P(ExclusiveTest, CpuReadRevokesAndSeesTheDevicesAtomics) {
  ASSERT_TRUE(dev->make_exclusive(*as, page(3), kPageSize).is_ok());
  EXPECT_EQ(as->page_info(page(3)).state, PageInfo::State::kDeviceExclusive);
  EXPECT_EQ(dev->exclusive_pages(*as, base, kLen), 1u);
  EXPECT_EQ(counter(Counter::device_exclusive_made), 1u);
  // The device told everyone but itself, with its owner.
  std::vector<NotifyRange> seen = recorder.take();
  ASSERT_EQ(seen.size(), 1u);
  EXPECT_EQ(seen[0].event, NotifyEvent::kExclusive);
  EXPECT_EQ(seen[0].owner, dev->owner());
  EXPECT_EQ(seen[0].start, page(3));
  EXPECT_EQ(seen[0].end, page(4));

  auto old = dev->atomic_fetch_add(*as, page(3) + 8, 5);
  ASSERT_TRUE(old.is_ok()) << old.status().to_string();
  EXPECT_EQ(*old, pattern_word(3, 1));
  EXPECT_EQ(dev->exclusive_pages(*as, base, kLen), 1u);  // still held: no CPU access yet

  // The CPU reads: revoked (an exclusive invalidation without an owner),
  // and the device's write is there.
  EXPECT_EQ(word(3)[1], pattern_word(3, 1) + 5);
  EXPECT_EQ(word(3)[0], pattern_word(3, 0));
  EXPECT_EQ(as->page_info(page(3)).state, PageInfo::State::kSystem);
  EXPECT_EQ(dev->exclusive_pages(*as, base, kLen), 0u);
  EXPECT_EQ(counter(Counter::device_exclusive_revoked), 1u);
  seen = recorder.take();
  ASSERT_EQ(seen.size(), 1u);
  EXPECT_EQ(seen[0].event, NotifyEvent::kExclusive);
  EXPECT_EQ(seen[0].owner, nullptr);
  EXPECT_TRUE(test::range_has_pattern(page(4), kPages - 4, 4));
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_P(ExclusiveTest, CpuWriteRevokesAndLandsAfterTheDevicesWrite) {
  ASSERT_TRUE(dev->make_exclusive(*as, base, 4 * kPageSize).is_ok());
  EXPECT_EQ(dev->exclusive_pages(*as, base, kLen), 4u);
  ASSERT_TRUE(dev->atomic_fetch_add(*as, page(2), 1).is_ok());
  word(2)[0] = word(2)[0] + 10;  // revokes page 2 only
  EXPECT_EQ(word(2)[0], pattern_word(2, 0) + 11);
  EXPECT_EQ(dev->exclusive_pages(*as, base, kLen), 3u);
  EXPECT_EQ(test::count_states(*as, base, kPages).exclusive, 3u);
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_P(ExclusiveTest, AddressSpaceReadAndWriteRevoke) {
  ASSERT_TRUE(dev->make_exclusive(*as, page(1), 2 * kPageSize).is_ok());
  std::uint64_t got = 0;
  ASSERT_TRUE(as->read(page(1) + 16, std::as_writable_bytes(std::span(&got, 1))).is_ok());
  EXPECT_EQ(got, pattern_word(1, 2));
  const std::uint64_t put = 0x5eed;
  ASSERT_TRUE(as->write(page(2), std::as_bytes(std::span(&put, 1))).is_ok());
  EXPECT_EQ(dev->exclusive_pages(*as, base, kLen), 0u);
  EXPECT_EQ(word(2)[0], put);
  EXPECT_EQ(word(2)[1], pattern_word(2, 1));
}

TEST_P(ExclusiveTest, AnotherDevicesAccessRevokesAndItsExclusiveRequestTakesOver) {
  auto other = test::make_device(std::size_t{8} << 20);
  ASSERT_TRUE(other);
  ASSERT_TRUE(dev->make_exclusive(*as, page(0), 2 * kPageSize).is_ok());
  ASSERT_TRUE(dev->atomic_fetch_add(*as, page(0), 7).is_ok());
  // A device read faults the page in through hmm_range_fault: the first
  // device loses page 0 and the data has its atomic.
  std::uint64_t got = 0;
  ASSERT_TRUE(other->device_read(*as, page(0), std::as_writable_bytes(std::span(&got, 1))).is_ok());
  EXPECT_EQ(got, pattern_word(0, 0) + 7);
  EXPECT_EQ(dev->exclusive_pages(*as, page(0), kPageSize), 0u);
  // The other device takes page 1 from the first.
  ASSERT_TRUE(other->make_exclusive(*as, page(1), kPageSize).is_ok());
  EXPECT_EQ(dev->exclusive_pages(*as, base, kLen), 0u);
  EXPECT_EQ(other->exclusive_pages(*as, base, kLen), 1u);
  ASSERT_TRUE(other->atomic_fetch_add(*as, page(1), 3).is_ok());
  EXPECT_EQ(word(1)[0], pattern_word(1, 0) + 3);
  other.reset();
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_P(ExclusiveTest, DeviceAndCpuAtomicsOnOneWordNeverLoseAnIncrement) {
  // The point of exclusive access: the device's atomics and the CPU's on
  // the same word, interleaved, add up exactly.
  constexpr int kEach = 300;
  std::thread cpu([&] {
    for (int i = 0; i < kEach; ++i) {
      std::atomic_ref<std::uint64_t> w(*page(5).as<std::uint64_t>());
      w.fetch_add(1, std::memory_order_relaxed);
      if (i % 8 == 0) std::this_thread::yield();
    }
  });
  for (int i = 0; i < kEach; ++i) {
    auto r = dev->atomic_fetch_add(*as, page(5), 1);
    ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  }
  cpu.join();
  EXPECT_EQ(word(5)[0], pattern_word(5, 0) + 2 * kEach);
  EXPECT_TRUE(test::page_has_pattern(page(6).ptr(), 6));
  EXPECT_GE(counter(Counter::device_exclusive_made), 1u);
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_P(ExclusiveTest, ForkRevokesSoTheChildSeesTheData) {
  ASSERT_TRUE(dev->make_exclusive(*as, page(7), kPageSize).is_ok());
  ASSERT_TRUE(dev->atomic_fetch_add(*as, page(7), 9).is_ok());
  const std::uint64_t expect = pattern_word(7, 0) + 9;
  const test::ChildResult child = test::run_in_child([&] {
    return page(7).as<volatile std::uint64_t>()[0] == expect && test::page_has_pattern(page(8).ptr(), 8) ? 0 : 1;
  });
  ASSERT_TRUE(child.exited && child.exit_code == 0) << child.describe();
  EXPECT_EQ(dev->exclusive_pages(*as, base, kLen), 0u);
  EXPECT_EQ(word(7)[0], expect);
}

TEST_P(ExclusiveTest, APageSharedWithAChildIsCopiedFirstAndTheChildKeepsItsOwn) {
  int go[2];
  ASSERT_EQ(::pipe(go), 0);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::alarm(20);
    char c;
    if (::read(go[0], &c, 1) != 1) ::_exit(2);
    ::_exit(page(9).as<volatile std::uint64_t>()[0] == pattern_word(9, 0) ? 0 : 1);
  }
  ::close(go[0]);
  ASSERT_TRUE(dev->make_exclusive(*as, page(9), kPageSize).is_ok());
  ASSERT_TRUE(dev->atomic_fetch_add(*as, page(9), 1).is_ok());
  ASSERT_EQ(::write(go[1], "g", 1), 1);
  ::close(go[1]);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status;
  EXPECT_EQ(word(9)[0], pattern_word(9, 0) + 1);
}

TEST_P(ExclusiveTest, ReadOnlyProtectionRevokesAndTheDeviceCannotWrite) {
  ASSERT_TRUE(dev->make_exclusive(*as, page(4), kPageSize).is_ok());
  ASSERT_TRUE(dev->atomic_fetch_add(*as, page(4), 2).is_ok());
  ASSERT_TRUE(as->protect(base, kLen, PROT_READ).is_ok());
  EXPECT_EQ(dev->exclusive_pages(*as, base, kLen), 0u);
  EXPECT_EQ(word(4)[0], pattern_word(4, 0) + 2);
  const std::uint64_t v = 1;
  EXPECT_EQ(dev->device_write(*as, page(4), std::as_bytes(std::span(&v, 1))).code(), EPERM);
  EXPECT_EQ(dev->make_exclusive(*as, page(4), kPageSize).code(), EFAULT);
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_P(ExclusiveTest, MunmapAndDontneedDropTheHeldPage) {
  ASSERT_TRUE(dev->make_exclusive(*as, page(10), 3 * kPageSize).is_ok());
  // Discarded: reads zeros afterwards, and the device lost it.
  ASSERT_EQ(::madvise(page(10).ptr(), kPageSize, MADV_DONTNEED), 0);
  EXPECT_TRUE(test::eventually([&] { return dev->exclusive_pages(*as, page(10), kPageSize) == 0; }));
  EXPECT_EQ(word(10)[0], 0u);
  // Unmapped: the notifier hears it, the frame goes back to the pool.
  ASSERT_EQ(::munmap(page(11).ptr(), kPageSize), 0);
  EXPECT_TRUE(test::eventually([&] { return dev->exclusive_pages(*as, page(11), kPageSize) == 0; }));
  EXPECT_TRUE(recorder.saw(NotifyEvent::kUnmap));
  // The third page is still held, and still right.
  EXPECT_EQ(dev->exclusive_pages(*as, page(12), kPageSize), 1u);
  EXPECT_TRUE(test::page_has_pattern(page(12).ptr(), 12));
  ASSERT_TRUE(test::settles(*as));
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_P(ExclusiveTest, MremapMovesTheHeldPageWithItsData) {
  ASSERT_TRUE(dev->make_exclusive(*as, page(16), kPageSize).is_ok());
  ASSERT_TRUE(dev->atomic_fetch_add(*as, page(16), 4).is_ok());
  void* to = ::mmap(nullptr, 4 * kPageSize, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(to, MAP_FAILED);
  void* moved = ::mremap(page(16).ptr(), 4 * kPageSize, 4 * kPageSize, MREMAP_MAYMOVE | MREMAP_FIXED, to);
  ASSERT_EQ(moved, to);
  const VirtAddr dst = VirtAddr::of(to);
  EXPECT_TRUE(test::eventually([&] { return dev->exclusive_pages(*as, page(16), kPageSize) == 0; }));
  EXPECT_EQ(dst.as<volatile std::uint64_t>()[0], pattern_word(16, 0) + 4);
  EXPECT_TRUE(test::page_has_pattern((dst + kPageSize).ptr(), 17));
  ASSERT_TRUE(test::settles(*as));
  UHMM_EXPECT_INVARIANTS(*as);
  ASSERT_EQ(::munmap(to, 4 * kPageSize), 0);
}

TEST_P(ExclusiveTest, MigrationSkipsHeldPagesAndTeardownReleasesThem) {
  ASSERT_TRUE(dev->make_exclusive(*as, page(20), kPageSize).is_ok());
  auto report = dev->migrate_to_device(*as, page(19), 3 * kPageSize);
  ASSERT_TRUE(report.is_ok());
  EXPECT_EQ(report->pages_migrated, 2u);
  EXPECT_EQ(as->page_info(page(20)).state, PageInfo::State::kDeviceExclusive);
  // Device-private neighbours come back on access as usual, the held one
  // through revocation.
  EXPECT_TRUE(test::range_has_pattern(page(19), 3, 19));
  // Destroying the address space with a held page returns its frame.
  ASSERT_TRUE(dev->make_exclusive(*as, page(30), kPageSize).is_ok());
  const std::uint64_t dropped = dev->mirror_stats().entries_dropped;
  interval_notifier_remove(sub);
  as.reset();  // RELEASE reaches the device, which lets go of the page (ASan: the frame is not leaked)
  EXPECT_GT(dev->mirror_stats().entries_dropped, dropped);
}

TEST_P(ExclusiveTest, HolesAndDevicePagesAreFaultedInFirst) {
  auto hole = as->map(kPageSize);
  ASSERT_TRUE(hole.is_ok());
  ASSERT_TRUE(dev->make_exclusive(*as, *hole, kPageSize).is_ok());
  EXPECT_EQ(as->page_info(*hole).state, PageInfo::State::kDeviceExclusive);
  EXPECT_EQ(hole->as<volatile std::uint64_t>()[0], 0u);

  auto other = test::make_device(std::size_t{8} << 20);
  ASSERT_TRUE(other);
  ASSERT_TRUE(other->migrate_to_device(*as, page(40), kPageSize).is_ok());
  ASSERT_EQ(as->page_info(page(40)).state, PageInfo::State::kDevicePrivate);
  ASSERT_TRUE(dev->make_exclusive(*as, page(40), kPageSize).is_ok());
  EXPECT_EQ(as->page_info(page(40)).state, PageInfo::State::kDeviceExclusive);
  EXPECT_TRUE(test::page_has_pattern(page(40).ptr(), 40));
  other.reset();
}

TEST_P(ExclusiveTest, BadRequestsAreRefused) {
  const int owner_cookie = 0;
  EXPECT_EQ(make_device_exclusive(*as, base, nullptr).status().code(), EINVAL);
  EXPECT_EQ(make_device_exclusive(*as, base + 8, &owner_cookie).status().code(), EINVAL);
  void* foreign = ::mmap(nullptr, kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(foreign, MAP_FAILED);
  EXPECT_EQ(make_device_exclusive(*as, VirtAddr::of(foreign), &owner_cookie).status().code(), EFAULT);
  ::munmap(foreign, kPageSize);
  ASSERT_TRUE(as->protect(page(50), kPageSize, PROT_NONE).is_ok());
  EXPECT_EQ(make_device_exclusive(*as, page(50), &owner_cookie).status().code(), EFAULT);
  EXPECT_EQ(dev->make_exclusive(*as, base + 1, kPageSize).code(), EINVAL);
  EXPECT_EQ(dev->make_exclusive(*as, base, 0).code(), EINVAL);
  EXPECT_EQ(dev->atomic_fetch_add(*as, base + 4, 1).status().code(), EINVAL);
  // Nothing changed.
  EXPECT_EQ(test::count_states(*as, base, kPages).exclusive, 0u);
  EXPECT_TRUE(test::range_has_pattern(base, 50));
}

INSTANTIATE_TEST_SUITE_P(FaultModes, ExclusiveTest,
                         ::testing::Values(FaultMode::kServiceThreads, FaultMode::kInThread),
                         [](const ::testing::TestParamInfo<FaultMode>& mode) { return test::fault_mode_name(mode.param); });

}  // namespace
}  // namespace uhmm
