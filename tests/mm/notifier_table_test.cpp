// Interval notifiers (mm::NotifierTable, uhmm/notifier.hpp): which
// subscriptions an invalidation calls, what they are handed, the sequence
// protocol and its waits, insert/remove racing invalidations, the interval
// tree at scale, and the API on a real AddressSpace.  The protocol is told
// in docs/notifiers.md.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <latch>
#include <limits>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "mm/address_space_impl.hpp"
#include "mm/notifier_table.hpp"
#include "uhmm/address_space.hpp"
#include "uhmm/notifier.hpp"

namespace uhmm {
namespace {

using mm::Invalidation;
using mm::NotifierTable;
using mm::ScopedInvalidation;

// Subscriptions are only bookkeeping here: nothing is ever touched at these
// addresses.
constexpr VirtAddr kBase{0x7f0000000000};
constexpr auto kPatience = std::chrono::seconds(20);

VirtAddr page(std::size_t n) { return kBase + n * kPageSize; }
VirtAddr minus_one(VirtAddr a) { return VirtAddr{a.value - 1}; }

NotifyRange pages(std::size_t first, std::size_t count, NotifyEvent event = NotifyEvent::kUnmap) {
  return NotifyRange{page(first), page(first + count), event};
}

#define ASSERT_OK(expr)                                  \
  do {                                                   \
    const ::uhmm::Status st_ = (expr);                   \
    ASSERT_TRUE(st_.is_ok()) << st_.to_string();         \
  } while (0)

#define EXPECT_TABLE_INVARIANTS(table)                   \
  do {                                                   \
    const ::uhmm::Status inv_ = (table).check_invariants(); \
    EXPECT_TRUE(inv_.is_ok()) << inv_.to_string();       \
  } while (0)

/// Polls `pred` until it holds or kPatience runs out (a bounded wait, not a
/// timing assertion: the tests only ever wait for something that must
/// happen).
template <class Pred>
bool eventually(Pred pred) {
  const auto deadline = std::chrono::steady_clock::now() + kPatience;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  return true;
}

/// Runs a function on its own thread; done() says whether it has returned.
class Background {
 public:
  explicit Background(std::function<void()> f)
      : thread_([this, f = std::move(f)] {
          f();
          done_.store(true, std::memory_order_release);
        }) {}
  /// A thread still blocked after kPatience is a failed test, not a hang.
  ~Background() {
    if (!finishes()) {
      std::fprintf(stderr, "background thread still blocked after %llds: aborting\n",
                   static_cast<long long>(kPatience.count()));
      std::fflush(stdout);
      std::abort();
    }
    join();
  }
  Background(const Background&) = delete;
  Background& operator=(const Background&) = delete;

  bool done() const { return done_.load(std::memory_order_acquire); }
  bool finishes() { return eventually([this] { return done(); }); }
  void join() {
    if (thread_.joinable()) thread_.join();
  }

 private:
  std::atomic<bool> done_{false};
  std::thread thread_;
};

/// A driver that records every callback and does what the contract asks:
/// records cur_seq under its lock.
struct Call {
  const IntervalNotifier* sub = nullptr;
  NotifyRange range;
  std::uint64_t cur_seq = 0;
};

class RecordingOps : public IntervalNotifierOps {
 public:
  bool invalidate(IntervalNotifier& sub, const NotifyRange& range, std::uint64_t cur_seq) override {
    if (before) before(sub, range, cur_seq);
    std::lock_guard lock(mutex);
    calls.push_back({&sub, range, cur_seq});
    sub.set_seq(cur_seq);
    return true;
  }
  std::size_t count() {
    std::lock_guard lock(mutex);
    return calls.size();
  }
  std::size_t count_for(const IntervalNotifier& sub) {
    std::lock_guard lock(mutex);
    return static_cast<std::size_t>(
        std::count_if(calls.begin(), calls.end(), [&](const Call& c) { return c.sub == &sub; }));
  }
  std::vector<Call> taken() {
    std::lock_guard lock(mutex);
    return calls;
  }

