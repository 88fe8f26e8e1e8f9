// End-to-end: fork of a process whose managed memory is partly on the
// device.  The child sees every byte; copy-on-write holds both ways, for
// CPU writes and for device writes made by the parent after the fork; the
// parent keeps working (migrations included) and loses nothing.  Each test
// runs with both fault modes.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

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
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::alarm(20);
    for (std::size_t i = 0; i < kPages; ++i)
      if (!test::page_has_pattern(page(i).ptr(), i)) ::_exit(kDataWrong);
    ::_exit(kChildOk);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), kChildOk);
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

INSTANTIATE_TEST_SUITE_P(FaultModes, ForkTest, ::testing::Values(FaultMode::kServiceThreads, FaultMode::kInThread),
                         [](const ::testing::TestParamInfo<FaultMode>& mode) { return test::fault_mode_name(mode.param); });

}  // namespace
}  // namespace uhmm
