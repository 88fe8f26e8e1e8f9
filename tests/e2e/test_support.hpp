// Shared helpers for the end-to-end, migrate and sim-device suites: data
// patterns checked word by word, page-state counts, and fork helpers.
#pragma once

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "uhmm/uhmm.hpp"

namespace uhmm::test {

/// The 64-bit word `word` of a page filled with `seed`.  Every word differs
/// from its neighbours and from the same word of other seeds, so a page that
/// moved to the wrong place, a stale copy or a zero page are all detected.
constexpr std::uint64_t pattern_word(std::uint64_t seed, std::size_t word) {
  std::uint64_t x = seed * 0x9E3779B97F4A7C15ull + word * 0xBF58476D1CE4E5B9ull + 0x94D049BB133111EBull;
  x ^= x >> 31;
  x *= 0xD6E8FEB86659FD39ull;
  x ^= x >> 29;
  return x | 1;  // never zero: a zero-filled page never passes
}

inline constexpr std::size_t kWordsPerPage = kPageSize / sizeof(std::uint64_t);

/// Fills one page with the pattern of `seed`.
inline void fill_page(void* page, std::uint64_t seed) {
  auto* w = static_cast<volatile std::uint64_t*>(page);
  for (std::size_t i = 0; i < kWordsPerPage; ++i) w[i] = pattern_word(seed, i);
}

/// Checks one page against the pattern of `seed`; names the first bad word.
inline ::testing::AssertionResult page_has_pattern(const void* page, std::uint64_t seed) {
  const auto* w = static_cast<const volatile std::uint64_t*>(page);
  for (std::size_t i = 0; i < kWordsPerPage; ++i) {
    const std::uint64_t got = w[i];
    if (got != pattern_word(seed, i))
      return ::testing::AssertionFailure() << "word " << i << " is " << std::hex << got << ", expected "
                                           << pattern_word(seed, i);
  }
  return ::testing::AssertionSuccess();
}

/// Checks a private buffer (not managed memory) of one page.
inline bool buffer_has_pattern(const std::byte* page, std::uint64_t seed) {
  for (std::size_t i = 0; i < kWordsPerPage; ++i) {
    std::uint64_t got;
    std::memcpy(&got, page + i * sizeof got, sizeof got);
    if (got != pattern_word(seed, i)) return false;
  }
  return true;
}

/// Page `i` of the range starting at `base` gets seed `salt + i`.
inline void fill_range(VirtAddr base, std::size_t pages, std::uint64_t salt = 0) {
  for (std::size_t i = 0; i < pages; ++i) fill_page((base + i * kPageSize).ptr(), salt + i);
}

inline ::testing::AssertionResult range_has_pattern(VirtAddr base, std::size_t pages, std::uint64_t salt = 0) {
  for (std::size_t i = 0; i < pages; ++i) {
    auto r = page_has_pattern((base + i * kPageSize).ptr(), salt + i);
    if (!r) return ::testing::AssertionFailure() << "page " << i << ": " << r.message();
  }
  return ::testing::AssertionSuccess();
}

/// Polls `pred` until it holds or `limit` passes; returns its last value.
///
/// Work the fault service does on behalf of other pages (fault-around, hole
/// fills, the device page's last reference) is asynchronous to the test
/// thread; tests wait for it to settle before asserting on counters or page
/// states.  Not a timing assertion: the limit only bounds a wait for
/// something that must happen.
template <class Pred>
bool eventually(Pred&& pred, std::chrono::milliseconds limit = std::chrono::milliseconds(5000)) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() >= deadline) return pred();
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  return true;
}

/// Waits until `map` has `in_use` pages in use: the fault service has then
/// dropped its references, which it does last (after counters and unlocks).
inline ::testing::AssertionResult settles_to(const DevicePagemap& map, std::uint64_t in_use) {
  if (eventually([&] { return map.pages_in_use() == in_use; })) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "page map still has " << map.pages_in_use() << " pages in use, expected "
                                       << in_use;
}

/// Waits until check_invariants() passes: no page-table entry locked and no
/// staging page taken, i.e. the fault service finished what it started.
inline ::testing::AssertionResult settles(const AddressSpace& as) {
  Status last;
  if (eventually([&] {
        last = as.check_invariants();
        return last.is_ok();
      }))
    return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "address space did not settle: " << last.to_string();
}

struct StateCounts {
  std::size_t none = 0, system = 0, device = 0, coherent = 0, exclusive = 0, locked = 0, poisoned = 0;
};

