// platform: the process's threads (threads.hpp).
#include "platform/threads.hpp"

#include <pthread.h>
#include <sched.h>
#include <linux/futex.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <string>

#include "platform/maps.hpp"
#include "platform/uffd.hpp"

namespace uhmm::platform {

std::optional<int> parse_stat_cpu(std::string_view stat) {
  const std::size_t name_end = stat.rfind(')');
  if (name_end == std::string_view::npos) return std::nullopt;
  // After the name: " state ppid ...", the state being field 3.
  std::size_t at = name_end + 1;
  for (int field = 2; field < 39; ++field) {
    at = stat.find(' ', at);
    if (at == std::string_view::npos) return std::nullopt;
    ++at;
  }
  int cpu = 0;
  const auto [end, ec] = std::from_chars(stat.data() + at, stat.data() + stat.size(), cpu);
  if (ec != std::errc() || end == stat.data() + at) return std::nullopt;
  return cpu;
}

Result<int> last_cpu_of_thread(std::uint32_t tid) {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/self/task/%u/stat", tid);
  auto text = read_proc_text(path);
  if (!text) return text.status();
  const std::optional<int> cpu = parse_stat_cpu(*text);
  if (!cpu) return Status::error(EIO, std::string("cannot parse ") + path);
  return *cpu;
}

Status pin_this_thread(unsigned cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (cpu >= CPU_SETSIZE) return Status::error(EINVAL, "no such CPU: " + std::to_string(cpu));
  CPU_SET(cpu, &set);
  if (const int rc = ::pthread_setaffinity_np(::pthread_self(), sizeof set, &set); rc != 0)
    return Status::error(rc, "pthread_setaffinity_np(" + std::to_string(cpu) + "): " + errno_text(rc));
  return Status::ok();
}

void name_this_thread(std::string_view role, std::optional<unsigned> index) {
  std::string name = "uhmm-";
  name.append(role);
  if (index) name += std::to_string(*index);
  if (name.size() > 15) name.resize(15);
  (void)::prctl(PR_SET_NAME, name.c_str(), 0, 0, 0);
}

namespace {
// The kernel reads the 32-bit value of the atomic's own storage.
std::uint32_t* futex_address(const std::atomic<std::uint32_t>& word) {
  static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t));
  static_assert(std::atomic<std::uint32_t>::is_always_lock_free);
  return const_cast<std::uint32_t*>(reinterpret_cast<const std::uint32_t*>(&word));
}
}  // namespace

void futex_wait(const std::atomic<std::uint32_t>& word, std::uint32_t expected, std::chrono::microseconds timeout) {
  const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(timeout).count();
  const struct timespec rel = {static_cast<time_t>(ns / 1'000'000'000), static_cast<long>(ns % 1'000'000'000)};
  (void)::syscall(SYS_futex, futex_address(word), FUTEX_WAIT_PRIVATE, expected, &rel, nullptr, 0);
}

void futex_wake_all(const std::atomic<std::uint32_t>& word) {
  (void)::syscall(SYS_futex, futex_address(word), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
}

}  // namespace uhmm::platform