  /// Runs first inside every callback (tests hook behaviour here).
  std::function<void(IntervalNotifier&, const NotifyRange&, std::uint64_t)> before;
  std::mutex mutex;  // the driver's lock
  std::vector<Call> calls;
};

// ---- which subscriptions are called ----------------------------------------------

TEST(NotifierTable, OnlyOverlappingSubscriptionsAreCalled) {
  NotifierTable table;
  RecordingOps ops;
  IntervalNotifier sub;  // [page 16, page 32)
  ASSERT_OK(table.insert(sub, page(16), 16 * kPageSize, ops));
  EXPECT_EQ(sub.start(), page(16));
  EXPECT_EQ(sub.end(), page(32));
  EXPECT_EQ(sub.length(), 16 * kPageSize);

  struct Case {
    VirtAddr start, end;
    bool overlaps;
  };
  const Case cases[] = {
      {page(0), page(16), false},                  // ends exactly where the subscription starts
      {page(32), page(48), false},                 // starts exactly where it ends
      {page(15), page(16) + 1, true},              // one byte in at the start
      {minus_one(page(32)), page(40), true},            // one byte in at the end
      {page(20), page(21), true},                  // inside
      {page(0), page(100), true},                  // around
      {page(16), page(32), true},                  // the same range
      {page(100), page(200), false},               // far away
      {minus_one(page(16)), page(16), false},           // the byte just before
      {page(16), page(16), false},                 // empty range
  };
  for (const Case& c : cases) {
    const std::size_t before = ops.count();
    {
      ScopedInvalidation inv(table, NotifyRange{c.start, c.end, NotifyEvent::kClear});
      ASSERT_OK(inv.status());
      EXPECT_EQ(inv.invalidation().notified(), c.overlaps ? 1u : 0u);
    }
    EXPECT_EQ(ops.count() - before, c.overlaps ? 1u : 0u)
        << "range [" << std::hex << c.start.value << ", " << c.end.value << ")";
  }
  EXPECT_TABLE_INVARIANTS(table);
  table.remove(sub);
  EXPECT_FALSE(sub.inserted());
}

TEST(NotifierTable, ByteGranularRangesAndSeveralSubscriptions) {
  NotifierTable table;
  RecordingOps ops;
  IntervalNotifier a, b, c;
  ASSERT_OK(table.insert(a, kBase + 10, 5, ops));    // bytes [10, 15)
  ASSERT_OK(table.insert(b, kBase + 15, 1, ops));    // byte 15
  ASSERT_OK(table.insert(c, kBase + 0, 100, ops));   // bytes [0, 100), overlaps both
  {
    ScopedInvalidation inv(table, NotifyRange{kBase + 14, kBase + 15});
    ASSERT_OK(inv.status());
  }
  ASSERT_EQ(ops.count(), 2u);
  EXPECT_EQ(ops.count_for(a), 1u);
  EXPECT_EQ(ops.count_for(c), 1u);
  {
    ScopedInvalidation inv(table, NotifyRange{kBase + 15, kBase + 16});
    ASSERT_OK(inv.status());
  }
  EXPECT_EQ(ops.count_for(b), 1u);
  EXPECT_EQ(ops.count_for(a), 1u);
  EXPECT_EQ(ops.count_for(c), 2u);
  // Callbacks come in address order.
  {
    ScopedInvalidation inv(table, NotifyRange{kBase, kBase + 100});
    ASSERT_OK(inv.status());
  }
  const auto calls = ops.taken();
  ASSERT_EQ(calls.size(), 7u);
  EXPECT_EQ(calls[4].sub, &c);
  EXPECT_EQ(calls[5].sub, &a);
  EXPECT_EQ(calls[6].sub, &b);
  EXPECT_TABLE_INVARIANTS(table);
  table.remove(a);
  table.remove(b);
  table.remove(c);
  EXPECT_EQ(table.size(), 0u);
}

TEST(NotifierTable, EventOwnerAndRangeArriveIntact) {
  NotifierTable table;
  RecordingOps ops;
  IntervalNotifier sub;
  ASSERT_OK(table.insert(sub, page(0), 8 * kPageSize, ops));
  const int device_a = 0;
  const NotifyEvent events[] = {NotifyEvent::kUnmap,   NotifyEvent::kClear,     NotifyEvent::kProtectionVma,
                                NotifyEvent::kMigrate, NotifyEvent::kExclusive, NotifyEvent::kRelease};
  for (NotifyEvent e : events) {
    NotifyRange r{page(2), page(3) + 5, e};
    if (e == NotifyEvent::kMigrate || e == NotifyEvent::kExclusive) r.owner = &device_a;
    ScopedInvalidation inv(table, r);
    ASSERT_OK(inv.status());
  }
  const auto calls = ops.taken();
  ASSERT_EQ(calls.size(), std::size(events));
  for (std::size_t i = 0; i < calls.size(); ++i) {
    const bool owned = events[i] == NotifyEvent::kMigrate || events[i] == NotifyEvent::kExclusive;
    EXPECT_EQ(calls[i].sub, &sub);
    EXPECT_EQ(calls[i].range.event, events[i]) << to_string(events[i]);
    EXPECT_EQ(calls[i].range.owner, owned ? static_cast<const void*>(&device_a) : nullptr);
    // The whole range of the change, not clipped to the subscription.
    EXPECT_EQ(calls[i].range.start, page(2));
    EXPECT_EQ(calls[i].range.end, page(3) + 5);
    EXPECT_TRUE(calls[i].range.blockable);
  }
  EXPECT_STREQ(to_string(NotifyEvent::kUnmap), "unmap");
  EXPECT_STREQ(to_string(NotifyEvent::kProtectionVma), "protection_vma");
  EXPECT_STREQ(to_string(NotifyEvent::kRelease), "release");
  table.remove(sub);
}

// ---- the sequence -----------------------------------------------------------------

TEST(NotifierTable, CurSeqIsOddDuringTheCallbackAndReadRetrySeesIt) {
  NotifierTable table;
  RecordingOps ops;
  IntervalNotifier sub;
  ASSERT_OK(table.insert(sub, page(0), kPageSize, ops));
  EXPECT_EQ(table.seq() % 2, 0u);
  const std::uint64_t seq = sub.read_begin();
  EXPECT_FALSE(sub.read_retry(seq));
  EXPECT_FALSE(sub.check_retry(seq));

  bool retry_before_set = true;
  bool retry_after_set = false;
  std::uint64_t table_seq_inside = 0;
  std::size_t active_inside = 0;
  ops.before = [&](IntervalNotifier& s, const NotifyRange&, std::uint64_t) {
    retry_before_set = s.read_retry(seq);
    table_seq_inside = table.seq();
    active_inside = table.active_invalidations();
  };
  std::uint64_t cur = 0;
  {
    ScopedInvalidation inv(table, pages(0, 1));
    ASSERT_OK(inv.status());
    cur = inv.invalidation().seq();
    retry_after_set = sub.read_retry(seq);
    EXPECT_TRUE(sub.check_retry(seq));
  }
  ASSERT_EQ(ops.count(), 1u);
  EXPECT_EQ(ops.taken()[0].cur_seq, cur);
  EXPECT_EQ(cur % 2, 1u) << "cur_seq must be odd";
  EXPECT_EQ(table_seq_inside % 2, 1u) << "the table's sequence is odd during an invalidation";
  EXPECT_EQ(active_inside, 1u);
  EXPECT_FALSE(retry_before_set) << "nothing reached the subscription before its callback";
  EXPECT_TRUE(retry_after_set) << "read_retry must report the invalidation";
  EXPECT_TRUE(sub.read_retry(seq));
  EXPECT_EQ(table.seq() % 2, 0u) << "even again once nothing is in flight";
  EXPECT_EQ(table.active_invalidations(), 0u);

  // A new read section starts from the sequence the callback recorded.
  const std::uint64_t seq2 = sub.read_begin();
  EXPECT_EQ(seq2, cur);
  EXPECT_FALSE(sub.read_retry(seq2));
  table.remove(sub);
}

TEST(NotifierTable, EveryInvalidationGetsItsOwnOddSequence) {
  NotifierTable table;
  const std::uint64_t idle = table.seq();
  Invalidation a, b, c;
  ASSERT_OK(table.invalidate_start(a, pages(0, 1)));
  ASSERT_OK(table.invalidate_start(b, pages(10, 1)));  // overlaps a in time
  EXPECT_EQ(table.active_invalidations(), 2u);
  table.invalidate_end(a);
  EXPECT_EQ(table.seq() % 2, 1u) << "still odd: b is in flight";
  ASSERT_OK(table.invalidate_start(c, pages(0, 1)));
  EXPECT_EQ(table.seq() % 2, 1u);
  EXPECT_TABLE_INVARIANTS(table);
  table.invalidate_end(c);
  table.invalidate_end(b);
  EXPECT_EQ(table.seq() % 2, 0u);
  EXPECT_EQ(table.active_invalidations(), 0u);
  for (std::uint64_t s : {a.seq(), b.seq(), c.seq()}) {
    EXPECT_EQ(s % 2, 1u);
    EXPECT_GT(s, idle);
  }
  EXPECT_LT(a.seq(), b.seq());
  EXPECT_LT(b.seq(), c.seq());
  EXPECT_GT(table.seq(), c.seq());
  EXPECT_TABLE_INVARIANTS(table);
}

// docs/notifiers.md draws this timeline: the device thread's walk is
// overtaken by an invalidation; read_retry under the driver lock catches it.
// The "CPU page table" is one value; the device mirror is a copy plus a
// valid bit, both under the driver's lock.
struct MirrorDriver : IntervalNotifierOps {
  bool invalidate(IntervalNotifier& sub, const NotifyRange&, std::uint64_t cur_seq) override {
    std::lock_guard lock(mutex);
    valid = false;  // stop device use
    sub.set_seq(cur_seq);
    return true;
  }
  std::mutex mutex;
  bool valid = false;
  int copy = 0;
};

TEST(NotifierTable, ReadRetryCatchesAnInvalidationThatOvertookTheWalk) {
  NotifierTable table;
  MirrorDriver driver;
  IntervalNotifier sub;
  ASSERT_OK(table.insert(sub, page(0), kPageSize, driver));
  std::atomic<int> cpu{1};

  // Device thread: read_begin, walk...
  const std::uint64_t seq = sub.read_begin();
  const int walked = cpu.load();
  // ...meanwhile the CPU side changes the page.
  {
    ScopedInvalidation inv(table, pages(0, 1));
    ASSERT_OK(inv.status());
    cpu.store(2);
  }
  // Device thread: lock, check, program.
  bool programmed = false;
  {
    std::lock_guard lock(driver.mutex);
    if (!sub.read_retry(seq)) {
      driver.copy = walked;
      driver.valid = true;
      programmed = true;
    }
  }
  EXPECT_FALSE(programmed) << "the walk saw the old page: read_retry must send the device thread back";
  // Without the check the device would now map the old page for good: no
  // callback is coming to take it away.
  EXPECT_NE(walked, cpu.load());

  // The retry: a fresh section sees the new page and programs it.
  const std::uint64_t seq2 = sub.read_begin();
  const int walked2 = cpu.load();
  {
    std::lock_guard lock(driver.mutex);
    ASSERT_FALSE(sub.read_retry(seq2));
    driver.copy = walked2;
    driver.valid = true;
  }
  EXPECT_EQ(driver.copy, cpu.load());
  table.remove(sub);
}

// ---- waiting -------------------------------------------------------------------

TEST(NotifierTable, ReadBeginWaitsForACoveringInvalidation) {
  NotifierTable table;
  RecordingOps ops;
  IntervalNotifier sub;
  ASSERT_OK(table.insert(sub, page(0), 16 * kPageSize, ops));
  Invalidation inv;
  ASSERT_OK(table.invalidate_start(inv, pages(4, 1)));
  ASSERT_EQ(ops.count(), 1u);

  std::atomic<std::uint64_t> got{0};
  Background reader([&] { got = sub.read_begin(); });
  const bool asleep = eventually([&] { return table.waiters() == 1; });
  EXPECT_TRUE(asleep) << "read_begin did not wait for the invalidation";
  // waiters() counts the reader only while it sleeps inside read_begin.
  EXPECT_FALSE(reader.done());
  table.invalidate_end(inv);
  ASSERT_TRUE(reader.finishes()) << "read_begin did not return after invalidate_end";
  reader.join();
  EXPECT_EQ(got.load(), inv.seq());
  EXPECT_FALSE(sub.read_retry(got.load()));
  EXPECT_EQ(table.waiters(), 0u);
  table.remove(sub);
}

TEST(NotifierTable, ReadBeginWaitsUntilEveryCoveringInvalidationEnds) {
  NotifierTable table;
  RecordingOps ops;
  IntervalNotifier sub;
  ASSERT_OK(table.insert(sub, page(0), 16 * kPageSize, ops));
  Invalidation first, second;
  ASSERT_OK(table.invalidate_start(first, pages(0, 1)));
  ASSERT_OK(table.invalidate_start(second, pages(8, 1)));
  Background reader([&] { (void)sub.read_begin(); });
  EXPECT_TRUE(eventually([&] { return table.waiters() == 1; }));
  table.invalidate_end(first);
  // Still covered by `second`: the reader must still be asleep.  It is
  // counted in waiters() until it returns, so this is not a race.
  EXPECT_EQ(table.waiters(), 1u);
  EXPECT_FALSE(reader.done());
  table.invalidate_end(second);
  ASSERT_TRUE(reader.finishes());
  table.remove(sub);
}

TEST(NotifierTable, ReadBeginDoesNotWaitForAnInvalidationElsewhere) {
  NotifierTable table;
  RecordingOps ops;
  IntervalNotifier sub, other;
  ASSERT_OK(table.insert(sub, page(0), 4 * kPageSize, ops));
  ASSERT_OK(table.insert(other, page(4), 4 * kPageSize, ops));  // touches sub's end
  Invalidation inv;
  ASSERT_OK(table.invalidate_start(inv, pages(4, 4)));  // covers `other` only
  EXPECT_EQ(table.seq() % 2, 1u);
  Background reader([&] { (void)sub.read_begin(); });
  const bool returned = reader.finishes();
  table.invalidate_end(inv);  // lets a wrongly waiting reader go before the join
  reader.join();
  EXPECT_TRUE(returned) << "read_begin waited for an invalidation that does not cover the subscription";
  EXPECT_EQ(ops.count_for(sub), 0u);
  EXPECT_EQ(ops.count_for(other), 1u);
  table.remove(sub);
  table.remove(other);
}

// A callback that blocks until released; remove in another thread must not
// return before the callback does (and the invalidation has ended).
TEST(NotifierTable, RemoveWaitsForARunningCallback) {
  NotifierTable table;
  RecordingOps ops;
  std::latch entered(1);
  std::latch release(1);
  std::atomic<bool> callback_returned{false};
  ops.before = [&](IntervalNotifier&, const NotifyRange&, std::uint64_t) {
    entered.count_down();
    release.wait();
  };
  IntervalNotifier sub;
  ASSERT_OK(table.insert(sub, page(0), kPageSize, ops));

  Background invalidator([&] {
    ScopedInvalidation inv(table, pages(0, 1));
    callback_returned = true;  // invalidate_start returned: the callback is done
  });
  entered.wait();
  std::atomic<bool> saw_callback_done_at_return{false};
  Background remover([&] {
    table.remove(sub);
    saw_callback_done_at_return = callback_returned.load();
  });
  const bool asleep = eventually([&] { return table.waiters() == 1; });
  EXPECT_TRUE(asleep) << "remove did not wait";
  EXPECT_FALSE(remover.done()) << "remove returned while the callback was still running";
  EXPECT_EQ(table.size(), 0u) << "remove takes the subscription out of lookups before waiting";
  release.count_down();
  ASSERT_TRUE(invalidator.finishes());
  ASSERT_TRUE(remover.finishes());
  invalidator.join();
  remover.join();
  EXPECT_TRUE(saw_callback_done_at_return.load());
  EXPECT_FALSE(sub.inserted());
  EXPECT_EQ(ops.count(), 1u);
  EXPECT_TABLE_INVARIANTS(table);
}

// ---- insert and remove while invalidations are in flight -------------------------

TEST(NotifierTable, InsertDuringAnInvalidation) {
  NotifierTable table;
  RecordingOps ops;
  Invalidation inv;
  ASSERT_OK(table.invalidate_start(inv, pages(0, 8)));

  IntervalNotifier covered, elsewhere;
  ASSERT_OK(table.insert(covered, page(4), 8 * kPageSize, ops));  // overlaps the range in flight
  ASSERT_OK(table.insert(elsewhere, page(8), kPageSize, ops));     // starts where it ends
  EXPECT_EQ(table.size(), 2u);
  EXPECT_TABLE_INVARIANTS(table);
  EXPECT_EQ(ops.count(), 0u) << "a subscription inserted late gets no callback from what started before it";

  // The covered one is mid-change: its first read section waits for the end.
  Background reader([&] { (void)covered.read_begin(); });
  EXPECT_TRUE(eventually([&] { return table.waiters() == 1; }));
  EXPECT_FALSE(reader.done());
  // The other one is not.
  Background other_reader([&] { (void)elsewhere.read_begin(); });
  const bool other_returned = other_reader.finishes();
  table.invalidate_end(inv);
  ASSERT_TRUE(reader.finishes());
  reader.join();
  other_reader.join();
  EXPECT_TRUE(other_returned);

  // From now on it is called like any other.
  {
    ScopedInvalidation again(table, pages(5, 1));
    ASSERT_OK(again.status());
  }
  EXPECT_EQ(ops.count_for(covered), 1u);
  EXPECT_TABLE_INVARIANTS(table);
  table.remove(covered);
  table.remove(elsewhere);
}

TEST(NotifierTable, RemoveDuringAnInvalidation) {
  NotifierTable table;
  RecordingOps ops;
  IntervalNotifier covered, uncovered;
  ASSERT_OK(table.insert(covered, page(0), kPageSize, ops));
  ASSERT_OK(table.insert(uncovered, page(100), kPageSize, ops));
  Invalidation inv;
  ASSERT_OK(table.invalidate_start(inv, pages(0, 1)));

  // Not covered: removal does not wait.
  Background quick([&] { table.remove(uncovered); });
  const bool quick_returned = quick.finishes();
  // Covered: waits for the invalidation to end...
  Background remover([&] { table.remove(covered); });
  EXPECT_TRUE(eventually([&] { return table.waiters() == 1; }));
  EXPECT_FALSE(remover.done());
  // ...but is already out of lookups: a new invalidation does not call it.
  {
    ScopedInvalidation second(table, pages(0, 1));
    ASSERT_OK(second.status());
    EXPECT_EQ(second.invalidation().notified(), 0u);
  }
  EXPECT_TABLE_INVARIANTS(table);
  table.invalidate_end(inv);
  ASSERT_TRUE(remover.finishes());
  remover.join();
  quick.join();
  EXPECT_TRUE(quick_returned) << "removing a subscription no invalidation covers waited";
  EXPECT_EQ(ops.count_for(covered), 1u);
  EXPECT_EQ(ops.count_for(uncovered), 0u);
  EXPECT_EQ(table.size(), 0u);
  EXPECT_TABLE_INVARIANTS(table);
}

TEST(NotifierTable, InsertAndRemoveFromACallback) {
  // Inserting from a callback is allowed (no wait involved).
  NotifierTable table;
  RecordingOps ops;
  RecordingOps late_ops;
  IntervalNotifier sub, late;
  ops.before = [&](IntervalNotifier&, const NotifyRange&, std::uint64_t) {
    if (!late.inserted()) {
      EXPECT_TRUE(table.insert(late, page(0), kPageSize, late_ops).is_ok());
    }
  };
  ASSERT_OK(table.insert(sub, page(0), kPageSize, ops));
  {
    ScopedInvalidation inv(table, pages(0, 1));
    ASSERT_OK(inv.status());
    EXPECT_TRUE(late.inserted());
    EXPECT_TABLE_INVARIANTS(table);
  }
  EXPECT_EQ(late_ops.count(), 0u);
  table.remove(late);
  table.remove(sub);
}

// ---- failures inside callbacks -----------------------------------------------------

TEST(NotifierTable, ACallbackThatThrowsDoesNotStopTheInvalidation) {
  NotifierTable table;
  struct Throwing : IntervalNotifierOps {
    bool invalidate(IntervalNotifier&, const NotifyRange&, std::uint64_t) override {
      if (non_std) throw 42;
      throw std::runtime_error("driver exploded");
    }
    bool non_std = false;
  } thrower, thrower2;
  thrower2.non_std = true;
  RecordingOps ops;
  IntervalNotifier first, bad, bad2, last;
  ASSERT_OK(table.insert(first, page(0), kPageSize, ops));
  ASSERT_OK(table.insert(bad, page(1), kPageSize, thrower));
  ASSERT_OK(table.insert(bad2, page(2), kPageSize, thrower2));
  ASSERT_OK(table.insert(last, page(3), kPageSize, ops));
  const std::uint64_t seq = bad.read_begin();

  testing::internal::CaptureStderr();
  {
    ScopedInvalidation inv(table, pages(0, 4));
    EXPECT_TRUE(inv.ok()) << inv.status().to_string();
    EXPECT_EQ(inv.invalidation().notified(), 4u);
  }
  const std::string err = testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("driver exploded"), std::string::npos) << err;
  EXPECT_NE(err.find("not a std::exception"), std::string::npos) << err;
  EXPECT_EQ(ops.count_for(first), 1u);
  EXPECT_EQ(ops.count_for(last), 1u) << "the subscriptions after the one that threw were not called";
  EXPECT_TRUE(bad.read_retry(seq)) << "uhmm records cur_seq for a callback that threw";
  EXPECT_EQ(table.active_invalidations(), 0u);
  EXPECT_TABLE_INVARIANTS(table);
  for (IntervalNotifier* s : {&first, &bad, &bad2, &last}) table.remove(*s);
}

// Returns false (would sleep) for non-blockable ranges, as a driver whose
// trylock failed does.
struct TrylockOps : RecordingOps {
  bool invalidate(IntervalNotifier& sub, const NotifyRange& range, std::uint64_t cur_seq) override {
    if (!range.blockable) return false;
    return RecordingOps::invalidate(sub, range, cur_seq);
  }
};

TEST(NotifierTable, NonBlockableInvalidationFailsWithEagain) {
  NotifierTable table;
  RecordingOps fine;
  TrylockOps busy;
  IntervalNotifier a, b, c;
  ASSERT_OK(table.insert(a, page(0), kPageSize, fine));
  ASSERT_OK(table.insert(b, page(1), kPageSize, busy));
  ASSERT_OK(table.insert(c, page(2), kPageSize, fine));
  NotifyRange r = pages(0, 3, NotifyEvent::kClear);
  r.blockable = false;
  {
    Invalidation inv;
    const Status s = table.invalidate_start(inv, r);
    EXPECT_EQ(s.code(), EAGAIN) << s.to_string();
    EXPECT_FALSE(inv.in_flight()) << "a failed start has already ended the invalidation";
    EXPECT_EQ(inv.notified(), 2u);
  }
  EXPECT_EQ(fine.count_for(a), 1u);
  EXPECT_EQ(fine.count_for(c), 0u) << "a non-blockable invalidation stops at the first busy callback";
  EXPECT_EQ(table.active_invalidations(), 0u);
  EXPECT_EQ(table.seq() % 2, 0u);
  {
    ScopedInvalidation inv(table, r);
    EXPECT_EQ(inv.status().code(), EAGAIN);
    EXPECT_FALSE(inv.invalidation().in_flight());
  }  // nothing to end: must not end twice
  // The same range, blockable, goes through.
  r.blockable = true;
  {
    ScopedInvalidation inv(table, r);
    EXPECT_TRUE(inv.ok());
  }
  EXPECT_EQ(busy.count_for(b), 1u);
  EXPECT_TABLE_INVARIANTS(table);
  for (IntervalNotifier* s : {&a, &b, &c}) table.remove(*s);
}

TEST(NotifierTable, FalseFromABlockableCallbackIsReportedAndIgnored) {
  NotifierTable table;
  struct Refusing : IntervalNotifierOps {
    bool invalidate(IntervalNotifier&, const NotifyRange&, std::uint64_t) override { return false; }
  } refusing;
  RecordingOps ops;
  IntervalNotifier a, b;
  ASSERT_OK(table.insert(a, page(0), kPageSize, refusing));
  ASSERT_OK(table.insert(b, page(1), kPageSize, ops));
  testing::internal::CaptureStderr();
  {
    ScopedInvalidation inv(table, pages(0, 2));
    EXPECT_TRUE(inv.ok());
  }
  const std::string err = testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("returned false for a blockable"), std::string::npos) << err;
  EXPECT_EQ(ops.count_for(b), 1u);
  table.remove(a);
  table.remove(b);
}

