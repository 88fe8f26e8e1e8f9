// devices/sim: the simulated device's driver side.  Layer rules:
// src/devices/README.md.
#include "uhmm/sim_device.hpp"

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <condition_variable>
#include <deque>
#include <future>
#include <map>
#include <thread>
#include <utility>
#include <vector>

#include "core/assert.hpp"
#include "core/sync.hpp"
#include "devices/sim/dma_engine.hpp"
#include "devices/sim/free_pages.hpp"
#include "devices/sim/prefetch_stream.hpp"
#include "mm/address_space_impl.hpp"
#include "platform/threads.hpp"
#include "platform/uffd.hpp"
#include "uhmm/hmm.hpp"
#include "uhmm/migrate.hpp"
#include "uhmm/notifier.hpp"

namespace uhmm::sim {

// ---- FaultInjection --------------------------------------------------------

namespace {
// Counts an armed countdown down; true exactly once, when it passes zero.
bool fire(std::atomic<std::int64_t>& countdown) {
  std::int64_t cur = countdown.load(std::memory_order_acquire);
  while (cur >= 0) {
    if (countdown.compare_exchange_weak(cur, cur - 1, std::memory_order_acq_rel)) return cur == 0;
  }
  return false;
}
}  // namespace

void FaultInjection::fail_alloc_after(std::uint64_t n) { alloc_countdown_.store(static_cast<std::int64_t>(n)); }
void FaultInjection::fail_all_allocs(bool on) { fail_all_allocs_.store(on); }
void FaultInjection::fail_copy_after(std::uint64_t n) { copy_countdown_.store(static_cast<std::int64_t>(n)); }
void FaultInjection::fail_migrate_to_ram(bool on) { fail_m2r_.store(on); }
void FaultInjection::disarm() {
  alloc_countdown_.store(-1);
  fail_all_allocs_.store(false);
  copy_countdown_.store(-1);
  fail_m2r_.store(false);
}
bool FaultInjection::should_fail_alloc() {
  return fail_all_allocs_.load(std::memory_order_acquire) || fire(alloc_countdown_);
}
bool FaultInjection::should_fail_copy() { return fire(copy_countdown_); }

// ---- memory ----------------------------------------------------------------

// One arena of device memory, its page map and which of its pages are
// free.  Immutable once made but for the free bits; every page's
// zone_device_data points back to it, so a page finds its memory and its
// free bit without a lock.
struct SimDevice::Chunk {
  std::byte* arena = nullptr;
  std::size_t bytes = 0;
  std::unique_ptr<FreePages> free;
  std::unique_ptr<DevicePagemap> map;
  Chunk() = default;
  Chunk(const Chunk&) = delete;
  Chunk& operator=(const Chunk&) = delete;
  ~Chunk() {
    map.reset();  // waits for anything still holding a page
    if (arena != nullptr) (void)platform::unmap(VirtAddr::of(arena), bytes);
  }
};

// The chunks, lowest first: pages are taken from the first chunk that has
// them, lowest first, so that a batch gets contiguous device memory and
// copies coalesce.  Taking a page, and growing (SimDevice::alloc_page maps
// a chunk), happen under the mutex: a page map is registered under it (the
// pfn registry's lock ranks after it), and concurrent allocations wait for
// the one chunk rather than each add their own.  Freeing takes no lock
// (FreePages).
struct SimDevice::FreeList {
  Mutex mutex{LockRank::kDeviceDriver};
  std::vector<std::unique_ptr<Chunk>> chunks UHMM_GUARDED_BY(mutex);

