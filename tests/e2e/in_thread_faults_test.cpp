// End-to-end: FaultMode::kInThread.  The faulting thread serves its own
// fault from uhmm's SIGBUS handler: loads and stores on device pages and on
// holes complete with the right data, no service thread exists, concurrent
// faults on one page migrate it once, a syscall on a device page gets EFAULT
// while AddressSpace::read/write still work, a device failure ends in the
// application's SIGBUS (chained to a handler installed earlier, or the
// default action), and a SIGBUS that is not uhmm's is left alone.
// The stress test runs in this mode too (stress_test.cpp).
#include <dirent.h>
#include <gtest/gtest.h>
#include <setjmp.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <future>
#include <latch>
#include <thread>
#include <vector>

#include "e2e/test_support.hpp"
#include "mm/address_space_impl.hpp"
#include "uhmm/uhmm.hpp"

// FaultMode::kInThread runs the fault service (which allocates) inside the
// SIGBUS handler of a synchronous fault: safe unless the faulting code holds
// the allocator's lock (docs/adr/0004-in-thread-faults.md), which TSan cannot
// know; it would report every such call.
extern "C" const char* __tsan_default_options() { return "report_signal_unsafe=0"; }

namespace uhmm {
namespace {

using test::count_states;
using test::fill_range;
using test::pattern_word;
using test::range_has_pattern;

constexpr std::size_t kBlock = kPagesPerHugePage;

std::unique_ptr<AddressSpace> in_thread_space() {
  AddressSpaceOptions o;
  o.fault_mode = FaultMode::kInThread;
  auto r = AddressSpace::create(o);
  EXPECT_TRUE(r.is_ok()) << r.status().to_string();
  return r.is_ok() ? std::move(*r) : nullptr;
}

std::unique_ptr<sim::SimDevice> small_device(std::size_t fault_around = kBlock) {
  sim::SimDeviceOptions o;
  o.memory_bytes = 16 << 20;
  o.warm_memory = false;
  o.fault_around_pages = fault_around;
  auto r = sim::SimDevice::create(o);
  EXPECT_TRUE(r.is_ok()) << r.status().to_string();
  return r.is_ok() ? std::move(*r) : nullptr;
}

std::size_t thread_count() {
  std::size_t n = 0;
  if (DIR* d = ::opendir("/proc/self/task")) {
    while (const dirent* e = ::readdir(d))
      if (e->d_name[0] != '.') ++n;
    ::closedir(d);
  }
  return n;
}

struct InThreadFaults : ::testing::Test {
  void SetUp() override {
    as = in_thread_space();
    dev = small_device();
    ASSERT_TRUE(as && dev);
  }
  void TearDown() override {
    dev.reset();
    as.reset();
  }
  VirtAddr on_device(std::size_t pages, std::uint64_t salt = 0) {
    auto r = as->map(pages * kPageSize);
    EXPECT_TRUE(r.is_ok()) << r.status().to_string();
    if (!r.is_ok()) return {};
    fill_range(*r, pages, salt);
    auto rep = dev->migrate_to_device(*as, *r, pages * kPageSize);
    EXPECT_TRUE(rep.is_ok() && rep->pages_migrated == pages);
    EXPECT_EQ(count_states(*as, *r, pages).device, pages);
    return *r;
  }
  std::uint64_t counter(Counter c) const { return as->stats().get(c); }

