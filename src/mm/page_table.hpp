// mm/page_table.hpp: the software page table beside the kernel's.
//
// A radix tree indexed by virtual page number, four levels of 512 like the
// hardware's, allocated lazily: reserving a huge range and touching nothing
// allocates nothing.  Nodes are never freed before the table dies (a page
// table of a 1 TiB range fully populated costs 0.2 % of it).
//
// Each page has one 64-bit PageEntry word.  Its states and every legal
// transition are drawn in docs/page-states.md; transitions go through
// PageTable::transition()/lock()/unlock() only, never by storing the word.
#pragma once

#include <atomic>
#include <cstdint>

#include "uhmm/address_space.hpp"
#include "uhmm/types.hpp"

namespace uhmm {
class DevicePage;
}

namespace uhmm::mm {

using PageState = PageInfo::State;

/// The value of one page-table entry.
///   bits 0-2   state (PageState)
///   bit  3     locked: a migration or a fault owns the entry; CPU faults wait
///   bit  4     device write: the device entry is writable
///   bit  5     waiters: a CPU fault is asleep on this page; wake it on unlock
///   bit  6     poisoned: a failed migrate_to_ram left a SIGBUS marker
///   bit  7     fork-shared: a system page a fork may have left shared
///              copy-on-write; UFFDIO_MOVE refuses it until a write fault
///              makes it private, so migrations un-share it first
///   bits 16-63 DevicePage* (device-private and device-coherent states), or
///              the address of the held frame (device-exclusive state)
class PageEntry {
 public:
  static constexpr std::uint64_t kStateMask = 0x7;
  static constexpr std::uint64_t kLocked = 1u << 3;
  static constexpr std::uint64_t kDeviceWrite = 1u << 4;
  static constexpr std::uint64_t kWaiters = 1u << 5;
  static constexpr std::uint64_t kPoisoned = 1u << 6;
  static constexpr std::uint64_t kForkShared = 1u << 7;
  static constexpr unsigned kPointerShift = 16;

  constexpr PageEntry() = default;
  constexpr explicit PageEntry(std::uint64_t bits) : bits_(bits) {}

  static PageEntry none() { return PageEntry{static_cast<std::uint64_t>(PageState::kNone)}; }
  static PageEntry system() { return PageEntry{static_cast<std::uint64_t>(PageState::kSystem)}; }
  static PageEntry device_private(DevicePage* page, bool writable) {
    return PageEntry{(reinterpret_cast<std::uint64_t>(page) << kPointerShift) |
                     (writable ? kDeviceWrite : 0) | static_cast<std::uint64_t>(PageState::kDevicePrivate)};
  }
  /// A coherent device page whose frame is mapped at the entry's address.
  static PageEntry device_coherent(DevicePage* page, bool writable) {
    return PageEntry{(reinterpret_cast<std::uint64_t>(page) << kPointerShift) |
                     (writable ? kDeviceWrite : 0) | static_cast<std::uint64_t>(PageState::kDeviceCoherent)};
  }

  /// `frame`: the staging slot that holds the page while a device has it.
  static PageEntry device_exclusive(VirtAddr frame) {
    return PageEntry{(frame.value << kPointerShift) | static_cast<std::uint64_t>(PageState::kDeviceExclusive)};
  }

  PageState state() const { return static_cast<PageState>(bits_ & kStateMask); }
  bool locked() const { return bits_ & kLocked; }
  bool device_writable() const { return bits_ & kDeviceWrite; }
  bool has_waiters() const { return bits_ & kWaiters; }
  bool poisoned() const { return bits_ & kPoisoned; }
  bool fork_shared() const { return bits_ & kForkShared; }
  DevicePage* device_page() const { return reinterpret_cast<DevicePage*>(bits_ >> kPointerShift); }
  VirtAddr held_frame() const { return VirtAddr{static_cast<std::uintptr_t>(bits_ >> kPointerShift)}; }
  /// Device-private or device-coherent: the entry holds a DevicePage reference.
  bool holds_device_page() const {
    return state() == PageState::kDevicePrivate || state() == PageState::kDeviceCoherent;
  }
  std::uint64_t bits() const { return bits_; }

  PageEntry with(std::uint64_t flag) const { return PageEntry{bits_ | flag}; }
  PageEntry without(std::uint64_t flag) const { return PageEntry{bits_ & ~flag}; }
  /// The entry with lock-time bits (locked, waiters) cleared.
  PageEntry settled() const { return without(kLocked | kWaiters); }

  friend bool operator==(PageEntry a, PageEntry b) { return a.bits_ == b.bits_; }

 private:
  std::uint64_t bits_ = 0;
};

using EntrySlot = std::atomic<std::uint64_t>;

class PageTable {
 public:
  PageTable() = default;
  ~PageTable();
  PageTable(const PageTable&) = delete;
  PageTable& operator=(const PageTable&) = delete;

  /// The slot of `vpn`; nullptr when `create` is false and no leaf exists.
  EntrySlot* slot(Vpn vpn, bool create);
  PageEntry load(Vpn vpn) const;

