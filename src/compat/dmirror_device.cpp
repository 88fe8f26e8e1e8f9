// compat: the emulated devices (dmirror_device.hpp).  What each command
// does: dmirror-abi.md; how memory is found and mirrored:
// docs/adr/0005-dmirror-emulation.md.
#include "compat/dmirror_device.hpp"

#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "compat/bounce.hpp"
#include "compat/ioctl_decode.hpp"
#include "compat/maps.hpp"
#include "core/run_set.hpp"
#include "compat/pagemap.hpp"
#include "core/sync.hpp"
#include "mm/address_space_impl.hpp"
#include "uhmm/address_space.hpp"
#include "uhmm/hmm.hpp"
#include "uhmm/notifier.hpp"
#include "uhmm/sim_device.hpp"

namespace uhmm::compat {

namespace {

using Clock = std::chrono::steady_clock;
constexpr auto kPatience = std::chrono::seconds(1);  // the kernel driver's retry timeout
constexpr std::size_t kUserSpan = std::size_t{1} << 47;
// Address space for the bounce buffers of all commands in flight; a
// command needing more than is free gets ENOMEM.
constexpr std::size_t kBounceArenaBytes = std::size_t{64} << 30;
constexpr int kPrivateMinors = 2;  // 0 and 1; 2 and 3 are device-coherent (ADR 0005, "Minors")

std::uintptr_t huge_up(std::uintptr_t a) { return (a / kHugePageSize + 1) * kHugePageSize; }

// Whether a page's pagemap entry shows an anonymous page: in a private file
// mapping, one the program copied on write (present without the file bit,
// or swapped out: only anonymous pages have swap entries there).
bool anonymous_page(std::uint64_t word) {
  return ((word & kPmPresent) && !(word & kPmFile)) || (word & kPmSwap);
}

// A private read-write file mapping, the only kind the library converts to
// anonymous memory (ADR 0005, "Private file mappings").  Special mappings
// ([vdso], [vvar]...) have no path; hugetlb and the like are refused by
// their VmFlags in convert_private_file.
bool convertible(const Mapping& m) {
  return !m.shared && !m.anonymous && m.prot == (PROT_READ | PROT_WRITE) && !m.name.empty() && m.name[0] == '/';
}

}  // namespace

// The pages of converted private file mappings that were still clean file
// pages at the conversion (ADR 0005, "Private file mappings"): they refuse
// migration, as the kernel's page-cache pages do.  Forgotten where uhmm
// sees the range unmapped or moved, or the address space go, and where
// the CPU has written them since: each mark keeps a digest of the page's
// content, which a CPU write (of other bytes) changes, as the kernel's
// write fault would have copied the page on write.
//
// Concurrency: any thread.  mutex_ is a leaf: nothing is called under it.
class FilePages final : public IntervalNotifierOps, public FilePageMarks {
 public:
  explicit FilePages(AddressSpace& as) : as_(as) {}
  ~FilePages() override { interval_notifier_remove(sub_); }
  FilePages(const FilePages&) = delete;
  FilePages& operator=(const FilePages&) = delete;

  Status subscribe() { return interval_notifier_insert(sub_, as_, VirtAddr{0}, kUserSpan, *this); }

  bool invalidate(IntervalNotifier& sub, const NotifyRange& range, std::uint64_t cur_seq) override {
    if (!range.blockable) return false;
    MutexLock lock(mutex_);
    sub.set_seq(cur_seq);
    if (range.event == NotifyEvent::kUnmap || range.event == NotifyEvent::kRelease)
      erase_locked(range.start.vpn().value, (range.end.value + kPageSize - 1) >> kPageShift);
    return true;
  }

  // Lock-free when there is no clean page (a program without converted
  // mappings pays one load per page in its pagemap reads).  The mutex is
  // never held across a read of pagemap.
  bool contains(Vpn vpn) const override {
    if (!any_.load(std::memory_order_acquire)) return false;
    MutexLock lock(mutex_);
    return pages_.contains(vpn.value);
  }

  /// Marks [first_vpn, end_vpn) clean, with the digest of each page's
  /// content: `content` holds the pages' bytes, or (null) they are read now.
  void add(std::uint64_t first_vpn, std::uint64_t end_vpn, const std::byte* content) {
    std::vector<std::uint64_t> digests(end_vpn - first_vpn, kUnknown);
    std::vector<std::byte> page(kPageSize);
    for (std::uint64_t v = first_vpn; v < end_vpn; ++v) {
      if (content != nullptr) {
        digests[v - first_vpn] = digest(content + (v - first_vpn) * kPageSize);
      } else if (copy_from_user(page.data(), v << kPageShift, kPageSize)) {
        digests[v - first_vpn] = digest(page.data());
      }
    }
    MutexLock lock(mutex_);
    pages_.add(first_vpn, end_vpn);
    for (std::uint64_t v = first_vpn; v < end_vpn; ++v) digests_[v] = digests[v - first_vpn];
    any_.store(!pages_.empty(), std::memory_order_release);
  }
  void erase(std::uint64_t first_vpn, std::uint64_t end_vpn) {
    MutexLock lock(mutex_);
    erase_locked(first_vpn, end_vpn);
  }
  /// Forgets the marks of the pages of [first_vpn, end_vpn) that the CPU
  /// wrote since they were marked (their content changed; a write of the
  /// same bytes goes unseen).  Reads only pages that are present, so it
  /// faults nothing in.
  void forget_written(std::uint64_t first_vpn, std::uint64_t end_vpn) {
    if (!any_.load(std::memory_order_acquire)) return;
    std::vector<std::byte> page(kPageSize);
    for (const auto& [f, e] : inside(first_vpn, end_vpn)) {
      std::vector<unsigned char> resident(e - f);
      if (!platform::resident_pages(VirtAddr::from_vpn(Vpn{f}), (e - f) * kPageSize, resident.data())) continue;
      for (std::uint64_t v = f; v < e; ++v) {
        if (!resident[v - f]) continue;
        std::uint64_t want;
        {
          MutexLock lock(mutex_);
          auto it = digests_.find(v);
          if (it == digests_.end() || it->second == kUnknown) continue;
          want = it->second;
        }
        if (copy_from_user(page.data(), v << kPageShift, kPageSize) && digest(page.data()) != want) erase(v, v + 1);
      }
    }
  }
  std::vector<RunSet::Run> inside(std::uint64_t first_vpn, std::uint64_t end_vpn) {
    MutexLock lock(mutex_);
    return pages_.inside(first_vpn, end_vpn);
  }
  std::vector<RunSet::Run> outside(std::uint64_t first_vpn, std::uint64_t end_vpn) {
    MutexLock lock(mutex_);
    return pages_.outside(first_vpn, end_vpn);
  }
  /// One flag per page of [start, end): still a clean file page.
  std::vector<bool> clean(std::uintptr_t start, std::uintptr_t end) {
    forget_written(start >> kPageShift, end >> kPageShift);
    std::vector<bool> out((end - start) / kPageSize);
    for (const auto& [f, e] : inside(start >> kPageShift, end >> kPageShift))
      for (std::uint64_t v = f; v < e; ++v) out[v - (start >> kPageShift)] = true;
    return out;
  }
  RunSet copy() {
    MutexLock lock(mutex_);
    return pages_;
  }

