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
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <exception>
#include <optional>
#include <thread>
#include <unordered_map>
#include <vector>

#include "core/sync.hpp"
#include "mm/address_space_impl.hpp"
#include "platform/threads.hpp"

namespace uhmm {

namespace {

enum PageBits : std::uint8_t {
  kLoaded = 1,    // the memfd holds the page (read in, or written by uhmm)
  kLoading = 2,   // someone holds it (reading it in, moving it): wait on `changed`
  kDirty = 4,     // written since it last reached the file (as far as uhmm knows)
  kOnDevice = 8,  // a device holds it (Impl::device); the memfd does not
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

// The device page a migrate entry names (migrate's helper, without linking
// the layer beside this one).
DevicePage* device_page_of(std::uint64_t entry) {
  if (!(entry & MIGRATE_PFN_VALID) || !is_device_pfn(migrate_pfn_to_pfn(entry))) return nullptr;
  return DevicePagemap::page_from_pfn(DevicePfn{migrate_pfn_to_pfn(entry)});
}

// Writeback moves at most this many consecutive pages with one pread and
// one pwrite (2 MiB: long enough that the system calls do not dominate).
constexpr std::size_t kWritebackRunPages = 512;

// Pages per preadv/pwritev between the cache and staging slots (IOV_MAX).
constexpr std::size_t kIovPages = 1024;

// Whole-iovec preadv/pwritev: EINTR and short transfers go on.
template <bool kWrite>
bool vector_io_full(int fd, std::vector<struct iovec> iov, std::uint64_t off) {
  std::size_t first = 0;
  while (first < iov.size()) {
    const ssize_t n = kWrite ? ::pwritev(fd, iov.data() + first, static_cast<int>(iov.size() - first), static_cast<off_t>(off))
                             : ::preadv(fd, iov.data() + first, static_cast<int>(iov.size() - first), static_cast<off_t>(off));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    off += static_cast<std::uint64_t>(n);
    for (std::size_t left = static_cast<std::size_t>(n); left > 0;) {
      const std::size_t take = std::min(left, iov[first].iov_len);
      iov[first].iov_base = static_cast<std::byte*>(iov[first].iov_base) + take;
      iov[first].iov_len -= take;
      left -= take;
      if (iov[first].iov_len == 0) ++first;
    }
    while (first < iov.size() && iov[first].iov_len == 0) ++first;
  }
  return true;
}
bool preadv_full(int fd, const std::vector<struct iovec>& iov, std::uint64_t off) { return vector_io_full<false>(fd, iov, off); }
bool pwritev_full(int fd, const std::vector<struct iovec>& iov, std::uint64_t off) { return vector_io_full<true>(fd, iov, off); }

struct PageBuffer {
  PageBuffer() : bytes(new std::byte[kPageSize]()) {}
  std::unique_ptr<std::byte[]> bytes;
  std::byte* data() { return bytes.get(); }
};

}  // namespace

struct FileCache::Impl final : mm::RegionBackend, DevicePageHolder, std::enable_shared_from_this<FileCache::Impl> {
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
  // The pages a device holds (kOnDevice), each with the cache's reference.
  std::unordered_map<std::uint64_t, DevicePage*> device UHMM_GUARDED_BY(mutex);
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

  enum class Claim { kAbsent, kLoaded, kOnDevice, kBeyondEnd };
  /// Waits until nobody holds page `index`, then holds it (kLoading) and
  /// says where it is; nothing is held past the end.
  Claim claim(std::uint64_t index) {
    MutexLock lock(mutex);
    for (;;) {
      if (index * kPageSize >= size || index >= pages.size()) return Claim::kBeyondEnd;
      if (!(pages[index] & kLoading)) break;
      changed.wait(mutex);
    }
    return claim_locked(index);
  }
  Claim claim_locked(std::uint64_t index) UHMM_REQUIRES(mutex) {
    const std::uint8_t was = pages[index];
    pages[index] |= kLoading;
    if (was & kOnDevice) return Claim::kOnDevice;
    return (was & kLoaded) ? Claim::kLoaded : Claim::kAbsent;
  }
  /// Lets go of a page held with claim(), with nothing learnt about it.
  void unclaim(std::uint64_t index) { finish_load(index, false, false); }
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
    if (c == Claim::kOnDevice) return fault_on_device(space, page, index, pages_left);
    if (c == Claim::kLoaded) {
      // In the memfd, not mapped here (another mapping read it in, or the
      // page came back from a device): map it, and the loaded pages after
      // it in this mapping (fault-around, which the kernel does not do for
      // a mapping registered with userfaultfd).
      const std::size_t run = 1 + claim_loaded_after(index, pages_left);
      const int err = map_loaded(space, page, run);
      for (std::size_t i = 0; i < run; ++i) unclaim(index + i);
      if (err != EFAULT) {
        if (err == 0 || err == EEXIST || err == ENOENT) return Fault::kInstalled;  // ENOENT: unmapped meanwhile
        std::fprintf(stderr, "uhmm: mapping page %llu of a cached file failed: %s\n",
                     static_cast<unsigned long long>(index), platform::errno_text(err).c_str());
        return Fault::kFailed;
      }
      if (const Claim again = claim(index); again != Claim::kLoaded) {  // changed meanwhile: look again
        if (again != Claim::kBeyondEnd) unclaim(index);
        return Fault::kInstalled;
      }
      // Loaded, yet the memfd lacks it: the application punched it out
      // (MADV_REMOVE) after it was read in, which for a file mapping punches
      // the file.  It reads as zeros and reaches the file so.
    }
    return load(space, page, index, pages_left, /*punched=*/c == Claim::kLoaded);
  }

