// compat: /proc/self/pagemap as the kernel would show it with device pages.
//
// uhmm moves a page that goes to a device out of the program's mapping
// (UFFDIO_MOVE), so the kernel's pagemap shows a hole where the kernel's
// own HMM would show a swap-like entry.  The preload library recognises the
// fds the program opens on its own pagemap and patches the 64-bit entries
// it reads through them (docs/adr/0005-dmirror-emulation.md, "pagemap").
//
// Concurrency: everything here is lock-free and allocation-free: read() is
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
///  - anything else (a system page, a hole, a coherent page, which stays
///    mapped for the CPU): the kernel's own entry.
/// Bits the kernel reports for any entry (soft-dirty, uffd-wp, file/shared)
/// are kept.
std::uint64_t pagemap_word(std::uint64_t kernel, const PageInfo& info);

/// Patches the entries of a pagemap read: `bytes` bytes at file offset
/// `offset` (both multiples of 8, as the kernel requires), in `buf`.
void patch_pagemap(const AddressSpace& as, std::uint64_t offset, void* buf, std::size_t bytes);

/// The kernel's pagemap entries of [start, end) (page aligned), one per
/// page, read through a fresh fd (patched where uhmm manages the pages, as
/// every pagemap read in the process is).  EIO if they cannot be read.
Result<std::vector<std::uint64_t>> read_own_pagemap(std::uintptr_t start, std::uintptr_t end);

/// Whether `path` names this process's pagemap: /proc/self/pagemap,
/// /proc/thread-self/pagemap or /proc/<our pid>/pagemap.
bool is_own_pagemap_path(const char* path);

/// The fds the program opened on its pagemap (one bit per fd below
/// kMaxFd, and the inode, so that a number reused behind our back
/// through dup2 is not mistaken for one).
class PagemapFds {
 public:
  static constexpr int kMaxFd = 1 << 16;
  static bool maybe(int fd) {
    return fd >= 0 && fd < kMaxFd &&
           ((marks_[static_cast<unsigned>(fd) / 64].load(std::memory_order_acquire) >> (fd % 64)) & 1);
  }
  /// Records an fd just opened on the pagemap (its inode from fstat).
  static void opened(int fd);
  static void closed(int fd);
  /// maybe(fd), confirmed by the fd's inode (one fstat).
  static bool is(int fd);

 private:
  static inline std::atomic<std::uint64_t> marks_[kMaxFd / 64] = {};
  static inline std::atomic<std::uint64_t> inodes_[kMaxFd] = {};  // bss: only touched pages cost memory
};

}  // namespace uhmm::compat