 private:
  static constexpr std::uint64_t kUnknown = 0;  // no digest: the page counts as clean
  static std::uint64_t digest(const std::byte* page) {
    const std::uint64_t d = std::hash<std::string_view>{}(std::string_view(reinterpret_cast<const char*>(page), kPageSize));
    return d == kUnknown ? 1 : d;
  }
  void erase_locked(std::uint64_t first_vpn, std::uint64_t end_vpn) UHMM_REQUIRES(mutex_) {
    pages_.erase(first_vpn, end_vpn);
    digests_.erase(digests_.lower_bound(first_vpn), digests_.lower_bound(end_vpn));
    any_.store(!pages_.empty(), std::memory_order_release);
  }

  AddressSpace& as_;
  IntervalNotifier sub_;
  mutable Mutex mutex_{LockRank::kLeaf};
  RunSet pages_ UHMM_GUARDED_BY(mutex_);
  std::map<std::uint64_t, std::uint64_t> digests_ UHMM_GUARDED_BY(mutex_);  // vpn -> digest of a marked page
  std::atomic<bool> any_{false};  // !pages_.empty(), written under mutex_
};

// What exists per fork generation.  Leaked, not destroyed, in a forked
// child (its threads do not exist there).
struct Runtime {
  std::unique_ptr<BounceArena> bounce;  // reserved before any memory is adopted (compat/bounce.hpp)
  std::unique_ptr<AddressSpace> as;
  std::array<std::unique_ptr<sim::SimDevice>, kDmirrorMinors> devices;
  std::mutex adopt_mutex;  // one adoption or conversion at a time (adopt's overlap check is not atomic with ours)
  std::unique_ptr<FilePages> file_pages;
};

namespace {

// Replaces the private file mapping `seen` by a private anonymous one with
// the same contents and protection at the same place, adopts it, and
// remembers its clean file pages (ADR 0005, "Private file mappings").  Only
// when [want_start, want_end) holds a page the program copied on write:
// else nothing could move, and the mapping stays as it is (ENOENT).  Any
// failure leaves the program's mapping as it was.
Status convert_private_file(Runtime& rt, const Mapping& seen, std::uintptr_t want_start, std::uintptr_t want_end) {
  std::lock_guard lock(rt.adopt_mutex);
  const std::uintptr_t start = seen.start, end = seen.end;
  const std::size_t len = end - start;
  auto same_mapping = [&](const std::optional<Mapping>& m) {
    return m && m->start == start && m->end == end && m->name == seen.name && m->prot == seen.prot &&
           m->shared == seen.shared;
  };
  // Another command may have converted it since the caller read the maps.
  if (rt.as->find_region(VirtAddr{start})) return Status::ok();
  if (!same_mapping(platform::mapping_at(VirtAddr{start}))) return Status::error(ENOENT, "the mapping changed");
  // What the anonymous copy can carry over; anything else (hugetlb, pfnmap,
  // I/O, locked, sealed, registered with someone's userfaultfd...) stays a
  // file mapping, refusing migration as before.
  auto flags = smaps_vm_flags(start);
  if (!flags) return flags.status();
  int map_flags = MAP_PRIVATE | MAP_ANONYMOUS;
  std::vector<int> advice;
  for (std::size_t i = 0; i < flags->size();) {
    const std::size_t b = flags->find_first_not_of(' ', i);
    if (b == std::string::npos) break;
    const std::size_t e = std::min(flags->find(' ', b), flags->size());
    const std::string_view f = std::string_view(*flags).substr(b, e - b);
    i = e;
    if (f == "rd" || f == "wr" || f == "mr" || f == "mw" || f == "me" || f == "ac" || f == "sd" || f == "sr" ||
        f == "rr")
      continue;
    if (f == "nr") {
      map_flags |= MAP_NORESERVE;
    } else if (f == "hg") {
      advice.push_back(MADV_HUGEPAGE);
    } else if (f == "nh") {
      advice.push_back(MADV_NOHUGEPAGE);
    } else if (f == "dd") {
      advice.push_back(MADV_DONTDUMP);
    } else if (f == "dc") {
      advice.push_back(MADV_DONTFORK);
    } else {
      return Status::error(ENOENT, "a private file mapping the library cannot convert");
    }
  }
  // Read before the copy: a page the program copies on write after this
  // reads as clean and keeps refusing, never the reverse.
  auto words = read_own_pagemap(start, end);
  if (!words) return words.status();
  bool any_anonymous = false;
  for (std::uintptr_t a = std::max(want_start, start); a < std::min(want_end, end); a += kPageSize)
    any_anonymous = any_anonymous || anonymous_page((*words)[(a - start) / kPageSize]);
  if (!any_anonymous) return Status::error(ENOENT, "no page copied on write: nothing can migrate");
  void* copy = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, map_flags, -1, 0);
  if (copy == MAP_FAILED) return Status::error(ENOMEM, "cannot map the anonymous copy");
  for (const int a : advice) (void)::madvise(copy, len, a);
  // Fault-safe: a page past the end of the file (SIGBUS for the program)
  // fails the copy, and such a mapping is not converted.
  if (!copy_from_user(copy, start, len) || !same_mapping(platform::mapping_at(VirtAddr{start}))) {
    ::munmap(copy, len);
    return Status::error(ENOENT, "the mapping cannot be copied whole");
  }
  // One mremap replaces the mapping: a thread touching it sees the file
  // mapping or the copy, never a hole.
  if (::mremap(copy, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, reinterpret_cast<void*>(start)) == MAP_FAILED) {
    const int err = errno;
    ::munmap(copy, len);
    return Status::error(err, "mremap of the anonymous copy failed");
  }
  for (std::size_t i = 0; i < words->size();) {
    std::size_t j = i;
    while (j < words->size() && !anonymous_page((*words)[j])) ++j;
    // Digests of the content as copied, read back at `start` (a store the
    // program makes in this instant counts as the page's clean content).
    rt.file_pages->add((start >> kPageShift) + i, (start >> kPageShift) + j, nullptr);
    while (j < words->size() && anonymous_page((*words)[j])) ++j;
    i = j;
  }
  // Adopted under the same lock: no other command adopts it as a plain
  // anonymous mapping first.  From here uhmm sees its munmap, which drops
  // the marks; if adoption fails they go now (nothing would drop them).
  if (Status adopted = rt.as->adopt(VirtAddr{start}, len); !adopted) {
    rt.file_pages->erase(start >> kPageShift, end >> kPageShift);
    return adopted;
  }
  return Status::ok();
}

}  // namespace