  void add(std::unique_ptr<Chunk> c) UHMM_REQUIRES(mutex) { chunks.push_back(std::move(c)); }
  std::uint64_t total_pages() UHMM_REQUIRES(mutex) {
    std::uint64_t n = 0;
    for (const auto& c : chunks) n += c->free->pages();
    return n;
  }
  std::uint64_t free_pages() UHMM_REQUIRES(mutex) {
    std::uint64_t n = 0;
    for (const auto& c : chunks) n += c->free->free_count();
    return n;
  }
  DevicePage* take() UHMM_REQUIRES(mutex) {
    for (const auto& c : chunks)
      if (const std::optional<std::uint64_t> i = c->free->take_one()) return &c->map->page_at(*i);
    return nullptr;
  }
  // 512 free pages making one large page: aligned in pfns, in one chunk.
  DevicePage* take_large() UHMM_REQUIRES(mutex) {
    for (const auto& c : chunks) {
      const std::uint64_t first_pfn = c->map->range().first.value;
      const std::uint64_t phase = (kPagesPerHugePage - first_pfn % kPagesPerHugePage) % kPagesPerHugePage;
      if (phase % 64 != 0) continue;  // never so: page maps start 2 MiB aligned
      if (const std::optional<std::uint64_t> i = c->free->take_run(phase)) return &c->map->page_at(*i);
    }
    return nullptr;
  }
  std::vector<Chunk*> all() {
    MutexLock lock(mutex);
    std::vector<Chunk*> out;
    for (const auto& c : chunks) out.push_back(c.get());
    return out;
  }
};

// ---- prefetch --------------------------------------------------------------

// Sequential prefetch (see SimDeviceOptions::prefetch_blocks).  One worker
// thread migrates queued blocks back with the ordinary explicit path.  Each
// queued block holds a pin on its region, so the address space cannot tear
// the region down under it: unmap waits for the pin, and the migration of a
// region already being unmapped simply collects nothing.
class SimDevice::Prefetcher {
 public:
  explicit Prefetcher(SimDevice& dev) : dev_(dev), thread_([this] { run(); }) {}
  ~Prefetcher() { stop(); }
  /// Ends the worker; later faults prefetch nothing.  Queued tasks are
  /// dropped (their pins released).  The object stays usable by faults
  /// still in flight, which is why the device stops it long before freeing it.
  void stop() {
    {
      MutexLock lock(mutex_);
      stopping_ = true;
      queue_.clear();
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }
  Prefetcher(const Prefetcher&) = delete;
  Prefetcher& operator=(const Prefetcher&) = delete;

  /// Called from migrate_to_ram for the block it just served.
  void on_fault(AddressSpace& as, VirtAddr block, const RegionInfo& region) {
    std::optional<PrefetchStream::Window> window;
    {
      MutexLock lock(mutex_);
      if (stopping_) return;
      auto it = streams_.try_emplace(&as, dev_.options_.prefetch_blocks, dev_.options_.prefetch_max_blocks).first;
      window = it->second.on_fault(block);
    }
    if (!window) return;
    std::vector<Task> tasks;
    for (VirtAddr next = window->from; next <= window->until; next = next + kHugePageSize) {
      if (next + kHugePageSize > region.end()) break;
      const PageInfo first = as.page_info(next);
      if (first.state != PageInfo::State::kDevicePrivate || first.device_page == nullptr ||
          first.device_page->pagemap().owner() != dev_.owner())
        break;
      mm::RegionPin pin = as.impl().pin_region(next, next + kHugePageSize);
      if (!pin) break;
      tasks.push_back(Task{&as, next, std::move(pin)});
    }
    {
      MutexLock lock(mutex_);
      if (stopping_) return;  // `tasks` goes, and its pins with it
      streams_.at(&as).queued(*window, tasks.empty() ? std::nullopt : std::optional(tasks.back().block));
      for (Task& t : tasks) queue_.push_back(std::move(t));
    }
    if (tasks.empty()) return;
    cv_.notify_one();
  }

  /// The application is moving [start, start + length) of `as` to the
  /// device: queued blocks in it would only come straight back.  They are
  /// dropped (their pins released), and the stream starts over.
  void cancel(AddressSpace& as, VirtAddr start, std::size_t length) {
    std::deque<Task> dropped;  // released outside the lock
    MutexLock lock(mutex_);
    const auto overlaps = [&](const Task& t) {
      return t.as == &as && t.block < start + length && start < t.block + kHugePageSize;
    };
    for (auto it = queue_.begin(); it != queue_.end();) {
      if (overlaps(*it)) {
        dropped.push_back(std::move(*it));
        it = queue_.erase(it);
      } else {
        ++it;
      }
    }
    if (!dropped.empty()) streams_.erase(&as);
  }

  /// Blocks queued or being migrated back.
  std::size_t pending() {
    MutexLock lock(mutex_);
    return queue_.size() + in_progress_;
  }

  /// Tests: while held, the worker takes no queued block.
  void hold(bool on) {
    {
      MutexLock lock(mutex_);
      held_ = on;
    }
    cv_.notify_all();
  }

 private:
  struct Task {
    AddressSpace* as = nullptr;
    VirtAddr block;
    mm::RegionPin pin;
  };

  /// Moves the queued blocks of `as` that continue a range ending at `end`
  /// into `tasks`; returns how many.  Not past the region the range lies
  /// in (it starts at `region_start`), nor while that is being unmapped.
  std::size_t take_following(AddressSpace& as, VirtAddr region_start, VirtAddr end, std::vector<Task>& tasks)
      UHMM_REQUIRES(mutex_) {
    std::size_t taken = 0;
    while (!queue_.empty()) {
      Task& t = queue_.front();
      if (t.as != &as || t.block != end + taken * kHugePageSize || t.pin->info.start != region_start ||
          t.pin->closing.load(std::memory_order_acquire))
        break;
      tasks.push_back(std::move(t));
      queue_.pop_front();
      ++taken;
    }
    in_progress_ += taken;
    dev_.stats_.add(Counter::prefetch_blocks, taken);
    return taken;
  }

  void run() {
    platform::name_this_thread("prefetch");
    for (;;) {
      // Consecutive queued blocks of one address space go as one range, so
      // that migrate_range pipelines their copies.
      std::vector<Task> tasks;
      {
        MutexLock lock(mutex_);
        while (!stopping_ && (queue_.empty() || held_)) cv_.wait(mutex_);
        if (stopping_) return;
        tasks.push_back(std::move(queue_.front()));
        queue_.pop_front();
        in_progress_ = 1;
        dev_.stats_.add(Counter::prefetch_migrations);
        dev_.stats_.add(Counter::prefetch_blocks);
        const Task& first = tasks.front();
        take_following(*first.as, first.pin->info.start, first.block + kHugePageSize, tasks);
      }
      // Worker threads never crash the process: migrate_range reports
      // errors as Status, and a failed prefetch only means a later fault.
      // A reader that waited for a block of this window shows where it
      // stands as a fault there would (it did not fault into the driver:
      // it found the block on its way): the stream goes on from there, so
      // the queue does not run dry before the reader's next fault.  What
      // that queues, the migration in progress takes on.
      AddressSpace& as = *tasks.front().as;
      const RegionInfo region = tasks.front().pin->info;
      const SimDevice::Continuation continuation{
          [&](VirtAddr at) { on_fault(as, at.huge_down(), region); },
          [&](VirtAddr end) -> std::size_t {
            MutexLock lock(mutex_);
            if (stopping_ || held_) return 0;
            return take_following(as, region.start, end, tasks) * kHugePageSize;
          }};
      if (!tasks.front().pin->closing.load(std::memory_order_acquire))
        (void)dev_.migrate_range(as, tasks.front().block, tasks.size() * kHugePageSize, /*to_device=*/false, nullptr,
                                 &continuation);
      tasks.clear();  // the pins go before the work counts as done
      MutexLock lock(mutex_);
      in_progress_ = 0;
    }
  }

  SimDevice& dev_;
  Mutex mutex_{LockRank::kLeaf};
  std::condition_variable_any cv_;
  bool stopping_ UHMM_GUARDED_BY(mutex_) = false;
  bool held_ UHMM_GUARDED_BY(mutex_) = false;
  std::size_t in_progress_ UHMM_GUARDED_BY(mutex_) = 0;
  std::deque<Task> queue_ UHMM_GUARDED_BY(mutex_);
  std::map<AddressSpace*, PrefetchStream> streams_ UHMM_GUARDED_BY(mutex_);
  std::thread thread_;
};

// ---- the mirror ------------------------------------------------------------

// The device's page table for one address space (docs/mirroring.md, "The
// simulated device's mirror"): virtual page number -> where the device
// reaches the page.  One interval notifier covers the whole user address
// range; its invalidate() drops the entries of the range under `mutex`, the
// lock every device access holds while it uses entries, so an invalidation
// returns only once no device access uses the range any more.
class SimDevice::Mirror final : public IntervalNotifierOps {
 public:
  struct Entry {
    std::byte* memory = nullptr;  // the page: device memory, the exclusive frame, or the system page's own address
    bool writable = false;
    bool device = false;  // one of this device's pages
    bool atomic = false;  // held exclusively for the device's atomics (memory: the frame uhmm holds)
    // A device-coherent page (this device's or another's): CPU memory at its
    // virtual address, reached fault-safe like a system page.
    bool coherent = false;
    // device: the page, so that a write marks it dirty (a page of a file
    // must reach the file when it comes back).
    DevicePage* page = nullptr;
  };

  Mirror(Mirrors& stats, const void* owner) : stats_(stats), owner_(owner) {}
  ~Mirror() override = default;
  Mirror(const Mirror&) = delete;
  Mirror& operator=(const Mirror&) = delete;

  bool invalidate(IntervalNotifier& sub, const NotifyRange& range, std::uint64_t cur_seq) override;
  void apply_invalidation(IntervalNotifier& sub, const NotifyRange& range, std::uint64_t cur_seq)
      UHMM_REQUIRES(mutex);
  /// Drops the entries of [first, end) (virtual page numbers).
  void drop(std::uint64_t first, std::uint64_t end) UHMM_REQUIRES(mutex);

  IntervalNotifier sub;
  // The device page-table lock.  Taken by invalidate() (no uhmm mutex held
  // there) and by device accesses; nothing is locked inside it.
  Mutex mutex{LockRank::kDeviceDriver};
  std::map<std::uint64_t, Entry> entries UHMM_GUARDED_BY(mutex);
  // Set by the kRelease callback: the address space is being destroyed and
  // is never touched again through this mirror.
  std::atomic<bool> released{false};

