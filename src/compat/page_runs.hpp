// compat: a set of virtual page numbers kept as disjoint runs.
//
// The dmirror library remembers with it which pages of a converted private
// file mapping were still clean file pages (docs/adr/0005-dmirror-emulation.md,
// "Private file mappings"): a mapping of many pages costs one run per
// stretch of clean pages, not one node per page.
//
// Concurrency: none; the owner locks.
#pragma once

#include <cstdint>
#include <map>
#include <utility>
#include <vector>

namespace uhmm::compat {

class PageRuns {
 public:
  using Run = std::pair<std::uint64_t, std::uint64_t>;  // [first, end)

  /// Adds [first, end) (empty: nothing).
  void add(std::uint64_t first, std::uint64_t end);
  /// Removes [first, end) (empty: nothing).
  void erase(std::uint64_t first, std::uint64_t end);
  bool contains(std::uint64_t vpn) const;
  bool empty() const { return runs_.empty(); }
  /// The parts of [first, end) inside the set, in order.
  std::vector<Run> inside(std::uint64_t first, std::uint64_t end) const;
  /// The parts of [first, end) outside the set, in order.
  std::vector<Run> outside(std::uint64_t first, std::uint64_t end) const;
  /// Every run, in order.
  std::vector<Run> runs() const { return {runs_.begin(), runs_.end()}; }
  /// Runs are non-empty, disjoint and never touch (touching ones merge).
  bool check_invariants() const;

 private:
  std::map<std::uint64_t, std::uint64_t> runs_;  // first -> end
};

}  // namespace uhmm::compat