// One open fd: its mirror of the address space and its flags.
class DmirrorFile final : public CommandHandler, public IntervalNotifierOps {
 public:
  DmirrorFile(Runtime& rt, sim::SimDevice& dev) : rt_(rt), as_(*rt.as), dev_(dev) {}
  ~DmirrorFile() override { interval_notifier_remove(sub_); }
  DmirrorFile(const DmirrorFile&) = delete;
  DmirrorFile& operator=(const DmirrorFile&) = delete;

  Status subscribe() { return interval_notifier_insert(sub_, as_, VirtAddr{0}, kUserSpan, *this); }
  sim::SimDevice& device() { return dev_; }

  int run(DmirrorOp op, DmirrorCmd& cmd) override;
  bool invalidate(IntervalNotifier& sub, const NotifyRange& range, std::uint64_t cur_seq) override;

 private:
  void apply_invalidation(IntervalNotifier& sub, const NotifyRange& range, std::uint64_t cur_seq)
      UHMM_REQUIRES(mutex_);
  // One page of the device's page table.
  struct Entry {
    DevicePage* page = nullptr;  // this device's page (private: its memory is `memory`; or coherent)
    std::byte* memory = nullptr;  // device memory, or the exclusive frame; null: the page the CPU maps at its
                                  // address (a system page, or a coherent one)
    bool write = false;
    bool atomic = false;  // held exclusively (make_device_exclusive)
  };
  enum class Kind : std::uint8_t { kGap, kManaged, kOther };
  struct Span {
    std::uintptr_t start = 0, end = 0;
    Kind kind = Kind::kGap;
    int prot = 0;
    bool shared = false;
  };
  // Outcome of one pass over the mirror: the first page it could not serve.
  struct Pass {
    int err = 0;
    std::uint64_t first_missing = 0;
  };

  // convert_files: convert the private file mappings that hold a page
  // copied on write in the range (only MIGRATE_TO_DEV needs them managed).
  Result<std::vector<Span>> layout(std::uintptr_t start, std::uintptr_t end, bool convert_files = false);
  Status adopt_mapping(const Mapping& m);
  Status walk_and_map(std::uintptr_t start, std::uintptr_t end, std::uint64_t flags, bool only_own,
                      Clock::time_point deadline);
  int fault_rest(const std::vector<Span>& spans, std::uintptr_t from, bool write, Clock::time_point deadline);
  enum class Direction { kFromRange, kToRange };
  Pass copy_pass(Direction dir, const std::vector<Span>& spans, std::uintptr_t addr, std::byte* buf,
                 std::uint64_t from, std::uint64_t other_from);

  int cmd_read(DmirrorCmd& cmd);
  int cmd_write(DmirrorCmd& cmd);
  int cmd_migrate_to_dev(DmirrorCmd& cmd);
  int cmd_migrate_to_sys(DmirrorCmd& cmd);
  int cmd_snapshot(DmirrorCmd& cmd);
  int cmd_exclusive(DmirrorCmd& cmd);
  int cmd_check_exclusive(DmirrorCmd& cmd);

  void drop(std::uint64_t first_vpn, std::uint64_t end_vpn) UHMM_REQUIRES(mutex_);

  Runtime& rt_;
  AddressSpace& as_;
  sim::SimDevice& dev_;
  IntervalNotifier sub_;
  // The device page-table lock: taken by invalidate() and around page-table
  // updates and device-memory copies; never across a uhmm call.
  Mutex mutex_{LockRank::kDeviceDriver};
  std::map<std::uint64_t, Entry> entries_ UHMM_GUARDED_BY(mutex_);
  // The fd's FLAGS: FAIL_ALLOC arms a one-shot failure of the next device
  // page allocation of a migration through this fd, the kernel's per-open
  // flag (other fds of the device are not affected).
  sim::FaultInjection fail_alloc_;
};

// ---- mirror ----------------------------------------------------------------

bool DmirrorFile::invalidate(IntervalNotifier& sub, const NotifyRange& range, std::uint64_t cur_seq) {
  // Our own exclusive request: the page is mapped right after it.  Our own
  // migrations are *not* skipped (ADR 0005, "Mirror coherence").
  if (range.event == NotifyEvent::kExclusive && range.owner == dev_.owner()) return true;
  // As the kernel's driver: an invalidation that cannot wait takes the
  // mirror's lock only if it is free at once.
  if (!range.blockable) {
    if (!mutex_.try_lock()) return false;
    apply_invalidation(sub, range, cur_seq);
    mutex_.unlock();
    return true;
  }
  MutexLock lock(mutex_);
  apply_invalidation(sub, range, cur_seq);
  return true;
}

void DmirrorFile::apply_invalidation(IntervalNotifier& sub, const NotifyRange& range, std::uint64_t cur_seq) {
  sub.set_seq(cur_seq);
  if (range.event == NotifyEvent::kRelease) {
    entries_.clear();
  } else {
    drop(range.start.vpn().value, (range.end.value + kPageSize - 1) >> kPageShift);
  }
}

void DmirrorFile::drop(std::uint64_t first_vpn, std::uint64_t end_vpn) {
  entries_.erase(entries_.lower_bound(first_vpn), entries_.lower_bound(end_vpn));
}

// ---- memory layout ---------------------------------------------------------

// Adopts the parts of mapping `m` that uhmm does not manage yet.
Status DmirrorFile::adopt_mapping(const Mapping& m) {
  std::lock_guard lock(rt_.adopt_mutex);
  std::uintptr_t p = m.start;
  while (p < m.end) {
    if (const auto r = as_.find_region(VirtAddr{p})) {
      p = r->end().value;
      continue;
    }
    const Status whole = as_.adopt(VirtAddr{p}, m.end - p);
    if (whole) break;
    if (whole.code() != EBUSY) return whole;
    // A managed range further on: adopt only the gap before it.
    std::uintptr_t q = p + kPageSize;
    while (q < m.end && !as_.find_region(VirtAddr{q})) q += kPageSize;
    UHMM_TRY(as_.adopt(VirtAddr{p}, q - p));
    p = q;
  }
  return Status::ok();
}

Result<std::vector<DmirrorFile::Span>> DmirrorFile::layout(std::uintptr_t start, std::uintptr_t end,
                                                           bool convert_files) {
  // An munmap uhmm has not processed yet would leave a stale managed range
  // where the program has mapped something new.
  as_.impl().settle_events_in(VirtAddr{start}, VirtAddr{end});
  auto maps = read_maps();
  if (!maps) return maps.status();
  std::vector<Span> out;
  for (const Piece& piece : split_range(*maps, start, end)) {
    Span s{piece.start, piece.end, Kind::kGap, 0, false};
    if (piece.mapping != nullptr) {
      s.prot = piece.mapping->prot;
      s.shared = piece.mapping->shared;
      s.kind = Kind::kOther;
      // A managed range stays managed whatever the maps say (adoption
      // itself splits the kernel's mappings at its edges).
      if (as_.find_region(VirtAddr{piece.start}) ||
          (piece.mapping->adoptable() && adopt_mapping(*piece.mapping).is_ok()) ||
          (convert_files && convertible(*piece.mapping) &&
           convert_private_file(rt_, *piece.mapping, piece.start, piece.end).is_ok())) {
        s.kind = Kind::kManaged;
      }
    }
    out.push_back(s);
  }
  return out;
}

