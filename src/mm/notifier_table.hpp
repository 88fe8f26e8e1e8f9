// mm/notifier_table.hpp: the interval-notifier subscriptions of one address
// space (the kernel's mmu_notifier_subscriptions), and the invalidation side
// that the rest of uhmm calls around every change of the address space.
//
// The protocol, its sequence numbers and the race they close are told once,
// in docs/notifiers.md; the public side is include/uhmm/notifier.hpp.
//
// Use from uhmm's own code, around a change of [start, end):
//
//     mm::ScopedInvalidation inv(impl.notifiers, {start, end, NotifyEvent::kUnmap});
//     ... change the range (every overlapping subscription has been called) ...
//     // ~ScopedInvalidation: invalidate_end, readers waiting on it resume
//
// Call invalidate_start with no mutex held (docs/locking.md rule 2: the
// callbacks take driver locks).  A NotifierTable can be built on its own,
// without an AddressSpace, which is how the tests drive the protocol.
//
// Concurrency: thread safe.  One mutex (rank kNotifierTable) guards the
// tree, the sequence, the list of invalidations in progress, and the
// table-owned fields of each inserted IntervalNotifier (tree links and
// `covering_`).  It is held for bookkeeping only: callbacks run without it,
// and no other lock is taken while it is held.  Threads that must wait (read_begin
// on a covered subscription, remove) sleep on one condition variable that
// invalidate_end notifies.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <thread>
#include <vector>

#include "core/sync.hpp"
#include "uhmm/notifier.hpp"
#include "uhmm/status.hpp"
#include "uhmm/types.hpp"

namespace uhmm::mm {

class NotifierTable;

/// One invalidation in progress, from NotifierTable::invalidate_start to
/// invalidate_end.  Lives on the invalidating thread's stack: the table
/// links it while it is in flight, so it is neither copyable nor movable.
class Invalidation {
 public:
  Invalidation() = default;
  /// Must have ended (checked).
  ~Invalidation();
  Invalidation(const Invalidation&) = delete;
  Invalidation& operator=(const Invalidation&) = delete;

  bool in_flight() const { return table_ != nullptr; }
  const NotifyRange& range() const { return range_; }
  /// The odd cur_seq this invalidation handed its callbacks.
  std::uint64_t seq() const { return seq_; }
  /// Callbacks made (so far, or in all once started).
  std::size_t notified() const { return notified_; }

 private:
  friend class NotifierTable;

  // Owned by the invalidating thread.
  NotifierTable* table_ = nullptr;  // set while in flight
  NotifyRange range_;
  std::uint64_t seq_ = 0;
  std::size_t notified_ = 0;
  // Written under the table's mutex by invalidate_start, then only read
  // (without the mutex by the callback loop) until invalidate_end clears it
  // under the mutex: the subscriptions the invalidation covers and calls.
  std::vector<IntervalNotifier*> subs_;

  // Guarded by the table's mutex:
  std::thread::id thread_;  // who started it (to catch a thread about to wait for itself)
  Invalidation* prev_ = nullptr;  // the table's list of invalidations in flight
  Invalidation* next_ = nullptr;
  // Subscriptions inserted while this was in flight that it covers: they
  // got no callback, but their read_begin waits for this to end.
  std::vector<IntervalNotifier*> late_;
};

class NotifierTable {
 public:
  NotifierTable() = default;
  /// No invalidation may be in flight and nobody may wait (checked).
  /// Notifiers still inserted are detached: remove() on them is a no-op.
  ~NotifierTable();
  NotifierTable(const NotifierTable&) = delete;
  NotifierTable& operator=(const NotifierTable&) = delete;

  // ---- subscriptions (interval_notifier_insert / _remove) ----------------

  /// See interval_notifier_insert in uhmm/notifier.hpp.
  Status insert(IntervalNotifier& sub, VirtAddr start, std::size_t length, IntervalNotifierOps& ops)
      UHMM_EXCLUDES(mutex_);
  /// See interval_notifier_remove.  `sub` must be inserted here.
  void remove(IntervalNotifier& sub) UHMM_EXCLUDES(mutex_);
  /// IntervalNotifier::read_begin.
  std::uint64_t read_begin(IntervalNotifier& sub) UHMM_EXCLUDES(mutex_);

  // ---- the invalidation side ----------------------------------------------

