// uhmm/file_cache.hpp: a user-space page cache for a file or a shared
// anonymous region, mapped into an AddressSpace (the kernel's address_space
// of an inode, for uhmm's mappings).
//
// Units: offsets and sizes are bytes in the object (the file); "page" is
// kPageSize bytes at a page-aligned offset.  A mapping's pages are the
// cache's pages, so every mapping of one cache sees every write at once.
//
// Durability (the full story, and why: docs/adr/0006-file-cache.md):
//   - a write through a mapping or write() is in the cache only;
//   - sync(kWriteback) returns once every page written before it began is in
//     the kernel's page cache of the file: it survives the process being
//     killed, not a power loss;
//   - sync(kDurable) also fdatasyncs the file: it survives a power loss;
//   - the periodic flush and unmap() do what sync(kWriteback) does, for all
//     pages or that mapping's pages; close() does sync(kDurable).
//   - pages reach the file whole (runs of whole pages per pwrite, at page
//     boundaries), so a killed process never leaves a torn page.
//
// Device pages: migrate_vma on a mapping of the cache (for instance
// sim::SimDevice::migrate_to_device) moves its pages to a device; every
// lookup (an access through any mapping, read(), write(), writeback of what
// the device wrote, truncation) brings them back first, with the device's
// writes when its page map has migrate_to_pagecache, else by reading the file
// again (then only clean pages go, read-only).  docs/adr/0006-file-cache.md.
//
// Not shared across processes: a forked child gets none of the mappings
// (they are MADV_DONTFORK, so a child's access faults with SIGSEGV) and its
// calls return ECHILD; a second cache of the same file, in this process or
// another, is refused with EBUSY (an exclusive flock on the file).  Plain
// read(2)/write(2) of the file by others bypass the cache, as they bypass
// any process's private buffers.
//
// Concurrency contract: every member may be called from any thread, except
// that the destructor (and close()) must not race with other calls, nor
// with the destruction of the cache's AddressSpace.
//
// Lifetime: the cache may outlive its AddressSpace.  The AddressSpace's
// destructor writes every mapping of the cache back and unmaps it; the cache
// stays open without mappings (read, write, truncate, sync and close work;
// map() returns ENODEV), and its pages stay in it until close().
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "uhmm/address_space.hpp"
#include "uhmm/status.hpp"
#include "uhmm/types.hpp"

namespace uhmm {

struct FileCacheOptions {
  /// Written pages reach the file at least this often (sync(kWriteback) on a
  /// library thread).  Zero: no periodic flush.
  std::chrono::milliseconds flush_interval{5000};
  /// A fault reads in up to this many pages (the faulting one and those
  /// after it in its mapping that the cache lacks) with one read of the file.
  std::size_t fault_around_pages = 16;
};

enum class SyncMode : std::uint8_t {
  kWriteback,  // msync(MS_SYNC): dirty pages into the kernel's page cache
  kDurable,    // fsync: and the file's data on stable storage (fdatasync)
};

class FileCache {
 public:
  /// Opens `path` with `open_flags` (O_RDONLY or O_RDWR, optionally O_CREAT
  /// with `mode`, O_TRUNC).  EBUSY if another cache holds the file; ENOSYS
  /// if the kernel cannot track written shared pages (Linux < 6.7).
  static Result<std::unique_ptr<FileCache>> open(AddressSpace& as, const std::string& path, int open_flags,
                                                 mode_t mode = 0600, FileCacheOptions options = {});
  /// Shared anonymous memory of `size` bytes (a multiple of the page size):
  /// the same cache with no file; sync() has nothing to do.
  static Result<std::unique_ptr<FileCache>> create_anonymous(AddressSpace& as, std::size_t size,
                                                             FileCacheOptions options = {});
  /// close(), reporting a failure on stderr (call close() to see it).
  ~FileCache();
  FileCache(const FileCache&) = delete;
  FileCache& operator=(const FileCache&) = delete;

  /// Maps [offset, offset + length) of the object, like mmap(MAP_SHARED):
  /// `offset` page aligned (EINVAL), `length` non-zero (EINVAL, rounded up to
  /// pages), `prot` PROT_READ or PROT_READ|PROT_WRITE (EINVAL), writable only
  /// if the file was opened O_RDWR (EACCES).  Pages past the end of the
  /// object raise SIGBUS when touched, until truncate() or write() grows the
  /// object over them.  If the application grows the mapping with mremap
  /// (in place or moving it), the new part maps the object further on, as a
  /// file mapping does, and unmap() removes all of it.
  Result<VirtAddr> map(std::uint64_t offset, std::size_t length, int prot = PROT_READ | PROT_WRITE);
  /// Writes back the pages written through the mapping at `addr`, then
  /// unmaps it.  A writeback error is returned and the mapping is gone, but
  /// its pages stay dirty in the cache (the next sync() retries them).
  Status unmap(VirtAddr addr);
  /// msync/fsync for every mapping of the cache.  On an error (ENOSPC, EIO,
  /// EFBIG...) the pages not written stay dirty and a later sync() retries.
  Status sync(SyncMode mode = SyncMode::kWriteback);
  /// ftruncate: pages past the new end are dropped (and raise SIGBUS in every
  /// mapping); growing again reads zeros.
  Status truncate(std::uint64_t new_size);
  std::uint64_t size() const;
  /// pread/pwrite through the cache: they see, and are seen by, every
  /// mapping.  read()'s range must lie inside the object (EINVAL
  /// otherwise).  write() past the end grows the object and the file first,
  /// as pwrite does (the gap reads zeros; EFBIG if the end overflows), so
  /// the pages that come inside stop raising SIGBUS in every mapping.
  Status read(std::uint64_t offset, std::span<std::byte> out);
  Status write(std::uint64_t offset, std::span<const std::byte> in);
  /// Unmaps every mapping, writes everything back and fdatasyncs; further
  /// calls fail with EBADF.
  Status close();

  /// Pages written since they last reached the file (for tests and tools).
  std::size_t dirty_pages() const;

  struct Impl;

 private:
  explicit FileCache(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

}  // namespace uhmm