// One hmm_range_fault walk of [start, end) under the notifier's sequence
// protocol (docs/notifiers.md), its results programmed into the mirror.
// only_own: map only this device's pages (after a migration).
Status DmirrorFile::walk_and_map(std::uintptr_t start, std::uintptr_t end, std::uint64_t flags, bool only_own,
                                 Clock::time_point deadline) {
  std::vector<std::uint64_t> pfns((end - start) / kPageSize);
  HmmRange range;
  range.address_space = &as_;
  range.notifier = &sub_;
  range.start = VirtAddr{start};
  range.end = VirtAddr{end};
  range.hmm_pfns = pfns.data();
  range.default_flags = flags;
  range.dev_private_owner = dev_.owner();
  // The kernel maps a clean page of a private file mapping read-only, so its
  // driver records it without WRITE until a write fault copies it.
  const std::vector<bool> clean =
      (flags & HMM_PFN_REQ_WRITE) ? std::vector<bool>(pfns.size()) : rt_.file_pages->clean(start, end);
  for (;;) {
    if (Clock::now() > deadline) return Status::error(EBUSY, "the range keeps changing");
    range.notifier_seq = sub_.read_begin();
    std::fill(pfns.begin(), pfns.end(), 0);
    const Status s = hmm_range_fault(range);  // no lock held: it may fault pages in
    if (s.code() == EBUSY) continue;
    if (!s) return s;
    MutexLock lock(mutex_);
    if (sub_.read_retry(range.notifier_seq)) continue;
    for (std::size_t i = 0; i < pfns.size(); ++i) {
      const std::uint64_t w = pfns[i];
      if (!(w & HMM_PFN_VALID)) continue;
      Entry e;
      e.write = (w & HMM_PFN_WRITE) != 0;
      if (DevicePage* page = hmm_pfn_to_device_page(w)) {
        const bool own = page->pagemap().owner() == dev_.owner();
        if (page->pagemap().type() == PagemapType::kCoherent) {
          // The CPU maps a coherent page at its address (its home slot is
          // empty then), so the device reaches it there, like a system
          // page: memory stays null.  Any owner's: the walk never moves
          // one, so skipping another device's would fault it forever.
          if (only_own && !own) continue;
          e.page = own ? page : nullptr;
        } else {
          if (!own) continue;
          e.page = page;
          e.memory = dev_.page_memory(*page);
        }
      } else if (only_own) {
        continue;
      } else if (clean[i]) {
        e.write = false;
      }
      entries_.insert_or_assign((start >> kPageShift) + i, e);
    }
    return Status::ok();
  }
}

// The device faults in everything from `from` to the end of the range, in
// chunks, as the kernel's driver does at the first page it misses.
int DmirrorFile::fault_rest(const std::vector<Span>& spans, std::uintptr_t from, bool write,
                            Clock::time_point deadline) {
  for (const Span& s : spans) {
    if (s.end <= from) continue;
    const std::uintptr_t lo = std::max(s.start, from);
    switch (s.kind) {
      case Kind::kGap:
        return EFAULT;
      case Kind::kOther:
        if (!(s.prot & PROT_READ)) return EFAULT;
        if (write && !(s.prot & PROT_WRITE)) return EPERM;
        break;
      case Kind::kManaged:
        // The kernel's walk reports the device's own page of a read-only
        // range without faulting it, read-only, so its driver would retry a
        // write there without end; a read-only range is EPERM here at once,
        // as for any other page of it.
        if (write && !(s.prot & PROT_WRITE)) return EPERM;
        for (std::uintptr_t c = lo; c < s.end;) {
          const std::uintptr_t ce = std::min(s.end, c + kFaultChunkPages * kPageSize);
          const Status st =
              walk_and_map(c, ce, write ? (HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE) : HMM_PFN_REQ_FAULT, false, deadline);
          if (!st) return st.code();
          c = ce;
        }
        break;
    }
  }
  return 0;
}

// Moves the range between the mirror and `buf`, page by page in order,
// from page `from` on (the pages before it were moved by an earlier pass);
// stops at the first page the mirror lacks (for a write: lacks, or holds
// read-only), every page before it moved.  Pages of unmanaged mappings are
// never mirrored: they are accessed in place when at or past `other_from`
// (the device has faulted them), else they count as missing.
DmirrorFile::Pass DmirrorFile::copy_pass(Direction dir, const std::vector<Span>& spans, std::uintptr_t addr,
                                         std::byte* buf, std::uint64_t from, std::uint64_t other_from) {
  const bool write = dir == Direction::kToRange;
  auto in_place = [&](std::uint64_t i) {
    return write ? copy_to_user(addr + i * kPageSize, buf + i * kPageSize, kPageSize)
                 : copy_from_user(buf + i * kPageSize, addr + i * kPageSize, kPageSize);
  };
  std::uint64_t i = from;
  for (const Span& s : spans) {
    const std::uint64_t i1 = (s.end - addr) / kPageSize;
    if (s.kind != Kind::kManaged) {
      for (; i < i1; ++i) {
        if (i < other_from || s.kind == Kind::kGap) return Pass{0, i};
        if (!in_place(i)) return Pass{EFAULT, i};
      }
      continue;
    }
    // System pages are accessed through the process's mapping after the
    // lock: a fault there (the page went to a device meanwhile) raises an
    // invalidation that needs the lock.  One at a time, not gathered in a
    // list: nothing sized by the range may be allocated while it is
    // accessed in place (ADR 0005, "Bounce buffers").
    while (i < i1) {
      bool system_page = false;
      {
        MutexLock lock(mutex_);
        auto it = entries_.lower_bound((addr >> kPageShift) + i);
        for (; i < i1; ++i, ++it) {
          if (it == entries_.end() || it->first != (addr >> kPageShift) + i || (write && !it->second.write))
            return Pass{0, i};
          if (it->second.memory == nullptr) {
            system_page = true;
            break;
          }
          if (write) {
            std::memcpy(it->second.memory, buf + i * kPageSize, kPageSize);
          } else {
            std::memcpy(buf + i * kPageSize, it->second.memory, kPageSize);
          }
        }
      }
      if (!system_page) break;
      if (!in_place(i)) return Pass{EFAULT, i};
      ++i;
    }
  }
  return Pass{0, i};
}