  /// Bytes of page-table nodes allocated.
  std::size_t bytes() const { return bytes_.load(std::memory_order_relaxed); }

  // Whether the kernel holds a page table under an aligned 2 MiB block of
  // the managed range.  A huge page moves in as one entry only where it
  // does not, so before moving one in uhmm drops the table with a zap
  // (what that costs: docs/migration.md, "Batching").  Where uhmm knows
  // there is none, it skips the zap.  Known only between a huge page's
  // move out of the block (the table goes with it) and the next install;
  // a smaller install in between makes it unknown again, and so does a
  // fault on the block (the kernel's 4 KiB fault path builds a table
  // before it asks uhmm), unless the fault came inside a huge-fault window
  // (AddressSpace::Impl::open_huge_fault_window): there the kernel's
  // huge-page path asks uhmm first and leaves no table.  Wrong "none"
  // costs speed only: the huge page is then split on its way in.
  /// Window epochs start here (below it: 0, unknown; 1, none and no window).
  static constexpr std::uint64_t kFirstHugeFaultWindow = 2;
  /// The block holding `vpn` has no kernel page table (its leaf must
  /// exist).  `huge_fault_window`: the window its region was in when the
  /// block's huge page left (an epoch of AddressSpace::Impl), or 0: none.
  void note_no_kernel_table(Vpn vpn, std::uint64_t huge_fault_window);
  /// Whether the block was known to have no kernel page table; it is no
  /// longer known afterwards (the caller is about to install there).
  bool take_no_kernel_table(Vpn vpn);
  /// A CPU fault on the page `vpn`, while the huge-fault window epoch was
  /// `huge_fault_window` (it never was older than the fault): the block
  /// may have a page table now, unless it left in that same window.
  void note_fault(Vpn vpn, std::uint64_t huge_fault_window);
  /// The blocks touching [first, first + count) may have kernel page tables.
  void note_kernel_table_maybe(Vpn first, std::uint64_t count);

  /// Calls fn(vpn, entry) for every entry that is not an unlocked none entry
  /// (so locked holes are visited too), in order, within [first, first + count).
  template <class Fn>
  void for_each_populated(Vpn first, std::uint64_t count, Fn&& fn) const;

 private:
  static constexpr unsigned kBits = 9;
  static constexpr unsigned kFanout = 1u << kBits;
  static constexpr unsigned kLevels = 4;
  static constexpr std::uint64_t kNoTable = 1;

  struct Node {
    std::atomic<void*> child[kFanout];
  };
  struct Leaf {
    EntrySlot entry[kFanout];
    // note_no_kernel_table: 0, the block may have a kernel page table;
    // kNoTable, it has none; a window epoch (kFirstHugeFaultWindow or
    // more), it has none and faults in that window leave it so.
    std::atomic<std::uint64_t> no_kernel_table;
  };
  static unsigned index_at(Vpn vpn, unsigned level) {
    return static_cast<unsigned>((vpn.value >> (kBits * (kLevels - 1 - level))) & (kFanout - 1));
  }
  void free_node(void* node, unsigned level);
  const Leaf* find_leaf(Vpn vpn) const;

  Leaf* find_leaf(Vpn vpn);
  Node root_{};
  std::atomic<std::size_t> bytes_{0};
};

/// Tries to lock the entry; on success returns true and the entry as it was.
bool try_lock_entry(EntrySlot& slot, PageEntry* before);
/// Unlocks by storing `after` (must not carry kLocked); returns whether a CPU
/// fault was waiting, in which case the caller must wake the page.
[[nodiscard]] bool unlock_entry(EntrySlot& slot, PageEntry after);
/// Replaces a locked entry's value while keeping it locked.
void update_locked_entry(EntrySlot& slot, PageEntry value);
/// Sets kForkShared on an unlocked system entry (a flag, not a transition:
/// nothing waits on it).  A locked entry is left to its holder, whose
/// unlock would overwrite the flag anyway; a page left unmarked that way
/// is caught when UFFDIO_MOVE refuses it (EBUSY), which marks it.
void mark_fork_shared(EntrySlot& slot);

template <class Fn>
void PageTable::for_each_populated(Vpn first, std::uint64_t count, Fn&& fn) const {
  std::uint64_t v = first.value;
  const std::uint64_t end = first.value + count;
  while (v < end) {
    const Leaf* leaf = find_leaf(Vpn{v});
    const std::uint64_t leaf_end = (v | (kFanout - 1)) + 1;
    const std::uint64_t stop = leaf_end < end ? leaf_end : end;
    if (leaf != nullptr) {
      for (std::uint64_t i = v; i < stop; ++i) {
        PageEntry e{leaf->entry[i & (kFanout - 1)].load(std::memory_order_acquire)};
        if (e.state() != PageState::kNone || e.locked()) fn(Vpn{i}, e);
      }
    }
    v = stop;
  }
}

}  // namespace uhmm::mm
