// devices/sim/free_pages.cpp: the bitmap of one chunk's free device pages.
#include "devices/sim/free_pages.hpp"

#include <algorithm>
#include <bit>

#include "core/assert.hpp"

namespace uhmm::sim {

FreePages::FreePages(std::uint64_t pages)
    : pages_(pages), bits_(std::make_unique<std::atomic<std::uint64_t>[]>(words())), free_(pages) {
  for (std::uint64_t w = 0; w < words(); ++w) {
    const std::uint64_t in_word = std::min(kBits, pages_ - w * kBits);
    bits_[w].store(in_word == kBits ? ~std::uint64_t{0} : (std::uint64_t{1} << in_word) - 1,
                   std::memory_order_relaxed);
  }
}

void FreePages::release(std::uint64_t index) {
  UHMM_DCHECK(index < pages_, "release of a page past the chunk");
  const std::uint64_t bit = std::uint64_t{1} << (index % kBits);
  // Release: the page's reset (DevicePagemap::page_became_free) happens
  // before a taker that sees the bit hands the page out again.
  const std::uint64_t before = bits_[index / kBits].fetch_or(bit, std::memory_order_acq_rel);
  UHMM_DCHECK(!(before & bit), "device page freed twice");
  if (before & bit) return;  // counted once: the books stay right
  free_.fetch_add(1, std::memory_order_acq_rel);
  lower_hint(index / kBits);
}

void FreePages::lower_hint(std::uint64_t word) {
  std::uint64_t hint = low_word_.load(std::memory_order_relaxed);
  while (word < hint && !low_word_.compare_exchange_weak(hint, word, std::memory_order_relaxed)) {
  }
}

std::optional<std::uint64_t> FreePages::take_one() {
  if (free_count() == 0) return std::nullopt;
  const std::uint64_t hint = low_word_.load(std::memory_order_relaxed);
  std::optional<std::uint64_t> found = find_one(hint);
  if (!found && hint != 0) found = find_one(0);
  return found;
}

std::optional<std::uint64_t> FreePages::find_one(std::uint64_t from_word) {
  for (std::uint64_t w = from_word; w < words(); ++w) {
    const std::uint64_t set = bits_[w].load(std::memory_order_acquire);
    if (set == 0) continue;
    const std::uint64_t bit = std::uint64_t{1} << std::countr_zero(set);
    bits_[w].fetch_and(~bit, std::memory_order_acq_rel);
    free_.fetch_sub(1, std::memory_order_acq_rel);
    // Only moves up when nobody lowered it meanwhile (a release below).
    std::uint64_t seen = from_word;
    (void)low_word_.compare_exchange_strong(seen, w, std::memory_order_relaxed);
    return w * kBits + static_cast<std::uint64_t>(std::countr_zero(set));
  }
  return std::nullopt;
}

std::optional<std::uint64_t> FreePages::take_run(std::uint64_t phase) {
  UHMM_DCHECK(phase < kRun && phase % kBits == 0, "a run's phase is a multiple of 64 below 512");
  if (phase >= kRun || phase % kBits != 0 || free_count() < kRun) return std::nullopt;
  const std::uint64_t hint = low_word_.load(std::memory_order_relaxed);
  std::optional<std::uint64_t> found = find_run(hint, phase);
  if (!found && hint != 0) found = find_run(0, phase);
  return found;
}

std::optional<std::uint64_t> FreePages::find_run(std::uint64_t from_word, std::uint64_t phase) {
  constexpr std::uint64_t kWordsPerRun = kRun / kBits;
  const std::uint64_t phase_words = phase / kBits;
  // The first run that starts at or after from_word: one that starts below
  // it holds pages below the hint, which are in use.
  std::uint64_t w = phase_words;
  if (from_word > w) w += (from_word - w + kWordsPerRun - 1) / kWordsPerRun * kWordsPerRun;
  for (; (w + kWordsPerRun) * kBits <= pages_; w += kWordsPerRun) {
    bool all = true;
    for (std::uint64_t k = 0; k < kWordsPerRun && all; ++k)
      all = bits_[w + k].load(std::memory_order_acquire) == ~std::uint64_t{0};
    if (!all) continue;
    // No release touches these words: every page in them is free.
    for (std::uint64_t k = 0; k < kWordsPerRun; ++k) bits_[w + k].store(0, std::memory_order_relaxed);
    free_.fetch_sub(kRun, std::memory_order_acq_rel);
    return w * kBits;
  }
  return std::nullopt;
}

}  // namespace uhmm::sim