 private:
  Mirrors& stats_;
  const void* owner_;  // the device's page-map owner
};

// Every mirror of the device, by address space, and the mirror statistics.
struct SimDevice::Mirrors {
  mutable Mutex mutex{LockRank::kDeviceDriver};  // never nests with Mirror::mutex
  std::map<const AddressSpace*, std::shared_ptr<Mirror>> by_space UHMM_GUARDED_BY(mutex);

  std::atomic<std::uint64_t> device_faults{0}, pages_faulted{0}, mirror_hits{0}, invalidations{0},
      entries_dropped{0}, retries{0};
};

// Every event drops the entries of its range, the device's own migrations
// included: the kernel's drivers skip their own MIGRATE events because they
// rewrite their page table while they migrate, and this device does not (a
// page it moves to itself leaves a stale system-page entry behind, one it
// moves back a stale device-memory entry).  Dropping costs a map lookup.
bool SimDevice::Mirror::invalidate(IntervalNotifier& s, const NotifyRange& range, std::uint64_t cur_seq) {
  // Its own exclusive request is the one event the device skips: it maps
  // the page right after, and a bumped sequence would make it retry forever.
  if (range.event == NotifyEvent::kExclusive && range.owner == owner_) return true;
  // An invalidation that cannot wait goes ahead only if the page-table lock
  // is free at once; otherwise it fails (EAGAIN) and its issuer retries.
  if (!range.blockable) {
    if (!mutex.try_lock()) return false;
    apply_invalidation(s, range, cur_seq);
    mutex.unlock();
    return true;
  }
  MutexLock lock(mutex);
  apply_invalidation(s, range, cur_seq);
  return true;
}

void SimDevice::Mirror::apply_invalidation(IntervalNotifier& s, const NotifyRange& range, std::uint64_t cur_seq) {
  s.set_seq(cur_seq);
  stats_.invalidations.fetch_add(1, std::memory_order_relaxed);
  if (range.event == NotifyEvent::kRelease) {
    released.store(true, std::memory_order_release);
    drop(0, ~std::uint64_t{0});
  } else {
    drop(range.start.vpn().value, (range.end.value + kPageSize - 1) >> kPageShift);
  }
}

void SimDevice::Mirror::drop(std::uint64_t first, std::uint64_t end) {
  auto lo = entries.lower_bound(first);
  auto hi = entries.lower_bound(end);
  std::uint64_t n = 0;
  for (auto it = lo; it != hi; ++it) ++n;
  entries.erase(lo, hi);
  stats_.entries_dropped.fetch_add(n, std::memory_order_relaxed);
}

// ---- SimDevice -------------------------------------------------------------

SimDevice::SimDevice(SimDeviceOptions options)
    : options_(options), free_list_(std::make_unique<FreeList>()), mirrors_(std::make_unique<Mirrors>()) {}

Result<std::unique_ptr<SimDevice>> SimDevice::create(SimDeviceOptions options) {
  if (options.memory_bytes < kPageSize) return Status::error(EINVAL, "device memory smaller than a page");
  if (options.batch_pages == 0) return Status::error(EINVAL, "batch_pages must be at least 1");
  if (options.fault_around_pages == 0) options.fault_around_pages = 1;
  std::unique_ptr<SimDevice> dev(new SimDevice(options));
  if (Status s = dev->init(); !s) return s;
  return dev;
}

Result<std::unique_ptr<SimDevice::Chunk>> SimDevice::make_chunk(std::size_t bytes) {
  auto chunk = std::make_unique<Chunk>();
  chunk->bytes = (bytes + kPageSize - 1) & ~(kPageSize - 1);
  auto arena = platform::map_anonymous_aligned(chunk->bytes, kHugePageSize, PROT_READ | PROT_WRITE, false);
  if (!arena) return arena.status();
  chunk->arena = arena->as<std::byte>();
  const bool coherent = options_.memory_type == PagemapType::kCoherent;
  // Coherent frames travel one by one (the page map advises the arena
  // MADV_NOHUGEPAGE), so huge pages would only be split.
  if (!coherent) (void)platform::advise(*arena, chunk->bytes, MADV_HUGEPAGE);
  if (options_.warm_memory) (void)platform::advise(*arena, chunk->bytes, MADV_POPULATE_WRITE);

  PagemapConfig config;
  config.type = options_.memory_type;
  config.npages = PageCount{chunk->bytes / kPageSize};
  config.owner = this;
  config.ops.page_free = [this](DevicePage& page) { free_page(page); };
  // The CPU never faults on coherent pages: no migrate_to_ram.
  if (!coherent) {
    config.ops.migrate_to_ram = [this](const CpuFault& fault) { return migrate_to_ram(fault); };
    if (options_.file_pages == FilePages::kCopiedBack)
      config.ops.migrate_to_pagecache = [this](DevicePage& page, std::span<std::byte> dst) {
        return copy_to_pagecache(page, dst);
      };
  } else {
    config.coherent_memory = chunk->arena;
  }
  try {
    auto map = DevicePagemap::create(std::move(config));
    if (!map) return map.status();
    chunk->map = std::move(*map);
  } catch (const std::bad_alloc&) {  // the page descriptors
    return Status::error(ENOMEM, "no memory for the device page descriptors");
  }
  const DevicePfnRange range = chunk->map->range();
  chunk->free = std::make_unique<FreePages>(range.count.value);
  for (std::uint64_t i = 0; i < range.count.value; ++i) chunk->map->page_at(i).zone_device_data = chunk.get();
  return chunk;
}

SimDevice::Chunk& SimDevice::chunk_of(const DevicePage& page) { return *static_cast<Chunk*>(page.zone_device_data); }

Status SimDevice::init() {
  auto first = make_chunk(options_.memory_bytes);
  if (!first) return first.status();
  {
    MutexLock lock(free_list_->mutex);
    free_list_->add(std::move(*first));
  }
  dma_ = std::make_unique<DmaEngine>(options_.dma_threads, options_.link, options_.inline_copy_bytes, faults_);
  prefetcher_ = std::make_unique<Prefetcher>(*this);
  return Status::ok();
}

SimDevice::~SimDevice() {
  // Unsubscribe every mirror first (outside every lock: removal waits for
  // the callbacks in flight).  A mirror whose address space is gone was
  // detached by its teardown, and removing it does nothing.
  {
    std::map<const AddressSpace*, std::shared_ptr<Mirror>> all;
    {
      MutexLock lock(mirrors_->mutex);
      all.swap(mirrors_->by_space);
    }
    for (auto& [as, m] : all) interval_notifier_remove(m->sub);
  }
  if (prefetcher_) prefetcher_->stop();  // no background migration may race the eviction
  const std::vector<Chunk*> chunks = free_list_->all();
  if (!chunks.empty()) {
    faults_.disarm();
    auto in_use = [&] {
      std::uint64_t n = 0;
      for (const Chunk* c : chunks) n += c->map->pages_in_use();
      return n;
    };
    for (int round = 0; round < 100 && in_use() != 0; ++round) {
      (void)evict_all();
      if (in_use() != 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
  // Outside the lock: a page map waits for pages still held, and their
  // release gives them back to the free list.
  for (Chunk* c : chunks) c->map.reset();
  dma_.reset();
  MutexLock lock(free_list_->mutex);
  free_list_->chunks.clear();  // unmaps the arenas
}

DevicePagemap& SimDevice::pagemap() {
  MutexLock lock(free_list_->mutex);
  return *free_list_->chunks.front()->map;
}

std::uint64_t SimDevice::free_pages() const {
  MutexLock lock(free_list_->mutex);
  return free_list_->free_pages();
}

std::size_t SimDevice::memory_bytes() const {
  MutexLock lock(free_list_->mutex);
  return free_list_->total_pages() * kPageSize;
}

std::byte* SimDevice::page_memory(const DevicePage& page) {
  return chunk_of(page).arena + page.index() * kPageSize;
}

bool SimDevice::injected_alloc_failure(FaultInjection* client_faults) {
  if ((client_faults == nullptr || !client_faults->should_fail_alloc()) && !faults_.should_fail_alloc()) return false;
  stats_.add(Counter::device_alloc_fail);
  return true;
}

DevicePage* SimDevice::alloc_page(FaultInjection* client_faults) {
  if (injected_alloc_failure(client_faults)) return nullptr;
  DevicePage* page = nullptr;
  {
    FreeList& fl = *free_list_;
    MutexLock lock(fl.mutex);
    page = fl.take();
    if (page == nullptr && options_.grow_bytes != 0) {
      // Every page in use: one more chunk.  If the host cannot map it, this
      // allocation fails as on a full device; a later one tries again.
      if (auto chunk = make_chunk(options_.grow_bytes)) {
        fl.add(std::move(*chunk));
        page = fl.take();
      }
    }
  }
  if (page == nullptr) {
    stats_.add(Counter::device_alloc_fail);
    return nullptr;
  }
  zone_device_page_init(*page);
  return page;
}

DevicePage* SimDevice::alloc_large_page(FaultInjection* client_faults) {
  if (injected_alloc_failure(client_faults)) return nullptr;
  DevicePage* head = nullptr;
  {
    FreeList& fl = *free_list_;
    MutexLock lock(fl.mutex);
    head = fl.take_large();
  }
  // No aligned free 2 MiB: not a failure, the unit goes to base pages.
  if (head == nullptr) return nullptr;
  const Status s = zone_device_folio_init(*head, kDeviceFolioOrder);
  UHMM_CHECK(s.is_ok(), "free device pages in use");
  return head;
}

void SimDevice::free_page(DevicePage& page) {
  stats_.add(Counter::device_page_free);
  chunk_of(page).free->release(page.index());
}

Status SimDevice::copy_to_pagecache(DevicePage& page, std::span<std::byte> dst) {
  std::vector<CopyOp> op{CopyOp{page_memory(page), dst.data()}};
  dma_->copy(op);
  if (!op[0].ok) {
    stats_.add(Counter::dma_copy_fail);
    return Status::error(EIO, "device copy failed");
  }
  stats_.add(Counter::dma_bytes_from_device, kPageSize);
  return Status::ok();
}

namespace {
// The 512 pfns of the 2 MiB system page starting at `first`.
std::vector<std::uint64_t> large_pfns(std::uint64_t first) {
  std::vector<std::uint64_t> pfns(kPagesPerHugePage);
  for (std::size_t k = 0; k < kPagesPerHugePage; ++k) pfns[k] = first + k;
  return pfns;
}
}  // namespace

// One batch's device copy, in three steps: prepare (allocate destinations
// and list the copies), run (the DMA engine), complete (write dst[] for the
// pages that copied; give back the destinations of those that did not).
// Each destination is one page, or one 2 MiB large page for a COMPOUND
// entry, copied as 512 page ops in a row (the engine coalesces them).
struct SimDevice::Transfer {
  bool to_device = true;
  std::vector<CopyOp> ops;
  struct Destination {
    std::size_t entry;           // dst[entry] gets it
    std::size_t first_op, nops;  // its copies: ops[first_op, first_op + nops)
    DevicePage* device_page;     // to the device (a large page's head)
    std::uint64_t system_pfn;    // to system memory (a large page's first)
    bool writable;
  };
  std::vector<Destination> dests;
  FaultInjection* client_faults = nullptr;  // to the device: see migrate_to_device
};

bool SimDevice::prepare(Transfer& t, std::span<const std::uint64_t> src, AddressSpace& as, MigrateReport* r) {
  // One destination of `pages` pages for entry `entry`, its data at `from`
  // (nullptr: zeros) going to `to`.
  auto add = [&t](std::size_t entry, std::size_t pages, const std::byte* from, std::byte* to, DevicePage* page,
                  std::uint64_t pfn, bool writable) {
    t.dests.push_back(Transfer::Destination{entry, t.ops.size(), pages, page, pfn, writable});
    for (std::size_t k = 0; k < pages; ++k)
      t.ops.push_back(CopyOp{from == nullptr ? nullptr : from + k * kPageSize, to + k * kPageSize});
  };
  if (t.to_device) {
    for (std::size_t i = 0; i < src.size(); ++i) {
      if (!(src[i] & MIGRATE_PFN_MIGRATE)) continue;
      const bool hole = !(src[i] & MIGRATE_PFN_VALID);
      const bool writable = hole || (src[i] & MIGRATE_PFN_WRITE);
      const auto* from = static_cast<const std::byte*>(migrate_pfn_to_host(src[i]));
      const std::size_t pages = (src[i] & MIGRATE_PFN_COMPOUND) ? kPagesPerHugePage : 1;
      if (hole && r != nullptr) r->holes += pages;
      if (pages > 1) {
        if (DevicePage* head = alloc_large_page(t.client_faults); head != nullptr) {
          add(i, pages, from, page_memory(*head), head, 0, writable);
          continue;
        }
        stats_.add(Counter::device_large_fallback);
      }
      // Base pages (a COMPOUND entry's unit is split; pages fills in its
      // source entries).
      for (std::size_t k = 0; k < pages; ++k) {
        DevicePage* page = alloc_page(t.client_faults);
        if (page == nullptr) continue;  // out of device memory: stays on the CPU
        add(i + k, 1, from == nullptr ? nullptr : from + k * kPageSize, page_memory(*page), page, 0, writable);
      }
    }
    return true;
  }
  // Base pages that need a system page: their entry, and their data (a
  // split unit's pages lie one after another in its large page).
  std::vector<std::pair<std::size_t, const std::byte*>> bases;
  for (std::size_t i = 0; i < src.size(); ++i) {
    if (!(src[i] & MIGRATE_PFN_MIGRATE) || !(src[i] & MIGRATE_PFN_VALID)) continue;
    const std::byte* from = page_memory(*migrate_pfn_to_device_page(src[i]));
    if (src[i] & MIGRATE_PFN_COMPOUND) {
      std::uint64_t pfn = 0;
      if (alloc_system_huge_page(as, &pfn).is_ok()) {
        add(i, kPagesPerHugePage, from, reinterpret_cast<std::byte*>(pfn << kPageShift), nullptr, pfn, true);
        continue;
      }
      for (std::size_t k = 0; k < kPagesPerHugePage; ++k) bases.emplace_back(i + k, from + k * kPageSize);
      continue;
    }
    bases.emplace_back(i, from);
  }
  std::vector<std::uint64_t> pfns(bases.size());
  if (!bases.empty() && !alloc_system_pages(as, pfns).is_ok()) {
    for (const Transfer::Destination& d : t.dests) free_system_pages(as, large_pfns(d.system_pfn));
    t.dests.clear();
    t.ops.clear();
    return false;
  }
  for (std::size_t k = 0; k < bases.size(); ++k)
    add(bases[k].first, 1, bases[k].second, reinterpret_cast<std::byte*>(pfns[k] << kPageShift), nullptr, pfns[k],
        true);
  return true;
}

bool SimDevice::complete(Transfer& t, std::span<std::uint64_t> dst, AddressSpace& as) {
  bool all_ok = true;
  for (const Transfer::Destination& d : t.dests) {
    bool ok = true;
    for (std::size_t k = d.first_op; k < d.first_op + d.nops; ++k) ok = ok && t.ops[k].ok;
    const bool large = d.nops > 1;
    if (!ok) {
      stats_.add(Counter::dma_copy_fail);
      all_ok = false;
      if (t.to_device) {
        // Back to the free list, every page of a large one; the source is untouched.
        for (std::size_t k = 0; k < d.nops; ++k) {
          DevicePage& page = d.device_page->pagemap().page_at(d.device_page->index() + k);
          page.unlock();
          page.put();
        }
      } else if (large) {
        free_system_pages(as, large_pfns(d.system_pfn));
      } else {
        free_system_pages(as, std::span<const std::uint64_t>(&d.system_pfn, 1));
      }
      continue;
    }
    const std::uint64_t compound = large ? MIGRATE_PFN_COMPOUND : 0;
    if (t.to_device) {
      stats_.add(Counter::dma_bytes_to_device, d.nops * kPageSize);
      dst[d.entry] = migrate_pfn(d.device_page->pfn()) | compound | (d.writable ? MIGRATE_PFN_WRITE : 0);
    } else {
      stats_.add(Counter::dma_bytes_from_device, d.nops * kPageSize);
      dst[d.entry] = migrate_pfn(d.system_pfn) | compound;
    }
  }
  return all_ok;
}

bool SimDevice::copy_to_system(std::span<std::uint64_t> src, std::span<std::uint64_t> dst, bool may_skip,
                               AddressSpace& as) {
  Transfer t;
  t.to_device = false;
  if (!prepare(t, src, as, nullptr)) return false;
  dma_->copy(t.ops);
  return complete(t, dst, as) || may_skip;
}

Result<MigrateReport> SimDevice::migrate_range(AddressSpace& as, VirtAddr addr, std::size_t length, bool to_device,
                                               FaultInjection* client_faults, const Continuation* continuation) {
  if (length == 0) return Status::error(EINVAL, "zero length");
  if (!addr.page_aligned() || length % kPageSize != 0) return Status::error(EINVAL, "range not page aligned");
  // A range the application has just moved here is here once its event is
  // processed.
  as.impl().await_returned_changes(addr, addr + length);
  const auto region = as.find_region(addr);
  if (!region || addr + length > region->end())
    return Status::error(EINVAL, "range not inside one managed range");
  MigrateReport report;
  // A two-stage pipeline: while the DMA engine copies batch N, this thread
  // commits batch N-1 and sets up batch N+1.
  struct InFlight {
    std::unique_ptr<ScopedMigrateVma> mig;
    Transfer transfer;
    std::future<void> copied;
  };
  std::unique_ptr<InFlight> previous;
  auto commit = [&](InFlight& f) {
    f.copied.wait();
    (void)complete(f.transfer, f.mig->dst(), as);
    f.mig->pages();
    for (std::uint64_t s : f.mig->src())
      if (s & MIGRATE_PFN_MIGRATE) report.pages_migrated += (s & MIGRATE_PFN_COMPOUND) ? kPagesPerHugePage : 1;
    f.mig->finalize();
    if (continuation && continuation->waited && f.mig->args().last_waited.value != 0)
      continuation->waited(f.mig->args().last_waited);
  };
  VirtAddr end = addr + length;
  const auto take_more = [&] {
    if (continuation && continuation->more) end = end + continuation->more(end);
  };
  const std::size_t batch = options_.batch_pages * kPageSize;
  Status failed;
  for (VirtAddr cur = addr;;) {
    // What was queued meanwhile goes on from here: asked both before the
    // last known batch is set up (the one before it is committed only
    // then) and once it is, since that commit may queue more.
    if (cur >= end) take_more();
    if (cur >= end) break;
    // Batches end on batch-size boundaries so that 2 MiB units stay whole.
    VirtAddr next = VirtAddr{(cur.value / batch + 1) * batch};
    if (next >= end) take_more();
    if (next > end) next = end;
    auto flight = std::make_unique<InFlight>();
    const std::uint32_t back = options_.memory_type == PagemapType::kCoherent ? MIGRATE_VMA_SELECT_DEVICE_COHERENT
                                                                              : MIGRATE_VMA_SELECT_DEVICE_PRIVATE;
    const std::uint32_t large = options_.large_pages && options_.memory_type == PagemapType::kPrivate
                                    ? std::uint32_t{MIGRATE_VMA_SELECT_COMPOUND}
                                    : std::uint32_t{0};
    flight->mig = std::make_unique<ScopedMigrateVma>(as, cur, next, owner(),
                                                     (to_device ? MIGRATE_VMA_SELECT_SYSTEM : back) | large);
    if (Status s = flight->mig->setup(); !s) {
      failed = s;
      break;
    }
    report.pages_requested += (next - cur) / kPageSize;
    flight->transfer.to_device = to_device;
    flight->transfer.client_faults = client_faults;
    (void)prepare(flight->transfer, flight->mig->src(), as, &report);  // no memory: the batch stays put
    if (!previous && next >= end) {
      // A single batch has nothing to overlap with: copy on this thread
      // rather than wake a worker (on a small machine that wake-up, and the
      // TLB-flush interrupts a busy second CPU then draws, cost more).
      dma_->copy(flight->transfer.ops);
      std::promise<void> done;
      flight->copied = done.get_future();
      done.set_value();
    } else {
      flight->copied = dma_->start(flight->transfer.ops);
    }
    if (previous) commit(*previous);
    previous = std::move(flight);
    cur = next;
  }
  if (previous) commit(*previous);
  if (!failed.is_ok()) return failed;
  // Pages already where they were asked to go count as skipped only if they
  // could have moved: the caller compares requested with migrated.
  report.pages_skipped = report.pages_requested - report.pages_migrated;
  return report;
}

Result<MigrateReport> SimDevice::migrate_to_device(AddressSpace& as, VirtAddr addr, std::size_t length,
                                                   FaultInjection* client_faults) {
  if (prefetcher_) prefetcher_->cancel(as, addr, length);
  return migrate_range(as, addr, length, true, client_faults);
}

void SimDevice::hold_prefetch_for_test(bool on) {
  if (prefetcher_) prefetcher_->hold(on);
}

std::size_t SimDevice::prefetch_pending() const { return prefetcher_ ? prefetcher_->pending() : 0; }

Result<MigrateReport> SimDevice::migrate_to_system(AddressSpace& as, VirtAddr addr, std::size_t length) {
  return migrate_range(as, addr, length, false, nullptr);
}

FaultOutcome SimDevice::migrate_to_ram(const CpuFault& fault) {
  if (faults_.migrate_to_ram_broken()) return FaultOutcome::kSigbus;
  AddressSpace& as = *fault.address_space;
  // Fault-around: bring back the device pages of the aligned block around
  // the fault, so a sequential reader pays one fault per block.
  VirtAddr lo = fault.address, hi = fault.address + kPageSize;
  if (options_.fault_around_pages > 1) {
    const auto region = as.find_region(fault.address);
    if (region) {
      const std::size_t span = std::min(options_.fault_around_pages, kPagesPerHugePage) * kPageSize;
      const VirtAddr block{fault.address.value / span * span};
      lo = std::max(block, region->start);
      hi = std::min(block + span, region->end());
      // A sequential stream of faults: start bringing the next blocks back
      // on the prefetch thread, in parallel with this one.
      if (span == kHugePageSize) prefetcher_->on_fault(as, block, *region);
    }
  }
  if (hi - lo == kPageSize) return migrate_one_to_ram(as, fault);
  ScopedMigrateVma mig(as, lo, hi, owner(), MIGRATE_VMA_SELECT_DEVICE_PRIVATE, fault.page);
  // The region seen above may be out of date: a munmap or mremap of a part
  // of it, which the application made just now, splits it (its event is
  // processed concurrently) and the window no longer lies in one range.
  // The faulting page is managed still; the neighbours are only a bonus.
  if (!mig.setup().is_ok()) return migrate_one_to_ram(as, fault);
  const std::size_t fault_index = (fault.address - lo) / kPageSize;
  const bool fault_page_collected = mig.src()[fault_index] & MIGRATE_PFN_MIGRATE;
  if (!copy_to_system(mig.src(), mig.dst(), /*may_skip=*/true, as)) {
    mig.finalize();
    return FaultOutcome::kOom;
  }
  const bool fault_page_copied = mig.dst()[fault_index] != 0;
  mig.pages();
  mig.finalize();
  if (fault_page_collected && !fault_page_copied) return FaultOutcome::kSigbus;
  return FaultOutcome::kOk;
}

FaultOutcome SimDevice::migrate_one_to_ram(AddressSpace& as, const CpuFault& fault) {
  // The same three phases for the faulting page alone, with nothing on the
  // heap: this is the whole of a one-page fault's service time.
  std::uint64_t src = 0, dst = 0;
  MigrateVma m;
  m.address_space = &as;
  m.start = fault.address;
  m.end = fault.address + kPageSize;
  m.src = &src;
  m.dst = &dst;
  m.pgmap_owner = owner();
  m.flags = MIGRATE_VMA_SELECT_DEVICE_PRIVATE;
  m.fault_page = fault.page;
  if (!migrate_vma_setup(m).is_ok()) return FaultOutcome::kSigbus;
  const bool collected = src & MIGRATE_PFN_MIGRATE;
  std::uint64_t pfn = 0;
  const bool allocated = collected && alloc_system_pages(as, std::span<std::uint64_t>(&pfn, 1)).is_ok();
  if (allocated) {
    CopyOp op{page_memory(*migrate_pfn_to_device_page(src)), reinterpret_cast<std::byte*>(pfn << kPageShift)};
    dma_->copy(std::span<CopyOp>(&op, 1));
    if (op.ok) {
      stats_.add(Counter::dma_bytes_from_device, kPageSize);
      dst = migrate_pfn(pfn);
    } else {
      stats_.add(Counter::dma_copy_fail);
      free_system_pages(as, std::span<const std::uint64_t>(&pfn, 1));
    }
  }
  migrate_vma_pages(m);
  migrate_vma_finalize(m);
  if (collected && !allocated) return FaultOutcome::kOom;
  return collected && dst == 0 ? FaultOutcome::kSigbus : FaultOutcome::kOk;
}

Result<MigrateReport> SimDevice::evict_all() {
  MigrateReport report;
  constexpr std::uint64_t kStep = kPagesPerHugePage;
  std::vector<std::uint64_t> src(kStep), dst(kStep);
  for (const Chunk* chunk : free_list_->all()) {
    const DevicePfnRange range = chunk->map->range();
    for (std::uint64_t off = 0; off < range.count.value; off += kStep) {
      const std::uint64_t n = std::min(kStep, range.count.value - off);
      UHMM_TRY(migrate_device_range(src.data(), range.first + off, PageCount{n}));
      std::fill(dst.begin(), dst.end(), 0);
      std::uint64_t collected = 0;
      for (std::uint64_t i = 0; i < n; ++i) {
        if (!(src[i] & MIGRATE_PFN_MIGRATE)) continue;
        ++collected;
        DevicePage* page = migrate_pfn_to_device_page(src[i]);
        AddressSpace* as = page->mapping().address_space;
        std::uint64_t pfn = 0;
        if (!alloc_system_pages(*as, std::span<std::uint64_t>(&pfn, 1)).is_ok()) continue;
        CopyOp op{page_memory(*page), reinterpret_cast<std::byte*>(pfn << kPageShift)};
        dma_->copy(std::span<CopyOp>(&op, 1));
        if (!op.ok) {
          free_system_pages(*as, std::span<const std::uint64_t>(&pfn, 1));
          continue;
        }
        dst[i] = migrate_pfn(pfn);
      }
      report.pages_requested += collected;
      migrate_device_pages(src.data(), dst.data(), PageCount{n});
      for (std::uint64_t i = 0; i < n; ++i)
        if (src[i] & MIGRATE_PFN_MIGRATE) ++report.pages_migrated;
      migrate_device_finalize(src.data(), dst.data(), PageCount{n});
    }
  }
  report.pages_skipped = report.pages_requested - report.pages_migrated;
  return report;
}

std::shared_ptr<SimDevice::Mirror> SimDevice::find_mirror(const AddressSpace& as) const {
  MutexLock lock(mirrors_->mutex);
  auto it = mirrors_->by_space.find(&as);
  if (it == mirrors_->by_space.end() || it->second->released.load(std::memory_order_acquire)) return nullptr;
  return it->second;
}

// The mirror of `as`, made (and subscribed) on first use.  A released mirror
// under the same address belongs to an address space that has been
// destroyed (this one reuses its memory): it is replaced.
std::shared_ptr<SimDevice::Mirror> SimDevice::mirror_for(AddressSpace& as) {
  std::shared_ptr<Mirror> stale, mirror;
  {
    MutexLock lock(mirrors_->mutex);
    std::shared_ptr<Mirror>& slot = mirrors_->by_space[&as];
    if (slot && !slot->released.load(std::memory_order_acquire)) return slot;
    stale = std::move(slot);
    mirror = std::make_shared<Mirror>(*mirrors_, owner());
    // The whole user address range: one subscription, like a driver that
    // mirrors the process (nouveau's svmm).  The callback takes only the
    // mirror's own lock, so inserting under the map's lock is allowed.
    constexpr std::size_t kUserSpan = std::size_t{1} << 47;
    if (!interval_notifier_insert(mirror->sub, as, VirtAddr{0}, kUserSpan, *mirror).is_ok()) {
      mirrors_->by_space.erase(&as);
      mirror.reset();
    } else {
      slot = mirror;
    }
  }
  // Detached when its address space went; otherwise this waits for its
  // callbacks.  Never under a lock the callbacks take.
  if (stale) interval_notifier_remove(stale->sub);
  return mirror;
}

MirrorStats SimDevice::mirror_stats() const {
  MirrorStats s;
  s.device_faults = mirrors_->device_faults.load();
  s.pages_faulted = mirrors_->pages_faulted.load();
  s.mirror_hits = mirrors_->mirror_hits.load();
  s.invalidations = mirrors_->invalidations.load();
  s.entries_dropped = mirrors_->entries_dropped.load();
  s.retries = mirrors_->retries.load();
  return s;
}

std::size_t SimDevice::mirrored_pages(const AddressSpace& as, VirtAddr addr, std::size_t length) const {
  const std::shared_ptr<Mirror> m = find_mirror(as);
  if (!m) return 0;
  MutexLock lock(m->mutex);
  const std::uint64_t first = addr.vpn().value;
  const std::uint64_t end = (addr.value + length + kPageSize - 1) >> kPageShift;
  std::size_t n = 0;
  for (auto it = m->entries.lower_bound(first); it != m->entries.end() && it->first < end; ++it) ++n;
  return n;
}

// One device fault: the misses of one access, [first_vpn, end_vpn) holding
// `misses` of them, serviced with one hmm_range_fault walk and programmed
// under the page-table lock (the driver loop of docs/mirroring.md).  Pages
// of the span that were already mirrored are present or the device's own:
// the walk reports them without faulting anything.
Status SimDevice::service_device_fault(Mirror& m, AddressSpace& as, std::uint64_t first_vpn, std::uint64_t end_vpn,
                                       std::size_t misses, Need need, std::chrono::steady_clock::time_point deadline) {
  mirrors_->device_faults.fetch_add(1, std::memory_order_relaxed);
  mirrors_->pages_faulted.fetch_add(misses, std::memory_order_relaxed);
  std::vector<std::uint64_t> pfns(end_vpn - first_vpn);
  HmmRange range;
  range.address_space = &as;
  range.notifier = &m.sub;
  range.start = VirtAddr::from_vpn(Vpn{first_vpn});
  range.end = VirtAddr::from_vpn(Vpn{end_vpn});
  range.hmm_pfns = pfns.data();
  // kResident (run_kernel) only looks: a page that is not on the device is
  // an error, not something to fault.
  range.default_flags = need == Need::kResident ? 0
                        : need == Need::kWrite  ? (HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)
                                                : HMM_PFN_REQ_FAULT;
  range.dev_private_owner = owner();
  for (;;) {
    if (std::chrono::steady_clock::now() > deadline) return Status::error(EBUSY, "device fault: the range keeps changing");
    range.notifier_seq = m.sub.read_begin();  // waits while the range is mid-change
    std::fill(pfns.begin(), pfns.end(), 0);
    const Status s = hmm_range_fault(range);  // no lock held: it may fault pages in
    if (s.code() == EBUSY) {
      mirrors_->retries.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    if (!s) return s;
    MutexLock lock(m.mutex);
    if (m.sub.read_retry(range.notifier_seq)) {  // an invalidation overtook the walk
      mirrors_->retries.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    for (std::size_t i = 0; i < pfns.size(); ++i) {
      const std::uint64_t w = pfns[i];
      if (!(w & HMM_PFN_VALID)) continue;
      Mirror::Entry e;
      e.writable = (w & HMM_PFN_WRITE) != 0;
      if (DevicePage* page = hmm_pfn_to_device_page(w)) {
        e.device = page->pagemap().owner() == owner();
        e.coherent = page->pagemap().type() == PagemapType::kCoherent;
        if (e.device) e.page = page;
        e.memory = e.coherent ? static_cast<std::byte*>(VirtAddr::from_vpn(Vpn{first_vpn + i}).ptr())
                              : page_memory(*page);
      } else {
        e.memory = static_cast<std::byte*>(hmm_pfn_to_host(w));
      }
      m.entries.insert_or_assign(first_vpn + i, e);
    }
    // A look-only walk (run_kernel) leaves a page that is not on this
    // device as a system page or nothing: the kernel cannot run there.
    if (need == Need::kResident)
      for (const std::uint64_t w : pfns) {
        const DevicePage* page = hmm_pfn_to_device_page(w);
        if (page == nullptr || page->pagemap().owner() != owner())
          return Status::error(EFAULT, "page not resident on this device");
      }
    return Status::ok();
  }
}

// Runs fn(entry, page address) on every page of [first_page, +npages) with
// the page-table lock held, once every page is mirrored (for writes:
// writable).  The misses of a pass are one device fault; a pass after it
// finds them mirrored unless an invalidation came in between.
template <class Fn>
Status SimDevice::mirrored_access(AddressSpace& as, VirtAddr first_page, std::size_t npages, Need need, Fn&& fn) {
  const std::shared_ptr<Mirror> m = mirror_for(as);
  if (!m) return Status::error(ENOMEM, "cannot subscribe the device's mirror");
  const std::uint64_t first = first_page.vpn().value;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(1);
  std::vector<const Mirror::Entry*> found(npages);
  for (bool first_pass = true;; first_pass = false) {
    std::size_t misses = 0;
    std::uint64_t miss_lo = 0, miss_hi = 0;
    {
      MutexLock lock(m->mutex);
      auto it = m->entries.lower_bound(first);
      for (std::size_t i = 0; i < npages; ++i) {
        const std::uint64_t vpn = first + i;
        while (it != m->entries.end() && it->first < vpn) ++it;
        const bool hit = it != m->entries.end() && it->first == vpn &&
                         (need != Need::kWrite || it->second.writable);
        found[i] = hit ? &it->second : nullptr;
        if (hit) continue;
        if (misses++ == 0) miss_lo = vpn;
        miss_hi = vpn + 1;
      }
      if (first_pass) mirrors_->mirror_hits.fetch_add(npages - misses, std::memory_order_relaxed);
      if (misses == 0) {
        if (need == Need::kResident)
          for (const Mirror::Entry* e : found)
            if (!e->device) return Status::error(EFAULT, "page not resident on this device");
        for (std::size_t i = 0; i < npages; ++i) fn(*found[i], first_page + i * kPageSize);
        return Status::ok();
      }
      if (!first_pass) {
        // Serviced and still missing without an invalidation in between:
        // what the walk reported cannot be used for this access.
        for (std::size_t i = 0; i < npages; ++i) {
          if (found[i] != nullptr) continue;
          auto e = m->entries.find(first + i);
          if (e == m->entries.end()) break;  // dropped meanwhile: fault again
          if (need == Need::kWrite && !e->second.writable)
            return Status::error(EPERM, "device write to a read-only page");
        }
      }
    }
    UHMM_TRY(service_device_fault(*m, as, miss_lo, miss_hi, misses, need, deadline));
  }
}

Status SimDevice::device_read(AddressSpace& as, VirtAddr addr, std::span<std::byte> out) {
  if (out.empty()) return Status::ok();
  if (!as.find_region(addr) || !as.find_region(addr + (out.size() - 1)))
    return Status::error(EFAULT, "range not managed");
  const VirtAddr first = addr.page_down();
  const std::size_t npages = ((addr + (out.size() - 1)).page_down() - first) / kPageSize + 1;
  // Device memory (and frames held exclusively for the device) is read
  // under the page-table lock (an invalidation waits for it); system pages through the process's mapping, fault-safe and
  // after the lock: a page the application unmaps or discards meanwhile
  // must neither crash the device nor wait, lock held, for uhmm to process
  // the change (whose invalidation needs that lock).
  std::vector<std::pair<VirtAddr, VirtAddr>> system_pieces;
  UHMM_TRY(mirrored_access(as, first, npages, Need::kRead, [&](const Mirror::Entry& e, VirtAddr page) {
    const VirtAddr lo = std::max(page, addr), hi = std::min(page + kPageSize, addr + out.size());
    if ((e.device && !e.coherent) || e.atomic) {
      std::memcpy(out.data() + (lo - addr), e.memory + (lo - page), hi - lo);
    } else {
      system_pieces.emplace_back(lo, hi);
    }
  }));
  for (const auto& [lo, hi] : system_pieces) UHMM_TRY(as.read(lo, out.subspan(lo - addr, hi - lo)));
  return Status::ok();
}

Status SimDevice::device_write(AddressSpace& as, VirtAddr addr, std::span<const std::byte> in) {
  if (in.empty()) return Status::ok();
  if (!as.find_region(addr) || !as.find_region(addr + (in.size() - 1)))
    return Status::error(EFAULT, "range not managed");
  const VirtAddr first = addr.page_down();
  const std::size_t npages = ((addr + (in.size() - 1)).page_down() - first) / kPageSize + 1;
  // As device_read: device memory under the lock, system pages after it.
  std::vector<std::pair<VirtAddr, VirtAddr>> system_pieces;
  UHMM_TRY(mirrored_access(as, first, npages, Need::kWrite, [&](const Mirror::Entry& e, VirtAddr page) {
    const VirtAddr lo = std::max(page, addr), hi = std::min(page + kPageSize, addr + in.size());
    if ((e.device && !e.coherent) || e.atomic) {
      std::memcpy(e.memory + (lo - page), in.data() + (lo - addr), hi - lo);
      if (e.page != nullptr) e.page->set_dirty();
    } else {
      system_pieces.emplace_back(lo, hi);
    }
  }));
  for (const auto& [lo, hi] : system_pieces) UHMM_TRY(as.write(lo, in.subspan(lo - addr, hi - lo)));
  return Status::ok();
}

Status SimDevice::run_kernel(AddressSpace& as, VirtAddr addr, std::size_t length,
                             const std::function<void(std::span<std::byte>, VirtAddr)>& fn) {
  if (!addr.page_aligned() || length % kPageSize != 0 || length == 0)
    return Status::error(EINVAL, "range not page aligned or empty");
  if (!as.find_region(addr) || !as.find_region(addr + (length - 1)))
    return Status::error(EFAULT, "range not managed");
  // Coherent pages are managed memory the CPU maps: never loaded or stored
  // in place under the lock (a page the application discards meanwhile
  // would fault, and the fault's invalidation needs that lock), but copied
  // through afterwards.
  std::vector<VirtAddr> coherent_pages;
  UHMM_TRY(mirrored_access(as, addr, length / kPageSize, Need::kResident, [&](const Mirror::Entry& e, VirtAddr page) {
    if (e.coherent) {
      coherent_pages.push_back(page);
    } else {
      fn(std::span<std::byte>(e.memory, kPageSize), page);
      if (e.page != nullptr) e.page->set_dirty();  // a kernel may write what it is given
    }
  }));
  std::vector<std::byte> copy(kPageSize);
  for (const VirtAddr page : coherent_pages) {
    UHMM_TRY(as.read(page, copy));
    fn(copy, page);
    UHMM_TRY(as.write(page, copy));
  }
  return Status::ok();
}

Status SimDevice::make_exclusive(AddressSpace& as, VirtAddr addr, std::size_t length) {
  if (!addr.page_aligned() || length % kPageSize != 0 || length == 0)
    return Status::error(EINVAL, "range not page aligned or empty");
  const std::shared_ptr<Mirror> m = mirror_for(as);
  if (!m) return Status::error(ENOMEM, "cannot subscribe the device's mirror");
  for (VirtAddr page = addr; page < addr + length; page = page + kPageSize) {
    // The page comes back locked, so nothing revokes it before it is
    // mapped: no sequence check is needed for it.
    Result<DeviceExclusivePage> held = make_device_exclusive(as, page, owner());
    if (!held.is_ok()) return held.status();
    MutexLock lock(m->mutex);
    m->entries[page.vpn().value] = Mirror::Entry{.memory = held->memory(), .writable = true, .atomic = true};
  }
  return Status::ok();
}

std::size_t SimDevice::exclusive_pages(const AddressSpace& as, VirtAddr addr, std::size_t length) const {
  const std::shared_ptr<Mirror> m = find_mirror(as);
  if (!m) return 0;
  MutexLock lock(m->mutex);
  std::size_t n = 0;
  const std::uint64_t end = (addr + length).vpn().value;
  for (auto it = m->entries.lower_bound(addr.vpn().value); it != m->entries.end() && it->first < end; ++it)
    if (it->second.atomic) ++n;
  return n;
}

Result<std::uint64_t> SimDevice::atomic_fetch_add(AddressSpace& as, VirtAddr addr, std::uint64_t value) {
  if (addr.value % alignof(std::uint64_t) != 0) return Status::error(EINVAL, "atomic on an unaligned address");
  const std::shared_ptr<Mirror> m = mirror_for(as);
  if (!m) return Status::error(ENOMEM, "cannot subscribe the device's mirror");
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(1);
  for (;;) {
    {
      MutexLock lock(m->mutex);
      auto it = m->entries.find(addr.vpn().value);
      if (it != m->entries.end() && it->second.atomic) {
        // The frame stays put while the entry exists (revoking it waits for
        // this lock), and no CPU can reach it meanwhile.
        std::atomic_ref<std::uint64_t> word(
            *reinterpret_cast<std::uint64_t*>(it->second.memory + (addr - addr.page_down())));
        return word.fetch_add(value, std::memory_order_acq_rel);
      }
    }
    if (std::chrono::steady_clock::now() > deadline)
      return Status::error(EBUSY, "exclusive access keeps being revoked");
    UHMM_TRY(make_exclusive(as, addr.page_down(), kPageSize));
  }
}

}  // namespace uhmm::sim
