#include "mm/page_table.hpp"

#include <cstdlib>
#include <new>

#include "core/assert.hpp"

namespace uhmm::mm {

PageTable::~PageTable() {
  for (unsigned i = 0; i < kFanout; ++i) {
    if (void* c = root_.child[i].load(std::memory_order_relaxed)) free_node(c, 1);
  }
}

void PageTable::free_node(void* node, unsigned level) {
  if (level < kLevels - 1) {
    auto* n = static_cast<Node*>(node);
    for (unsigned i = 0; i < kFanout; ++i) {
      if (void* c = n->child[i].load(std::memory_order_relaxed)) free_node(c, level + 1);
    }
  }
  std::free(node);
}

EntrySlot* PageTable::slot(Vpn vpn, bool create) {
  Node* node = &root_;
  for (unsigned level = 0; level < kLevels - 1; ++level) {
    std::atomic<void*>& ref = node->child[index_at(vpn, level)];
    void* child = ref.load(std::memory_order_acquire);
    if (child == nullptr) {
      if (!create) return nullptr;
      // Zeroed memory is a valid Node and a valid Leaf (all entries none).
      const std::size_t size = level == kLevels - 2 ? sizeof(Leaf) : sizeof(Node);
      void* fresh = std::calloc(1, size);
      UHMM_CHECK(fresh != nullptr, "out of memory for page-table nodes");
      if (ref.compare_exchange_strong(child, fresh, std::memory_order_acq_rel)) {
        child = fresh;
        bytes_.fetch_add(size, std::memory_order_relaxed);
      } else {
        std::free(fresh);  // another thread won; `child` holds its node
      }
    }
    if (level == kLevels - 2) return &static_cast<Leaf*>(child)->entry[index_at(vpn, kLevels - 1)];
    node = static_cast<Node*>(child);
  }
  return nullptr;  // unreachable
}

const PageTable::Leaf* PageTable::find_leaf(Vpn vpn) const {
  const Node* node = &root_;
  for (unsigned level = 0; level < kLevels - 1; ++level) {
    void* child = node->child[index_at(vpn, level)].load(std::memory_order_acquire);
    if (child == nullptr) return nullptr;
    if (level == kLevels - 2) return static_cast<const Leaf*>(child);
    node = static_cast<const Node*>(child);
  }
  return nullptr;
}

PageTable::Leaf* PageTable::find_leaf(Vpn vpn) {
  return const_cast<Leaf*>(static_cast<const PageTable*>(this)->find_leaf(vpn));
}

void PageTable::note_no_kernel_table(Vpn vpn, std::uint64_t huge_fault_window) {
  Leaf* leaf = find_leaf(vpn);
  UHMM_DCHECK(leaf != nullptr, "note_no_kernel_table for a block uhmm never saw");
  UHMM_DCHECK(huge_fault_window == 0 || huge_fault_window >= kFirstHugeFaultWindow, "not a window epoch");
  if (leaf != nullptr)
    leaf->no_kernel_table.store(huge_fault_window != 0 ? huge_fault_window : kNoTable, std::memory_order_release);
}

bool PageTable::take_no_kernel_table(Vpn vpn) {
  Leaf* leaf = find_leaf(vpn);
  return leaf != nullptr && leaf->no_kernel_table.exchange(0, std::memory_order_acq_rel) != 0;
}

void PageTable::note_fault(Vpn vpn, std::uint64_t huge_fault_window) {
  Leaf* leaf = find_leaf(vpn);
  if (leaf == nullptr) return;
  const std::uint64_t known = leaf->no_kernel_table.load(std::memory_order_acquire);
  if (known == 0 || (known >= kFirstHugeFaultWindow && known == huge_fault_window)) return;
  leaf->no_kernel_table.store(0, std::memory_order_release);
}

void PageTable::note_kernel_table_maybe(Vpn first, std::uint64_t count) {
  for (std::uint64_t v = first.value & ~std::uint64_t{kFanout - 1}; v < first.value + count; v += kFanout) {
    if (Leaf* leaf = find_leaf(Vpn{v})) leaf->no_kernel_table.store(0, std::memory_order_release);
  }
}

PageEntry PageTable::load(Vpn vpn) const {
  const Leaf* leaf = find_leaf(vpn);
  if (leaf == nullptr) return PageEntry::none();
  return PageEntry{leaf->entry[index_at(vpn, kLevels - 1)].load(std::memory_order_acquire)};
}

bool try_lock_entry(EntrySlot& slot, PageEntry* before) {
  std::uint64_t cur = slot.load(std::memory_order_acquire);
  while (!(cur & PageEntry::kLocked)) {
    if (slot.compare_exchange_weak(cur, cur | PageEntry::kLocked, std::memory_order_acq_rel)) {
      *before = PageEntry{cur};
      return true;
    }
  }
  return false;
}

bool unlock_entry(EntrySlot& slot, PageEntry after) {
  UHMM_DCHECK(!after.locked(), "unlock_entry with a locked value");
  const std::uint64_t old = slot.exchange(after.without(PageEntry::kWaiters).bits(), std::memory_order_acq_rel);
  UHMM_DCHECK(old & PageEntry::kLocked, "unlock_entry on an unlocked entry");
  return old & PageEntry::kWaiters;
}

void update_locked_entry(EntrySlot& slot, PageEntry value) {
  std::uint64_t cur = slot.load(std::memory_order_acquire);
  for (;;) {
    UHMM_DCHECK(cur & PageEntry::kLocked, "update_locked_entry on an unlocked entry");
    const std::uint64_t next = value.bits() | PageEntry::kLocked | (cur & PageEntry::kWaiters);
    if (slot.compare_exchange_weak(cur, next, std::memory_order_acq_rel)) return;
  }
}

void mark_fork_shared(EntrySlot& slot) {
  std::uint64_t cur = slot.load(std::memory_order_acquire);
  for (;;) {
    const PageEntry e{cur};
    if (e.state() != PageState::kSystem || e.locked() || e.fork_shared()) return;
    if (slot.compare_exchange_weak(cur, cur | PageEntry::kForkShared, std::memory_order_acq_rel)) return;
  }
}

}  // namespace uhmm::mm