// ---- arguments ------------------------------------------------------------------

TEST(NotifierTable, InsertChecksItsRange) {
  NotifierTable table;
  RecordingOps ops;
  IntervalNotifier sub;
  constexpr std::uintptr_t kMax = std::numeric_limits<std::uintptr_t>::max();
  EXPECT_EQ(table.insert(sub, page(0), 0, ops).code(), EOVERFLOW);
  EXPECT_EQ(table.insert(sub, VirtAddr{kMax - kPageSize}, 2 * kPageSize, ops).code(), EOVERFLOW);
  EXPECT_EQ(table.insert(sub, VirtAddr{kMax}, 1, ops).code(), EOVERFLOW);
  EXPECT_EQ(table.insert(sub, page(0), kMax, ops).code(), EOVERFLOW);
  EXPECT_FALSE(sub.inserted());
  EXPECT_EQ(table.size(), 0u);
  // Up to the last byte is fine; so are unaligned ranges.
  ASSERT_OK(table.insert(sub, VirtAddr{kMax - kPageSize}, kPageSize, ops));
  EXPECT_EQ(sub.end().value, kMax);
  IntervalNotifier other;
  ASSERT_OK(table.insert(other, kBase + 3, 7, ops));
  EXPECT_EQ(table.insert(other, page(50), kPageSize, ops).code(), EBUSY) << "already inserted";
  EXPECT_EQ(other.start(), kBase + 3) << "a refused insert changes nothing";
  {
    ScopedInvalidation inv(table, NotifyRange{VirtAddr{kMax - 1}, VirtAddr{kMax}});
    ASSERT_OK(inv.status());
    EXPECT_EQ(inv.invalidation().notified(), 1u);
  }
  EXPECT_TABLE_INVARIANTS(table);
  table.remove(sub);
  table.remove(other);
  // Removing what is not inserted is a no-op; re-inserting after remove works.
  interval_notifier_remove(sub);
  ASSERT_OK(table.insert(sub, page(7), kPageSize, ops));
  EXPECT_EQ(sub.start(), page(7));
  table.remove(sub);
}