  std::unique_ptr<AddressSpace> as;
  std::unique_ptr<sim::SimDevice> dev;
};

// Faults are served by the faulting threads; only the userfaultfd events
// (munmap, madvise, mremap) need threads: one reads, one processes.
TEST(InThreadFaultMode, StartsNoFaultServiceThreads) {
  std::thread([] {}).join();  // a sanitizer starts its own thread with the first one
  const std::size_t before = thread_count();
  auto as = in_thread_space();
  ASSERT_TRUE(as);
  EXPECT_EQ(thread_count(), before + 2);
  AddressSpaceOptions o;
  o.fault_threads = 4;
  auto served = AddressSpace::create(o);
  ASSERT_TRUE(served.is_ok());
  // The control: the four service threads do show (a sanitizer may add its own).
  EXPECT_GE(thread_count(), before + 2 + 4 + 1);
}

TEST_F(InThreadFaults, HoleFaultsZeroFillInTheFaultingThread) {
  auto r = as->map(2 * kBlock * kPageSize);
  ASSERT_TRUE(r.is_ok());
  auto* words = r->as<volatile std::uint64_t>();
  EXPECT_EQ(words[0], 0u);
  words[kBlock * test::kWordsPerPage + 3] = 77;  // a write into the second block
  EXPECT_EQ(words[kBlock * test::kWordsPerPage + 3], 77u);
  EXPECT_GE(counter(Counter::hole_faults), 2u);
  EXPECT_EQ(count_states(*as, *r, 2 * kBlock).system, 2 * kBlock);
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_F(InThreadFaults, LoadBringsDevicePagesBackWithTheirData) {
  const VirtAddr base = on_device(kBlock, 5);
  const std::uint64_t faults = counter(Counter::device_private_faults);
  EXPECT_TRUE(range_has_pattern(base, kBlock, 5));
  EXPECT_GE(counter(Counter::device_private_faults), faults + 1);
  EXPECT_EQ(count_states(*as, base, kBlock).system, kBlock);
  EXPECT_EQ(dev->pagemap().pages_in_use(), 0u);
  EXPECT_GE(as->stats().fault_latency().count(), 1u);
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_F(InThreadFaults, StoreKeepsTheRestOfThePage) {
  const VirtAddr base = on_device(kBlock, 9);
  auto* w = (base + 7 * kPageSize).as<volatile std::uint64_t>();
  w[3] = 0xfeed;
  for (std::size_t k = 0; k < test::kWordsPerPage; ++k)
    ASSERT_EQ(w[k], k == 3 ? 0xfeedu : pattern_word(9 + 7, k)) << "word " << k;
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_F(InThreadFaults, SyscallOnADevicePageGetsEfaultButReadAndWriteWork) {
  const VirtAddr base = on_device(kBlock, 3);
  int p[2];
  ASSERT_EQ(::pipe(p), 0);
  errno = 0;
  EXPECT_EQ(::write(p[1], (base + 4 * kPageSize).ptr(), kPageSize), -1);
  EXPECT_EQ(errno, EFAULT);  // the documented price of this mode
  EXPECT_EQ(count_states(*as, base, kBlock).device, kBlock);  // nothing moved

  // AddressSpace::read/write serve the pages first, across page boundaries.
  std::vector<std::byte> buf(3 * kPageSize);
  ASSERT_TRUE(as->read(base + 10 * kPageSize + 8, std::span(buf).first(2 * kPageSize)).is_ok());
  EXPECT_EQ(reinterpret_cast<const std::uint64_t*>(buf.data())[0], pattern_word(3 + 10, 1));
  EXPECT_EQ(reinterpret_cast<const std::uint64_t*>(buf.data())[test::kWordsPerPage],
            pattern_word(3 + 11, 1));
  ASSERT_TRUE(dev->migrate_to_device(*as, base, kBlock * kPageSize).is_ok());
  std::vector<std::byte> ones(kPageSize, std::byte{1});
  ASSERT_TRUE(as->write(base + 20 * kPageSize, ones).is_ok());
  EXPECT_EQ((base + 20 * kPageSize).as<volatile std::uint8_t>()[kPageSize - 1], 1u);
  EXPECT_EQ((base + 21 * kPageSize).as<volatile std::uint64_t>()[0], pattern_word(3 + 21, 0));
  ::close(p[0]);
  ::close(p[1]);
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_F(InThreadFaults, ThreadsFaultingTheSamePageMigrateItOnce) {
  dev.reset();
  dev = small_device(1);  // only the faulting page comes back
  const VirtAddr base = on_device(kBlock, 1);
  const std::uint64_t to_ram = counter(Counter::pgmigrate_to_ram);
  constexpr int kThreads = 8;
  std::latch go(kThreads);
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      go.arrive_and_wait();
      if ((base + 5 * kPageSize).as<volatile std::uint64_t>()[t] != pattern_word(1 + 5, t)) wrong.fetch_add(1);
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(counter(Counter::pgmigrate_to_ram), to_ram + 1);
  EXPECT_EQ(count_states(*as, base, kBlock).device, kBlock - 1);
  UHMM_EXPECT_INVARIANTS(*as);
}

// A fault on a page that a migration holds sleeps (no kernel wake-up exists
// in this mode) until the migration's unlock wakes it.  The sleep is made
// endless here, so only that wake-up can end it.
TEST_F(InThreadFaults, AFaultOnAPageUnderMigrationSleepsUntilTheMigrationWakesIt) {
  auto r = as->map(kBlock * kPageSize);
  ASSERT_TRUE(r.is_ok());
  const VirtAddr base = *r;
  fill_range(base, kBlock, 4);
  as->impl().entry_sleep_us.store(std::int64_t{3600} * 1'000'000);
  ScopedMigrateVma mig(*as, base, base + kBlock * kPageSize, dev->owner(), MIGRATE_VMA_SELECT_SYSTEM);
  ASSERT_TRUE(mig.setup().is_ok());
  ASSERT_EQ(mig.args().cpages, kBlock);
  auto reader = std::async(std::launch::async,
                           [&] { return (base + 7 * kPageSize).as<volatile std::uint64_t>()[3]; });
  // The fault finds the entry locked and goes to sleep on it.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (as->impl().entry_sleepers.load() == 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  ASSERT_EQ(as->impl().entry_sleepers.load(), 1u);
  EXPECT_EQ(reader.wait_for(std::chrono::milliseconds(50)), std::future_status::timeout);
  // No destinations: every page goes back where it was, and is unlocked.
  mig.pages();
  mig.finalize();
  const bool woken = reader.wait_for(std::chrono::seconds(10)) == std::future_status::ready;
  if (!woken) as->impl().wake(base, kBlock);  // so that the test can end
  EXPECT_TRUE(woken) << "the unlock did not wake the sleeping fault";
  EXPECT_EQ(reader.get(), pattern_word(4 + 7, 3));
  EXPECT_EQ(as->impl().entry_sleepers.load(), 0u);
  EXPECT_TRUE(range_has_pattern(base, kBlock, 4));
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST_F(InThreadFaults, WriterRacingWithMigrationsLosesNoWrite) {
  constexpr std::size_t kStride = 16;
  auto r = as->map(kBlock * kPageSize);
  ASSERT_TRUE(r.is_ok());
  const VirtAddr base = *r;
  for (std::size_t i = 0; i < kBlock; i += kStride) (base + i * kPageSize).as<volatile std::uint64_t>()[0] = 0;
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> passes{0};
  std::thread writer([&] {
    std::uint64_t done = 0;
    while (!stop.load(std::memory_order_relaxed) || done < 20) {
      for (std::size_t i = 0; i < kBlock; i += kStride) {
        auto* w = (base + i * kPageSize).as<volatile std::uint64_t>();
        w[0] = w[0] + 1;
      }
      passes.store(++done, std::memory_order_relaxed);
    }
  });
  for (int round = 0; round < 20; ++round) {
    ASSERT_TRUE(dev->migrate_to_device(*as, base, kBlock * kPageSize).is_ok());
    ASSERT_TRUE(dev->migrate_to_system(*as, base, kBlock / 2 * kPageSize).is_ok());
  }
  stop.store(true);
  writer.join();
  for (std::size_t i = 0; i < kBlock; i += kStride)
    ASSERT_EQ((base + i * kPageSize).as<volatile std::uint64_t>()[0], passes.load()) << "page " << i;
  UHMM_EXPECT_INVARIANTS(*as);
}

TEST(InThreadFaultMode, TwoAddressSpacesEachServeTheirOwnFaults) {
  auto a = in_thread_space();
  auto b = in_thread_space();
  auto dev = small_device();
  ASSERT_TRUE(a && b && dev);
  auto ra = a->map(kBlock * kPageSize);
  auto rb = b->map(kBlock * kPageSize);
  ASSERT_TRUE(ra.is_ok() && rb.is_ok());
  fill_range(*ra, kBlock, 11);
  fill_range(*rb, kBlock, 22);
  ASSERT_TRUE(dev->migrate_to_device(*a, *ra, kBlock * kPageSize).is_ok());
  ASSERT_TRUE(dev->migrate_to_device(*b, *rb, kBlock * kPageSize).is_ok());
  EXPECT_TRUE(range_has_pattern(*rb, kBlock, 22));
  EXPECT_TRUE(range_has_pattern(*ra, kBlock, 11));
  EXPECT_GE(a->stats().get(Counter::device_private_faults), 1u);
  EXPECT_GE(b->stats().get(Counter::device_private_faults), 1u);
}

// ---- SIGBUS that is the application's --------------------------------------
// In forked children: each creates its own address space and device.

enum Code : int { kOk = 0, kSetupFailed = 10, kSurvived, kWrongSignalInfo, kNoHandlerCall, kDataWrong };

sigjmp_buf g_jump;
std::atomic<void*> g_seen_addr{nullptr};
std::atomic<int> g_seen_code{0};

void recovering_handler(int, siginfo_t* info, void*) {
  g_seen_addr.store(info->si_addr);
  g_seen_code.store(info->si_code);
  siglongjmp(g_jump, 1);
}

// A device that cannot bring a page back; the access ends in SIGBUS.  With
// `own_handler`, the application installed a handler before uhmm's, which
// must receive the signal with the faulting address and BUS_ADRERR, as for
// a kernel driver's failing migrate_to_ram.
int failing_device_child(bool own_handler) {
  if (own_handler) {
    struct sigaction sa {};
    sa.sa_sigaction = recovering_handler;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGBUS, &sa, nullptr);
  } else {
    ::signal(SIGBUS, SIG_DFL);
  }
  auto as = in_thread_space();
  auto dev = small_device();
  if (!as || !dev) return kSetupFailed;
  auto r = as->map(16 * kPageSize);
  if (!r.is_ok()) return kSetupFailed;
  fill_range(*r, 16, 0);
  if (!dev->migrate_to_device(*as, *r, 16 * kPageSize).is_ok()) return kSetupFailed;
  dev->faults().fail_migrate_to_ram(true);
  auto* p = (*r + 3 * kPageSize).as<volatile std::uint64_t>();
  if (sigsetjmp(g_jump, 1) == 0) {
    (void)p[5];
    return kSurvived;
  }
  if (g_seen_addr.load() != const_cast<std::uint64_t*>(p + 5) || g_seen_code.load() != BUS_ADRERR)
    return kWrongSignalInfo;
  // The application's handler ran; the process goes on, and once the device
  // recovers an explicit migration brings the data back.
  dev->faults().fail_migrate_to_ram(false);
  auto back = dev->migrate_to_system(*as, *r, 16 * kPageSize);
  if (!back.is_ok()) return kSetupFailed;
  if (!range_has_pattern(*r, 16, 0)) return kDataWrong;
  return kOk;
}

TEST(InThreadFaultMode, DeviceFailureEndsInSigbusByDefault) {
  const test::ChildResult r = test::run_in_child([] { return failing_device_child(false); });
  EXPECT_TRUE(r.signaled && r.signal == SIGBUS) << "child " << r.describe();
}

TEST(InThreadFaultMode, DeviceFailureReachesTheHandlerInstalledBefore) {
  const test::ChildResult r = test::run_in_child([] { return failing_device_child(true); });
  EXPECT_TRUE(r.exited && r.exit_code == kOk) << "child " << r.describe();
}

TEST(InThreadFaultMode, ForeignSigbusKeepsItsDefaultAction) {
  const test::ChildResult r = test::run_in_child([] {
    ::signal(SIGBUS, SIG_DFL);
    auto as = in_thread_space();
    if (!as) return static_cast<int>(kSetupFailed);
    ::raise(SIGBUS);  // not a fault on managed memory
    return static_cast<int>(kSurvived);
  });
  EXPECT_TRUE(r.signaled && r.signal == SIGBUS) << "child " << r.describe();
}

// An application handler installed after uhmm's calls handle_sigbus first.
TEST(InThreadFaultMode, LaterHandlerDelegatesThroughHandleSigbus) {
  const test::ChildResult r = test::run_in_child([] {
    auto as = in_thread_space();
    auto dev = small_device();
    if (!as || !dev) return static_cast<int>(kSetupFailed);
    struct sigaction sa {};
    sa.sa_sigaction = [](int sig, siginfo_t* info, void* uc) {
      if (handle_sigbus(sig, info, uc)) return;
      ::_exit(kNoHandlerCall);
    };
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGBUS, &sa, nullptr);
    auto m = as->map(kBlock * kPageSize);
    if (!m.is_ok()) return static_cast<int>(kSetupFailed);
    fill_range(*m, kBlock, 4);
    if (!dev->migrate_to_device(*as, *m, kBlock * kPageSize).is_ok()) return static_cast<int>(kSetupFailed);
    if (!range_has_pattern(*m, kBlock, 4)) return static_cast<int>(kDataWrong);
    return static_cast<int>(kOk);
  });
  EXPECT_TRUE(r.exited && r.exit_code == kOk) << "child " << r.describe();
}

}  // namespace
}  // namespace uhmm
