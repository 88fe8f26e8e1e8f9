// mm: readers that take the REMOVE event of uhmm's own zaps off the
// userfaultfd on the zapping thread's CPU.
//
// uhmm's own MADV_DONTNEED (AddressSpace::Impl::zap_own) returns only once
// some thread has read its REMOVE event.  Who reads it decides what the zap
// costs (measured on this kind of VM, 2026-11-22, docs/performance.md):
// a reader on the zapping thread's CPU 3-6 us, a reader asleep on another
// CPU 80 us (two wake-ups of an idle virtual CPU, each an exit to the
// host), and when the service thread the kernel picks is the zapping thread
// itself, nobody until the backup reader steps in, 200 us later.  So each
// CPU that zaps gets a reader pinned to it, asleep until a zap there is
// about to start: waking it costs no interrupt, and it reads the moment the
// zapping thread blocks.
#pragma once

#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "core/sync.hpp"

namespace uhmm::mm {

class LocalZapReaders {
 public:
  struct Hooks {
    /// Reads what the userfaultfd holds now (events queued, faults passed
    /// on to the service threads).
    std::function<void()> drain;
    /// A zap of uhmm's has not had its event read yet.
    std::function<bool()> zap_unread;
    /// A reader gives up on a zap whose event it could not read (the
    /// fallback reader takes over).
    std::function<void()> gave_up;
  };
  /// `uffd_fd` is the managed userfaultfd, non-blocking.
  LocalZapReaders(int uffd_fd, Hooks hooks);
  ~LocalZapReaders();
  LocalZapReaders(const LocalZapReaders&) = delete;
  LocalZapReaders& operator=(const LocalZapReaders&) = delete;

  /// Called by a zap of uhmm's after its record is in place and before the
  /// MADV_DONTNEED: wakes the reader of the calling thread's CPU (started
  /// the first time).  False if there is none (stopping, or no thread to
  /// spare): the caller then wakes the fallback reader.
  bool before_zap();
  /// Ends and joins the readers; later zaps wake none.
  void stop();
  /// In a forked child, where the threads do not exist: forgets them.
  void abandon();

 private:
  struct Reader {
    unsigned cpu = 0;
    int wake_fd = -1;
    std::thread thread;
  };
  void run(const Reader& reader) const;
  /// The reader of `cpu`, started if there is none yet; null once stopping
  /// or if no thread can be started.
  const Reader* reader_for(unsigned cpu) UHMM_REQUIRES(mutex_);

  const int uffd_fd_;
  const Hooks hooks_;
  const int stop_fd_;
  Mutex mutex_{LockRank::kLeaf};
  bool stopping_ UHMM_GUARDED_BY(mutex_) = false;
  std::vector<std::unique_ptr<Reader>> readers_ UHMM_GUARDED_BY(mutex_);  // by CPU; null: none yet
};

}  // namespace uhmm::mm
