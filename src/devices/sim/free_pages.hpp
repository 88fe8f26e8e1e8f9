// devices/sim/free_pages.hpp: which pages of one chunk of device memory are
// free, as one bit a page.
//
// A migration back to the CPU frees every device page it empties, one
// page_free call per 4 KiB page, on the migrating thread's critical path:
// 512 per 2 MiB moved.  So freeing takes no lock: it sets the page's bit and
// counts it.  Taking pages is rarer (once per 2 MiB with large pages) and
// callers do it one at a time (the sim's free-list mutex), which is what
// lets a taker claim a bit it saw set without a compare-and-swap loop:
// nobody else clears bits, and a concurrent release sets only the bit of a
// page in use, never one the taker looks at.
//
// Pages go lowest first (first fit), so that a batch gets contiguous device
// memory and its copies coalesce.  `low_word_` is a hint: no free page below
// it, except one released while a taker moved the hint past it.  Such a page
// is found again when a release lowers the hint, or when a search from the
// hint fails and searches again from the start; the hint only saves time.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>

namespace uhmm::sim {

class FreePages {
 public:
  /// `pages` pages, all free.
  explicit FreePages(std::uint64_t pages);
  FreePages(const FreePages&) = delete;
  FreePages& operator=(const FreePages&) = delete;

  std::uint64_t pages() const { return pages_; }
  std::uint64_t free_count() const { return free_.load(std::memory_order_acquire); }

  /// Page `index` (in use) is free again.  Any thread, no lock.
  void release(std::uint64_t index);

  // Takers: one at a time (the caller serializes them).

  /// The lowest free page, now in use; nullopt when none is free.
  std::optional<std::uint64_t> take_one();
  /// The lowest `kRun` free pages in a row starting at an index that is
  /// `phase` more than a multiple of kRun (`phase` < kRun, a multiple of 64),
  /// now in use; nullopt when there is no such run.
  static constexpr std::uint64_t kRun = 512;
  std::optional<std::uint64_t> take_run(std::uint64_t phase);

 private:
  static constexpr std::uint64_t kBits = 64;
  std::uint64_t words() const { return (pages_ + kBits - 1) / kBits; }
  std::optional<std::uint64_t> find_one(std::uint64_t from_word);
  std::optional<std::uint64_t> find_run(std::uint64_t from_word, std::uint64_t phase);
  void lower_hint(std::uint64_t word);

  std::uint64_t pages_;
  std::unique_ptr<std::atomic<std::uint64_t>[]> bits_;  // bit set: the page is free
  std::atomic<std::uint64_t> free_;
  std::atomic<std::uint64_t> low_word_{0};
};

}  // namespace uhmm::sim
