// End-to-end: fork of a process whose managed memory is partly on the
// device.  The child sees every byte; copy-on-write holds both ways, for
// CPU writes and for device writes made by the parent after the fork; the
// parent keeps working (migrations included) and loses nothing.  Each test
// runs with both fault modes.
#include <gtest/gtest.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstring>
#include <vector>

#include "e2e/test_support.hpp"
#include "uhmm/uhmm.hpp"

extern "C" const char* __tsan_default_options() { return "report_signal_unsafe=0"; }  // kInThread: ADR 0004

namespace uhmm {
namespace {

using test::count_states;
using test::pattern_word;
using test::range_has_pattern;

constexpr std::size_t kPages = 2 * kPagesPerHugePage;
constexpr std::size_t kLen = kPages * kPageSize;

// Child exit codes, so that a failure names the step.
enum ChildCode : int { kChildOk = 0, kNoGo = 20, kDataWrong, kSawParentCpuWrite, kSawParentDeviceWrite };

class ForkTest : public ::testing::TestWithParam<FaultMode> {
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
  }
  void TearDown() override {
    dev.reset();
    as.reset();
  }
  VirtAddr page(std::size_t i) const { return base + i * kPageSize; }
  // Forks a child that reads every page of the range and exits.
  void expect_a_child_reads_every_page() {
    const test::ChildResult child = test::run_in_child([&] {
      for (std::size_t i = 0; i < kPages; ++i)
        if (!test::page_has_pattern(page(i).ptr(), i)) return static_cast<int>(kDataWrong);
      return static_cast<int>(kChildOk);
    });
    ASSERT_TRUE(child.exited) << child.describe();
    EXPECT_EQ(child.exit_code, kChildOk);
  }

  std::unique_ptr<AddressSpace> as;
  std::unique_ptr<sim::SimDevice> dev;
  VirtAddr base;
};

TEST_P(ForkTest, ChildSeesDeviceDataAndCopyOnWriteHoldsBothWays) {
  // Half on the device, half on the CPU.
  ASSERT_TRUE(dev->migrate_to_device(*as, page(kPagesPerHugePage / 2), kLen / 2).is_ok());
  ASSERT_EQ(count_states(*as, base, kPages).device, kPages / 2);
  int go[2];
  ASSERT_EQ(::pipe(go), 0);

  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::alarm(20);
    char c;
    if (::read(go[0], &c, 1) != 1) ::_exit(kNoGo);
    // The parent has written page 5 with the CPU and page 700 through the
    // device by now; the child must still see the contents of fork time.
    if (page(5).as<volatile std::uint64_t>()[0] != pattern_word(5, 0)) ::_exit(kSawParentCpuWrite);
    if (page(700).as<volatile std::uint64_t>()[0] != pattern_word(700, 0)) ::_exit(kSawParentDeviceWrite);
    for (std::size_t i = 0; i < kPages; ++i)
      if (!test::page_has_pattern(page(i).ptr(), i)) ::_exit(kDataWrong);
    page(9).as<volatile std::uint64_t>()[0] = 0xc41d;  // the child's own write
    ::_exit(kChildOk);
  }
  ::close(go[0]);
  // Everything came back before the fork.
  EXPECT_EQ(count_states(*as, base, kPages).device, 0u);
  page(5).as<volatile std::uint64_t>()[0] = 0x9a7e;
  const std::uint64_t from_device = 0xde71ce;
  ASSERT_TRUE(dev->device_write(*as, page(700), std::as_bytes(std::span(&from_device, 1))).is_ok());
  ASSERT_EQ(::write(go[1], "g", 1), 1);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ::close(go[1]);
  ASSERT_TRUE(WIFEXITED(status)) << "child died, status " << status;
  EXPECT_EQ(WEXITSTATUS(status), kChildOk);