  /// Holds the loaded pages right after `index` in its mapping that nobody
  /// holds (up to fault_around_pages in all); how many.
  std::size_t claim_loaded_after(std::uint64_t index, std::size_t pages_left) {
    MutexLock lock(mutex);
    const std::size_t limit = std::min(pages_left, std::max<std::size_t>(options.fault_around_pages, 1));
    std::size_t n = 0;
    while (1 + n < limit && index + 1 + n < pages.size() &&
           (pages[index + 1 + n] & (kLoaded | kLoading | kOnDevice)) == kLoaded) {
      pages[index + 1 + n] |= kLoading;
      ++n;
    }
    return n;
  }

  /// Maps `n` pages the memfd holds at `page` with UFFDIO_CONTINUE, past
  /// those mapped already.  The first page's errno (0 if it is mapped now).
  int map_loaded(AddressSpace::Impl& space, VirtAddr page, std::size_t n) {
    int first_error = -1;
    for (std::size_t done = 0; done < n;) {
      const platform::PartialResult r =
          space.uffd.continue_range(page + done * kPageSize, (n - done) * kPageSize, /*wake=*/false, !anonymous());
      if (first_error < 0) first_error = r.bytes_done > 0 ? 0 : r.error;
      done += r.bytes_done / kPageSize;
      if (r.error == 0) break;
      if (r.error != EEXIST) break;  // the rest faults again by itself
      ++done;
    }
    return first_error < 0 ? 0 : first_error;
  }

  /// Reads page `index` (held) and, fault-around, the pages after it in its
  /// mapping that nobody has, into the memfd through the mapping at `page`.
  Fault load(AddressSpace::Impl& space, VirtAddr page, std::uint64_t index, std::size_t pages_left, bool punched) {
    const std::uint64_t offset = index * kPageSize;
    std::size_t run = 1;
    if (!punched && !anonymous()) {
      // Fault-around: the pages after it that nobody has, read with it.
      MutexLock lock(mutex);
      const std::size_t limit = std::min(pages_left, std::max<std::size_t>(options.fault_around_pages, 1));
      while (run < limit && index + run < pages.size() &&
             !(pages[index + run] & (kLoaded | kLoading | kOnDevice))) {
        pages[index + run] |= kLoading;
        ++run;
      }
    }
    std::vector<std::byte> buf(run * kPageSize);
    if (!punched && !anonymous()) {
      if (Status s = pread_full(file_fd, buf.data(), buf.size(), offset, /*short_ok=*/true, "pread of the file"); !s) {
        std::fprintf(stderr, "uhmm: reading page %llu of a cached file failed: %s\n",
                     static_cast<unsigned long long>(index), s.to_string().c_str());
        for (std::size_t i = 0; i < run; ++i) unclaim(index + i);
        return Fault::kFailed;
      }
    }
    // Installed write-protected, so that only a later write marks them.
    // EEXIST: that page reached the memfd another way (another mapping's
    // fault, read/write) and stays as it is; the copy goes on after it.
    // Inside the install window, after a look at the queue and at the
    // mapping, as a fault's zero fill is (docs/address-space-events.md,
    // case 2): the fault may be late, and the address may map something
    // else by now, whose pages these are not.
    std::vector<int> result(run, 0);
    std::size_t done = 0;
    bool outrun = false;
    const int error = space.install_in_window([&] {
      if (!still_maps(space, page + done * kPageSize, offset + done * kPageSize, run - done)) {
        outrun = true;
        return 0;
      }
      while (done < run) {
        const platform::PartialResult r = space.uffd.copy(page + done * kPageSize, buf.data() + done * kPageSize,
                                                          (run - done) * kPageSize, /*wake=*/false,
                                                          /*write_protect=*/!anonymous());
        done += r.bytes_done / kPageSize;
        if (r.error == 0) break;
        if (r.error != EEXIST) return r.error;
        result[done++] = EEXIST;
      }
      return 0;
    });
    // A change of the mapping came first (EAGAIN), or any error: the pages
    // left are not installed; each faults again.
    for (std::size_t i = done; i < run && (outrun || error != 0); ++i) result[i] = outrun ? EAGAIN : error;
    for (std::size_t i = 0; i < run; ++i) {
      const bool present = result[i] == 0 || result[i] == EEXIST;
      finish_load(index + i, present, i == 0 && punched && !anonymous() && result[0] == 0);
    }
    // EAGAIN: a change of the mapping came first; ENOENT: it went.  The
    // access faults again and finds what the change left.
    if (result[0] == 0 || result[0] == EEXIST || result[0] == EAGAIN || result[0] == ENOENT) return Fault::kInstalled;
    {
      MutexLock lock(mutex);
      if (offset >= size) return Fault::kBeyondEnd;  // truncated meanwhile
    }
    std::fprintf(stderr, "uhmm: installing page %llu of a cached file failed: %s\n",
                 static_cast<unsigned long long>(index), platform::errno_text(result[0]).c_str());
    return Fault::kFailed;
  }

