// platform: facts about the process's threads that uhmm's own threads need
// (where a thread runs, and names that tell uhmm's threads apart in top,
// perf and gdb).
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

#include "uhmm/status.hpp"

namespace uhmm::platform {

/// The CPU field ("processor", the 39th) of the text of /proc/<pid>/stat,
/// or nullopt if it does not parse.  The command name may hold spaces and
/// parentheses: fields are counted from the last ')'.
std::optional<int> parse_stat_cpu(std::string_view stat);
/// The CPU a thread of this process last ran on (where it is running, or
/// will most likely resume).  EIO if its /proc entry cannot be read (the
/// thread is gone).  Costs a few microseconds: not for a fast path.
Result<int> last_cpu_of_thread(std::uint32_t tid);

/// last_cpu_of_thread for a caller that asks about the same thread again
/// and again: keeps that thread's /proc stat file open between looks (a
/// look then costs one pread, about 0.9 us here, instead of 2.2 us with the
/// open and close).  One per calling thread: not thread-safe.
class ThreadCpuProbe {
 public:
  ThreadCpuProbe() = default;
  ~ThreadCpuProbe();
  ThreadCpuProbe(const ThreadCpuProbe&) = delete;
  ThreadCpuProbe& operator=(const ThreadCpuProbe&) = delete;

  Result<int> last_cpu_of(std::uint32_t tid);

 private:
  void forget();
  int fd_ = -1;
  std::uint32_t tid_ = 0;
};

/// Keeps the calling thread on `cpu`.  An error if the CPU does not exist
/// or the thread may not run there (its cpuset).
Status pin_this_thread(unsigned cpu);

/// Names the calling thread: "uhmm-" followed by `role` and, if given,
/// `index` ("uhmm-fault1").  The kernel keeps 15 bytes; the rest is cut.
/// Best effort: a thread that cannot be named runs the same.
void name_this_thread(std::string_view role, std::optional<unsigned> index = std::nullopt);

}  // namespace uhmm::platform