  // The parent sees its own writes, not the child's.
  EXPECT_EQ(page(5).as<volatile std::uint64_t>()[0], 0x9a7eu);
  EXPECT_EQ(page(700).as<volatile std::uint64_t>()[0], from_device);
  EXPECT_EQ(page(9).as<volatile std::uint64_t>()[0], pattern_word(9, 0));
  for (std::size_t i = 10; i < kPages; ++i) {
    if (i == 700) continue;
    ASSERT_TRUE(test::page_has_pattern(page(i).ptr(), i)) << "page " << i;
  }
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_P(ForkTest, ParentMigratesOnAfterForkAndLosesNothing) {
  ASSERT_TRUE(dev->migrate_to_device(*as, base, kLen).is_ok());
  expect_a_child_reads_every_page();
  // Pages still shared copy-on-write with the (now gone) child may refuse
  // to move (the kernel reports them busy); whatever moves comes back intact.
  for (int round = 0; round < 3; ++round) {
    auto to = dev->migrate_to_device(*as, base, kLen);
    ASSERT_TRUE(to.is_ok());
    ASSERT_TRUE(range_has_pattern(base, kPages));
  }
  ASSERT_TRUE(test::settles(*as));
  UHMM_EXPECT_INVARIANTS(*as);
}

// The kernel's migrate_vma migrates a page the parent shares copy-on-write
// with a child (it is mapped twice, not pinned).  uhmm moves pages with
// UFFDIO_MOVE, which refuses such a page until a write fault makes it the
// parent's alone again: pages the parent has not written since the fork
// must still all migrate, with their data.
TEST_P(ForkTest, PagesSharedWithAnExitedChildAllMigrate) {
  // A quarter went to the device and came back before the fork, a quarter
  // is on the device at the fork (brought back for it), the rest never left.
  ASSERT_TRUE(dev->migrate_to_device(*as, base, kLen / 4).is_ok());
  ASSERT_TRUE(dev->migrate_to_system(*as, base, kLen / 4).is_ok());
  ASSERT_TRUE(dev->migrate_to_device(*as, page(kPages / 4), kLen / 4).is_ok());
  ASSERT_EQ(count_states(*as, base, kPages).device, kPages / 4);
  // An untouched managed range: its holes must stay holes (no un-sharing
  // may populate them).
  auto holes = as->map(kHugePageSize);
  ASSERT_TRUE(holes.is_ok());

  expect_a_child_reads_every_page();
  ASSERT_EQ(count_states(*as, base, kPages).system, kPages);

  auto to = dev->migrate_to_device(*as, base, kLen);
  ASSERT_TRUE(to.is_ok());
  EXPECT_EQ(to->pages_migrated, kPages);
  EXPECT_EQ(to->pages_skipped, 0u);
  EXPECT_EQ(count_states(*as, base, kPages).device, kPages);
  EXPECT_EQ(count_states(*as, *holes, kPagesPerHugePage).none, kPagesPerHugePage);
  auto hole_rep = dev->migrate_to_device(*as, *holes, kHugePageSize);
  ASSERT_TRUE(hole_rep.is_ok());
  EXPECT_EQ(hole_rep->holes, kPagesPerHugePage);

  // Back, and once more out: nothing refuses, nothing is lost.
  auto back = dev->migrate_to_system(*as, base, kLen);
  ASSERT_TRUE(back.is_ok());
  EXPECT_EQ(back->pages_migrated, kPages);
  EXPECT_TRUE(range_has_pattern(base, kPages));
  auto again = dev->migrate_to_device(*as, base, kLen);
  ASSERT_TRUE(again.is_ok());
  EXPECT_EQ(again->pages_migrated, kPages);
  EXPECT_TRUE(range_has_pattern(base, kPages));  // the CPU reads bring them back
  ASSERT_TRUE(test::settles(*as));
  UHMM_EXPECT_INVARIANTS(*as);
}

// While the child still maps the pages, the kernel migrates them too (the
// child's view stays the data of fork time).  uhmm gives the parent its own
// copy first, which the child never sees: the child keeps fork-time data
// even after the parent changed its pages on the device.
TEST_P(ForkTest, PagesSharedWithALiveChildMigrateAndTheChildKeepsItsData) {
  int go[2];
  ASSERT_EQ(::pipe(go), 0);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::alarm(20);
    ::close(go[1]);
    for (std::size_t i = 0; i < kPages; ++i)
      if (!test::page_has_pattern(page(i).ptr(), i)) ::_exit(kDataWrong);
    char c;
    if (::read(go[0], &c, 1) != 1) ::_exit(kNoGo);
    if (page(3).as<volatile std::uint64_t>()[0] != pattern_word(3, 0)) ::_exit(kSawParentDeviceWrite);
    for (std::size_t i = 0; i < kPages; ++i)
      if (!test::page_has_pattern(page(i).ptr(), i)) ::_exit(kDataWrong);
    ::_exit(kChildOk);
  }
  ::close(go[0]);
  auto to = dev->migrate_to_device(*as, base, kLen);
  ASSERT_TRUE(to.is_ok());
  EXPECT_EQ(to->pages_migrated, kPages);
  EXPECT_EQ(count_states(*as, base, kPages).device, kPages);
  const std::uint64_t from_device = 0xd0d0;
  ASSERT_TRUE(dev->device_write(*as, page(3), std::as_bytes(std::span(&from_device, 1))).is_ok());
  ASSERT_EQ(::write(go[1], "g", 1), 1);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ::close(go[1]);
  ASSERT_TRUE(WIFEXITED(status)) << "child died, status " << status;
  EXPECT_EQ(WEXITSTATUS(status), kChildOk);