// ---- commands --------------------------------------------------------------

int DmirrorFile::run(DmirrorOp op, DmirrorCmd& cmd) {
  switch (op) {
    case DmirrorOp::kRead:
      return cmd_read(cmd);
    case DmirrorOp::kWrite:
      return cmd_write(cmd);
    case DmirrorOp::kMigrateToDev:
      return cmd_migrate_to_dev(cmd);
    case DmirrorOp::kMigrateToSys:
      return cmd_migrate_to_sys(cmd);
    case DmirrorOp::kSnapshot:
      return cmd_snapshot(cmd);
    case DmirrorOp::kExclusive:
      return cmd_exclusive(cmd);
    case DmirrorOp::kCheckExclusive:
      return cmd_check_exclusive(cmd);
    case DmirrorOp::kRelease: {
      const auto r = dev_.evict_all();
      return r ? 0 : r.code();
    }
    case DmirrorOp::kFlags:
      // The value replaces the fd's flags: without FAIL_ALLOC it disarms it.
      if (cmd.npages & kDmirrorFlagFailAlloc) {
        fail_alloc_.fail_alloc_after(0);
      } else {
        fail_alloc_.disarm();
      }
      return 0;
  }
  return EINVAL;
}

int DmirrorFile::cmd_read(DmirrorCmd& cmd) {
  const std::uint64_t n = cmd_pages(cmd);
  const std::uintptr_t end = cmd.addr + n * kPageSize;
  auto spans = layout(cmd.addr, end);
  if (!spans) return spans.code();
  auto bounce = Bounce::make(*rt_.bounce, n * kPageSize);
  if (!bounce) return bounce.code();
  std::uint64_t copied = 0;
  std::uint64_t other_from = n;
  const auto deadline = Clock::now() + kPatience;
  for (;;) {
    const Pass p = copy_pass(Direction::kFromRange, *spans, cmd.addr, bounce->data(), copied, other_from);
    if (p.err != 0) return p.err;
    if (p.first_missing == n) break;
    copied = p.first_missing;
    if (Clock::now() > deadline) return EBUSY;
    ++cmd.faults;
    if (const int err = fault_rest(*spans, cmd.addr + p.first_missing * kPageSize, false, deadline)) return err;
    other_from = std::min(other_from, p.first_missing);
  }
  if (!copy_to_user(cmd.ptr, bounce->data(), n * kPageSize)) return EFAULT;
  cmd.cpages = n;
  return 0;
}

int DmirrorFile::cmd_write(DmirrorCmd& cmd) {
  const std::uint64_t n = cmd_pages(cmd);
  const std::uintptr_t end = cmd.addr + n * kPageSize;
  auto bounce = Bounce::make(*rt_.bounce, n * kPageSize);
  if (!bounce) return bounce.code();
  if (!copy_from_user(bounce->data(), cmd.ptr, n * kPageSize)) return EFAULT;
  auto spans = layout(cmd.addr, end);
  if (!spans) return spans.code();
  std::uint64_t copied = 0;
  std::uint64_t other_from = n;
  const auto deadline = Clock::now() + kPatience;
  int err = 0;
  for (;;) {
    const Pass p = copy_pass(Direction::kToRange, *spans, cmd.addr, bounce->data(), copied, other_from);
    if (p.err != 0) {
      err = p.err;
      break;
    }
    copied = p.first_missing;
    if (p.first_missing == n) break;
    if (Clock::now() > deadline) {
      err = EBUSY;
      break;
    }
    ++cmd.faults;
    if ((err = fault_rest(*spans, cmd.addr + p.first_missing * kPageSize, true, deadline)) != 0) break;
    other_from = std::min(other_from, p.first_missing);
  }
  // A page the device wrote is copied on write now, as the kernel's write
  // fault copies a clean page of a private file mapping: it may migrate.
  // (The pages written are a prefix: copy_pass goes in order.)
  if (copied > 0) rt_.file_pages->erase(cmd.addr >> kPageShift, (cmd.addr >> kPageShift) + copied);
  if (err != 0) return err;
  cmd.cpages = n;
  return 0;
}

int DmirrorFile::cmd_migrate_to_dev(DmirrorCmd& cmd) {
  const std::uint64_t n = cmd_pages(cmd);
  const std::uintptr_t end = cmd.addr + n * kPageSize;
  auto spans = layout(cmd.addr, end, /*convert_files=*/true);
  if (!spans) return spans.code();
  for (const Span& s : *spans) {
    if (s.kind == Kind::kGap || !(s.prot & PROT_READ)) return EINVAL;
    // migrate_vma_setup refuses hugetlb, I/O and PFN mappings outright.
    if (s.kind == Kind::kOther && migrate_vma_refuses(s.start)) return EINVAL;
  }
  for (const Span& s : *spans) {
    if (s.kind != Kind::kManaged) continue;  // cannot move: ENOENT below
    // Steps of at most 512 pages that keep 2 MiB units whole.
    for (std::uintptr_t c = s.start; c < s.end;) {
      const auto region = as_.find_region(VirtAddr{c});
      if (!region) return EINVAL;
      const std::uintptr_t ce = std::min({s.end, region->end().value, huge_up(c)});
      // Clean file pages stay (the kernel does not move page-cache pages):
      // they are missing from the mirror afterwards, so ENOENT below.  One
      // the CPU wrote since the conversion is a copy-on-write page: it moves.
      rt_.file_pages->forget_written(c >> kPageShift, ce >> kPageShift);
      for (const auto& [f, e] : rt_.file_pages->outside(c >> kPageShift, ce >> kPageShift)) {
        const auto moved =
            dev_.migrate_to_device(as_, VirtAddr::from_vpn(Vpn{f}), (e - f) * kPageSize, &fail_alloc_);
        if (!moved) return moved.code();
      }
      const Status mapped = walk_and_map(c, ce, 0, /*only_own=*/true, Clock::now() + kPatience);
      if (!mapped) return mapped.code();
      c = ce;
    }
  }
  // What the device holds now, read back for the caller to verify.
  auto bounce = Bounce::make(*rt_.bounce, n * kPageSize);
  if (!bounce) return bounce.code();
  const Pass p = copy_pass(Direction::kFromRange, *spans, cmd.addr, bounce->data(), 0, n);
  if (p.err != 0) return p.err;
  if (p.first_missing != n) return ENOENT;
  if (!copy_to_user(cmd.ptr, bounce->data(), n * kPageSize)) return EFAULT;
  cmd.cpages = n;
  return 0;
}