TEST(NotifierTable, DestroyingTheTableDetachesWhatIsLeft) {
  RecordingOps ops;
  IntervalNotifier sub;
  {
    NotifierTable table;
    ASSERT_OK(table.insert(sub, page(0), kPageSize, ops));
  }
  EXPECT_FALSE(sub.inserted());
  interval_notifier_remove(sub);  // a no-op now

  constexpr std::size_t kMany = 1000;
  auto many = std::make_unique<IntervalNotifier[]>(kMany);
  {
    NotifierTable table;
    for (std::size_t i = 0; i < kMany; ++i) ASSERT_OK(table.insert(many[i], page(i % 37), kPageSize, ops));
  }
  for (std::size_t i = 0; i < kMany; ++i) EXPECT_FALSE(many[i].inserted()) << i;
}

// ---- misuse that would deadlock is caught ------------------------------------------

class NotifierTableDeathTest : public ::testing::Test {
 protected:
  void SetUp() override { GTEST_FLAG_SET(death_test_style, "threadsafe"); }
};

TEST_F(NotifierTableDeathTest, RemoveFromACallback) {
  EXPECT_DEATH(
      {
        NotifierTable table;
        RecordingOps ops;
        IntervalNotifier sub;
        ops.before = [&](IntervalNotifier& s, const NotifyRange&, std::uint64_t) { interval_notifier_remove(s); };
        (void)table.insert(sub, page(0), kPageSize, ops);
        ScopedInvalidation inv(table, pages(0, 1));
      },
      "called from an invalidate callback");
}

