// uhmm/notifier.hpp: interval notifiers (the kernel's mmu_interval_notifier).
//
// A driver that mirrors part of an address space in a device page table
// subscribes that range with interval_notifier_insert().  Before anything
// changes the range (unmap, madvise, migration, teardown...), uhmm calls the
// subscription's invalidate(), which stops device use of the range.  The
// driver's mirroring path uses the sequence protocol, read_begin() /
// read_retry(), so that it never programs the device from a page-table walk
// that an invalidation overtook.  The protocol, with the race it closes
// drawn out: docs/notifiers.md.
//
// Glossary:
//   subscription   an inserted IntervalNotifier: a byte range [start, end)
//                  of one AddressSpace plus the driver's ops.
//   invalidation   one change of a range, from its start (callbacks run) to
//                  its end (the change is complete and visible).
//   sequence       a 64-bit counter.  The address space's sequence is odd
//                  while any invalidation is in progress; every invalidation
//                  gets its own odd `cur_seq`, larger than any before it.
//
// Concurrency contract:
//   * read_begin, read_retry, check_retry and set_seq may be called from any
//     thread.  read_begin may sleep: it must not be called with a lock the
//     driver's invalidate() takes, nor from an invalidate() callback.
//   * insert and remove of one IntervalNotifier are called by its owner, not
//     concurrently with each other; insert and remove of different
//     notifiers, and invalidations, may run concurrently with anything.
//   * remove waits for every invalidation that covers the subscription to
//     finish: it must not be called from an invalidate() callback (that is
//     checked: it would wait for itself) nor with a lock invalidate() takes.
//   * An IntervalNotifier must be removed before it is destroyed (checked).
//     An AddressSpace may go away first: its teardown invalidates everything
//     with kRelease, then the notifiers still inserted are detached and
//     remove on them is a no-op.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "uhmm/status.hpp"
#include "uhmm/types.hpp"

namespace uhmm {

class AddressSpace;
class IntervalNotifier;
namespace mm {
class NotifierTable;
}

/// Why a range is being invalidated (the kernel's mmu_notifier_event).
enum class NotifyEvent : std::uint8_t {
  kUnmap,          // the range stops being mapped (munmap, mremap, AddressSpace::unmap)
  kClear,          // pages are dropped, the mapping stays (zap, madvise(MADV_DONTNEED))
  kProtectionVma,  // the mapping's protection changes (mprotect)
  kMigrate,        // pages move between system and device memory; `owner` says who moves them
  kExclusive,      // a device takes exclusive access for atomics; `owner` says which
  kRelease,        // the address space is being torn down
};

/// "unmap", "clear", "protection_vma", "migrate", "exclusive", "release".
const char* to_string(NotifyEvent event);

/// The range handed to invalidate() (the kernel's mmu_notifier_range).  The
/// whole range of the change is passed, not only its overlap with the
/// subscription.
struct NotifyRange {
  VirtAddr start;  // first byte
  VirtAddr end;    // one past the last byte
  NotifyEvent event = NotifyEvent::kUnmap;
  /// For kMigrate and kExclusive: the device (page-map owner cookie) that
  /// causes the event, so that a driver can skip what it caused itself.
  /// nullptr for the other events.
  const void* owner = nullptr;
  /// false when the invalidating thread cannot wait.  A callback that would
  /// have to sleep then returns false, and the invalidation fails with
  /// EAGAIN.  Every invalidation uhmm issues today is blockable.
  bool blockable = true;

  /// Whether [s, e) shares at least one byte with this range.
  constexpr bool overlaps(VirtAddr s, VirtAddr e) const { return s < end && start < e; }
};

/// The driver's side of a subscription (the kernel's
/// mmu_interval_notifier_ops).
struct IntervalNotifierOps {
  virtual ~IntervalNotifierOps();

