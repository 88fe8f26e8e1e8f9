// platform: what uhmm reads of /proc about its own threads and memory, and
// the names it gives its threads.
#include <gtest/gtest.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "platform/maps.hpp"
#include "platform/threads.hpp"
#include "platform/uffd.hpp"

namespace uhmm::platform {
namespace {

TEST(ProcStat, TheCpuIsTheThirtyNinthFieldCountedAfterTheName) {
  // A name with spaces and parentheses, as prctl(PR_SET_NAME) allows.
  const char* stat =
      "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 3 0 1234 1000000 200 "
      "18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n";
  EXPECT_EQ(parse_stat_cpu(stat), 1);
  const char* on_cpu_7 =
      "7 (x) R 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 1 1 1 1 1 1 0 0 0 0 0 0 0 0 0 0 17 7 0";
  EXPECT_EQ(parse_stat_cpu(on_cpu_7), 7);
  EXPECT_EQ(parse_stat_cpu("no name here"), std::nullopt);
  EXPECT_EQ(parse_stat_cpu("1 (short) S 1 2 3"), std::nullopt);
  EXPECT_EQ(parse_stat_cpu(""), std::nullopt);
}

TEST(ProcSmaps, AFlagIsLookedUpInTheMappingHoldingTheAddress) {
  const char* smaps =
      "7f0000000000-7f0000200000 rw-p 00000000 00:00 0 \n"
      "Size:               2048 kB\n"
      "VmFlags: rd wr mr mw me ac nh \n"
      "7f0000200000-7f0000400000 rw-p 00000000 00:00 0                          [anon:x]\n"
      "Size:               2048 kB\n"
      "THPeligible:        1\n"
      "VmFlags: rd wr mr mw me ac hg\n"
      "7f0000400000-7f0000401000 r--p 00000000 00:00 0\n"
      "Size:                  4 kB\n";
  EXPECT_EQ(smaps_has_flag(smaps, 0x7f0000000000, "nh"), true);
  EXPECT_EQ(smaps_has_flag(smaps, 0x7f00001fffff, "nh"), true);
  EXPECT_EQ(smaps_has_flag(smaps, 0x7f0000200000, "nh"), false);
  EXPECT_EQ(smaps_has_flag(smaps, 0x7f0000200000, "hg"), true);
  EXPECT_EQ(smaps_has_flag(smaps, 0x7f0000400000, "nh"), std::nullopt);  // no VmFlags line
  EXPECT_EQ(smaps_has_flag(smaps, 0x7f0000500000, "nh"), std::nullopt);  // nothing mapped
  EXPECT_EQ(smaps_has_flag("", 0x1000, "nh"), std::nullopt);
}

TEST(ProcSmaps, ThisProcessesMadviseShowsUp) {
  const std::size_t len = 4 << 20;
  void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(p, MAP_FAILED);
  auto* half = static_cast<char*>(p) + len / 2;
  ASSERT_EQ(madvise(half, len / 2, MADV_NOHUGEPAGE), 0);
  EXPECT_EQ(mapping_has_flag(VirtAddr::of(p), "nh"), false);
  EXPECT_EQ(mapping_has_flag(VirtAddr::of(half), "nh"), true);
  munmap(p, len);
}

TEST(SysThp, HugeReadFaultsNeedThpOnAndTheHugeZeroPage) {
  EXPECT_TRUE(huge_read_faults_from("always [madvise] never\n", "1\n"));
  EXPECT_TRUE(huge_read_faults_from("[always] madvise never\n", "1\n"));
  EXPECT_FALSE(huge_read_faults_from("always madvise [never]\n", "1\n"));
  EXPECT_FALSE(huge_read_faults_from("always [madvise] never\n", "0\n")) << "a read fault would allocate";
  EXPECT_FALSE(huge_read_faults_from("", ""));
}

TEST(SysThp, AProcessWithThpDisabledHasNoHugeReadFaults) {
  // In a child: the setting is the process's, inherited by later forks.
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    if (prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0) _exit(2);
    _exit(huge_read_faults_available() ? 1 : 0);
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

TEST(ProcStat, AThreadKeptOnACpuIsSeenThere) {
  const unsigned cpus = std::thread::hardware_concurrency();
  for (unsigned cpu = 0; cpu < cpus && cpu < 4; ++cpu) {
    SCOPED_TRACE(cpu);
    int seen = -2;
    std::thread t([&] {
      cpu_set_t set;
      CPU_ZERO(&set);
      CPU_SET(cpu, &set);
      if (pthread_setaffinity_np(pthread_self(), sizeof set, &set) != 0) return;  // not allowed here
      const auto tid = static_cast<std::uint32_t>(::syscall(SYS_gettid));
      Result<int> r = last_cpu_of_thread(tid);
      seen = r.is_ok() ? *r : -1;
    });
    t.join();
    if (seen == -2) continue;
    EXPECT_EQ(seen, static_cast<int>(cpu));
  }
}

TEST(ProcStat, ALookFollowsAThreadThatMoves) {
  cpu_set_t allowed;
  ASSERT_EQ(sched_getaffinity(0, sizeof allowed, &allowed), 0);
  std::vector<unsigned> cpus;
  for (unsigned c = 0; c < CPU_SETSIZE && cpus.size() < 2; ++c)
    if (CPU_ISSET(c, &allowed)) cpus.push_back(c);
  if (cpus.size() < 2) GTEST_SKIP() << "one CPU";
  // The thread moves itself from one CPU to the other; each look sees
  // where it is now.
  std::atomic<int> step{0};
  std::atomic<std::uint32_t> tid{0};
  std::thread t([&] {
    tid = static_cast<std::uint32_t>(::syscall(SYS_gettid));
    for (int i = 0; i < 2; ++i) {
      cpu_set_t set;
      CPU_ZERO(&set);
      CPU_SET(cpus[static_cast<std::size_t>(i)], &set);
      if (pthread_setaffinity_np(pthread_self(), sizeof set, &set) != 0) {
        step = -1;
        return;
      }
      step = 2 * i + 1;  // on cpus[i] now
      while (step.load() != 2 * i + 2) std::this_thread::yield();
    }
  });
  for (int i = 0; i < 2; ++i) {
    while (step.load() != 2 * i + 1 && step.load() != -1) std::this_thread::yield();
    if (step.load() == -1) break;
    Result<int> r = last_cpu_of_thread(tid.load());
    EXPECT_TRUE(r.is_ok()) << r.status().to_string();
    if (r.is_ok()) {
      EXPECT_EQ(*r, static_cast<int>(cpus[static_cast<std::size_t>(i)]));
    }
    step = 2 * i + 2;
  }
  t.join();
  ASSERT_NE(step.load(), -1) << "the thread could not move";
}

TEST(ProcStat, AThreadThatIsGoneIsEio) {
  std::uint32_t tid = 0;
  std::thread t([&] { tid = static_cast<std::uint32_t>(::syscall(SYS_gettid)); });
  t.join();
  // The kernel reuses thread ids only after wrapping around pid_max.
  const Result<int> r = last_cpu_of_thread(tid);
  ASSERT_FALSE(r.is_ok());
  EXPECT_EQ(r.status().code(), EIO);
}

TEST(ThreadNames, AThreadNamedByUhmmShowsItsNameInProc) {
  std::string seen, cut;
  std::thread([&] {
    name_this_thread("fault", 3);
    seen = *read_proc_text(("/proc/self/task/" + std::to_string(::syscall(SYS_gettid)) + "/comm").c_str());
    name_this_thread("a-role-far-too-long");
    cut = *read_proc_text(("/proc/self/task/" + std::to_string(::syscall(SYS_gettid)) + "/comm").c_str());
  }).join();
  EXPECT_EQ(seen, "uhmm-fault3\n");
  EXPECT_EQ(cut, "uhmm-a-role-far\n");  // the kernel keeps 15 bytes
}

TEST(HugeMapped, TellsAHugeMappedBlockFromASplitOneAndAnEmptyOne) {
  constexpr std::size_t kBlock = std::size_t{2} << 20;
  void* raw = ::mmap(nullptr, 3 * kBlock, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(raw, MAP_FAILED);
  auto* p = reinterpret_cast<char*>((reinterpret_cast<std::uintptr_t>(raw) + kBlock - 1) & ~(kBlock - 1));
  const VirtAddr first = VirtAddr::of(p), second = VirtAddr::of(p + kBlock);
  ASSERT_EQ(::madvise(p, 2 * kBlock, MADV_HUGEPAGE), 0);
  Result<bool> empty = huge_mapped(first, kBlock);
  if (!empty && empty.status().code() == EOPNOTSUPP) GTEST_SKIP() << "no PAGEMAP_SCAN (Linux < 6.7)";
  ASSERT_TRUE(empty.is_ok()) << empty.status().to_string();
  EXPECT_FALSE(*empty) << "nothing is mapped yet";
  std::memset(p, 1, 2 * kBlock);
  if (!*huge_mapped(first, kBlock) || !*huge_mapped(second, kBlock)) GTEST_SKIP() << "the kernel gave no huge pages";
  EXPECT_TRUE(*huge_mapped(first, 2 * kBlock));
  // Dropping one small page splits the second block's huge mapping.
  ASSERT_EQ(::madvise(p + kBlock + 4096, 4096, MADV_DONTNEED), 0);
  EXPECT_TRUE(*huge_mapped(first, kBlock));
  EXPECT_FALSE(*huge_mapped(second, kBlock));
  EXPECT_FALSE(*huge_mapped(first, 2 * kBlock)) << "every page must be huge-mapped";
  ::munmap(raw, 3 * kBlock);
}

}  // namespace
}  // namespace uhmm::platform