  /// Starts invalidating `range`: opens a new odd sequence, then calls the
  /// invalidate() of every subscription that overlaps the range (in address
  /// order, on this thread, without the table's mutex).  When it returns ok
  /// the caller changes the range and then calls invalidate_end(inv).
  /// Errors (the invalidation is then already over: do not end it, and do
  /// not change the range):
  ///   EAGAIN  !range.blockable and a callback could not proceed;
  ///   ENOMEM  the list of subscriptions to call could not be allocated.
  /// An empty range (start == end) covers no subscription.
  Status invalidate_start(Invalidation& inv, const NotifyRange& range) UHMM_EXCLUDES(mutex_);
  /// Ends an invalidation that invalidate_start opened: read_begin on the
  /// subscriptions it covered resumes once no other invalidation covers them.
  void invalidate_end(Invalidation& inv) noexcept UHMM_EXCLUDES(mutex_);

  // ---- introspection (tests, tools) ---------------------------------------

  /// The address space's sequence: odd while any invalidation is in flight.
  std::uint64_t seq() const UHMM_EXCLUDES(mutex_);
  std::size_t active_invalidations() const UHMM_EXCLUDES(mutex_);
  /// Inserted subscriptions.
  std::size_t size() const UHMM_EXCLUDES(mutex_);
  /// Threads asleep in read_begin or remove.
  std::size_t waiters() const UHMM_EXCLUDES(mutex_);
  /// Tree nodes examined by invalidation lookups so far (a lookup examines
  /// O(log n + matches) of them).
  std::uint64_t nodes_visited() const UHMM_EXCLUDES(mutex_);
  /// Height of the interval tree (0 when empty).
  std::size_t height() const UHMM_EXCLUDES(mutex_);
  /// Checks every invariant: tree order, heap order and subtree bounds,
  /// sequence parity, and each subscription's count of invalidations that
  /// cover it.  Slow; for tests.
  Status check_invariants() const UHMM_EXCLUDES(mutex_);

 private:
  using Node = IntervalNotifier;

  // Interval tree: a treap ordered by (start, address), each node carrying
  // the largest end in its subtree.  Callers hold mutex_.
  static bool key_less(const Node* a, const Node* b);
  static void update(Node* n);
  static Node* merge(Node* a, Node* b);
  static void split(Node* t, const Node* key, Node*& less, Node*& rest);
  static Node* erase(Node* t, Node* n);
  template <class F> static void visit_overlapping(Node* t, std::uintptr_t start, std::uintptr_t end, F& f,
                                                   std::uint64_t& visited);

  void link_in_flight(Invalidation& inv) UHMM_REQUIRES(mutex_);
  void unlink_in_flight(Invalidation& inv) UHMM_REQUIRES(mutex_);
  /// Sleeps until no invalidation covers `sub`; check-fails if this thread
  /// started one that does (it would wait for itself).
  void wait_uncovered(const IntervalNotifier& sub, const char* who) UHMM_REQUIRES(mutex_);
  /// Calls one subscription's invalidate(); false if it returned false or threw.
  static bool call(IntervalNotifier& sub, const NotifyRange& range, std::uint64_t seq);

  mutable Mutex mutex_{LockRank::kNotifierTable};
  std::condition_variable_any cv_;  // waited on with mutex_; notified when a `covering_` drops to 0
  Node* root_ UHMM_GUARDED_BY(mutex_) = nullptr;
  std::size_t size_ UHMM_GUARDED_BY(mutex_) = 0;
  std::uint64_t seq_ UHMM_GUARDED_BY(mutex_) = 0;  // even: idle; odd: active_ > 0
  std::size_t active_ UHMM_GUARDED_BY(mutex_) = 0;
  Invalidation* in_flight_ UHMM_GUARDED_BY(mutex_) = nullptr;  // list head
  std::size_t waiters_ UHMM_GUARDED_BY(mutex_) = 0;
  std::uint64_t nodes_visited_ UHMM_GUARDED_BY(mutex_) = 0;
};

/// invalidate_start in the constructor, invalidate_end in the destructor
/// (or at end()), so that no path can forget to end.
class ScopedInvalidation {
 public:
  ScopedInvalidation(NotifierTable& table, const NotifyRange& range)
      : table_(table), status_(table.invalidate_start(inv_, range)) {}
  ~ScopedInvalidation() { end(); }
  ScopedInvalidation(const ScopedInvalidation&) = delete;
  ScopedInvalidation& operator=(const ScopedInvalidation&) = delete;

  /// Not ok (EAGAIN, ENOMEM): the range must not be changed; nothing to end.
  const Status& status() const { return status_; }
  bool ok() const { return status_.is_ok(); }
  const Invalidation& invalidation() const { return inv_; }
  /// Ends the invalidation now; idempotent.
  void end() noexcept {
    if (inv_.in_flight()) table_.invalidate_end(inv_);
  }

 private:
  NotifierTable& table_;
  Invalidation inv_;
  Status status_;
};

}  // namespace uhmm::mm
