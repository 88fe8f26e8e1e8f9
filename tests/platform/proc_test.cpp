// platform: what uhmm reads of /proc about its own threads, and their names.
#include <gtest/gtest.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <string>
#include <thread>

#include "platform/maps.hpp"
#include "platform/threads.hpp"

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

}  // namespace
}  // namespace uhmm::platform