int DmirrorFile::cmd_migrate_to_sys(DmirrorCmd& cmd) {
  const std::uint64_t n = cmd_pages(cmd);
  auto spans = layout(cmd.addr, cmd.addr + n * kPageSize);
  if (!spans) return spans.code();
  for (const Span& s : *spans)
    if (s.kind == Kind::kGap) return EINVAL;
  for (const Span& s : *spans) {
    if (s.kind != Kind::kManaged) continue;  // no device page can be there
    for (std::uintptr_t c = s.start; c < s.end;) {
      const auto region = as_.find_region(VirtAddr{c});
      if (!region) return EINVAL;
      const std::uintptr_t ce = std::min({s.end, region->end().value, huge_up(c)});
      auto moved = dev_.migrate_to_system(as_, VirtAddr{c}, ce - c);
      if (!moved) return moved.code();
      cmd.cpages += moved->pages_migrated;
      c = ce;
    }
  }
  return 0;
}

int DmirrorFile::cmd_snapshot(DmirrorCmd& cmd) {
  const std::uint64_t n = cmd_pages(cmd);
  auto spans = layout(cmd.addr, cmd.addr + n * kPageSize);
  if (!spans) return spans.code();
  std::vector<std::uint8_t> bytes(n, snapshot::kError);
  for (const Span& s : *spans) {
    const std::uint64_t i0 = (s.start - cmd.addr) / kPageSize;
    const std::uint64_t count = (s.end - s.start) / kPageSize;
    if (s.kind == Kind::kGap || !(s.prot & PROT_READ)) continue;  // ERROR
    if (s.kind == Kind::kOther) {
      // Not managed: the kernel's own page table says what is present.  A
      // clean page of a private file mapping is mapped read-only (a write
      // copies it first).
      // A hugetlb page is mapped whole by a 2 MiB entry (PMD).
      auto words = read_own_pagemap(s.start, s.end);
      const std::uint8_t size = is_hugetlb(s.start) ? snapshot::kPmd : 0;
      for (std::uint64_t k = 0; k < count; ++k) {
        const std::uint64_t w = words ? (*words)[k] : 0;
        const bool writable = (s.prot & PROT_WRITE) && (s.shared || !(w & kPmFile));
        bytes[i0 + k] = !(w & kPmPresent) ? snapshot::kNone
                                           : static_cast<std::uint8_t>((writable ? snapshot::kWrite : snapshot::kRead) | size);
      }
      continue;
    }
    const std::vector<bool> clean = rt_.file_pages->clean(s.start, s.end);
    std::vector<std::uint64_t> pfns(count);
    HmmRange range;
    range.address_space = &as_;
    range.start = VirtAddr{s.start};
    range.end = VirtAddr{s.end};
    range.hmm_pfns = pfns.data();
    range.dev_private_owner = dev_.owner();
    if (const Status st = hmm_range_fault(range); !st) return st.code();
    for (std::uint64_t k = 0; k < count; ++k) {
      const std::uint64_t w = pfns[k];
      std::uint8_t b = snapshot::kNone;
      if (w & HMM_PFN_ERROR) {
        b = snapshot::kError;
      } else if (w & HMM_PFN_VALID) {
        if (const DevicePage* page = hmm_pfn_to_device_page(w)) {
          const bool local = page->pagemap().owner() == dev_.owner();
          if (page->pagemap().type() == PagemapType::kCoherent) {
            b = local ? snapshot::kDevCoherentLocal : snapshot::kDevCoherentRemote;
          } else {
            b = local ? snapshot::kDevPrivateLocal : snapshot::kDevPrivateRemote;
          }
        }
        const bool clean_page = clean[k] && hmm_pfn_to_device_page(w) == nullptr;  // as the kernel maps it
        b |= (w & HMM_PFN_WRITE) && !clean_page ? snapshot::kWrite : snapshot::kRead;
      }
      bytes[i0 + k] = b;
    }
  }
  if (!copy_to_user(cmd.ptr, bytes.data(), n)) return EFAULT;
  cmd.cpages = n;
  return 0;
}

int DmirrorFile::cmd_exclusive(DmirrorCmd& cmd) {
  const std::uint64_t n = cmd_pages(cmd);
  auto spans = layout(cmd.addr, cmd.addr + n * kPageSize);
  if (!spans) return spans.code();
  for (const Span& s : *spans) {
    if (s.kind == Kind::kGap || !(s.prot & PROT_WRITE)) return EFAULT;
    if (s.kind == Kind::kOther) return EOPNOTSUPP;  // only private anonymous pages can be held
  }
  for (const Span& s : *spans) {
    for (std::uintptr_t va = s.start; va < s.end; va += kPageSize) {
      // The page comes back locked: nothing revokes it before it is mapped.
      Result<DeviceExclusivePage> held = make_device_exclusive(as_, VirtAddr{va}, dev_.owner());
      if (!held) return held.code();
      // The kernel takes the page for writing, copying a clean file page.
      rt_.file_pages->erase(va >> kPageShift, (va >> kPageShift) + 1);
      MutexLock lock(mutex_);
      entries_.insert_or_assign(va >> kPageShift, Entry{nullptr, held->memory(), true, true});
    }
  }
  auto bounce = Bounce::make(*rt_.bounce, n * kPageSize);
  if (!bounce) return bounce.code();
  const Pass p = copy_pass(Direction::kFromRange, *spans, cmd.addr, bounce->data(), 0, n);
  if (p.err != 0) return p.err;
  if (p.first_missing != n) return EBUSY;  // revoked before it could be read: the range keeps changing
  if (!copy_to_user(cmd.ptr, bounce->data(), n * kPageSize)) return EFAULT;
  cmd.cpages = n;
  return 0;
}

int DmirrorFile::cmd_check_exclusive(DmirrorCmd& cmd) {
  const std::uint64_t first = cmd.addr >> kPageShift;
  MutexLock lock(mutex_);
  for (auto it = entries_.lower_bound(first); it != entries_.end() && it->first < first + cmd_pages(cmd); ++it)
    if (it->second.atomic) return EPERM;
  return 0;
}

// ---- the process -----------------------------------------------------------

namespace {
// Set while this thread changes protections through uhmm: uhmm's own
// ::mprotect comes back through the interposed one and must go to libc.
// Initial-exec: the library is preloaded, and the access must not allocate.
thread_local bool in_mprotect __attribute__((tls_model("initial-exec"))) = false;

using MprotectFn = int (*)(void*, std::size_t, int);
MprotectFn libc_mprotect() {
  static const auto fn = reinterpret_cast<MprotectFn>(::dlsym(RTLD_NEXT, "mprotect"));
  return fn != nullptr ? fn : &::mprotect;
}
}  // namespace

