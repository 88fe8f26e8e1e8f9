// LocalZapReaders: the reader of the zapping thread's CPU reads the REMOVE
// event of a zap that no other thread reads, is pinned to that CPU and
// named after it, gives up on a zap that never comes, and stops.
#include <gtest/gtest.h>

#include <linux/userfaultfd.h>
#include <sched.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include "mm/zap_readers.hpp"
#include "platform/maps.hpp"
#include "platform/threads.hpp"
#include "platform/uffd.hpp"

namespace uhmm::mm {
namespace {

using namespace std::chrono_literals;

// A userfaultfd with REMOVE events over a 2 MiB range, and hooks that count
// what they read, standing in for the address space's event queue.
class ZapReadersTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto u = platform::Uffd::open(UFFD_FEATURE_EVENT_REMOVE, /*nonblocking=*/true);
    if (!u) GTEST_SKIP() << "no userfaultfd: " << u.status().message();
    uffd_ = std::move(*u);
    auto area = platform::map_anonymous_aligned(kHugePageSize, kHugePageSize, PROT_READ | PROT_WRITE, true);
    ASSERT_TRUE(area.is_ok());
    area_ = *area;
    ASSERT_TRUE(uffd_.register_range(area_, kHugePageSize, UFFDIO_REGISTER_MODE_MISSING).is_ok());
  }
  void TearDown() override {
    readers_.reset();
    if (area_.value != 0) (void)platform::unmap(area_, kHugePageSize);
  }

  LocalZapReaders& readers() {
    if (!readers_) {
      readers_ = std::make_unique<LocalZapReaders>(
          uffd_.fd(), LocalZapReaders::Hooks{[this] { drain(); }, [this] { return removes_read_ < zaps_started_; },
                                             [this] { ++give_ups_; }});
    }
    return *readers_;
  }
  void drain() {
    struct uffd_msg m;
    while (::read(uffd_.fd(), &m, sizeof m) == static_cast<ssize_t>(sizeof m))
      if (m.event == UFFD_EVENT_REMOVE) ++removes_read_;
  }
  // A zap as AddressSpace::Impl::zap_own makes it, from a thread pinned to
  // `cpu`; the future is ready once MADV_DONTNEED has returned.
  std::future<bool> zap_on(unsigned cpu) {
    return std::async(std::launch::async, [this, cpu] {
      if (!platform::pin_this_thread(cpu).is_ok()) return false;
      ++zaps_started_;
      const bool woke = readers().before_zap();
      return woke && platform::advise(area_, kHugePageSize, MADV_DONTNEED).is_ok();
    });
  }

  // Whether the zap returned within 10 s; if not, it is unblocked (its
  // event read here) so that the test fails instead of hanging.
  bool returned(std::future<bool>& zap) {
    if (zap.wait_for(10s) == std::future_status::ready) return zap.get();
    while (zap.wait_for(1ms) != std::future_status::ready) drain();
    return false;
  }

  // The reader counts an event just after reading it, which lets the zap
  // return: the count may trail the zap by a moment.
  int removes_read_soon(int want) {
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    while (removes_read_.load() < want && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(100us);
    return removes_read_.load();
  }

  platform::Uffd uffd_;
  VirtAddr area_{0};
  std::unique_ptr<LocalZapReaders> readers_;
  std::atomic<int> zaps_started_{0}, removes_read_{0}, give_ups_{0};
};

// The CPUs this process may run on.
std::vector<unsigned> allowed_cpus() {
  cpu_set_t set;
  std::vector<unsigned> cpus;
  if (::sched_getaffinity(0, sizeof set, &set) != 0) return cpus;
  for (unsigned c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &set)) cpus.push_back(c);
  return cpus;
}

// The threads of this process named `name`, by thread id.
std::vector<int> threads_named(const std::string& name) {
  std::vector<int> tids;
  for (const auto& task : std::filesystem::directory_iterator("/proc/self/task")) {
    std::ifstream comm(task.path() / "comm");
    std::string line;
    if (std::getline(comm, line) && line == name) tids.push_back(std::stoi(task.path().filename().string()));
  }
  return tids;
}

TEST_F(ZapReadersTest, TheReaderOfTheZappingCpuReadsTheEvent) {
  // Nobody else reads this uffd: without the reader the zap would block
  // for good (the test's timeout would end it).
  const unsigned cpu = allowed_cpus().back();
  auto zapped = zap_on(cpu);
  ASSERT_TRUE(returned(zapped));
  EXPECT_EQ(removes_read_soon(1), 1);
  EXPECT_EQ(give_ups_.load(), 0);

  const std::vector<int> tids = threads_named("uhmm-zap" + std::to_string(cpu));
  ASSERT_EQ(tids.size(), 1u);
  cpu_set_t set;
  ASSERT_EQ(::sched_getaffinity(tids[0], sizeof set, &set), 0);
  EXPECT_EQ(CPU_COUNT(&set), 1);
  EXPECT_TRUE(CPU_ISSET(cpu, &set));

  // The same reader serves the next zap there.
  auto again = zap_on(cpu);
  ASSERT_TRUE(returned(again));
  EXPECT_EQ(removes_read_soon(2), 2);
  EXPECT_EQ(threads_named("uhmm-zap" + std::to_string(cpu)).size(), 1u);
}

TEST_F(ZapReadersTest, EachZappingCpuGetsItsOwnReader) {
  const std::vector<unsigned> cpus = allowed_cpus();
  if (cpus.size() < 2) GTEST_SKIP() << "one CPU";
  for (unsigned cpu : {cpus[0], cpus[1]}) {
    auto zapped = zap_on(cpu);
    ASSERT_TRUE(returned(zapped));
  }
  EXPECT_EQ(removes_read_soon(2), 2);
  EXPECT_EQ(threads_named("uhmm-zap" + std::to_string(cpus[0])).size(), 1u);
  EXPECT_EQ(threads_named("uhmm-zap" + std::to_string(cpus[1])).size(), 1u);
}

TEST_F(ZapReadersTest, AZapThatNeverComesIsGivenUp) {
  // The record is made and the reader woken, but no MADV_DONTNEED follows:
  // the reader must not wait on it for ever.
  ++zaps_started_;
  ASSERT_TRUE(readers().before_zap());
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (give_ups_.load() == 0 && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(5ms);
  EXPECT_EQ(give_ups_.load(), 1);
  EXPECT_EQ(removes_read_.load(), 0);
}

TEST_F(ZapReadersTest, StopEndsTheReadersAndLaterZapsWakeNone) {
  const unsigned cpu = allowed_cpus().front();
  const std::string name = "uhmm-zap" + std::to_string(cpu);
  auto zapped = zap_on(cpu);
  ASSERT_TRUE(returned(zapped));
  ASSERT_EQ(threads_named(name).size(), 1u);
  readers().stop();
  // Joined; the kernel lets go of the thread's /proc entry just after.
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (!threads_named(name).empty() && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(1ms);
  EXPECT_TRUE(threads_named(name).empty());
  EXPECT_FALSE(readers().before_zap());
}

}  // namespace
}  // namespace uhmm::mm
