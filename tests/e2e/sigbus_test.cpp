// End-to-end: a device that cannot bring a page back.  The faulting access
// ends in SIGBUS, a syscall on the page gets EFAULT, the rest of the process
// keeps working, and an explicit migration back recovers the data.
//
// Each scenario runs in a forked child that creates its own AddressSpace and
// SimDevice (userfaultfd registrations and the fault-service threads do not
// carry over a fork).  The parent is single-threaded when it forks.
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "e2e/test_support.hpp"
#include "uhmm/uhmm.hpp"

namespace uhmm {
namespace {

constexpr std::size_t kPages = 16;
constexpr std::size_t kBadPage = 3;

// Exit codes of the child, so that a failure names the step.
enum ChildCode : int {
  kOk = 0,
  kNoAddressSpace = 10,
  kNoDevice,
  kNoMap,
  kNotSettled,
  kNotMigrated,
  kSurvivedAccess,
  kSyscallDidNotFail,
  kWrongErrno,
  kNotPoisoned,
  kNoFailCount,
  kCpuPageBroken,
  kRecoveryFailed,
  kRecoveredDataWrong,
  kOtherDevicePageWrong,
  kInvariants,
};

struct Rig {
  std::unique_ptr<AddressSpace> as;
  std::unique_ptr<sim::SimDevice> dev;
  VirtAddr base;    // kPages on the device
  VirtAddr other;   // kPages that stay on the CPU
};

// How the device fails to bring a page back.
enum class Failure { kMigrateToRam, kOnePageCopy };

// Builds the scenario in the child; returns 0 or a ChildCode.  With
// kOnePageCopy, a fault brings back the faulting page alone (the device's
// one-page path) and its copy fails.
int build(Rig& rig, Failure failure = Failure::kMigrateToRam) {
  auto as_r = AddressSpace::create();
  if (!as_r.is_ok()) return kNoAddressSpace;
  rig.as = std::move(*as_r);
  sim::SimDeviceOptions o;
  o.memory_bytes = 16 << 20;
  o.warm_memory = false;
  o.dma_threads = 1;
  if (failure == Failure::kOnePageCopy) o.fault_around_pages = 1;
  auto dev_r = sim::SimDevice::create(o);
  if (!dev_r.is_ok()) return kNoDevice;
  rig.dev = std::move(*dev_r);
  auto b = rig.as->map(kPages * kPageSize);
  auto c = rig.as->map(kPages * kPageSize);
  if (!b.is_ok() || !c.is_ok()) return kNoMap;
  rig.base = *b;
  rig.other = *c;
  test::fill_range(rig.base, kPages, 0);
  test::fill_range(rig.other, kPages, 100);
  if (!test::eventually([&] { return rig.as->check_invariants().is_ok(); })) return kNotSettled;
  auto rep = rig.dev->migrate_to_device(*rig.as, rig.base, kPages * kPageSize);
  if (!rep.is_ok() || rep->pages_migrated != kPages) return kNotMigrated;
  if (failure == Failure::kMigrateToRam) {
    rig.dev->faults().fail_migrate_to_ram(true);
  } else {
    rig.dev->faults().fail_copy_after(0);
  }
  return kOk;
}

int access_child(bool write, Failure failure = Failure::kMigrateToRam) {
  ::signal(SIGBUS, SIG_DFL);  // the default action, even under a sanitizer
  Rig rig;
  if (const int rc = build(rig, failure); rc != kOk) return rc;
  auto* p = (rig.base + kBadPage * kPageSize).as<volatile std::uint64_t>();
  if (write) {
    p[7] = 42;
  } else {
    (void)p[7];
  }
  return kSurvivedAccess;
}

TEST(SigbusTest, ReadOfPageTheDeviceCannotReturnRaisesSigbus) {
  const test::ChildResult r = test::run_in_child([] { return access_child(false); });
  EXPECT_TRUE(r.signaled && r.signal == SIGBUS) << "child " << r.describe();
}

TEST(SigbusTest, WriteToPageTheDeviceCannotReturnRaisesSigbus) {
  const test::ChildResult r = test::run_in_child([] { return access_child(true); });
  EXPECT_TRUE(r.signaled && r.signal == SIGBUS) << "child " << r.describe();
}

TEST(SigbusTest, FailedCopyOfAOnePageFaultRaisesSigbus) {
  const test::ChildResult r = test::run_in_child([] { return access_child(false, Failure::kOnePageCopy); });
  EXPECT_TRUE(r.signaled && r.signal == SIGBUS) << "child " << r.describe();
}

// After the failed copy the data is still on the device, intact.
TEST(SigbusTest, FailedCopyOfAOnePageFaultLosesNothing) {
  const test::ChildResult r = test::run_in_child([] {
    Rig rig;
    if (const int rc = build(rig, Failure::kOnePageCopy); rc != kOk) return rc;
    int p[2];
    if (::pipe(p) != 0) return static_cast<int>(kSyscallDidNotFail);
    if (::write(p[1], (rig.base + kBadPage * kPageSize).ptr(), kPageSize) != -1 || errno != EFAULT)
      return static_cast<int>(kSyscallDidNotFail);
    if (rig.dev->stats().get(Counter::dma_copy_fail) != 1) return static_cast<int>(kNoFailCount);
    // The fault service wakes the access before it lets go of the entry.
    if (!test::eventually([&] { return rig.as->page_info(rig.base + kBadPage * kPageSize).poisoned &&
                                       !rig.as->page_info(rig.base + kBadPage * kPageSize).locked; }))
      return static_cast<int>(kNotPoisoned);
    rig.dev->faults().disarm();
    auto back = rig.dev->migrate_to_system(*rig.as, rig.base, kPages * kPageSize);
    if (!back.is_ok() || back->pages_migrated != kPages) return static_cast<int>(kRecoveryFailed);
    if (!test::range_has_pattern(rig.base, kPages)) return static_cast<int>(kRecoveredDataWrong);
    return static_cast<int>(kOk);
  });
  EXPECT_TRUE(r.exited && r.exit_code == kOk) << "child " << r.describe();
}

int syscall_child() {
  ::signal(SIGBUS, SIG_DFL);
  Rig rig;
  if (const int rc = build(rig); rc != kOk) return rc;
  int p[2];
  if (::pipe(p) != 0) return kSyscallDidNotFail;
  // write(2) reads the buffer (unlike /dev/null, which ignores it).
  errno = 0;
  const ssize_t w = ::write(p[1], (rig.base + kBadPage * kPageSize).ptr(), kPageSize);
  if (w != -1) return kSyscallDidNotFail;
  if (errno != EFAULT) return kWrongErrno;
  if (!test::eventually([&] { return rig.as->page_info(rig.base + kBadPage * kPageSize).poisoned; }))
    return kNotPoisoned;
  if (rig.as->stats().get(Counter::migrate_to_ram_fail) < 1) return kNoFailCount;

  // The process is fine otherwise: CPU pages work, also through syscalls.
  if (!test::range_has_pattern(rig.other, kPages, 100)) return kCpuPageBroken;
  if (::write(p[1], rig.other.ptr(), kPageSize) != static_cast<ssize_t>(kPageSize)) return kCpuPageBroken;
  std::vector<std::byte> buf(kPageSize);
  if (::read(p[0], buf.data(), kPageSize) != static_cast<ssize_t>(kPageSize)) return kCpuPageBroken;
  if (!test::buffer_has_pattern(buf.data(), 100)) return kCpuPageBroken;
  (rig.other + 5 * kPageSize).as<volatile std::uint64_t>()[0] = 1;

  // The device recovers; an explicit migration brings the data back.
  rig.dev->faults().fail_migrate_to_ram(false);
  auto back = rig.dev->migrate_to_system(*rig.as, rig.base + kBadPage * kPageSize, kPageSize);
  if (!back.is_ok() || back->pages_migrated != 1) return kRecoveryFailed;
  if (!test::eventually([&] { return rig.as->check_invariants().is_ok(); })) return kInvariants;
  if (rig.as->page_info(rig.base + kBadPage * kPageSize).poisoned) return kRecoveryFailed;
  if (!test::page_has_pattern((rig.base + kBadPage * kPageSize).ptr(), kBadPage)) return kRecoveredDataWrong;
  // The other device pages fault back normally now.
  if (!test::range_has_pattern(rig.base, kPages)) return kOtherDevicePageWrong;
  if (!test::eventually([&] { return rig.as->check_invariants().is_ok(); })) return kInvariants;
  ::close(p[0]);
  ::close(p[1]);
  rig.dev.reset();
  rig.as.reset();
  return kOk;
}

TEST(SigbusTest, SyscallOnPageTheDeviceCannotReturnGetsEfault) {
  const test::ChildResult r = test::run_in_child(syscall_child);
  EXPECT_TRUE(r.exited && r.exit_code == kOk) << "child " << r.describe();
}

// The control: the same scenario with a working device does not die.
TEST(SigbusTest, WorkingDeviceServesTheSameAccess) {
  const test::ChildResult r = test::run_in_child([] {
    Rig rig;
    if (const int rc = build(rig); rc != kOk) return rc;
    rig.dev->faults().fail_migrate_to_ram(false);
    if (!test::range_has_pattern(rig.base, kPages)) return static_cast<int>(kOtherDevicePageWrong);
    return static_cast<int>(kOk);
  });
  EXPECT_TRUE(r.exited && r.exit_code == kOk) << "child " << r.describe();
}

}  // namespace
}  // namespace uhmm