sim::SimDeviceOptions dmirror_device_options(int minor) {
  sim::SimDeviceOptions o;
  // Minors 2 and 3: device-coherent memory, which the CPU keeps mapping
  // after a migration (ADR 0005, "Minors").
  o.memory_type = minor >= kPrivateMinors ? PagemapType::kCoherent : PagemapType::kPrivate;
  std::size_t chunk = kDeviceChunkBytes;
  if (const char* knob = std::getenv("UHMM_DMIRROR_CHUNK_BYTES"); knob != nullptr && *knob >= '0' && *knob <= '9') {
    char* end = nullptr;
    const unsigned long long v = std::strtoull(knob, &end, 10);
    if (end != knob && *end == '\0' && v >= kPageSize && v % kPageSize == 0) chunk = static_cast<std::size_t>(v);
  }
  o.memory_bytes = chunk;
  o.grow_bytes = chunk;
  o.warm_memory = false;
  o.fault_around_pages = 1;  // the kernel's driver brings back the faulting page only
  o.prefetch_blocks = 0;
  o.batch_pages = kMigrateStepPages;
  return o;
}

namespace {
void atfork_prepare() { DmirrorProcess::instance().prepare_fork(); }
void atfork_parent() { DmirrorProcess::instance().parent_after_fork(); }
void atfork_child() { DmirrorProcess::instance().child_after_fork(); }
}  // namespace

DmirrorProcess& DmirrorProcess::instance() {
  static DmirrorProcess* const p = new DmirrorProcess();  // never destroyed (see the header)
  return *p;
}

Result<Runtime*> DmirrorProcess::runtime_locked() {
  if (runtime_ != nullptr) return runtime_;
  // Before the address space: no memory of the program is managed yet, so
  // none can be in the hole the arena fills (compat/bounce.hpp).
  auto arena = BounceArena::reserve(kBounceArenaBytes);
  if (!arena) return arena.status();
  AddressSpaceOptions options;
  options.fault_mode = FaultMode::kServiceThreads;  // syscalls on device pages must work
  auto as = AddressSpace::create(options);
  if (!as) {
    static std::once_flag said;
    std::call_once(said, [&] {
      std::fprintf(stderr, "uhmm-dmirror: cannot emulate /dev/hmm_dmirror*: %s\n", as.status().to_string().c_str());
    });
    return as.status();
  }
  auto* rt = new Runtime;
  rt->bounce = std::move(*arena);
  rt->as = std::move(*as);
  // After the address space: uhmm's own child handler (registered by its
  // creation) must run before ours.
  if (!atfork_installed_) {
    if (::pthread_atfork(atfork_prepare, atfork_parent, atfork_child) != 0) {
      delete rt;
      return Status::error(ENOMEM, "pthread_atfork failed");
    }
    atfork_installed_ = true;
  }
  rt->file_pages = std::make_unique<FilePages>(*rt->as);
  if (const Status s = rt->file_pages->subscribe(); !s) {
    delete rt;
    return s;
  }
  // A forked child: its converted mappings' clean pages, as the parent knew
  // them at fork, where the same mappings are still anonymous here.
  if (!inherited_clean_.empty()) {
    if (auto maps = read_maps()) {
      for (const Mapping& m : *maps)
        if (m.adoptable())
          for (const auto& [f, e] : inherited_clean_.inside(m.start >> kPageShift, m.end >> kPageShift))
            rt->file_pages->add(f, e, nullptr);
    }
    inherited_clean_ = RunSet();
  }
  std::lock_guard table(table_mutex_);
  runtime_ = rt;
  published_files_.store(rt->file_pages.get(), std::memory_order_release);
  published_as_.store(rt->as.get(), std::memory_order_release);
  return rt;
}

Result<std::shared_ptr<DmirrorFile>> DmirrorProcess::make_file_locked(int minor) {
  auto rt = runtime_locked();
  if (!rt) return rt.status();
  std::unique_ptr<sim::SimDevice>& dev = (*rt)->devices[static_cast<std::size_t>(minor)];
  if (!dev) {
    auto made = sim::SimDevice::create(dmirror_device_options(minor));
    if (!made) return made.status();
    dev = std::move(*made);
  }
  auto file = std::make_shared<DmirrorFile>(**rt, *dev);
  UHMM_TRY(file->subscribe());
  return file;
}

Result<int> DmirrorProcess::open(int minor, int flags) {
  if (minor < 0 || minor >= kDmirrorMinors) return Status::error(ENOENT, "no such device");
  std::lock_guard init(init_mutex_);
  auto file = make_file_locked(minor);
  if (!file) return file.status();
  const std::string name = std::string("hmm_dmirror") + std::to_string(minor);
  const int fd = ::memfd_create(name.c_str(), (flags & O_CLOEXEC) ? MFD_CLOEXEC : 0u);
  if (fd < 0) return Status::error(errno, "memfd_create");
  struct stat st {};
  (void)::fstat(fd, &st);
  std::lock_guard table(table_mutex_);
  fds_[fd] = FdEntry{minor, st.st_ino, std::move(*file), generation_};
  open_count_.store(static_cast<int>(fds_.size()), std::memory_order_release);
  set_mark(fd, true);
  return fd;
}

void DmirrorProcess::set_mark(int fd, bool on) {
  if (fd < 0 || fd >= kMarkedFds) return;
  const std::uint64_t bit = std::uint64_t{1} << (fd % 64);
  auto& word = marks_[static_cast<unsigned>(fd) / 64];
  if (on) {
    word.fetch_or(bit, std::memory_order_acq_rel);
  } else {
    word.fetch_and(~bit, std::memory_order_acq_rel);
  }
}

bool DmirrorProcess::is_device_fd(int fd) {
  if (!maybe_device_fd(fd)) return false;
  struct stat st {};
  if (::fstat(fd, &st) != 0) return false;
  std::lock_guard table(table_mutex_);
  const auto it = fds_.find(fd);
  return it != fds_.end() && it->second.inode == st.st_ino;
}

Result<std::shared_ptr<DmirrorFile>> DmirrorProcess::file_for(int fd) {
  if (!maybe_device_fd(fd)) return std::shared_ptr<DmirrorFile>();
  struct stat st {};
  if (::fstat(fd, &st) != 0) return std::shared_ptr<DmirrorFile>();
  int minor = 0;
  {
    std::lock_guard table(table_mutex_);
    const auto it = fds_.find(fd);
    if (it == fds_.end()) return std::shared_ptr<DmirrorFile>();
    if (it->second.inode != st.st_ino) {
      // The number was closed and reused behind our back (dup2, close_range).
      fds_.erase(it);
      open_count_.store(static_cast<int>(fds_.size()), std::memory_order_release);
      set_mark(fd, false);
      return std::shared_ptr<DmirrorFile>();
    }
    if (it->second.file && it->second.generation == generation_) return it->second.file;
    minor = it->second.minor;
  }
  // Inherited across fork: this process gets a mirror of its own.
  std::lock_guard init(init_mutex_);
  auto file = make_file_locked(minor);
  if (!file) return file.status();
  std::lock_guard table(table_mutex_);
  const auto it = fds_.find(fd);
  if (it == fds_.end()) return std::shared_ptr<DmirrorFile>();
  if (!it->second.file || it->second.generation != generation_) {
    it->second.file = *file;
    it->second.generation = generation_;
  }
  return it->second.file;
}