TEST_F(NotifierTableDeathTest, ReadBeginInsideItsOwnThreadsInvalidation) {
  EXPECT_DEATH(
      {
        NotifierTable table;
        RecordingOps ops;
        IntervalNotifier sub;
        (void)table.insert(sub, page(0), kPageSize, ops);
        ScopedInvalidation inv(table, pages(0, 1));
        (void)sub.read_begin();  // would wait for `inv`, which this thread ends
      },
      "waiting for an invalidation this thread started");
}

TEST_F(NotifierTableDeathTest, DestroyedWhileInserted) {
  EXPECT_DEATH(
      {
        NotifierTable table;
        RecordingOps ops;
        auto sub = std::make_unique<IntervalNotifier>();
        (void)table.insert(*sub, page(0), kPageSize, ops);
        sub.reset();
      },
      "destroyed while inserted");
}

// ---- many subscriptions: the interval tree -----------------------------------------

TEST(NotifierTable, ManySubscriptionsLookupsTouchOnlyWhatOverlaps) {
  constexpr std::size_t kCount = 10000;
  NotifierTable table;
  RecordingOps ops;
  // Subscription i covers page 2i; odd pages are gaps.  Inserted in address
  // order, the worst order for a tree that does not balance itself.
  auto subs = std::make_unique<IntervalNotifier[]>(kCount);
  for (std::size_t i = 0; i < kCount; ++i) ASSERT_OK(table.insert(subs[i], page(2 * i), kPageSize, ops));
  EXPECT_EQ(table.size(), kCount);
  EXPECT_TABLE_INVARIANTS(table);
  const std::size_t height = table.height();
  EXPECT_LE(height, 60u) << "log2(10000) is about 13; a treap stays within a small multiple";

  auto invalidate = [&](NotifyRange r, std::size_t expected_calls) {
    const std::size_t calls_before = ops.count();
    const std::uint64_t visited_before = table.nodes_visited();
    {
      ScopedInvalidation inv(table, r);
      EXPECT_TRUE(inv.ok());
    }
    EXPECT_EQ(ops.count() - calls_before, expected_calls);
    return table.nodes_visited() - visited_before;
  };
  // One subscription: O(height) nodes, not O(n).
  EXPECT_LE(invalidate(pages(2 * 5000, 1), 1), 3 * height + 4);
  // A gap: nothing called, still O(height).
  EXPECT_LE(invalidate(pages(2 * 5000 + 1, 1), 0), 3 * height + 4);
  // A hundred neighbours: O(height + 100).
  EXPECT_LE(invalidate(pages(2 * 100, 200), 100), 3 * height + 3 * 100);
  // Past the end.
  EXPECT_LE(invalidate(pages(2 * kCount, 100), 0), 3 * height + 4);

  // One subscription spanning everything does not make lookups scan (a
  // multimap bounded by the longest length would).
  IntervalNotifier whole;
  ASSERT_OK(table.insert(whole, page(0), 2 * kCount * kPageSize, ops));
  const std::size_t height2 = table.height();
  EXPECT_LE(invalidate(pages(2 * 7000, 1), 2), 3 * height2 + 4);
  table.remove(whole);

  // Random ranges against a brute-force answer, while half the
  // subscriptions are removed in random order.
  std::mt19937_64 rng(7);
  std::vector<std::size_t> order(kCount);
  for (std::size_t i = 0; i < kCount; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<bool> present(kCount, true);
  for (std::size_t k = 0; k < kCount / 2; ++k) {
    table.remove(subs[order[k]]);
    present[order[k]] = false;
    if (k % 500 != 0) continue;
    EXPECT_TABLE_INVARIANTS(table);
    for (int q = 0; q < 20; ++q) {
      const std::size_t first = rng() % (2 * kCount);
      const std::size_t count = 1 + rng() % 64;
      std::set<const IntervalNotifier*> expected;
      for (std::size_t p = first; p < first + count && p < 2 * kCount; ++p)
        if (p % 2 == 0 && present[p / 2]) expected.insert(&subs[p / 2]);
      const std::size_t before = ops.count();
      {
        ScopedInvalidation inv(table, pages(first, count));
        ASSERT_TRUE(inv.ok());
      }
      const auto calls = ops.taken();
      std::set<const IntervalNotifier*> got;
      for (std::size_t c = before; c < calls.size(); ++c) got.insert(calls[c].sub);
      EXPECT_EQ(got, expected) << "pages [" << first << ", " << first + count << ")";
    }
  }
  EXPECT_EQ(table.size(), kCount - kCount / 2);
  EXPECT_TABLE_INVARIANTS(table);
  for (std::size_t i = 0; i < kCount; ++i)
    if (present[i]) table.remove(subs[i]);
  EXPECT_EQ(table.size(), 0u);
  EXPECT_EQ(table.height(), 0u);
}

// ---- concurrency ------------------------------------------------------------------

// Several threads invalidate overlapping and disjoint ranges while device
// threads mirror the "CPU page table" with the read protocol and another
// thread inserts and removes subscriptions.  Checked: every subscription is
// called exactly once per invalidation overlapping it, and a valid device
// mirror never differs from the CPU side (the guarantee the protocol gives).
TEST(NotifierTable, ConcurrentInvalidationsKeepMirrorsCoherent) {
  constexpr std::size_t kSubs = 16;
  constexpr std::size_t kPagesPerSub = 4;
  constexpr std::size_t kPages = kSubs * kPagesPerSub;
  constexpr int kInvalidators = 3;
  constexpr int kReaders = 2;
  constexpr int kRounds = 3000;

  NotifierTable table;
  std::atomic<int> cpu[kPages];
  for (auto& v : cpu) v.store(0);

  struct Mirror : IntervalNotifierOps {
    bool invalidate(IntervalNotifier& s, const NotifyRange&, std::uint64_t cur_seq) override {
      std::lock_guard lock(mutex);
      valid = false;
      s.set_seq(cur_seq);
      calls.fetch_add(1, std::memory_order_relaxed);
      return true;
    }
    std::mutex mutex;
    bool valid = false;
    int copy[kPagesPerSub] = {};
    std::atomic<std::uint64_t> calls{0};
    std::atomic<std::uint64_t> expected{0};
  };
  Mirror mirrors[kSubs];
  IntervalNotifier subs[kSubs];
  for (std::size_t i = 0; i < kSubs; ++i)
    ASSERT_OK(table.insert(subs[i], page(i * kPagesPerSub), kPagesPerSub * kPageSize, mirrors[i]));

  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> stale{0}, programmed{0}, retries{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kInvalidators; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(static_cast<unsigned>(t) + 1);
      for (int r = 0; r < kRounds; ++r) {
        const std::size_t first = rng() % kPages;
        const std::size_t count = 1 + rng() % 8;
        const std::size_t last = std::min(first + count, kPages);
        for (std::size_t i = 0; i < kSubs; ++i)
          if (first < (i + 1) * kPagesPerSub && i * kPagesPerSub < last) mirrors[i].expected.fetch_add(1);
        ScopedInvalidation inv(table, pages(first, last - first, NotifyEvent::kMigrate));
        if (!inv.ok()) continue;
        for (std::size_t p = first; p < last; ++p) {  // the change, slow enough for walks to overlap it
          cpu[p].fetch_add(1);
          std::this_thread::yield();
        }
      }
    });
  }
  for (int t = 0; t < kReaders; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(static_cast<unsigned>(t) + 100);
      while (!stop.load(std::memory_order_relaxed)) {
        const std::size_t i = rng() % kSubs;
        const std::uint64_t seq = subs[i].read_begin();
        int walked[kPagesPerSub];
        for (std::size_t p = 0; p < kPagesPerSub; ++p) walked[p] = cpu[i * kPagesPerSub + p].load();
        std::this_thread::yield();  // let invalidations overtake the walk
        std::lock_guard lock(mirrors[i].mutex);
        if (subs[i].read_retry(seq)) {
          retries.fetch_add(1, std::memory_order_relaxed);
          continue;
        }
        std::copy(std::begin(walked), std::end(walked), mirrors[i].copy);
        mirrors[i].valid = true;
        programmed.fetch_add(1, std::memory_order_relaxed);
        // Under the driver lock a valid mirror must equal the CPU side: every
        // change happens after the callback cleared `valid`, and no read
        // section can finish until the change has ended.
        for (std::size_t p = 0; p < kPagesPerSub; ++p)
          if (mirrors[i].copy[p] != cpu[i * kPagesPerSub + p].load()) stale.fetch_add(1);
      }
    });
  }
  // Churn: extra subscriptions come and go across the same pages.
  threads.emplace_back([&] {
    RecordingOps extra_ops;
    IntervalNotifier extra[4];
    std::mt19937 rng(999);
    while (!stop.load(std::memory_order_relaxed)) {
      for (auto& e : extra) {
        if (e.inserted()) {
          interval_notifier_remove(e);
        } else {
          EXPECT_TRUE(table.insert(e, page(rng() % kPages), (1 + rng() % 8) * kPageSize, extra_ops).is_ok());
        }
      }
    }
    for (auto& e : extra) interval_notifier_remove(e);
  });
  for (int t = 0; t < kInvalidators; ++t) threads[static_cast<std::size_t>(t)].join();
  stop.store(true);
  for (std::size_t t = kInvalidators; t < threads.size(); ++t) threads[t].join();

  EXPECT_EQ(stale.load(), 0u) << "a device mirror went stale";
  EXPECT_GT(programmed.load(), 0u);
  for (std::size_t i = 0; i < kSubs; ++i) {
    EXPECT_EQ(mirrors[i].calls.load(), mirrors[i].expected.load()) << "subscription " << i;
    // Quiescent now: a last read section sees the final values.
    const std::uint64_t seq = subs[i].read_begin();
    std::lock_guard lock(mirrors[i].mutex);
    EXPECT_FALSE(subs[i].read_retry(seq));
  }
  EXPECT_EQ(table.active_invalidations(), 0u);
  EXPECT_EQ(table.seq() % 2, 0u);
  EXPECT_EQ(table.waiters(), 0u);
  EXPECT_EQ(table.size(), kSubs);
  EXPECT_TABLE_INVARIANTS(table);
  for (auto& s : subs) table.remove(s);
  std::printf("programmed %llu, retried %llu\n", static_cast<unsigned long long>(programmed.load()),
              static_cast<unsigned long long>(retries.load()));
}

