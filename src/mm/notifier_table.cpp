// mm/notifier_table.cpp: interval notifiers.  The protocol: docs/notifiers.md.
#include "mm/notifier_table.hpp"

#include <algorithm>
#include <cstdio>
#include <exception>
#include <limits>
#include <new>
#include <unordered_map>

#include "mm/address_space_impl.hpp"

namespace uhmm {

namespace {
// The table whose invalidate() callback this thread is running, if any:
// remove() and a waiting read_begin() from inside one would wait for the
// invalidation that is calling them.
thread_local const mm::NotifierTable* t_calling_back = nullptr;

// Treap priorities: a hash of the node's address (a notifier does not move
// while inserted), so no random-number state is shared between tables.
std::uint64_t mix(std::uintptr_t x) {
  std::uint64_t z = static_cast<std::uint64_t>(x) + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
}  // namespace

const char* to_string(NotifyEvent event) {
  switch (event) {
    case NotifyEvent::kUnmap: return "unmap";
    case NotifyEvent::kClear: return "clear";
    case NotifyEvent::kProtectionVma: return "protection_vma";
    case NotifyEvent::kMigrate: return "migrate";
    case NotifyEvent::kExclusive: return "exclusive";
    case NotifyEvent::kRelease: return "release";
  }
  return "unknown";
}

IntervalNotifierOps::~IntervalNotifierOps() = default;

// ---- IntervalNotifier --------------------------------------------------------

IntervalNotifier::~IntervalNotifier() {
  UHMM_CHECK(table_ == nullptr, "interval notifier destroyed while inserted (call interval_notifier_remove)");
}

std::uint64_t IntervalNotifier::read_begin() {
  UHMM_CHECK(table_ != nullptr, "read_begin on an interval notifier that is not inserted");
  return table_->read_begin(*this);
}

bool IntervalNotifier::read_retry(std::uint64_t seq) const {
  // The driver's lock orders this against set_seq; acquire is for drivers
  // that check without it.
  return seq_.load(std::memory_order_acquire) != seq;
}

bool IntervalNotifier::check_retry(std::uint64_t seq) const {
  return seq_.load(std::memory_order_relaxed) != seq;
}

void IntervalNotifier::set_seq(std::uint64_t cur_seq) {
  UHMM_DCHECK((cur_seq & 1) != 0, "set_seq with a sequence no invalidation handed out (cur_seq is odd)");
  seq_.store(cur_seq, std::memory_order_release);
}

Status interval_notifier_insert(IntervalNotifier& sub, AddressSpace& as, VirtAddr start, std::size_t length,
                                IntervalNotifierOps& ops) {
  return as.impl().notifiers.insert(sub, start, length, ops);
}

void interval_notifier_remove(IntervalNotifier& sub) {
  if (mm::NotifierTable* table = sub.table_) table->remove(sub);
}

namespace mm {

// ---- the interval tree -----------------------------------------------------
//
// Why a treap with max-end augmentation: GPU drivers make a subscription per
// allocation, so a table holds thousands, and every invalidation (each
// migration batch, each unmap) looks up the ones it overlaps.  A linear scan
// costs O(n) per invalidation.  A sorted std::multimap by start with a bound
// on the longest subscription degrades to a scan as soon as one long
// subscription exists (a driver mirroring a whole heap beside many small
// ones).  An interval tree, each node holding the largest end in its
// subtree, answers in O(log n + k) whatever the lengths.  A treap is the
// smallest balanced tree to write correctly (split and merge, no rotation
// cases) and its expected height is O(log n) for any insertion order; the
// nodes are intrusive (inside IntervalNotifier), so insert allocates
// nothing.  No header-only interval tree is installed here (no Boost).

bool NotifierTable::key_less(const Node* a, const Node* b) {
  if (a->start_ != b->start_) return a->start_ < b->start_;
  return std::less<const Node*>{}(a, b);  // equal starts: any strict order will do
}

void NotifierTable::update(Node* n) {
  std::uintptr_t m = n->end_;
  if (n->left_ != nullptr) m = std::max(m, n->left_->max_end_);
  if (n->right_ != nullptr) m = std::max(m, n->right_->max_end_);
  n->max_end_ = m;
}

// Every key in `a` is below every key in `b`.
NotifierTable::Node* NotifierTable::merge(Node* a, Node* b) {
  if (a == nullptr) return b;
  if (b == nullptr) return a;
  if (a->priority_ >= b->priority_) {
    a->right_ = merge(a->right_, b);
    update(a);
    return a;
  }
  b->left_ = merge(a, b->left_);
  update(b);
  return b;
}

// `less` gets the nodes ordered before `key`, `rest` the others.
void NotifierTable::split(Node* t, const Node* key, Node*& less, Node*& rest) {
  if (t == nullptr) {
    less = rest = nullptr;
    return;
  }
  if (key_less(t, key)) {
    split(t->right_, key, t->right_, rest);
    less = t;
  } else {
    split(t->left_, key, less, t->left_);
    rest = t;
  }
  update(t);
}

NotifierTable::Node* NotifierTable::erase(Node* t, Node* n) {
  UHMM_CHECK(t != nullptr, "interval notifier missing from its table's tree");
  if (t == n) {
    Node* joined = merge(n->left_, n->right_);
    n->left_ = n->right_ = nullptr;
    return joined;
  }
  if (key_less(n, t)) {
    t->left_ = erase(t->left_, n);
  } else {
    t->right_ = erase(t->right_, n);
  }
  update(t);
  return t;
}

// Calls f(node) for every node overlapping [start, end), in address order.
template <class F>
void NotifierTable::visit_overlapping(Node* t, std::uintptr_t start, std::uintptr_t end, F& f,
                                      std::uint64_t& visited) {
  while (t != nullptr) {
    ++visited;
    if (t->max_end_ <= start) return;  // everything below ends before the range
    visit_overlapping(t->left_, start, end, f, visited);
    if (t->start_.value >= end) return;  // this and everything to its right start after it
    if (t->end_ > start) f(t);
    t = t->right_;
  }
}

// ---- NotifierTable -----------------------------------------------------------

Invalidation::~Invalidation() {
  UHMM_CHECK(table_ == nullptr, "invalidation destroyed in flight (invalidate_end missing)");
}

NotifierTable::~NotifierTable() {
  MutexLock lock(mutex_);
  UHMM_CHECK(active_ == 0, "notifier table destroyed with invalidations in flight");
  UHMM_CHECK(waiters_ == 0, "notifier table destroyed while threads wait on it");
  // Detach what is left so that a later interval_notifier_remove is a no-op.
  // Rotating left children up flattens the tree without allocating.
  while (root_ != nullptr) {
    Node* n = root_;
    if (n->left_ != nullptr) {
      root_ = n->left_;
      n->left_ = root_->right_;
      root_->right_ = n;
      continue;
    }
    root_ = n->right_;
    n->right_ = nullptr;
    n->table_ = nullptr;
    n->ops_ = nullptr;
  }
  size_ = 0;
}

Status NotifierTable::insert(IntervalNotifier& sub, VirtAddr start, std::size_t length, IntervalNotifierOps& ops) {
  if (length == 0) return Status::error(EOVERFLOW, "interval notifier of length 0");
  if (length > std::numeric_limits<std::uintptr_t>::max() - start.value)
    return Status::error(EOVERFLOW, "interval notifier range overflows the address space");
  if (sub.table_ != nullptr) return Status::error(EBUSY, "interval notifier already inserted");
  const std::uintptr_t end = start.value + length;

  MutexLock lock(mutex_);
  // Invalidations in flight that cover the new range started before it
  // existed: it gets no callback from them (it mirrors nothing yet), but
  // the range is mid-change, so its read_begin must wait for them to end.
  // Make room first so that nothing below can fail half way.
  try {
    for (Invalidation* inv = in_flight_; inv != nullptr; inv = inv->next_)
      if (inv->range_.overlaps(start, VirtAddr{end})) inv->late_.reserve(inv->late_.size() + 1);
  } catch (const std::bad_alloc&) {
    return Status::error(ENOMEM, "interval notifier bookkeeping");
  }
  sub.table_ = this;
  sub.ops_ = &ops;
  sub.start_ = start;
  sub.end_ = end;
  // Every cur_seq handed out from now on is larger, so read_retry on a
  // sequence read_begin returned before any callback is exact.
  sub.seq_.store(seq_, std::memory_order_relaxed);
  sub.covering_ = 0;
  for (Invalidation* inv = in_flight_; inv != nullptr; inv = inv->next_) {
    if (inv->range_.overlaps(start, VirtAddr{end})) {
      inv->late_.push_back(&sub);
      ++sub.covering_;
    }
  }
  sub.left_ = sub.right_ = nullptr;
  sub.max_end_ = end;
  sub.priority_ = mix(reinterpret_cast<std::uintptr_t>(&sub));
  Node* less = nullptr;
  Node* rest = nullptr;
  split(root_, &sub, less, rest);
  root_ = merge(merge(less, &sub), rest);
  ++size_;
  return Status::ok();
}

void NotifierTable::remove(IntervalNotifier& sub) {
  UHMM_CHECK(t_calling_back != this, "interval_notifier_remove called from an invalidate callback");
  MutexLock lock(mutex_);
  UHMM_CHECK(sub.table_ == this, "interval notifier removed from a table it is not in");
  // Out of the tree first: no invalidation that starts from now on sees it.
  root_ = erase(root_, &sub);
  --size_;
  // Those in flight still hold it in their lists (and may not have called
  // it yet): wait until the last of them ends.
  wait_uncovered(sub, "interval_notifier_remove");
  sub.table_ = nullptr;
  sub.ops_ = nullptr;
}

std::uint64_t NotifierTable::read_begin(IntervalNotifier& sub) {
  MutexLock lock(mutex_);
  UHMM_DCHECK(sub.table_ == this, "read_begin on a notifier of another table");
  wait_uncovered(sub, "read_begin");
  // The mutex orders this load after the set_seq of every callback of the
  // invalidations that have ended, and after their changes to the range.
  return sub.seq_.load(std::memory_order_relaxed);
}

void NotifierTable::wait_uncovered(const IntervalNotifier& sub, const char* who) {
  if (sub.covering_ == 0) return;
  UHMM_CHECK(t_calling_back != this, "read_begin / remove would sleep inside an invalidate callback");
  const std::thread::id me = std::this_thread::get_id();
  for (const Invalidation* inv = in_flight_; inv != nullptr; inv = inv->next_) {
    if (inv->thread_ == me && inv->range_.overlaps(sub.start_, VirtAddr{sub.end_})) {
      std::fprintf(stderr, "uhmm: %s waits for an invalidation its own thread has not ended\n", who);
      UHMM_CHECK(false, "waiting for an invalidation this thread started: it would never end");
    }
  }
  ++waiters_;
  while (sub.covering_ > 0) cv_.wait(mutex_);
  --waiters_;
}

void NotifierTable::link_in_flight(Invalidation& inv) {
  inv.prev_ = nullptr;
  inv.next_ = in_flight_;
  if (in_flight_ != nullptr) in_flight_->prev_ = &inv;
  in_flight_ = &inv;
}

void NotifierTable::unlink_in_flight(Invalidation& inv) {
  if (inv.prev_ != nullptr) {
    inv.prev_->next_ = inv.next_;
  } else {
    in_flight_ = inv.next_;
  }
  if (inv.next_ != nullptr) inv.next_->prev_ = inv.prev_;
  inv.prev_ = inv.next_ = nullptr;
}

bool NotifierTable::call(IntervalNotifier& sub, const NotifyRange& range, std::uint64_t seq) {
  // Never let a driver's exception unwind into uhmm's threads (style habit
  // 13).  Record the sequence ourselves so that a read section of the
  // driver that the callback failed to stop at least retries.
  const char* what = nullptr;
  try {
    const bool ok = sub.ops_->invalidate(sub, range, seq);
    if (!ok && range.blockable) {
      std::fprintf(stderr,
                   "uhmm: interval notifier [%#lx, %#lx) returned false for a blockable %s invalidation "
                   "of [%#lx, %#lx); continuing\n",
                   static_cast<unsigned long>(sub.start_.value), static_cast<unsigned long>(sub.end_),
                   to_string(range.event), static_cast<unsigned long>(range.start.value),
                   static_cast<unsigned long>(range.end.value));
    }
    return ok;
  } catch (const std::exception& e) {
    what = e.what();
    std::fprintf(stderr, "uhmm: interval notifier [%#lx, %#lx) threw during a %s invalidation of [%#lx, %#lx): %s\n",
                 static_cast<unsigned long>(sub.start_.value), static_cast<unsigned long>(sub.end_),
                 to_string(range.event), static_cast<unsigned long>(range.start.value),
                 static_cast<unsigned long>(range.end.value), what);
  } catch (...) {
    std::fprintf(stderr,
                 "uhmm: interval notifier [%#lx, %#lx) threw during a %s invalidation of [%#lx, %#lx) "
                 "(not a std::exception)\n",
                 static_cast<unsigned long>(sub.start_.value), static_cast<unsigned long>(sub.end_),
                 to_string(range.event), static_cast<unsigned long>(range.start.value),
                 static_cast<unsigned long>(range.end.value));
  }
  sub.seq_.store(seq, std::memory_order_release);
  return false;
}

Status NotifierTable::invalidate_start(Invalidation& inv, const NotifyRange& range) {
  UHMM_CHECK(!inv.in_flight(), "invalidate_start on an invalidation already in flight");
  UHMM_CHECK(range.start <= range.end, "invalidation range ends before it starts");
  inv.range_ = range;
  inv.notified_ = 0;
  {
    MutexLock lock(mutex_);
    // Find the subscriptions to call before changing anything, so that a
    // failed allocation leaves the table as it was.
    inv.subs_.clear();
    try {
      auto collect = [&inv](Node* n) { inv.subs_.push_back(n); };
      if (range.start < range.end) visit_overlapping(root_, range.start.value, range.end.value, collect, nodes_visited_);
    } catch (const std::bad_alloc&) {
      inv.subs_.clear();
      return Status::error(ENOMEM, "invalidation: list of interval notifiers to call");
    }
    // A fresh odd sequence for every invalidation: odd while any is in
    // flight (the first one makes it odd, later ones keep it odd), and never
    // handed out twice, so a read section that an invalidation overtook
    // always sees a value it did not start with.
    seq_ += (active_ == 0) ? 1 : 2;
    ++active_;
    inv.seq_ = seq_;
    inv.table_ = this;
    inv.thread_ = std::this_thread::get_id();
    inv.late_.clear();
    link_in_flight(inv);
    for (Node* n : inv.subs_) ++n->covering_;
  }

  // Callbacks run without the mutex: drivers take their own locks, and may
  // insert, or run invalidations of their own.  The subscriptions in subs_
  // stay alive: remove() waits for covering_ to drop to 0.
  const NotifierTable* const outer = t_calling_back;
  t_calling_back = this;
  for (IntervalNotifier* sub : inv.subs_) {
    ++inv.notified_;
    if (!call(*sub, inv.range_, inv.seq_) && !range.blockable) {
      // A non-blockable invalidation gives up at the first callback that
      // would sleep; the caller must not change the range.  Those already
      // called have stopped their device's use, which costs them a retry.
      t_calling_back = outer;
      invalidate_end(inv);
      return Status::error(EAGAIN, "a non-blockable invalidation found an interval notifier busy");
    }
  }
  t_calling_back = outer;
  return Status::ok();
}

void NotifierTable::invalidate_end(Invalidation& inv) noexcept {
  UHMM_CHECK(inv.table_ == this, "invalidate_end of an invalidation not in flight in this table");
  MutexLock lock(mutex_);
  bool uncovered = false;
  for (Node* n : inv.subs_) uncovered |= (--n->covering_ == 0);
  for (Node* n : inv.late_) uncovered |= (--n->covering_ == 0);
  inv.subs_.clear();
  inv.late_.clear();
  unlink_in_flight(inv);
  if (--active_ == 0) ++seq_;  // even again: nothing in flight
  inv.table_ = nullptr;
  // Notified under the mutex: a woken remover cannot return (and free its
  // notifier) before this function is done with the notifiers.
  if (uncovered && waiters_ > 0) cv_.notify_all();
}

// ---- introspection -----------------------------------------------------------

std::uint64_t NotifierTable::seq() const {
  MutexLock lock(mutex_);
  return seq_;
}

std::size_t NotifierTable::active_invalidations() const {
  MutexLock lock(mutex_);
  return active_;
}

std::size_t NotifierTable::size() const {
  MutexLock lock(mutex_);
  return size_;
}

std::size_t NotifierTable::waiters() const {
  MutexLock lock(mutex_);
  return waiters_;
}

std::uint64_t NotifierTable::nodes_visited() const {
  MutexLock lock(mutex_);
  return nodes_visited_;
}

std::size_t NotifierTable::height() const {
  MutexLock lock(mutex_);
  struct Walk {
    static std::size_t of(const Node* n) { return n == nullptr ? 0 : 1 + std::max(of(n->left_), of(n->right_)); }
  };
  return Walk::of(root_);
}

Status NotifierTable::check_invariants() const {
  MutexLock lock(mutex_);
  if (((seq_ & 1) != 0) != (active_ > 0))
    return Status::error(EINVAL, "sequence parity disagrees with the number of invalidations in flight");

  // How many in-flight invalidations list each subscription.
  std::unordered_map<const Node*, unsigned> listed;
  std::size_t in_flight = 0;
  std::uint64_t previous_seq = std::numeric_limits<std::uint64_t>::max();
  for (const Invalidation* inv = in_flight_; inv != nullptr; inv = inv->next_) {
    ++in_flight;
    if (inv->table_ != this) return Status::error(EINVAL, "in-flight invalidation names another table");
    if ((inv->seq_ & 1) == 0 || inv->seq_ > seq_) return Status::error(EINVAL, "in-flight invalidation with a bad sequence");
    // The list is newest first and sequences grow with every start.
    if (inv->seq_ >= previous_seq) return Status::error(EINVAL, "in-flight sequences not unique and ordered");
    previous_seq = inv->seq_;
    if (inv->next_ != nullptr && inv->next_->prev_ != inv) return Status::error(EINVAL, "in-flight list links broken");
    for (const std::vector<Node*>* list : {&inv->subs_, &inv->late_}) {
      for (const Node* n : *list) {
        if (!inv->range_.overlaps(n->start_, VirtAddr{n->end_}))
          return Status::error(EINVAL, "invalidation lists an interval notifier it does not overlap");
        ++listed[n];
      }
    }
  }
  if (in_flight != active_) return Status::error(EINVAL, "in-flight list disagrees with the active count");
  for (const auto& [n, count] : listed)
    if (n->covering_ != count) return Status::error(EINVAL, "covering count disagrees with the in-flight lists");

  // The tree: in-order keys ascend, parents outrank children, every node
  // knows its subtree's largest end, and uncovered nodes count 0.
  std::size_t nodes = 0;
  const Node* previous = nullptr;
  Status bad;
  struct Frame {
    const Node* n;
    bool expanded;
  };
  std::vector<Frame> stack;
  if (root_ != nullptr) stack.push_back({root_, false});
  while (!stack.empty() && bad.is_ok()) {
    Frame f = stack.back();
    stack.pop_back();
    const Node* n = f.n;
    if (!f.expanded) {
      if (n->right_ != nullptr) stack.push_back({n->right_, false});
      stack.push_back({n, true});
      if (n->left_ != nullptr) stack.push_back({n->left_, false});
      continue;
    }
    ++nodes;
    std::uintptr_t max_end = n->end_;
    for (const Node* c : {n->left_, n->right_}) {
      if (c == nullptr) continue;
      max_end = std::max(max_end, c->max_end_);
      if (c->priority_ > n->priority_) bad = Status::error(EINVAL, "treap heap order broken");
    }
    if (n->table_ != this) bad = Status::error(EINVAL, "tree node names another table");
    if (n->end_ <= n->start_.value) bad = Status::error(EINVAL, "tree node with an empty range");
    if (n->max_end_ != max_end) bad = Status::error(EINVAL, "subtree max end is stale");
    if (previous != nullptr && !key_less(previous, n)) bad = Status::error(EINVAL, "tree out of order");
    if (listed.find(n) == listed.end() && n->covering_ != 0)
      bad = Status::error(EINVAL, "covering count set with no invalidation in flight listing it");
    previous = n;
  }
  UHMM_TRY(bad);
  if (nodes != size_) return Status::error(EINVAL, "tree size disagrees with the count");
  return Status::ok();
}

}  // namespace mm
}  // namespace uhmm