/// Page states of a range as the software page table reports them (reads
/// only the table: never touches the memory).
inline StateCounts count_states(const AddressSpace& as, VirtAddr base, std::size_t pages) {
  StateCounts c;
  for (std::size_t i = 0; i < pages; ++i) {
    const PageInfo info = as.page_info(base + i * kPageSize);
    switch (info.state) {
      case PageInfo::State::kNone: ++c.none; break;
      case PageInfo::State::kSystem: ++c.system; break;
      case PageInfo::State::kDevicePrivate: ++c.device; break;
      case PageInfo::State::kDeviceCoherent: ++c.coherent; break;
      case PageInfo::State::kDeviceExclusive: ++c.exclusive; break;
    }
    if (info.locked) ++c.locked;
    if (info.poisoned) ++c.poisoned;
  }
  return c;
}

#define UHMM_EXPECT_INVARIANTS(as)                                  \
  do {                                                              \
    const ::uhmm::Status uhmm_inv_ = (as).check_invariants();       \
    EXPECT_TRUE(uhmm_inv_.is_ok()) << uhmm_inv_.to_string();        \
  } while (0)

/// Result of running `fn` in a forked child.
struct ChildResult {
  bool exited = false;
  int exit_code = -1;
  bool signaled = false;
  int signal = 0;
  std::string describe() const {
    if (exited) return "exited with code " + std::to_string(exit_code);
    if (signaled) return std::string("killed by signal ") + std::to_string(signal) + " (" + strsignal(signal) + ")";
    return "did not finish";
  }
};

/// Forks; the child runs `fn` and _exit()s with its return value.  The child
/// gets a watchdog alarm so that a hang ends as SIGALRM, not as a stuck test.
/// Call from a single-threaded parent when the child must start threads
/// (TSan refuses new threads after a multi-threaded fork).
template <class Fn>
ChildResult run_in_child(Fn&& fn, unsigned watchdog_seconds = 20) {
  ChildResult r;
  const pid_t pid = ::fork();
  if (pid < 0) return r;
  if (pid == 0) {
    ::alarm(watchdog_seconds);
    int code = 100;
    try {
      code = fn();
    } catch (...) {
      code = 101;
    }
    ::_exit(code);
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) return r;
  }
  if (WIFEXITED(status)) {
    r.exited = true;
    r.exit_code = WEXITSTATUS(status);
  } else if (WIFSIGNALED(status)) {
    r.signaled = true;
    r.signal = WTERMSIG(status);
  }
  return r;
}

/// A forked child that shares the parent's memory copy-on-write and waits
/// until killed (the destructor kills and reaps it).
class SleepingChild {
 public:
  SleepingChild() {
    pid_ = ::fork();
    if (pid_ == 0) {
      ::alarm(60);  // never outlive a crashed parent for long
      for (;;) ::pause();
    }
  }
  ~SleepingChild() { stop(); }
  SleepingChild(const SleepingChild&) = delete;
  SleepingChild& operator=(const SleepingChild&) = delete;
  bool started() const { return pid_ > 0; }
  void stop() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    int status = 0;
    while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
    pid_ = -1;
  }

 private:
  pid_t pid_ = -1;
};

/// Interval-notifier ops that record every invalidation (the driver side
/// of the protocol reduced to set_seq), for tests of who gets told what.
struct RecordingNotifierOps : IntervalNotifierOps {
  bool invalidate(IntervalNotifier& sub, const NotifyRange& range, std::uint64_t cur_seq) override {
    std::lock_guard lock(mutex);
    sub.set_seq(cur_seq);
    events.push_back(range);
    return true;
  }
  /// The invalidations so far, emptying the record.
  std::vector<NotifyRange> take() {
    std::lock_guard lock(mutex);
    return std::exchange(events, {});
  }
  bool saw(NotifyEvent event) {
    std::lock_guard lock(mutex);
    for (const NotifyRange& r : events)
      if (r.event == event) return true;
    return false;
  }
  std::mutex mutex;
  std::vector<NotifyRange> events;
};

/// An address space serving faults the given way; null (and a test
/// failure) if it cannot be made.
inline std::unique_ptr<AddressSpace> make_address_space(FaultMode mode = FaultMode::kServiceThreads) {
  AddressSpaceOptions o;
  o.fault_mode = mode;
  auto r = AddressSpace::create(o);
  EXPECT_TRUE(r.is_ok()) << r.status().to_string();
  return r.is_ok() ? std::move(*r) : nullptr;
}

/// A cold simulated device of `bytes`, without sequential prefetch (so
/// that tests see exactly the pages they fault).
inline std::unique_ptr<sim::SimDevice> make_device(std::size_t bytes) {
  sim::SimDeviceOptions o;
  o.memory_bytes = bytes;
  o.warm_memory = false;
  o.prefetch_blocks = 0;
  auto r = sim::SimDevice::create(o);
  EXPECT_TRUE(r.is_ok()) << r.status().to_string();
  return r.is_ok() ? std::move(*r) : nullptr;
}

/// Test-name suffix for a fault mode parameter.
inline std::string fault_mode_name(FaultMode mode) {
  return mode == FaultMode::kInThread ? "InThread" : "ServiceThreads";
}

}  // namespace uhmm::test
