// compat: the emulated /dev/hmm_dmirror devices of one process.
//
// DmirrorProcess is the library's whole state: the fd table, and (per fork
// generation) the AddressSpace, one simulated device per minor and one
// mirror per fd.  The design, the memory rules and fork:
// docs/adr/0005-dmirror-emulation.md.
//
// Concurrency: every member may be called from any thread.  Locks (taken in
// this order, none held across a call into uhmm that may wait for a
// migration or a fault, so that fork's prepare handler can take them):
//   init_mutex_   creating the runtime (address space, devices) and files;
//   table_mutex_  the fd table;
//   a mirror's mutex (DmirrorFile), taken by its invalidate() callback.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>

#include "compat/dmirror_abi.hpp"
#include "compat/pagemap.hpp"
#include "core/run_set.hpp"
#include "uhmm/sim_device.hpp"
#include "uhmm/status.hpp"

namespace uhmm {
class AddressSpace;
}

namespace uhmm::compat {

class DmirrorFile;
struct Runtime;

/// The kernel's device memory grows in chunks of this size, without limit.
inline constexpr std::size_t kDeviceChunkBytes = std::size_t{256} << 20;

/// How the simulated device behind `minor` is made (ADR 0005, "Process
/// state"): its memory starts with one chunk and grows by one whenever it
/// is full.  Test knob: UHMM_DMIRROR_CHUNK_BYTES, read here, sets another
/// chunk size (page multiple, at least one page), so that tests reach later
/// chunks with little memory; anything else in it is ignored.
sim::SimDeviceOptions dmirror_device_options(int minor);

class DmirrorProcess {
 public:
  /// The process's instance, made on first use and never destroyed (the
  /// program may use a device fd from its own atexit handlers).
  static DmirrorProcess& instance();

  /// Opens minor `minor` (0 and 1 device-private, 2 and 3 device-coherent):
  /// a new fd, or the errno (ENOENT for any other minor,
  /// EPERM when uhmm cannot work in this process, after one line on stderr).
  Result<int> open(int minor, int flags);
  /// Whether any device fd may be open: false means every fd is the
  /// program's own (one atomic load, for the interposers' fast path).
  /// Whether `fd` may be a device fd: false means it is certainly not.
  /// Lock-free and allocation-free, even before the instance exists: every
  /// ioctl, mmap and close of the process comes through here, uhmm's own
  /// (its fault service issues userfaultfd ioctls) included, and those must
  /// never wait for the library's locks.
  static bool maybe_device_fd(int fd) {
    if (fd < 0) return false;
    if (fd < kMarkedFds)
      return (marks_[static_cast<unsigned>(fd) / 64].load(std::memory_order_acquire) >> (fd % 64)) & 1;
    return open_count_.load(std::memory_order_acquire) != 0;
  }
  /// Whether `fd` is a device fd.
  bool is_device_fd(int fd);
  /// Closes a device fd: evicts its device (every page of the device comes
  /// back to system memory) and drops its mirror unless another fd of the
  /// same open device (a dup) remains, as the kernel releases a file on its
  /// last close; closes the fd.  nullopt if
  /// `fd` is not a device fd; else 0 or errno.
  std::optional<int> close(int fd);
  /// `copy` was just made from `fd` (dup, dup2, dup3, F_DUPFD): a copy of a
  /// device fd is the same open device (one mirror; closing one of them
  /// releases nothing while another is open), and a device fd that dup2
  /// replaced at `copy` is closed as close() would.
  void duplicated(int fd, int copy);
  /// ioctl on a device fd: nullopt if `fd` is not a device fd; else 0 or errno.
  std::optional<int> ioctl(int fd, unsigned long request, std::uintptr_t arg);

  /// mprotect(addr, len, prot) of memory uhmm manages: nullopt when no
  /// managed range overlaps it (the caller then calls libc's mprotect);
  /// else 0 or the errno, the whole range handled (ADR 0005, "mprotect").
  /// Lock-free when the library has no address space yet.
  std::optional<int> mprotect(std::uintptr_t addr, std::size_t len, int prot);

  /// The address space of the current fork generation, or nullptr before
  /// the first open (and in a forked child until its first command).
  /// Lock-free, for the interposed pagemap reads; what it points to is
  /// never destroyed (a child leaks its parent's).
  static const AddressSpace* address_space() { return published_as_.load(std::memory_order_acquire); }
  /// The pages of that address space to show as file pages in pagemap
  /// reads, or nullptr when address_space() is.  Lock-free; never destroyed.
  static const FilePageMarks* file_pages() { return published_files_.load(std::memory_order_acquire); }

  /// pthread_atfork handlers (installed after the address space exists).
  void prepare_fork();
  void parent_after_fork();
  void child_after_fork();

 private:
  struct FdEntry {
    int minor = 0;
    ino_t inode = 0;
    std::shared_ptr<DmirrorFile> file;  // of generation `generation`
    std::uint64_t generation = 0;
  };
  DmirrorProcess() = default;
  /// Drops `it` (table_mutex_ held); its file if that was the device's last
  /// fd in this generation (the caller evicts it, outside the lock).
  std::shared_ptr<DmirrorFile> forget_locked(std::map<int, FdEntry>::iterator it);
  Result<Runtime*> runtime_locked();  // init_mutex_ held
  Result<std::shared_ptr<DmirrorFile>> make_file_locked(int minor);  // init_mutex_ held
  /// The fd's file, rebuilt after a fork; nullptr if `fd` is not a device fd.
  Result<std::shared_ptr<DmirrorFile>> file_for(int fd);

  std::mutex init_mutex_;
  std::mutex table_mutex_;
  // Guarded by table_mutex_:
  std::map<int, FdEntry> fds_;
  // Written under both mutexes, read under either.
  Runtime* runtime_ = nullptr;
  std::uint64_t generation_ = 0;
  bool atfork_installed_ = false;
  // The clean pages of converted private file mappings (ADR 0005, "Private
  // file mappings"), copied for the child by prepare_fork, and the child's
  // copy until its runtime exists.
  RunSet fork_clean_;
  RunSet inherited_clean_;
  static void set_mark(int fd, bool on);
  static constexpr int kMarkedFds = 1 << 16;
  // One bit per fd below kMarkedFds: set while fds_ holds it.
  static inline std::atomic<std::uint64_t> marks_[kMarkedFds / 64] = {};
  static inline std::atomic<int> open_count_{0};  // entries in fds_
  static inline std::atomic<const AddressSpace*> published_as_{nullptr};  // runtime_->as, for address_space()
  static inline std::atomic<const FilePageMarks*> published_files_{nullptr};  // runtime_->file_pages
};

}  // namespace uhmm::compat