  /// Called before [range.start, range.end), which overlaps `sub`, changes.
  /// Must stop device use of the overlap (unmap it from the device page
  /// table; wait until the device no longer reads or writes it) and call
  /// sub.set_seq(cur_seq) under the driver lock that also guards its
  /// read_retry() check, before returning.  Returns true; false only when
  /// !range.blockable and the work would need to sleep (a trylock failed).
  ///
  /// Runs on the invalidating thread with no uhmm mutex held; may take the
  /// driver's own locks; must not call read_begin() or
  /// interval_notifier_remove().  An exception thrown here is caught,
  /// reported on stderr and counted as `false`; uhmm then records cur_seq
  /// itself so that later read_retry() calls see the invalidation.
  virtual bool invalidate(IntervalNotifier& sub, const NotifyRange& range, std::uint64_t cur_seq) = 0;
};

/// One subscription.  Not copyable or movable: the address space links it
/// by address while it is inserted.
class IntervalNotifier {
 public:
  IntervalNotifier() = default;
  /// The notifier must not be inserted any more (checked).
  ~IntervalNotifier();
  IntervalNotifier(const IntervalNotifier&) = delete;
  IntervalNotifier& operator=(const IntervalNotifier&) = delete;

  /// Starts a read section: returns the sequence to hand to read_retry().
  /// Sleeps while an invalidation that covers this subscription is in
  /// progress (the range is mid-change), and returns once it has ended.
  /// The notifier must be inserted.
  std::uint64_t read_begin();
  /// Under the driver lock that invalidate() takes: true if an invalidation
  /// reached this subscription since read_begin() returned `seq`; the walk
  /// is stale, start again.  false: program the device, still under the
  /// lock.
  bool read_retry(std::uint64_t seq) const;
  /// The same check without the driver lock: true means retry for certain,
  /// false means nothing yet (read_retry() under the lock still decides).
  /// For giving up early on a long walk.
  bool check_retry(std::uint64_t seq) const;
  /// Called by invalidate(), under the driver lock, with its cur_seq.
  void set_seq(std::uint64_t cur_seq);

  /// The subscribed range (meaningful while inserted).
  VirtAddr start() const { return start_; }
  VirtAddr end() const { return VirtAddr{end_}; }
  std::size_t length() const { return end_ - start_.value; }
  /// For the owner: whether the notifier is inserted in an address space.
  bool inserted() const { return table_ != nullptr; }

 private:
  friend class mm::NotifierTable;
  friend void interval_notifier_remove(IntervalNotifier& sub);

  // Written by insert and remove (under the table's mutex); constant while
  // the notifier is inserted.
  mm::NotifierTable* table_ = nullptr;
  IntervalNotifierOps* ops_ = nullptr;
  VirtAddr start_;
  std::uintptr_t end_ = 0;  // one past the last byte

  // The driver's sequence: written by set_seq (under the driver's lock) and
  // by insert; read by read_retry (under the driver's lock), check_retry
  // (no lock) and read_begin (under the table's mutex).
  std::atomic<std::uint64_t> seq_{0};

  // Guarded by the table's mutex (mm::NotifierTable::mutex_):
  unsigned covering_ = 0;  // invalidations in progress that cover this subscription
  IntervalNotifier* left_ = nullptr;   // interval tree links (mm/notifier_table.cpp)
  IntervalNotifier* right_ = nullptr;
  std::uintptr_t max_end_ = 0;  // largest end_ in the subtree rooted here
  std::uint64_t priority_ = 0;  // treap heap key
};

/// Subscribes [start, start + length) of `as` (the kernel's
/// mmu_interval_notifier_insert).  Any byte range is accepted; it need not be
/// managed memory yet.  EOVERFLOW (as the kernel) if length is 0 or
/// start + length overflows; EBUSY if `sub` is already inserted; ENOMEM if bookkeeping cannot be
/// allocated.  Inserting while an invalidation of the range is in progress
/// is safe: the new subscription gets no callback from it, but its
/// read_begin() sleeps until it ends.
Status interval_notifier_insert(IntervalNotifier& sub, AddressSpace& as, VirtAddr start, std::size_t length,
                                IntervalNotifierOps& ops);

/// Unsubscribes (the kernel's mmu_interval_notifier_remove): no callback
/// starts on `sub` after this begins, and it returns only once every
/// invalidation covering `sub` has finished, so the ops may be destroyed
/// afterwards.  A no-op if `sub` is not inserted.  Must not be called from
/// an invalidate() callback (checked).
void interval_notifier_remove(IntervalNotifier& sub);

}  // namespace uhmm