std::optional<int> DmirrorProcess::ioctl(int fd, unsigned long request, std::uintptr_t arg) {
  auto file = file_for(fd);
  if (!file) return file.code();
  if (!*file) return std::nullopt;
  return dispatch_ioctl(**file, request, arg);
}

std::optional<int> DmirrorProcess::close(int fd) {
  if (!maybe_device_fd(fd)) return std::nullopt;
  struct stat st {};
  if (::fstat(fd, &st) != 0) return std::nullopt;
  std::shared_ptr<DmirrorFile> file;
  {
    std::lock_guard table(table_mutex_);
    const auto it = fds_.find(fd);
    if (it == fds_.end() || it->second.inode != st.st_ino) return std::nullopt;
    file = forget_locked(it);
  }
  // Closing evicts the whole device, for every mirror (dmirror-abi.md).
  if (file) (void)file->device().evict_all();
  file.reset();  // unsubscribes (waits for its callbacks; no lock of ours held)
  return 0;
}

std::shared_ptr<DmirrorFile> DmirrorProcess::forget_locked(std::map<int, FdEntry>::iterator it) {
  std::shared_ptr<DmirrorFile> file;
  if (it->second.generation == generation_) file = std::move(it->second.file);
  const int fd = it->first;
  fds_.erase(it);
  open_count_.store(static_cast<int>(fds_.size()), std::memory_order_release);
  set_mark(fd, false);
  // A dup of it remains: the open device lives on, nothing is released.
  for (const auto& [other, entry] : fds_)
    if (file && entry.file == file) return nullptr;
  return file;
}

void DmirrorProcess::duplicated(int fd, int copy) {
  if (fd == copy || (!maybe_device_fd(fd) && !maybe_device_fd(copy))) return;
  struct stat st {};
  const bool copy_open = ::fstat(copy, &st) == 0;
  std::shared_ptr<DmirrorFile> released;
  {
    std::lock_guard table(table_mutex_);
    // dup2 closed whatever `copy` was.
    if (const auto old = fds_.find(copy); old != fds_.end()) released = forget_locked(old);
    const auto it = fds_.find(fd);
    if (copy_open && it != fds_.end() && it->second.inode == st.st_ino) {
      fds_[copy] = it->second;  // the same open device: the same mirror
      open_count_.store(static_cast<int>(fds_.size()), std::memory_order_release);
      set_mark(copy, true);
    }
  }
  if (released) (void)released->device().evict_all();
}

std::optional<int> DmirrorProcess::mprotect(std::uintptr_t addr, std::size_t len, int prot) {
  if (in_mprotect || published_as_.load(std::memory_order_acquire) == nullptr) return std::nullopt;
  // What libc's mprotect rejects by itself, it rejects here too.
  if (addr % kPageSize != 0 || len == 0) return std::nullopt;
  const std::size_t bytes = (len + kPageSize - 1) & ~(kPageSize - 1);
  if (bytes < len || addr + bytes < addr) return std::nullopt;
  const std::uintptr_t end = addr + bytes;
  Runtime* rt = nullptr;
  {
    std::lock_guard table(table_mutex_);
    rt = runtime_;
  }
  if (rt == nullptr) return std::nullopt;
  in_mprotect = true;
  struct Reset {
    ~Reset() { in_mprotect = false; }
  } reset;
  AddressSpace& as = *rt->as;
  // A range the program has unmapped may still be managed until its event
  // is processed (as in DmirrorFile::layout).
  as.impl().settle_events_in(VirtAddr{addr}, VirtAddr{end});
  std::vector<RegionInfo> managed;
  {
    ReaderLock lock(as.impl().regions_mutex);
    auto it = as.impl().regions.upper_bound(addr);
    if (it != as.impl().regions.begin()) --it;
    for (; it != as.impl().regions.end() && it->second->info.start.value < end; ++it)
      if (it->second->info.end().value > addr) managed.push_back(it->second->info);
  }
  if (managed.empty()) return std::nullopt;
  const MprotectFn real = libc_mprotect();
  if (prot != PROT_NONE && prot != PROT_READ && prot != (PROT_READ | PROT_WRITE)) {
    // A protection uhmm cannot hold (execute, write-only, grows*): uhmm
    // lets go of the ranges, bringing their device pages back, and the
    // kernel applies it.  The read-write parts are adopted again on the
    // device's next use of them.
    for (const RegionInfo& r : managed) {
      const Status s = as.unmap(r.start);
      if (!s && s.code() != EINVAL) return s.code();  // EINVAL: already gone
    }
    return real(reinterpret_cast<void*>(addr), bytes, prot) == 0 ? 0 : errno;
  }
  // In address order, as the kernel goes (and stops at its first error):
  // managed pieces through uhmm, the gaps between them through libc.
  std::uintptr_t p = addr;
  for (const RegionInfo& r : managed) {
    const std::uintptr_t lo = std::max(p, r.start.value), hi = std::min(end, r.end().value);
    if (p < lo && real(reinterpret_cast<void*>(p), lo - p, prot) != 0) return errno;
    if (const Status s = as.protect(VirtAddr{lo}, hi - lo, prot); !s) return s.code();
    p = hi;
  }
  if (p < end && real(reinterpret_cast<void*>(p), end - p, prot) != 0) return errno;
  return 0;
}

void DmirrorProcess::prepare_fork() {
  init_mutex_.lock();
  table_mutex_.lock();
  // Copied now: in the child, a thread that no longer exists may hold the
  // lock of the set.
  if (runtime_ != nullptr) fork_clean_ = runtime_->file_pages->copy();
}

void DmirrorProcess::parent_after_fork() {
  fork_clean_ = RunSet();
  table_mutex_.unlock();
  init_mutex_.unlock();
}

// The child has one thread, this one.  The runtime's threads are gone, so
// all of it is leaked, never destroyed: a destructor would join or detach
// threads that do not exist.  uhmm keeps the inherited address space on its
// fork list, which is harmless: no page of it was on a device at fork time.
// Each fd gets a fresh mirror on its next use.
void DmirrorProcess::child_after_fork() {
  ++generation_;
  inherited_clean_ = std::move(fork_clean_);
  fork_clean_ = RunSet();
  if (runtime_ != nullptr) {
    auto* leaked = new std::vector<std::shared_ptr<DmirrorFile>>();
    for (auto& [fd, entry] : fds_) leaked->push_back(std::move(entry.file));
    for (auto& dev : runtime_->devices) (void)dev.release();
    (void)runtime_->as.release();
    published_as_.store(nullptr, std::memory_order_release);
    published_files_.store(nullptr, std::memory_order_release);
    runtime_ = nullptr;  // leaked: its adopt mutex may have been held by a thread that is gone
  }
  table_mutex_.unlock();
  init_mutex_.unlock();
}

}  // namespace uhmm::compat
