// file: the user-space page cache of a file or a shared anonymous region.
// The design and the durability rules: docs/adr/0006-file-cache.md.
//
// The pages live in a memfd the size of the object; every uhmm mapping of
// the cache maps that memfd, so all of them share one page per offset.  A
// page the memfd lacks is a missing-page fault that mm hands to this layer
// (mm::RegionBackend): it is read from the file and installed with
// UFFDIO_COPY, write-protected.  Writes through a mapping clear the
// protection without any fault reaching user space (UFFD_FEATURE_WP_ASYNC);
// writeback finds them with PAGEMAP_SCAN, which protects them again in the
// same walk, and writes each dirty page with one pwrite.
//
// Concurrency contract of Impl: `mutex` guards the page states and the
// size, and no I/O and no userfaultfd call happens under it.  A page being
// read in is marked kLoading; whoever else needs it (a fault, read/write,
// truncate) waits on `changed`.  `writeback_mutex` serializes writebacks
// and truncations of the cache.  Lock order: docs/locking.md.
#include "uhmm/file_cache.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <exception>
#include <optional>
#include <thread>
#include <vector>

#include "core/sync.hpp"
#include "mm/address_space_impl.hpp"

namespace uhmm {

namespace {

enum PageBits : std::uint8_t {
  kLoaded = 1,   // the memfd holds the page (read in, or written by uhmm)
  kLoading = 2,  // someone is reading it in: wait on `changed`
  kDirty = 4,    // written since it last reached the file (as far as uhmm knows)
};

std::uint64_t pages_for(std::uint64_t bytes) { return (bytes + kPageSize - 1) / kPageSize; }

Status errno_status(const char* what) {
  const int e = errno;
  return Status::error(e, std::string(what) + ": " + platform::errno_text(e));
}

// Whole-buffer pread/pwrite: EINTR and short transfers go on; `short_ok`
// lets a read stop at the end of the file (the rest stays as it was).
Status pread_full(int fd, std::byte* buf, std::size_t len, std::uint64_t off, bool short_ok, const char* what) {
  std::size_t done = 0;
  while (done < len) {
    const ssize_t n = ::pread(fd, buf + done, len - done, static_cast<off_t>(off + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno_status(what);
    if (n == 0) {
      if (short_ok) return Status::ok();
      return Status::error(EIO, std::string(what) + ": unexpected end of file");
    }
    done += static_cast<std::size_t>(n);
  }
  return Status::ok();
}

Status pwrite_full(int fd, const std::byte* buf, std::size_t len, std::uint64_t off, const char* what) {
  std::size_t done = 0;
  while (done < len) {
    const ssize_t n = ::pwrite(fd, buf + done, len - done, static_cast<off_t>(off + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno_status(what);
    done += static_cast<std::size_t>(n);
  }
  return Status::ok();
}

struct PageBuffer {
  PageBuffer() : bytes(new std::byte[kPageSize]()) {}
  std::unique_ptr<std::byte[]> bytes;
  std::byte* data() { return bytes.get(); }
};

}  // namespace

struct FileCache::Impl final : mm::RegionBackend, std::enable_shared_from_this<FileCache::Impl> {
  /// Null once the address space was destroyed (address_space_closing);
  /// cleared under writeback_mutex, so the flusher's writeback never sees
  /// it go in the middle.
  std::atomic<AddressSpace*> as{nullptr};
  int file_fd = -1;  // -1: shared anonymous memory
  int memfd = -1;
  bool writable = true;
  pid_t owner = 0;
  FileCacheOptions options;

  Mutex writeback_mutex{LockRank::kFileWriteback};
  mutable Mutex mutex{LockRank::kFileCache};
  std::condition_variable_any changed;  // a page stopped loading; the flusher should stop
  std::uint64_t size UHMM_GUARDED_BY(mutex) = 0;
  std::vector<std::uint8_t> pages UHMM_GUARDED_BY(mutex);  // PageBits, one per page of the object
  bool closed UHMM_GUARDED_BY(mutex) = false;
  bool stop_flusher UHMM_GUARDED_BY(mutex) = false;
  std::thread flusher;

  bool anonymous() const { return file_fd < 0; }
  /// Where the mappings live; null once the address space is gone.
  AddressSpace::Impl* space() const {
    AddressSpace* a = as.load(std::memory_order_acquire);
    return a != nullptr ? &a->impl() : nullptr;
  }

  Status usable() const {
    if (::getpid() != owner) return Status::error(ECHILD, "this file cache belongs to the parent process");
    MutexLock lock(mutex);
    if (closed) return Status::error(EBADF, "file cache closed");
    return Status::ok();
  }

  // ---- loading ------------------------------------------------------------

  enum class Claim { kMine, kLoaded, kBeyondEnd };
  /// Waits until page `index` is not being loaded, then claims it for
  /// loading (kMine) unless it is loaded already or past the end.
  Claim claim(std::uint64_t index) {
    MutexLock lock(mutex);
    for (;;) {
      if (index * kPageSize >= size || index >= pages.size()) return Claim::kBeyondEnd;
      if (!(pages[index] & kLoading)) break;
      changed.wait(mutex);
    }
    if (pages[index] & kLoaded) return Claim::kLoaded;
    pages[index] |= kLoading;
    return Claim::kMine;
  }
  void finish_load(std::uint64_t index, bool loaded, bool dirty) {
    {
      MutexLock lock(mutex);
      if (index < pages.size()) {  // a truncation may have dropped it
        pages[index] &= static_cast<std::uint8_t>(~kLoading);
        if (loaded) pages[index] |= kLoaded;
        if (dirty) pages[index] |= kDirty;
      }
    }
    changed.notify_all();
  }
  /// The file's page at `index`: up to the end of the file, zeros after.
  Status read_from_file(std::uint64_t index, std::byte* buf) {
    std::memset(buf, 0, kPageSize);
    if (anonymous()) return Status::ok();
    return pread_full(file_fd, buf, kPageSize, index * kPageSize, /*short_ok=*/true, "pread of the file");
  }

  Fault fault_missing(AddressSpace::Impl& space, VirtAddr page, std::uint64_t offset, std::size_t pages_left,
                      bool /*write*/) override {
    const std::uint64_t index = offset / kPageSize;
    const Claim c = claim(index);
    if (c == Claim::kBeyondEnd) return Fault::kBeyondEnd;
    // Loaded already, yet missing here: the application punched the page out
    // of the memfd (MADV_REMOVE) after it was read in, which for a file
    // mapping punches the file.  It reads as zeros and reaches the file so.
    const bool punched = c == Claim::kLoaded;
    std::size_t run = 1;
    {
      MutexLock lock(mutex);
      if (punched) {
        if (index >= pages.size() || (pages[index] & kLoading)) return Fault::kInstalled;  // look again
        pages[index] |= kLoading;
      } else if (!anonymous()) {
        // Fault-around: the pages after it that nobody has, read with it.
        const std::size_t limit = std::min(pages_left, std::max<std::size_t>(options.fault_around_pages, 1));
        while (run < limit && index + run < pages.size() && !(pages[index + run] & (kLoaded | kLoading))) {
          pages[index + run] |= kLoading;
          ++run;
        }
      }
    }
    std::vector<std::byte> buf(run * kPageSize);
    if (!punched && !anonymous()) {
      if (Status s = pread_full(file_fd, buf.data(), buf.size(), offset, /*short_ok=*/true, "pread of the file"); !s) {
        std::fprintf(stderr, "uhmm: reading page %llu of a cached file failed: %s\n",
                     static_cast<unsigned long long>(index), s.to_string().c_str());
        for (std::size_t i = 0; i < run; ++i) finish_load(index + i, false, false);
        return Fault::kFailed;
      }
    }
    // Installed write-protected, so that only a later write marks them.
    // EEXIST: that page reached the memfd another way (another mapping's
    // fault, read/write) and stays as it is; the copy goes on after it.
    std::vector<int> result(run, 0);
    std::size_t done = 0;
    while (done < run) {
      const platform::PartialResult r = space.uffd.copy(page + done * kPageSize, buf.data() + done * kPageSize,
                                                        (run - done) * kPageSize, /*wake=*/false,
                                                        /*write_protect=*/!anonymous());
      done += r.bytes_done / kPageSize;
      if (r.error == 0) break;
      if (r.error == EEXIST) {
        result[done++] = EEXIST;
        continue;
      }
      // Any other error: the pages left are not installed; each faults again.
      for (std::size_t i = done; i < run; ++i) result[i] = r.error;
      break;
    }
    for (std::size_t i = 0; i < run; ++i) {
      const bool present = result[i] == 0 || result[i] == EEXIST;
      finish_load(index + i, present, i == 0 && punched && !anonymous() && result[0] == 0);
    }
    if (result[0] == 0 || result[0] == EEXIST) return Fault::kInstalled;
    {
      MutexLock lock(mutex);
      if (offset >= size) return Fault::kBeyondEnd;  // truncated meanwhile
    }
    std::fprintf(stderr, "uhmm: installing page %llu of a cached file failed: %s\n",
                 static_cast<unsigned long long>(index), platform::errno_text(result[0]).c_str());
    return Fault::kFailed;
  }

  /// read/write's way to a page: holds it (as a load does, so faults and
  /// truncate wait for it) and fills the memfd from the file if it lacks
  /// it.  The caller copies, then calls release().
  Status hold_loaded(std::uint64_t index) {
    bool loaded;
    {
      MutexLock lock(mutex);
      for (;;) {
        if (index * kPageSize >= size || index >= pages.size())
          return Status::error(EINVAL, "beyond the end of the object (truncated meanwhile)");
        if (!(pages[index] & kLoading)) break;
        changed.wait(mutex);
      }
      loaded = pages[index] & kLoaded;
      pages[index] |= kLoading;
    }
    if (loaded) return Status::ok();
    PageBuffer buf;
    Status s = read_from_file(index, buf.data());
    if (s) {
      std::uint64_t len;
      {
        // A truncation may have moved the end since; it waits for us.
        MutexLock lock(mutex);
        const std::uint64_t at = index * kPageSize;
        len = size > at ? std::min<std::uint64_t>(kPageSize, size - at) : 0;
      }
      s = pwrite_full(memfd, buf.data(), len, index * kPageSize, "pwrite of the cache");
    }
    if (!s) finish_load(index, false, false);
    return s;
  }
  void release(std::uint64_t index, bool dirty) { finish_load(index, true, dirty && !anonymous()); }
  /// hold_loaded for the bytes [at, at + n) of one page: they must still lie
  /// inside the object (a truncation since the caller looked may have cut
  /// the page it holds).
  Status hold_range(std::uint64_t at, std::size_t n) {
    UHMM_TRY(hold_loaded(at / kPageSize));
    bool inside;
    {
      MutexLock lock(mutex);
      inside = at + n <= size;
    }
    if (inside) return Status::ok();
    release(at / kPageSize, false);
    return Status::error(EINVAL, "beyond the end of the object (truncated meanwhile)");
  }

  void mapping_lost(std::uint64_t offset, std::size_t len) noexcept override {
    // Which pages were written there is gone with the page tables: every
    // page the memfd holds in the range goes back to the file once more.
    if (anonymous()) return;
    MutexLock lock(mutex);
    const std::uint64_t end = std::min<std::uint64_t>(pages_for(offset + len), pages.size());
    for (std::uint64_t i = offset / kPageSize; i < end; ++i)
      if (pages[i] & kLoaded) pages[i] |= kDirty;
  }

  // ---- writeback ----------------------------------------------------------

  /// Moves the written bits of the mappings (all, or the one at `only`) into
  /// the page states, write-protecting the pages again.
  void collect_written(std::optional<VirtAddr> only) {
    AddressSpace::Impl* sp = space();
    if (sp == nullptr) return;  // no mappings any more
    // A munmap or madvise the application made before this call has had its
    // event read (the kernel held the call until then) but maybe not
    // processed: its mapping_lost must come first, or this writeback would
    // miss the pages it marks.
    std::vector<std::pair<VirtAddr, VirtAddr>> ranges;
    sp->for_each_backed_region(this, [&](VirtAddr start, std::size_t length, std::uint64_t) {
      ranges.emplace_back(start, start + length);
    });
    for (const auto& [lo, hi] : ranges) sp->settle_events_in(lo, hi);
    // After the events: an mremap that moved a mapping and grew it has made
    // its region at the new place only now.
    sp->follow_backed_growth(this);
    std::vector<std::pair<VirtAddr, VirtAddr>> written;
    std::vector<std::pair<std::uint64_t, std::uint64_t>> written_pages;  // [first, end) page indexes
    // Under regions_mutex (shared): a region still listed is still this
    // cache's mapping.  If the application unmapped it already, its UNMAP
    // event is not processed yet and will call mapping_lost; the scan then
    // fails (nothing registered there) or reads a fresh mapping that uhmm
    // has not handed out yet (map_backed waits for that event first), whose
    // pages nobody can have written.
    sp->for_each_backed_region(this, [&](VirtAddr start, std::size_t length, std::uint64_t offset) {
      if (only && *only != start) return;
      written.clear();
      if (Status s = platform::scan_written(start, length, /*reprotect=*/true, &written); !s) {
        mapping_lost(offset, length);
        return;
      }
      for (const auto& [lo, hi] : written)
        written_pages.emplace_back((offset + (lo - start)) / kPageSize, pages_for(offset + (hi - start)));
    });
    mark_written(written_pages);
  }

  /// Marks dirty the pages a scan reported written.  A page the memfd lacks
  /// (neither loaded nor being loaded) holds nothing to write back: the scan
  /// reports it only because its slot had no write-protect marker, which is
  /// the case in the part of a mapping that mremap grew.  A page being
  /// loaded may be installed and written already, or not installed yet: its
  /// load decides, so writeback never copies a hole over the file's data.
  void mark_written(const std::vector<std::pair<std::uint64_t, std::uint64_t>>& written_pages) {
    MutexLock lock(mutex);
    for (const auto& [first, last] : written_pages) {
      for (std::uint64_t i = first; i < last; ++i) {
        while (i < pages.size() && (pages[i] & kLoading)) changed.wait(mutex);
        if (i < pages.size() && (pages[i] & kLoaded)) pages[i] |= kDirty;
      }
    }
  }

  Status writeback(SyncMode mode, std::optional<VirtAddr> only) {
    if (anonymous()) return Status::ok();
    MutexLock serial(writeback_mutex);
    collect_written(only);
    std::vector<std::uint64_t> dirty;
    {
      MutexLock lock(mutex);
      for (std::uint64_t i = 0; i < pages.size(); ++i)
        if (pages[i] & kDirty) dirty.push_back(i);
    }
    PageBuffer buf;
    std::vector<std::uint64_t> written;
    Status failed;
    for (std::size_t k = 0; k < dirty.size(); ++k) {
      const std::uint64_t i = dirty[k];
      std::uint64_t len;
      {
        // Clean before the copy: a write after this point marks it again.
        MutexLock lock(mutex);
        if (i >= pages.size() || !(pages[i] & kDirty)) continue;
        pages[i] &= static_cast<std::uint8_t>(~kDirty);
        len = std::min<std::uint64_t>(kPageSize, size - i * kPageSize);
      }
      Status s = pread_full(memfd, buf.data(), len, i * kPageSize, false, "pread of the cache");
      // One pwrite of the whole page: a killed process leaves it old or new.
      if (s) s = pwrite_full(file_fd, buf.data(), len, i * kPageSize, "writeback");
      if (!s) {
        failed = s;
        MutexLock lock(mutex);
        for (std::size_t j = k; j < dirty.size(); ++j)
          if (dirty[j] < pages.size() && (pages[dirty[j]] & kLoaded)) pages[dirty[j]] |= kDirty;
        break;
      }
      written.push_back(i);
    }
    if (failed.is_ok() && mode == SyncMode::kDurable && ::fdatasync(file_fd) != 0) failed = errno_status("fdatasync");
    if (!failed.is_ok() && mode == SyncMode::kDurable) {
      // A failed fdatasync leaves no telling which pages reached the disk.
      MutexLock lock(mutex);
      for (std::uint64_t i : written)
        if (i < pages.size() && (pages[i] & kLoaded)) pages[i] |= kDirty;
    }
    return failed;
  }

  void flusher_main() {
    bool reported = false;
    for (;;) {
      {
        MutexLock lock(mutex);
        changed.wait_for(mutex, options.flush_interval, [&]() UHMM_REQUIRES(mutex) { return stop_flusher; });
        if (stop_flusher) return;
      }
      try {
        const Status s = writeback(SyncMode::kWriteback, std::nullopt);
        if (!s && !reported) std::fprintf(stderr, "uhmm: periodic writeback failed: %s\n", s.to_string().c_str());
        reported = !s.is_ok();
      } catch (const std::exception& e) {
        std::fprintf(stderr, "uhmm: periodic writeback failed: %s\n", e.what());
      }
    }
  }

  void stop_flush_thread() {
    if (!flusher.joinable()) return;
    {
      MutexLock lock(mutex);
      stop_flusher = true;
    }
    changed.notify_all();
    flusher.join();
  }

  bool is_mapping(VirtAddr addr, std::size_t* length) const {
    bool found = false;
    AddressSpace::Impl* sp = space();
    if (sp == nullptr) return false;
    sp->for_each_backed_region(this, [&](VirtAddr start, std::size_t len, std::uint64_t) {
      if (start == addr) {
        found = true;
        *length = len;
      }
    });
    return found;
  }

  Status unmap_one(VirtAddr addr) {
    if (AddressSpace::Impl* sp = space()) sp->follow_backed_growth(this);  // unmap all of it
    std::size_t length = 0;
    if (!is_mapping(addr, &length)) return Status::error(EINVAL, "no mapping of this cache starts here");
    // Read-only first: a write racing with the unmap faults (as it may with
    // munmap), and none lands after the scan below.
    if (!anonymous() && ::mprotect(addr.ptr(), length, PROT_READ) != 0) return errno_status("mprotect");
    const Status wb = writeback(SyncMode::kWriteback, addr);
    UHMM_TRY(space()->unmap_region(addr, /*backed_ok=*/true));
    return wb;
  }

  /// Every mapping, written back and unmapped; the first error.
  Status unmap_all() {
    AddressSpace::Impl* sp = space();
    if (sp == nullptr) return Status::ok();
    std::vector<VirtAddr> starts;
    sp->for_each_backed_region(this, [&](VirtAddr start, std::size_t, std::uint64_t) { starts.push_back(start); });
    Status first;
    for (VirtAddr s : starts) {
      const Status r = unmap_one(s);
      if (first.is_ok() && !r.is_ok()) first = r;
    }
    return first;
  }

  /// Growing for write(): like pwrite, a write past the end makes the
  /// object (and the file) that long first; the gap reads zeros.
  Status grow_for_write(std::uint64_t end) {
    {
      MutexLock lock(mutex);
      if (end <= size) return Status::ok();
    }
    MutexLock serial(writeback_mutex);
    return grow(end);
  }
  /// The file first, then the memfd: a page that comes inside the object
  /// reads what the file holds there, zeros.  Pages past the old end are
  /// new, so every mapping's access there faults and loads them.
  Status grow(std::uint64_t new_size) UHMM_REQUIRES(writeback_mutex) {
    {
      MutexLock lock(mutex);
      if (new_size <= size) return Status::ok();
    }
    if (!anonymous() && ::ftruncate(file_fd, static_cast<off_t>(new_size)) != 0) return errno_status("ftruncate");
    if (::ftruncate(memfd, static_cast<off_t>(new_size)) != 0) return errno_status("ftruncate of the cache");
    MutexLock lock(mutex);
    size = new_size;
    pages.resize(pages_for(new_size), 0);
    return Status::ok();
  }

  void address_space_closing() noexcept override {
    // The mappings go with the address space; their written pages reach the
    // file now (or stay dirty in the cache, which outlives them: a later
    // sync() or close() retries).  The cache stays open without mappings.
    try {
      if (Status s = unmap_all(); !s)
        std::fprintf(stderr, "uhmm: writing back a file cache's mappings failed: %s\n", s.to_string().c_str());
    } catch (const std::exception& e) {
      std::fprintf(stderr, "uhmm: writing back a file cache's mappings failed: %s\n", e.what());
    }
    MutexLock serial(writeback_mutex);
    as.store(nullptr, std::memory_order_release);
  }

  /// The address space stops calling address_space_closing (a closed cache
  /// has nothing to give up).
  void detach() {
    if (AddressSpace::Impl* sp = space()) sp->detach_backend(this);
  }
};

FileCache::FileCache(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

namespace {
Status start(FileCache::Impl& c) {
  if (c.options.flush_interval.count() > 0 && !c.anonymous()) c.flusher = std::thread([&c] { c.flusher_main(); });
  return Status::ok();
}
}  // namespace

Result<std::unique_ptr<FileCache>> FileCache::open(AddressSpace& as, const std::string& path, int open_flags,
                                                   mode_t mode, FileCacheOptions options) {
  if (!as.impl().shared_write_tracking)
    return Status::error(ENOSYS, "the kernel lacks asynchronous write-protection of shared memory (Linux >= 6.7)");
  const int access = open_flags & O_ACCMODE;
  if (access != O_RDONLY && access != O_RDWR) return Status::error(EINVAL, "open a cached file O_RDONLY or O_RDWR");
  auto impl = std::make_shared<Impl>();
  impl->as.store(&as);
  impl->owner = ::getpid();
  impl->options = options;
  impl->writable = access == O_RDWR;
  impl->file_fd = ::open(path.c_str(), open_flags | O_CLOEXEC, mode);
  if (impl->file_fd < 0) return errno_status(("open " + path).c_str());
  auto fail = [&](Status s) {
    ::close(impl->file_fd);
    if (impl->memfd >= 0) ::close(impl->memfd);
    return s;
  };
  struct stat st {};
  if (::fstat(impl->file_fd, &st) != 0) return fail(errno_status("fstat"));
  if (!S_ISREG(st.st_mode)) return fail(Status::error(EINVAL, path + " is not a regular file"));
  // One cache per file: a second one would hold pages of its own, and the
  // two would silently diverge.
  if (::flock(impl->file_fd, LOCK_EX | LOCK_NB) != 0)
    return fail(errno == EWOULDBLOCK ? Status::error(EBUSY, path + " is cached by another uhmm file cache")
                                     : errno_status("flock"));
  impl->memfd = ::memfd_create("uhmm-file-cache", MFD_CLOEXEC);
  if (impl->memfd < 0) return fail(errno_status("memfd_create"));
  if (::ftruncate(impl->memfd, st.st_size) != 0) return fail(errno_status("ftruncate of the cache"));
  {
    MutexLock lock(impl->mutex);
    impl->size = static_cast<std::uint64_t>(st.st_size);
    impl->pages.assign(pages_for(impl->size), 0);
  }
  UHMM_TRY(start(*impl));
  as.impl().attach_backend(impl);
  return std::unique_ptr<FileCache>(new FileCache(std::move(impl)));
}

Result<std::unique_ptr<FileCache>> FileCache::create_anonymous(AddressSpace& as, std::size_t size,
                                                               FileCacheOptions options) {
  if (size == 0 || size % kPageSize != 0) return Status::error(EINVAL, "size must be a non-zero multiple of the page size");
  auto impl = std::make_shared<Impl>();
  impl->as.store(&as);
  impl->owner = ::getpid();
  impl->options = options;
  impl->memfd = ::memfd_create("uhmm-shared-anonymous", MFD_CLOEXEC);
  if (impl->memfd < 0) return errno_status("memfd_create");
  if (::ftruncate(impl->memfd, static_cast<off_t>(size)) != 0) {
    const Status s = errno_status("ftruncate");
    ::close(impl->memfd);
    return s;
  }
  {
    MutexLock lock(impl->mutex);
    impl->size = size;
    impl->pages.assign(pages_for(size), 0);
  }
  as.impl().attach_backend(impl);
  return std::unique_ptr<FileCache>(new FileCache(std::move(impl)));
}

FileCache::~FileCache() {
  if (::getpid() != impl_->owner) return;  // the parent's: leave it be
  {
    MutexLock lock(impl_->mutex);
    if (impl_->closed) return;
  }
  if (Status s = close(); !s) {
    std::fprintf(stderr, "uhmm: closing a file cache failed, unwritten pages are lost: %s\n", s.to_string().c_str());
    impl_->detach();
    MutexLock lock(impl_->mutex);
    impl_->closed = true;
    if (impl_->file_fd >= 0) ::close(impl_->file_fd);
    ::close(impl_->memfd);
  }
}

Result<VirtAddr> FileCache::map(std::uint64_t offset, std::size_t length, int prot) {
  UHMM_TRY(impl_->usable());
  if (offset % kPageSize != 0) return Status::error(EINVAL, "offset not page aligned");
  if (length == 0) return Status::error(EINVAL, "zero length");
  if (prot != PROT_READ && prot != (PROT_READ | PROT_WRITE))
    return Status::error(EINVAL, "protection must be PROT_READ or PROT_READ|PROT_WRITE");
  if ((prot & PROT_WRITE) && !impl_->writable) return Status::error(EACCES, "file opened read-only");
  const std::size_t len = pages_for(length) * kPageSize;
  if (offset + len < offset) return Status::error(EINVAL, "range wraps around");
  AddressSpace::Impl* sp = impl_->space();
  if (sp == nullptr) return Status::error(ENODEV, "the cache's address space was destroyed");
  return sp->map_backed(impl_->memfd, offset, len, prot,
                        impl_->anonymous() ? RegionKind::kSharedAnonymous : RegionKind::kFile,
                        /*track_writes=*/!impl_->anonymous(), impl_);
}

Status FileCache::unmap(VirtAddr addr) {
  UHMM_TRY(impl_->usable());
  return impl_->unmap_one(addr);
}

Status FileCache::sync(SyncMode mode) {
  UHMM_TRY(impl_->usable());
  return impl_->writeback(mode, std::nullopt);
}

std::uint64_t FileCache::size() const {
  MutexLock lock(impl_->mutex);
  return impl_->size;
}

std::size_t FileCache::dirty_pages() const {
  impl_->collect_written(std::nullopt);
  MutexLock lock(impl_->mutex);
  std::size_t n = 0;
  for (std::uint8_t p : impl_->pages) n += (p & kDirty) != 0;
  return n;
}

Status FileCache::truncate(std::uint64_t new_size) {
  UHMM_TRY(impl_->usable());
  if (!impl_->writable) return Status::error(EBADF, "file opened read-only");
  Impl& c = *impl_;
  MutexLock serial(c.writeback_mutex);
  std::uint64_t old_size;
  {
    MutexLock lock(c.mutex);
    old_size = c.size;
    if (new_size < old_size) {
      // Pages past the new end stop loading first: a load that read the old
      // content and installs it after the memfd shrank would leave stale
      // bytes beyond the end (or, for the new last page, in its tail).
      const std::uint64_t first = new_size / kPageSize;
      auto loading = [&]() UHMM_REQUIRES(c.mutex) {
        for (std::uint64_t i = first; i < c.pages.size(); ++i)
          if (c.pages[i] & kLoading) return true;
        return false;
      };
      c.size = new_size;  // no new load starts past it
      if (new_size % kPageSize != 0) {
        while (loading()) c.changed.wait(c.mutex);
        c.pages[first] |= kLoading;  // nor of the new last page, until the memfd is cut
      } else {
        while (loading()) c.changed.wait(c.mutex);
      }
      c.pages.resize(pages_for(new_size));
    }
  }
  if (new_size >= old_size) return c.grow(new_size);
  Status s;
  // Shrinking: the memfd drops the pages (every mapping loses them and
  // raises SIGBUS past the end) and zeroes the tail of the last one.
  if (::ftruncate(c.memfd, static_cast<off_t>(new_size)) != 0) s = errno_status("ftruncate of the cache");
  if (s && !c.anonymous() && ::ftruncate(c.file_fd, static_cast<off_t>(new_size)) != 0) s = errno_status("ftruncate");
  {
    MutexLock lock(c.mutex);
    if (new_size % kPageSize != 0 && new_size / kPageSize < c.pages.size())
      c.pages[new_size / kPageSize] &= static_cast<std::uint8_t>(~kLoading);
  }
  c.changed.notify_all();
  return s;
}

Status FileCache::read(std::uint64_t offset, std::span<std::byte> out) {
  UHMM_TRY(impl_->usable());
  Impl& c = *impl_;
  {
    MutexLock lock(c.mutex);
    if (offset > c.size || out.size() > c.size - offset) return Status::error(EINVAL, "range beyond the end");
  }
  // Through a private page: `out` may itself be managed memory, whose fault
  // must not wait on a page this call is loading.
  PageBuffer buf;
  std::size_t done = 0;
  while (done < out.size()) {
    const std::uint64_t at = offset + done;
    const std::size_t in_page = at % kPageSize;
    const std::size_t n = std::min<std::size_t>(kPageSize - in_page, out.size() - done);
    UHMM_TRY(c.hold_range(at, n));
    const Status s = pread_full(c.memfd, buf.data(), n, at, false, "pread of the cache");
    c.release(at / kPageSize, false);
    UHMM_TRY(s);
    std::memcpy(out.data() + done, buf.data(), n);
    done += n;
  }
  return Status::ok();
}

Status FileCache::write(std::uint64_t offset, std::span<const std::byte> in) {
  UHMM_TRY(impl_->usable());
  if (!impl_->writable) return Status::error(EBADF, "file opened read-only");
  Impl& c = *impl_;
  if (in.empty()) return Status::ok();
  if (offset + in.size() < offset) return Status::error(EFBIG, "range beyond the largest file offset");
  UHMM_TRY(c.grow_for_write(offset + in.size()));
  PageBuffer buf;
  std::size_t done = 0;
  while (done < in.size()) {
    const std::uint64_t at = offset + done;
    const std::size_t in_page = at % kPageSize;
    const std::size_t n = std::min<std::size_t>(kPageSize - in_page, in.size() - done);
    std::memcpy(buf.data(), in.data() + done, n);  // may fault: nothing held yet
    UHMM_TRY(c.hold_range(at, n));
    // Held: a truncation waits, so this never writes past the memfd's end.
    const Status s = pwrite_full(c.memfd, buf.data(), n, at, "pwrite of the cache");
    c.release(at / kPageSize, s.is_ok());
    UHMM_TRY(s);
    done += n;
  }
  return Status::ok();
}

Status FileCache::close() {
  UHMM_TRY(impl_->usable());
  Impl& c = *impl_;
  c.stop_flush_thread();
  const Status first = c.unmap_all();
  const Status wb = c.writeback(SyncMode::kDurable, std::nullopt);
  // The dirty pages are only in the cache: keep it open so that the caller
  // can make room and close again.
  if (!wb.is_ok()) return wb;
  c.detach();
  {
    MutexLock lock(c.mutex);
    c.closed = true;
  }
  if (c.file_fd >= 0) ::close(c.file_fd);  // drops the flock
  ::close(c.memfd);
  return first;
}

}  // namespace uhmm