  /// Inside the install window: whether `count` pages at `at` are still
  /// this object's, from `offset` on, with no change of theirs queued.
  bool still_maps(AddressSpace::Impl& space, VirtAddr at, std::uint64_t offset, std::size_t count) {
    const VirtAddr end = at + count * kPageSize;
    if (!space.pending_event_ranges(at, end).empty()) return false;
    const mm::RegionPin region = space.pin_region(at, end);
    return region && region->backend.get() == this && region->backend_offset + (at - region->info.start) == offset;
  }

  /// read/write's way to a page: holds it (as a load does, so faults and
  /// truncate wait for it) and fills the memfd from the file if it lacks
  /// it.  The caller copies, then calls release().
  Status hold_loaded(std::uint64_t index) {
    const Claim c = claim(index);
    if (c == Claim::kBeyondEnd) return Status::error(EINVAL, "beyond the end of the object (truncated meanwhile)");
    if (c == Claim::kOnDevice) {
      const Status s = back_claimed(index, /*only_if_dirty=*/false);
      if (!s) unclaim(index);
      return s;
    }
    if (c == Claim::kLoaded) return Status::ok();
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

  // ---- device pages (docs/adr/0006-file-cache.md, "Device pages") ---------

  std::uint64_t bytes_of_page(std::uint64_t index) const UHMM_REQUIRES(mutex) {
    const std::uint64_t at = index * kPageSize;
    return size > at ? std::min<std::uint64_t>(kPageSize, size - at) : 0;
  }

  /// The cache's mappings now: where each starts and which pages it maps.
  struct Mapping {
    VirtAddr start;
    std::uint64_t first_page;
    std::uint64_t pages;
  };
  std::vector<Mapping> mappings() const {
    std::vector<Mapping> out;
    if (AddressSpace::Impl* sp = space())
      sp->for_each_backed_region(this, [&](VirtAddr start, std::size_t len, std::uint64_t off) {
        out.push_back(Mapping{start, off / kPageSize, len / kPageSize});
      });
    return out;
  }

  /// Where pages [first, first + n) of the object are mapped, as address
  /// ranges (each mapping that covers some of them).
  std::vector<std::pair<VirtAddr, VirtAddr>> views_of(std::uint64_t first, std::uint64_t n) const {
    std::vector<std::pair<VirtAddr, VirtAddr>> out;
    for (const Mapping& v : mappings()) {
      const std::uint64_t a = std::max(first, v.first_page), b = std::min(first + n, v.first_page + v.pages);
      if (a < b) out.emplace_back(v.start + (a - v.first_page) * kPageSize, v.start + (b - v.first_page) * kPageSize);
    }
    return out;
  }

  /// Tells every mirror of the pages that they change (and keeps telling
  /// until the result is destroyed): a device must not keep a page in its
  /// table that is moving.
  using Invalidations = std::vector<std::unique_ptr<mm::ScopedInvalidation>>;
  Invalidations invalidate(std::uint64_t first, std::uint64_t n, NotifyEvent event, const void* migrating_for) const {
    Invalidations out;
    AddressSpace::Impl* sp = space();
    if (sp == nullptr) return out;  // no mapping left, so no mirror either
    for (const auto& [lo, hi] : views_of(first, n))
      out.push_back(std::make_unique<mm::ScopedInvalidation>(sp->notifiers, NotifyRange{lo, hi, event, migrating_for}));
    return out;
  }

  /// The data of `page` (locked; the device page of `index`, which the
  /// caller holds) back in the memfd, dirty if the device wrote it or it was
  /// dirty when it left.  The page leaves the cache; dropping the cache's
  /// reference is the caller's, once it has unlocked the page.
  Status take_back(std::uint64_t index, DevicePage& page) {
    Invalidations views = invalidate(index, 1, NotifyEvent::kClear, nullptr);
    PageBuffer buf;
    bool copied = false, device_wrote = false;
    if (const auto& copy_back = page.pagemap().ops().migrate_to_pagecache) {
      if (Status s = copy_back(page, std::span<std::byte>(buf.data(), kPageSize)); s) {
        copied = true;
        device_wrote = page.test_and_clear_dirty();
      } else {
        std::fprintf(stderr, "uhmm: a device could not copy page %llu of a cached %s back (%s); %s\n",
                     static_cast<unsigned long long>(index), anonymous() ? "shared region" : "file",
                     s.to_string().c_str(), anonymous() ? "it reads as zeros" : "it is read from the file again");
      }
    }
    if (!copied) UHMM_TRY(read_from_file(index, buf.data()));
    std::uint64_t len;
    {
      MutexLock lock(mutex);
      len = bytes_of_page(index);
    }
    UHMM_TRY(pwrite_full(memfd, buf.data(), len, index * kPageSize, "pwrite of the cache"));
    {
      MutexLock lock(mutex);
      device.erase(index);
      pages[index] = static_cast<std::uint8_t>((pages[index] & ~kOnDevice) | kLoaded |
                                               (device_wrote && !anonymous() ? kDirty : 0));
    }
    page.set_holder(nullptr, 0);
    if (AddressSpace::Impl* sp = space()) sp->stats.add(copied ? Counter::file_pages_copied_back : Counter::file_pages_reread);
    return Status::ok();
  }

  /// With `index` held: if a device holds it, its data back in the memfd
  /// (only if it must reach the file, with `only_if_dirty`).
  Status back_claimed(std::uint64_t index, bool only_if_dirty) {
    DevicePage* page = nullptr;
    bool dirty = false;
    {
      MutexLock lock(mutex);
      if (auto it = device.find(index); it != device.end()) page = it->second;
      dirty = index < pages.size() && (pages[index] & kDirty);
    }
    if (page == nullptr || (only_if_dirty && !dirty && !page->dirty())) return Status::ok();
    page->lock();  // an eviction holding it gives up: it cannot hold the index
    const Status s = take_back(index, *page);
    page->unlock();
    if (s) page->put();  // the cache's reference
    return s;
  }

  /// A CPU access to a page a device holds (`index`, held): it comes back,
  /// with the pages after it in the mapping that the device also holds
  /// (fault-around), and is mapped where the access was.
  Fault fault_on_device(AddressSpace::Impl& space, VirtAddr page, std::uint64_t index, std::size_t pages_left) {
    space.stats.add(Counter::device_private_faults);
    std::size_t run = 1;
    {
      MutexLock lock(mutex);
      const std::size_t limit = std::min(pages_left, std::max<std::size_t>(options.fault_around_pages, 1));
      while (run < limit && index + run < pages.size() && (pages[index + run] & kOnDevice) &&
             !(pages[index + run] & kLoading)) {
        pages[index + run] |= kLoading;
        ++run;
      }
    }
    std::size_t back = 0;
    for (; back < run; ++back)
      if (Status s = back_claimed(index + back, false); !s) {
        std::fprintf(stderr, "uhmm: bringing page %llu of a cached file back from its device failed: %s\n",
                     static_cast<unsigned long long>(index + back), s.to_string().c_str());
        break;
      }
    // The pages are in the memfd and no mapping maps them: map them here.
    if (back > 0) (void)map_loaded(space, page, back);
    for (std::size_t i = 0; i < run; ++i) unclaim(index + i);
    return back > 0 ? Fault::kInstalled : Fault::kFailed;
  }

  std::uint64_t migrate_collect(AddressSpace::Impl& space, MigrateVma& m, std::uint64_t offset, int prot) override {
    const bool want_system = m.flags & MIGRATE_VMA_SELECT_SYSTEM;
    const bool want_private = m.flags & MIGRATE_VMA_SELECT_DEVICE_PRIVATE;
    const std::uint64_t first = offset / kPageSize;
    const std::uint64_t write_bit = (prot & PROT_WRITE) ? MIGRATE_PFN_WRITE : 0;
    std::vector<std::uint64_t> system, on_device;  // entry indices held
    {
      MutexLock lock(mutex);
      if (closed) return 0;
      for (std::uint64_t i = 0; i < m.npages; ++i) {
        const std::uint64_t index = first + i;
        if (index >= pages.size() || index * kPageSize >= size) break;
        const std::uint8_t bits = pages[index];
        if (bits & kLoading) {
          space.stats.add(Counter::migrate_skipped_locked);
          continue;
        }
        if (want_system && (bits & kLoaded) && !(bits & kOnDevice)) {
          pages[index] |= kLoading;
          system.push_back(i);
        } else if (want_private && (bits & kOnDevice)) {
          const DevicePagemap& map = device.at(index)->pagemap();
          if (map.type() != PagemapType::kPrivate || map.owner() != m.pgmap_owner) continue;
          pages[index] |= kLoading;
          on_device.push_back(i);
        }
      }
    }
    std::uint64_t collected = 0;
    for (const std::uint64_t i : on_device) {
      DevicePage* page;
      {
        MutexLock lock(mutex);
        page = device.at(first + i);
      }
      if (!page->trylock()) {  // an eviction has it
        unclaim(first + i);
        space.stats.add(Counter::migrate_skipped_locked);
        continue;
      }
      page->get();  // the migration's reference, dropped at finish
      m.src[i] = migrate_pfn(page->pfn()) | MIGRATE_PFN_MIGRATE | (device_writable(*page) ? write_bit : 0);
      ++collected;
    }
    if (!on_device.empty()) {
      // Mirrors of the other mappings drop the device page too.
      Invalidations views = invalidate(first + on_device.front(), on_device.back() - on_device.front() + 1,
                                       NotifyEvent::kMigrate, m.pgmap_owner);
    }
    if (system.empty()) return collected;
    std::vector<mm::SlotRun> slots;
    if (!space.staging.take_ready(system.size(), slots)) {
      for (const std::uint64_t i : system) unclaim(first + i);
      return collected;
    }
    {
      // The pages leave every mapping (they stay in the memfd): an access
      // from now on is a minor fault, which waits for the pages held here.
      // Every mapping: the regions are brought up to date first.
      settle_mappings(space);
      Invalidations views = invalidate(first + system.front(), system.back() - system.front() + 1,
                                       NotifyEvent::kMigrate, m.pgmap_owner);
      zap_everywhere(system, first);
    }
    mark_held_written(system, first);
    // Copied into the staging slots, a run of consecutive pages with one
    // preadv.
    std::vector<VirtAddr> slot_of;
    slot_of.reserve(system.size());
    for (const mm::SlotRun& run : slots)
      for (std::size_t j = 0; j < run.pages; ++j) slot_of.push_back(run.start + j * kPageSize);
    std::vector<struct iovec> iov;
    for (std::size_t k = 0; k < system.size();) {
      std::size_t n = 1;
      while (k + n < system.size() && n < kIovPages && system[k + n] == system[k] + n) ++n;
      std::uint64_t len;
      {
        MutexLock lock(mutex);
        len = std::min<std::uint64_t>(n * kPageSize, size - (first + system[k]) * kPageSize);
      }
      iov.clear();
      for (std::size_t j = 0; j < n; ++j) {
        std::memset(slot_of[k + j].ptr(), 0, kPageSize);  // the tail past the end reads zeros
        iov.push_back(iovec{slot_of[k + j].ptr(), std::min<std::size_t>(kPageSize, len - j * kPageSize)});
      }
      const bool copied = preadv_full(memfd, iov, (first + system[k]) * kPageSize);
      for (std::size_t j = 0; j < n; ++j) {
        const std::uint64_t i = system[k + j];
        if (!copied) {
          space.staging.give_back_ready(slot_of[k + j], 1);
          unclaim(first + i);
          continue;
        }
        m.src[i] = migrate_pfn(slot_of[k + j].vpn().value) | MIGRATE_PFN_MIGRATE | write_bit;
        ++collected;
      }
      k += n;
    }
    return collected;
  }

  /// Calls fn(address, first page index, pages) for each stretch of the
  /// pages first + held[k] (ascending) that a mapping of the cache maps.
  template <typename Fn>
  void for_each_mapped_run(const std::vector<std::uint64_t>& held, std::uint64_t first, Fn&& fn) {
    for (const Mapping& v : mappings()) {
      for (std::size_t k = 0; k < held.size();) {
        std::size_t n = 1;
        while (k + n < held.size() && held[k + n] == held[k] + n) ++n;
        const std::uint64_t a = std::max(first + held[k], v.first_page);
        const std::uint64_t b = std::min(first + held[k] + n, v.first_page + v.pages);
        if (a < b) fn(v.start + (a - v.first_page) * kPageSize, a, static_cast<std::size_t>(b - a));
        k += n;
      }
    }
  }

  /// After the zap, marks dirty the held pages written through a mapping
  /// since the last scan: their slots lost the write-protect marker (fact
  /// 7).  A mapping that cannot be scanned any more (unmapped meanwhile)
  /// may have written any of them.
  void mark_held_written(const std::vector<std::uint64_t>& held, std::uint64_t first) {
    std::vector<std::pair<VirtAddr, VirtAddr>> written;
    for_each_mapped_run(held, first, [&](VirtAddr at, std::uint64_t index, std::size_t n) {
      written.clear();
      const bool scanned = platform::scan_written(at, n * kPageSize, /*reprotect=*/true, &written).is_ok();
      MutexLock lock(mutex);
      if (!scanned) written.assign(1, {at, at + n * kPageSize});
      for (const auto& [lo, hi] : written)
        for (std::uint64_t i = index + (lo - at) / kPageSize; i < index + pages_for(hi - at) && i < index + n; ++i)
          if (i < pages.size() && (pages[i] & kLoaded)) pages[i] |= kDirty;
    });
  }

  /// Zaps pages first + held[k] (ascending) from every mapping of the cache.
  void zap_everywhere(const std::vector<std::uint64_t>& held, std::uint64_t first) {
    AddressSpace::Impl* sp = space();
    for_each_mapped_run(held, first, [&](VirtAddr at, std::uint64_t, std::size_t n) { sp->zap_own(at, n * kPageSize); });
  }

  static bool device_writable(const DevicePage& page) {
    return static_cast<bool>(page.pagemap().ops().migrate_to_pagecache);
  }

  void migrate_commit(AddressSpace::Impl& space, MigrateVma& m, std::uint64_t offset) override {
    const std::uint64_t first = offset / kPageSize;
    for (std::uint64_t i = 0; i < m.npages; ++i) {
      const std::uint64_t s = m.src[i], d = m.dst[i];
      if (!(s & MIGRATE_PFN_MIGRATE)) continue;
      const DevicePage* to_device = device_page_of(d);
      bool ok;
      if (device_page_of(s) == nullptr) {
        ok = to_device != nullptr && may_hold(first + i, *to_device, VirtAddr{migrate_pfn_to_pfn(s) << kPageShift});
      } else {  // from a device: into a system page (a device to device move is not offered)
        ok = to_device == nullptr && space.staging.contains(VirtAddr{migrate_pfn_to_pfn(d) << kPageShift});
      }
      if (!ok) m.src[i] &= ~MIGRATE_PFN_MIGRATE;
    }
  }

  void migrate_finish(AddressSpace::Impl& space, MigrateVma& m, std::uint64_t offset, Moved& moved) override {
    const std::uint64_t first = offset / kPageSize;
    std::vector<std::pair<std::uint64_t, std::uint64_t>> punch;  // runs of pages that left the memfd
    std::vector<DevicePage*> released;  // device pages whose data came back
    std::vector<std::uint64_t> held;    // indices to let go of, once the memfd is right
    const std::vector<bool> came_back = put_back_device_data(m, first);
    for (std::uint64_t i = 0; i < m.npages; ++i) {
      const std::uint64_t s = m.src[i], d = m.dst[i];
      if (!(s & MIGRATE_PFN_VALID)) {
        release_dst(space, d);
        continue;
      }
      const std::uint64_t index = first + i;
      held.push_back(index);
      DevicePage* from_device = device_page_of(s);
      bool placed = false;
      if (from_device == nullptr) {
        const VirtAddr slot{migrate_pfn_to_pfn(s) << kPageShift};
        if (s & MIGRATE_PFN_MIGRATE) {
          DevicePage* to_device = device_page_of(d);
          to_device->set_holder(this, index * kPageSize);
          to_device->unlock();  // the allocation's reference is the cache's now
          {
            MutexLock lock(mutex);
            device[index] = to_device;
            pages[index] = static_cast<std::uint8_t>((pages[index] & ~kLoaded) | kOnDevice);
          }
          if (!punch.empty() && punch.back().first + punch.back().second == index) {
            ++punch.back().second;
          } else {
            punch.emplace_back(index, 1);
          }
          placed = true;
          ++moved.to_device;
        } else {
          release_dst(space, d);
        }
        space.staging.give_back_ready(slot, 1);
      } else {
        placed = came_back[i];
        if (placed) {
          const bool device_wrote = from_device->test_and_clear_dirty();
          {
            MutexLock lock(mutex);
            device.erase(index);
            pages[index] = static_cast<std::uint8_t>((pages[index] & ~kOnDevice) | kLoaded |
                                                     (device_wrote && !anonymous() ? kDirty : 0));
          }
          from_device->set_holder(nullptr, 0);
          released.push_back(from_device);
          ++moved.to_ram;
        }
        release_dst(space, d);
        from_device->unlock();
        from_device->put();  // the migration's reference
      }
      ++(placed ? moved.success : moved.fail);
    }
    // The pages a device holds now leave the memfd before anyone may look
    // at them again: a fault after that brings the device's data back, and
    // a punch after it would drop what the CPU wrote since.
    for (const auto& [index, n] : punch)
      if (::fallocate(memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(index * kPageSize),
                      static_cast<off_t>(n * kPageSize)) != 0)
        std::fprintf(stderr, "uhmm: dropping pages of a cached file that moved to a device failed: %s\n",
                     platform::errno_text(errno).c_str());
    for (const std::uint64_t index : held) unclaim(index);
    for (DevicePage* page : released) page->put();  // the cache's reference
  }

  /// The device data that migrate_vma brought back into system pages (src
  /// a device page, MIGRATE kept, dst a staging slot) goes into the memfd,
  /// a run of consecutive pages with one pwritev.  Which entries made it.
  std::vector<bool> put_back_device_data(const MigrateVma& m, std::uint64_t first) {
    std::vector<bool> done(m.npages, false);
    auto coming = [&](std::uint64_t i) {
      return (m.src[i] & MIGRATE_PFN_MIGRATE) && device_page_of(m.src[i]) != nullptr;
    };
    std::vector<struct iovec> iov;
    for (std::uint64_t i = 0; i < m.npages;) {
      if (!coming(i)) {
        ++i;
        continue;
      }
      std::uint64_t n = 1;
      while (i + n < m.npages && n < kIovPages && coming(i + n)) ++n;
      std::uint64_t len;
      {
        MutexLock lock(mutex);
        len = std::min<std::uint64_t>(n * kPageSize, size - (first + i) * kPageSize);
      }
      iov.clear();
      for (std::uint64_t j = 0; j < n && j * kPageSize < len; ++j)
        iov.push_back(iovec{VirtAddr{migrate_pfn_to_pfn(m.dst[i + j]) << kPageShift}.ptr(),
                            std::min<std::size_t>(kPageSize, len - j * kPageSize)});
      const bool ok = pwritev_full(memfd, iov, (first + i) * kPageSize);
      if (!ok)
        std::fprintf(stderr, "uhmm: putting a device's data back into a cached file failed: %s\n",
                     platform::errno_text(errno).c_str());
      for (std::uint64_t j = 0; j < n; ++j) done[i + j] = ok;
      i += n;
    }
    return done;
  }

  /// Whether a device page of `to`'s map may hold page `index`, whose data
  /// is in `slot`: the first stage re-reads the file, so the page must be
  /// clean there (written back now if not), and shared anonymous memory has
  /// no file to re-read.
  bool may_hold(std::uint64_t index, const DevicePage& to, VirtAddr slot) {
    if (device_writable(to)) return true;
    if (anonymous()) return false;
    std::uint64_t len;
    {
      MutexLock lock(mutex);
      if (!(pages[index] & kDirty)) return true;
      pages[index] &= static_cast<std::uint8_t>(~kDirty);
      len = bytes_of_page(index);
    }
    if (pwrite_full(file_fd, static_cast<const std::byte*>(slot.ptr()), len, index * kPageSize, "writeback"))
      return true;
    MutexLock lock(mutex);
    pages[index] |= kDirty;
    return false;
  }

  static void release_dst(AddressSpace::Impl& space, std::uint64_t d) {
    if (!(d & MIGRATE_PFN_VALID)) return;
    if (DevicePage* page = device_page_of(d)) {
      page->unlock();
      page->put();
    } else if (const VirtAddr slot{migrate_pfn_to_pfn(d) << kPageShift}; space.staging.contains(slot)) {
      space.staging.give_back_ready(slot, 1);
    }
  }

  Look look_up(std::uint64_t offset) const override {
    const std::uint64_t index = offset / kPageSize;
    MutexLock lock(mutex);
    // A page someone holds is moving (or being read in): not there yet,
    // as for a locked entry; a fault waits for it.
    if (index >= pages.size() || offset >= size || (pages[index] & kLoading)) return Look{};
    if (pages[index] & kOnDevice) {
      const DevicePage* page = device.at(index);
      return Look{Look::kDevice, page, device_writable(*page)};
    }
    return Look{(pages[index] & kLoaded) ? Look::kPresent : Look::kAbsent, nullptr, false};
  }

  void evict(DevicePage& page) override {
    const std::uint64_t index = page.holder_offset() / kPageSize;
    bool held = false;
    {
      MutexLock lock(mutex);
      if (index < pages.size() && index * kPageSize < size && !(pages[index] & kLoading)) {
        auto it = device.find(index);
        if (it != device.end() && it->second == &page) {
          pages[index] |= kLoading;
          held = true;
        }
      }
    }
    if (!held) {  // someone else is moving it: the eviction tries again
      page.unlock();
      return;
    }
    const Status s = take_back(index, page);
    if (!s)
      std::fprintf(stderr, "uhmm: evicting page %llu of a cached file failed: %s\n",
                   static_cast<unsigned long long>(index), s.to_string().c_str());
    unclaim(index);
    page.unlock();  // nothing of the cache is touched after this
    if (s) page.put();  // the cache's reference; the caller still holds one
  }

  /// Lets go of every device page of index >= `from` without bringing its
  /// data back (truncation; a closed cache's clean pages).  Pages are held
  /// by nobody else (the caller made sure).
  void drop_device_pages(std::uint64_t from) {
    std::vector<std::pair<std::uint64_t, DevicePage*>> dropped;
    {
      MutexLock lock(mutex);
      for (auto it = device.begin(); it != device.end();) {
        if (it->first < from) {
          ++it;
          continue;
        }
        dropped.emplace_back(*it);
        if (it->first < pages.size()) pages[it->first] &= static_cast<std::uint8_t>(~kOnDevice);
        it = device.erase(it);
      }
    }
    for (const auto& [index, page] : dropped) {
      page->lock();  // waits out an eviction looking at it
      {
        Invalidations views = invalidate(index, 1, NotifyEvent::kClear, nullptr);
      }
      page->set_holder(nullptr, 0);
      page->unlock();
      page->put();
    }
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

  /// Makes the cache's regions match its mappings: the changes the
  /// application made to them (munmap, madvise, mremap) that uhmm has read
  /// are processed, and growth by mremap is followed.
  void settle_mappings(AddressSpace::Impl& sp) {
    std::vector<std::pair<VirtAddr, VirtAddr>> ranges;
    sp.for_each_backed_region(this, [&](VirtAddr start, std::size_t length, std::uint64_t) {
      ranges.emplace_back(start, start + length);
    });
    for (const auto& [lo, hi] : ranges) sp.settle_events_in(lo, hi);
    // After the events: an mremap that moved a mapping and grew it has made
    // its region at the new place only now.
    sp.follow_backed_growth(this);
  }

  /// Moves the written bits of the mappings (all, or the one at `only`) into
  /// the page states, write-protecting the pages again.
  void collect_written(std::optional<VirtAddr> only) {
    AddressSpace::Impl* sp = space();
    if (sp == nullptr) return;  // no mappings any more
    // A munmap or madvise the application made before this call has had its
    // event read (the kernel held the call until then) but maybe not
    // processed: its mapping_lost must come first, or this writeback would
    // miss the pages it marks.
    settle_mappings(*sp);
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
  /// (Only a load is waited for: a page held while loaded, or while a device
  /// has it, may be held by the caller, a migration collecting it.)
  void mark_written(const std::vector<std::pair<std::uint64_t, std::uint64_t>>& written_pages) {
    MutexLock lock(mutex);
    for (const auto& [first, last] : written_pages) {
      for (std::uint64_t i = first; i < last; ++i) {
        while (i < pages.size() && (pages[i] & (kLoading | kLoaded | kOnDevice)) == kLoading) changed.wait(mutex);
        if (i < pages.size() && (pages[i] & kLoaded)) pages[i] |= kDirty;
      }
    }
  }

  /// Brings back the device pages whose data must reach the file (the
  /// device wrote them, or they were dirty when they left).
  Status back_dirty_device_pages() {
    std::vector<std::uint64_t> indices;
    {
      MutexLock lock(mutex);
      for (const auto& [index, page] : device) indices.push_back(index);
    }
    Status failed;
    for (const std::uint64_t index : indices) {
      if (claim(index) != Claim::kOnDevice) {
        unclaim(index);
        continue;
      }
      const Status s = back_claimed(index, /*only_if_dirty=*/true);
      unclaim(index);
      if (!s && failed.is_ok()) failed = s;
    }
    return failed;
  }

  Status writeback(SyncMode mode, std::optional<VirtAddr> only) {
    if (anonymous()) return Status::ok();
    MutexLock serial(writeback_mutex);
    const Status from_devices = back_dirty_device_pages();
    collect_written(only);
    std::vector<std::uint64_t> dirty;
    {
      MutexLock lock(mutex);
      for (std::uint64_t i = 0; i < pages.size(); ++i)
        if (pages[i] & kDirty) dirty.push_back(i);
    }
    std::vector<std::byte> buf;
    std::vector<std::uint64_t> written;
    Status failed;
    for (std::size_t k = 0; k < dirty.size();) {
      // A run of consecutive dirty pages goes with one pread of the cache and
      // one pwrite of whole pages (the file's tail in the last) at a page
      // boundary: the kernel copies a write into the file's page cache a
      // folio at a time and looks for a fatal signal only between folios, so
      // a killed process leaves every page old or new, never torn.
      const std::uint64_t first = dirty[k];
      std::size_t n = 0;
      std::uint64_t len = 0;
      {
        // Clean before the copy: a write after this point marks it again.
        MutexLock lock(mutex);
        while (k + n < dirty.size() && n < kWritebackRunPages && dirty[k + n] == first + n) {
          const std::uint64_t i = first + n;
          if (i >= pages.size() || !(pages[i] & kDirty) || (pages[i] & kOnDevice)) break;  // kOnDevice: not in the memfd
          pages[i] &= static_cast<std::uint8_t>(~kDirty);
          ++n;
        }
        if (n > 0) len = std::min<std::uint64_t>(n * kPageSize, size - first * kPageSize);
      }
      if (n == 0) {
        ++k;
        continue;
      }
      buf.resize(len);
      Status s = pread_full(memfd, buf.data(), len, first * kPageSize, false, "pread of the cache");
      if (s) s = pwrite_full(file_fd, buf.data(), len, first * kPageSize, "writeback");
      if (!s) {
        failed = s;
        MutexLock lock(mutex);
        for (std::size_t j = k; j < dirty.size(); ++j)
          if (dirty[j] < pages.size() && (pages[dirty[j]] & kLoaded)) pages[dirty[j]] |= kDirty;
        break;
      }
      for (std::size_t j = 0; j < n; ++j) written.push_back(first + j);
      k += n;
    }
    if (failed.is_ok() && mode == SyncMode::kDurable && ::fdatasync(file_fd) != 0) failed = errno_status("fdatasync");
    if (!failed.is_ok() && mode == SyncMode::kDurable) {
      // A failed fdatasync leaves no telling which pages reached the disk.
      MutexLock lock(mutex);
      for (std::uint64_t i : written)
        if (i < pages.size() && (pages[i] & kLoaded)) pages[i] |= kDirty;
    }
    return failed.is_ok() ? from_devices : failed;
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
  if (c.options.flush_interval.count() > 0 && !c.anonymous()) {
    c.flusher = std::thread([&c] {
      platform::name_this_thread("flush");
      c.flusher_main();
    });
  }
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
    impl_->drop_device_pages(0);
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
  if (new_size % kPageSize != 0) {
    // The new last page keeps its head: a device's copy comes back first,
    // so that cutting the memfd zeroes its tail.
    const std::uint64_t last = new_size / kPageSize;
    const Status back = c.claim(last) == Impl::Claim::kOnDevice ? c.back_claimed(last, false) : Status::ok();
    c.unclaim(last);
    UHMM_TRY(back);
  }
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
  c.drop_device_pages(pages_for(new_size));  // past the end: their data goes with the file's
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
  // What devices still hold is clean (the file has it): let go of it.
  c.drop_device_pages(0);
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
