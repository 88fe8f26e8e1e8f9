// core: run sets (run_set.hpp).
#include "core/run_set.hpp"

#include <algorithm>

namespace uhmm {

void RunSet::add(std::uint64_t first, std::uint64_t end) {
  if (first >= end) return;
  // Members come back one by one and in order (a device freeing the pages
  // of a large page): growing the run before them in place allocates
  // nothing, where replacing it would free one node and allocate another.
  auto it = runs_.upper_bound(first);
  if (it != runs_.begin() && std::prev(it)->second >= first) {
    const auto grown = std::prev(it);
    grown->second = std::max(grown->second, end);
    // Swallow the runs the grown one now overlaps or touches.
    while (it != runs_.end() && it->first <= grown->second) {
      grown->second = std::max(grown->second, it->second);
      it = runs_.erase(it);
    }
    return;
  }
  // Swallow the runs it overlaps or touches after it.
  while (it != runs_.end() && it->first <= end) {
    end = std::max(end, it->second);
    it = runs_.erase(it);
  }
  runs_.emplace_hint(it, first, end);
}

void RunSet::erase(std::uint64_t first, std::uint64_t end) {
  if (first >= end) return;
  auto it = runs_.upper_bound(first);
  if (it != runs_.begin() && std::prev(it)->second > first) --it;
  while (it != runs_.end() && it->first < end) {
    const auto [f, e] = *it;
    it = runs_.erase(it);
    if (f < first) runs_.emplace(f, first);
    if (e > end) runs_.emplace(end, e);
  }
}

bool RunSet::contains(std::uint64_t value) const {
  auto it = runs_.upper_bound(value);
  return it != runs_.begin() && std::prev(it)->second > value;
}

std::optional<std::uint64_t> RunSet::take_first_fit(std::uint64_t len) {
  if (len == 0) return std::nullopt;
  for (auto it = runs_.begin(); it != runs_.end(); ++it) {
    const auto [first, end] = *it;
    if (end - first < len) continue;
    runs_.erase(it);
    if (end - first > len) runs_.emplace(first + len, end);
    return first;
  }
  return std::nullopt;
}

std::vector<RunSet::Run> RunSet::inside(std::uint64_t first, std::uint64_t end) const {
  std::vector<Run> out;
  if (first >= end) return out;
  auto it = runs_.upper_bound(first);
  if (it != runs_.begin() && std::prev(it)->second > first) --it;
  for (; it != runs_.end() && it->first < end; ++it) out.emplace_back(std::max(first, it->first), std::min(end, it->second));
  return out;
}

std::vector<RunSet::Run> RunSet::outside(std::uint64_t first, std::uint64_t end) const {
  std::vector<Run> out;
  std::uint64_t p = first;
  for (const auto& [f, e] : inside(first, end)) {
    if (p < f) out.emplace_back(p, f);
    p = e;
  }
  if (p < end) out.emplace_back(p, end);
  return out;
}

bool RunSet::check_invariants() const {
  std::uint64_t prev_end = 0;
  bool first_run = true;
  for (const auto& [f, e] : runs_) {
    if (f >= e) return false;
    if (!first_run && f <= prev_end) return false;  // overlapping or touching
    prev_end = e;
    first_run = false;
  }
  return true;
}

}  // namespace uhmm
