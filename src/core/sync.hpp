// Mutexes with lock ranks.  The one lock order of the project is in
// docs/locking.md; the ranks below mirror it and debug builds check that a
// thread only ever takes a lock of a higher rank than every lock it holds.
#pragma once

#include <condition_variable>
#include <mutex>
#include <shared_mutex>

#include "core/assert.hpp"
#include "core/thread_annotations.hpp"

namespace uhmm {

// Mirrors docs/locking.md.  Lower ranks are taken first.
enum class LockRank : unsigned {
  kFileWriteback = 3,   // FileCache::Impl::writeback_mutex (one writeback or truncate of a cache at a time)
  kUffdRead = 5,        // AddressSpace::Impl::read_mutex (read() of the managed uffd + queueing; install windows)
  kRegions = 10,        // AddressSpace::Impl::regions_mutex
  kDeviceDriver = 20,   // a device's own state (sim: free list)
  kStaging = 30,        // StagingPool::mutex
  kPfnRegistry = 50,    // device pfn registry
  kFileCache = 60,      // FileCache::Impl::mutex (page states of one cache; no I/O under it)
  kNotifierTable = 70,  // mm::NotifierTable::mutex_ (nothing nests inside; callbacks run without it)
  kUffdEvents = 90,     // AddressSpace::Impl::events_mutex (the event queue)
  kLeaf = 100,          // locks that never nest
};

namespace lock_rank {
void acquired(LockRank rank);
void taken_without_waiting(LockRank rank);  // a successful try-lock
void released(LockRank rank);
}  // namespace lock_rank

class UHMM_CAPABILITY("mutex") Mutex {
 public:
  explicit Mutex(LockRank rank) : rank_(rank) {}
  void lock() UHMM_ACQUIRE() {
    lock_rank::acquired(rank_);
    m_.lock();
  }
  /// For callers that must not sleep (non-blockable invalidations).
  bool try_lock() UHMM_TRY_ACQUIRE(true) {
    if (!m_.try_lock()) return false;
    lock_rank::taken_without_waiting(rank_);
    return true;
  }
  void unlock() UHMM_RELEASE() {
    m_.unlock();
    lock_rank::released(rank_);
  }
  std::mutex& native() { return m_; }

 private:
  std::mutex m_;
  LockRank rank_;
};

class UHMM_CAPABILITY("shared_mutex") SharedMutex {
 public:
  explicit SharedMutex(LockRank rank) : rank_(rank) {}
  void lock() UHMM_ACQUIRE() {
    lock_rank::acquired(rank_);
    m_.lock();
  }
  void unlock() UHMM_RELEASE() {
    m_.unlock();
    lock_rank::released(rank_);
  }
  void lock_shared() UHMM_ACQUIRE_SHARED() {
    lock_rank::acquired(rank_);
    m_.lock_shared();
  }
  void unlock_shared() UHMM_RELEASE_SHARED() {
    m_.unlock_shared();
    lock_rank::released(rank_);
  }

 private:
  std::shared_mutex m_;
  LockRank rank_;
};

class UHMM_SCOPED_CAPABILITY MutexLock {
 public:
  explicit MutexLock(Mutex& m) UHMM_ACQUIRE(m) : m_(m) { m_.lock(); }
  ~MutexLock() UHMM_RELEASE() { m_.unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex& m_;
};

class UHMM_SCOPED_CAPABILITY WriterLock {
 public:
  explicit WriterLock(SharedMutex& m) UHMM_ACQUIRE(m) : m_(m) { m_.lock(); }
  ~WriterLock() UHMM_RELEASE() { m_.unlock(); }
  WriterLock(const WriterLock&) = delete;
  WriterLock& operator=(const WriterLock&) = delete;

 private:
  SharedMutex& m_;
};

class UHMM_SCOPED_CAPABILITY ReaderLock {
 public:
  explicit ReaderLock(SharedMutex& m) UHMM_ACQUIRE_SHARED(m) : m_(m) { m_.lock_shared(); }
  ~ReaderLock() UHMM_RELEASE() { m_.unlock_shared(); }
  ReaderLock(const ReaderLock&) = delete;
  ReaderLock& operator=(const ReaderLock&) = delete;

 private:
  SharedMutex& m_;
};

}  // namespace uhmm
