// compat: /proc/self/pagemap as the kernel would show it with device pages.
//
// uhmm moves a page that goes to a device out of the program's mapping
// (UFFDIO_MOVE), so the kernel's pagemap shows a hole where the kernel's
// own HMM would show a swap-like entry.  The preload library recognises the
// fds the program opens on its own pagemap and patches the 64-bit entries
// it reads through them (docs/adr/0005-dmirror-emulation.md, "pagemap").
//
// Concurrency: everything here is allocation-free, and lock-free up to the
// leaf lock a FilePageMarks may take for a managed page: read() is
// interposed for the whole process, uhmm's own userfaultfd reads included.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "uhmm/address_space.hpp"
#include "uhmm/status.hpp"

namespace uhmm::compat {

// The entry bits (facts of the kernel's documented pagemap format).
inline constexpr std::uint64_t kPmPresent = std::uint64_t{1} << 63;
inline constexpr std::uint64_t kPmSwap = std::uint64_t{1} << 62;
inline constexpr std::uint64_t kPmFile = std::uint64_t{1} << 61;  // a file page or shared anonymous memory
inline constexpr std::uint64_t kPmMmapExclusive = std::uint64_t{1} << 56;
/// Bits 0-54: the PFN of a present page, or swap type and offset.
inline constexpr std::uint64_t kPmFrameMask = (std::uint64_t{1} << 55) - 1;

/// The entry the kernel would report for a page uhmm's page table describes
/// as `info`, given the entry it did report (`kernel`):
///  - on a device (private) or held for a device (exclusive): a swap-like
///    entry, as the kernel reports its device-private and device-exclusive
///    entries: not present, swapped, mapped exclusively (the page of a
///    private anonymous mapping has one mapping), no frame bits (they are
///    zero for an unprivileged reader anyway);
///  - under migration (locked, not a hole) and absent from the kernel's page
///    table (uhmm holds it in a staging slot): the kernel would show a
///    migration entry: swapped, not present, and not "exclusive" (the kernel
///    does not report that bit for migration entries);
///  - a present system page that is a clean page of a converted private
///    file mapping (`file_page`): the kernel's entry with the file bit, as
///    the kernel reports the page-cache page it would still map there;
///  - anything else (a system page, a hole, a coherent page, which stays
///    mapped for the CPU): the kernel's own entry.
/// Bits the kernel reports for any entry (soft-dirty, uffd-wp, file/shared)
/// are kept.
std::uint64_t pagemap_word(std::uint64_t kernel, const PageInfo& info, bool file_page = false);

/// Pages uhmm holds as anonymous memory that the kernel would still show as
/// file pages: the clean pages of the private file mappings the library
/// converted (ADR 0005, "Private file mappings").
class FilePageMarks {
 public:
  /// Whether page `vpn` is one.  Called during interposed pagemap reads:
  /// must not allocate, nor take a lock that is held across a read.
  virtual bool contains(Vpn vpn) const = 0;

 protected:
  ~FilePageMarks() = default;
};

/// Patches the entries of a pagemap read: `bytes` bytes at file offset
/// `offset` (both multiples of 8, as the kernel requires), in `buf`.
/// `files` (may be null): the pages to show as file pages.
void patch_pagemap(const AddressSpace& as, const FilePageMarks* files, std::uint64_t offset, void* buf,
                   std::size_t bytes);

/// The kernel's pagemap entries of [start, end) (page aligned), one per
/// page, read through a fresh fd (patched where uhmm manages the pages, as
/// every pagemap read in the process is).  EIO if they cannot be read.
Result<std::vector<std::uint64_t>> read_own_pagemap(std::uintptr_t start, std::uintptr_t end);

/// Whether `path` names this process's pagemap: /proc/self/pagemap,
/// /proc/thread-self/pagemap or /proc/<our pid>/pagemap.
bool is_own_pagemap_path(const char* path);

/// The fds the program opened on its pagemap, or made from one (dup,
/// dup2, dup3, fcntl F_DUPFD): one bit per fd, and the inode, so that a
/// number reused behind our back is not mistaken for one.  Any fd number
/// the kernel can hand out: fds below kBlockFds live in a static block,
/// each further block of kBlockFds numbers is mapped the first time an fd
/// in it is recorded and never unmapped, so a read of a lower fd costs one
/// atomic load, and a read of a higher one a second load (its block) and
/// no lock.  Blocks are small (36 KiB) so that a program with a few high
/// fds pays little, and so that the mapped blocks are reached under the
/// usual fd limits (tests/compat).
class PagemapFds {
 public:
  static constexpr int kBlockFds = 1 << 12;
  static bool maybe(int fd) {
    if (fd < 0) return false;
    const Block* b = fd < kBlockFds ? &first_ : blocks_[fd / kBlockFds].load(std::memory_order_acquire);
    return b != nullptr && b->marked(fd % kBlockFds);
  }
  /// Records an fd just opened on the pagemap (its inode from fstat).
  static void opened(int fd);
  /// Records `copy`, just made from `fd` by dup*, if `fd` is a pagemap fd;
  /// forgets `copy`'s old number otherwise (dup2 closed what it was).
  static void duplicated(int fd, int copy);
  static void closed(int fd);
  /// maybe(fd), confirmed by the fd's inode (one fstat).
  static bool is(int fd);

 private:
  struct Block {
    std::atomic<std::uint64_t> marks[kBlockFds / 64];
    std::atomic<std::uint64_t> inodes[kBlockFds];
    bool marked(int i) const {
      return (marks[static_cast<unsigned>(i) / 64].load(std::memory_order_acquire) >> (i % 64)) & 1;
    }
  };
  // fds are ints: this many blocks cover every non-negative one (4 MiB of
  // bss, of which only the pages of blocks in use are ever touched).
  static constexpr std::size_t kBlocks = (std::size_t{1} << 31) / kBlockFds;
  /// The block of `fd`, mapped if `make` and not there yet; nullptr if it
  /// is not there (or cannot be mapped: that fd then reads unpatched).
  static Block* block(int fd, bool make);
  static inline Block first_ = {};  // bss: only touched pages cost memory
  static inline std::atomic<Block*> blocks_[kBlocks] = {};  // [0] unused: first_
};

}  // namespace uhmm::compat
