// platform: facts about the process's threads that uhmm's own threads need
// (where a thread runs, and names that tell uhmm's threads apart in top,
// perf and gdb).
#pragma once

#include <atomic>
#include <chrono>
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

/// Keeps the calling thread on `cpu`.  An error if the CPU does not exist
/// or the thread may not run there (its cpuset).
Status pin_this_thread(unsigned cpu);

/// Names the calling thread: "uhmm-" followed by `role` and, if given,
/// `index` ("uhmm-fault1").  The kernel keeps 15 bytes; the rest is cut.
/// Best effort: a thread that cannot be named runs the same.
void name_this_thread(std::string_view role, std::optional<unsigned> index = std::nullopt);

/// Sleeps while `word` holds `expected`, for at most `timeout`, until
/// futex_wake_all on it (a private futex).  Returns at once if the word
/// differs already; may return early (a signal, a spurious wake-up): callers
/// look again.  Async-signal-safe (one system call), so the in-thread fault
/// handler may wait with it.
void futex_wait(const std::atomic<std::uint32_t>& word, std::uint32_t expected, std::chrono::microseconds timeout);
/// Wakes every thread asleep in futex_wait on `word`.
void futex_wake_all(const std::atomic<std::uint32_t>& word);

}  // namespace uhmm::platform