  EXPECT_EQ(page(3).as<volatile std::uint64_t>()[0], from_device);
  for (std::size_t i = 0; i < kPages; ++i) {
    if (i == 3) continue;
    ASSERT_TRUE(test::page_has_pattern(page(i).ptr(), i)) << "page " << i;
  }
  ASSERT_TRUE(test::settles(*as));
  UHMM_EXPECT_INVARIANTS(*as);
}

// A read-only range cannot move its pages out (nor un-share them with a
// write fault); once writable again, the pages a fork shared all migrate.
TEST_P(ForkTest, SharedPagesOfAReadOnlyRangeMigrateOnceWritableAgain) {
  const test::ChildResult child = test::run_in_child([&] { return range_has_pattern(base, kPages) ? 0 : 1; });
  ASSERT_TRUE(child.exited && child.exit_code == 0) << child.describe();
  ASSERT_TRUE(as->protect(base, kLen, PROT_READ).is_ok());
  auto ro = dev->migrate_to_device(*as, base, kLen);
  ASSERT_TRUE(ro.is_ok());
  EXPECT_EQ(ro->pages_migrated, 0u);
  EXPECT_TRUE(range_has_pattern(base, kPages));
  ASSERT_TRUE(as->protect(base, kLen, PROT_READ | PROT_WRITE).is_ok());
  auto rw = dev->migrate_to_device(*as, base, kLen);
  ASSERT_TRUE(rw.is_ok());
  EXPECT_EQ(rw->pages_migrated, kPages);
  EXPECT_TRUE(range_has_pattern(base, kPages));
  ASSERT_TRUE(test::settles(*as));
  UHMM_EXPECT_INVARIANTS(*as);
}

// A fork uhmm does not see (no pthread_atfork handlers: a raw clone) leaves
// the pages shared unmarked: the first migration finds them busy and skips
// them, losing nothing; it marks them, so the next one migrates them all.
TEST_P(ForkTest, PagesSharedByAnUnseenForkMigrateOnTheNextAttempt) {
  const long pid = ::syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0);
  ASSERT_GE(pid, 0);
  if (pid == 0) ::_exit(kChildOk);
  int status = 0;
  ASSERT_EQ(::waitpid(static_cast<pid_t>(pid), &status, 0), pid);
  auto first = dev->migrate_to_device(*as, base, kLen);
  ASSERT_TRUE(first.is_ok());
  EXPECT_EQ(first->pages_migrated, 0u);
  EXPECT_EQ(first->pages_skipped, kPages);
  EXPECT_EQ(as->stats().get(Counter::migrate_skipped_pinned), kPages);
  EXPECT_EQ(count_states(*as, base, kPages).system, kPages);
  EXPECT_TRUE(range_has_pattern(base, kPages));
  auto second = dev->migrate_to_device(*as, base, kLen);
  ASSERT_TRUE(second.is_ok());
  EXPECT_EQ(count_states(*as, base, kPages).device, kPages);
  EXPECT_TRUE(range_has_pattern(base, kPages));
  ASSERT_TRUE(test::settles(*as));
  UHMM_EXPECT_INVARIANTS(*as);
}

INSTANTIATE_TEST_SUITE_P(FaultModes, ForkTest, ::testing::Values(FaultMode::kServiceThreads, FaultMode::kInThread),
                         [](const ::testing::TestParamInfo<FaultMode>& mode) { return test::fault_mode_name(mode.param); });

}  // namespace
}  // namespace uhmm