// ---- the public API on a real address space -------------------------------------------

TEST(IntervalNotifierApi, InsertAndRemoveOnAnAddressSpace) {
  RecordingOps ops;  // outlives the address space: its teardown may send kRelease
  IntervalNotifier sub, kept;
  {
    AddressSpaceOptions o;
    o.fault_threads = 2;
    auto created = AddressSpace::create(o);
    ASSERT_TRUE(created.is_ok()) << created.status().to_string();
    std::unique_ptr<AddressSpace> as = std::move(*created);
    const std::size_t len = 4 * kHugePageSize;
    auto mapped = as->map(len);
    ASSERT_TRUE(mapped.is_ok()) << mapped.status().to_string();
    const VirtAddr buf = *mapped;

    EXPECT_EQ(interval_notifier_insert(sub, *as, buf, 0, ops).code(), EOVERFLOW);
    EXPECT_EQ(interval_notifier_insert(sub, *as, VirtAddr{std::numeric_limits<std::uintptr_t>::max()}, 2, ops).code(),
              EOVERFLOW);
    ASSERT_OK(interval_notifier_insert(sub, *as, buf + kHugePageSize, kHugePageSize, ops));
    ASSERT_OK(interval_notifier_insert(kept, *as, buf, len, ops));
    EXPECT_TRUE(sub.inserted());
    mm::NotifierTable& table = as->impl().notifiers;
    EXPECT_EQ(table.size(), 2u);

    const int device = 0;
    const std::uint64_t seq = sub.read_begin();
    {
      NotifyRange r{buf + kHugePageSize + kPageSize, buf + kHugePageSize + 2 * kPageSize, NotifyEvent::kMigrate,
                    &device};
      ScopedInvalidation inv(table, r);
      ASSERT_OK(inv.status());
    }
    EXPECT_EQ(ops.count_for(sub), 1u);
    EXPECT_EQ(ops.count_for(kept), 1u);
    EXPECT_EQ(ops.taken()[0].range.owner, &device);
    EXPECT_TRUE(sub.read_retry(seq));

    interval_notifier_remove(sub);
    EXPECT_FALSE(sub.inserted());
    EXPECT_EQ(table.size(), 1u);
    {
      ScopedInvalidation inv(table, NotifyRange{buf, buf + len, NotifyEvent::kClear});
      ASSERT_OK(inv.status());
    }
    EXPECT_EQ(ops.count_for(sub), 1u) << "a removed notifier is not called";
    EXPECT_EQ(ops.count_for(kept), 2u);
    EXPECT_TABLE_INVARIANTS(table);
    // `kept` stays inserted: the address space goes first.
  }
  EXPECT_FALSE(kept.inserted()) << "address-space teardown detaches the notifiers left";
  interval_notifier_remove(kept);  // a no-op
}

}  // namespace
}  // namespace uhmm
