// core: a set of integers (page numbers, offsets) kept as disjoint runs:
// one node per stretch, not per member.  Users: the dmirror library's clean
// pages of converted private file mappings and the bounce arena's free
// space.  (The sim device's free pages are a bitmap, devices/sim/free_pages.hpp:
// they are freed one page at a time on the migration's critical path.)
//
// Concurrency: none; the owner locks.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <utility>
#include <vector>

namespace uhmm {

class RunSet {
 public:
  using Run = std::pair<std::uint64_t, std::uint64_t>;  // [first, end)

  /// Adds [first, end) (empty: nothing).
  void add(std::uint64_t first, std::uint64_t end);
  /// Removes [first, end) (empty: nothing).
  void erase(std::uint64_t first, std::uint64_t end);
  bool contains(std::uint64_t value) const;
  /// Removes and returns the start of `len` members in a row from the
  /// lowest run long enough (first fit); nullopt when no run is.
  std::optional<std::uint64_t> take_first_fit(std::uint64_t len);
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

}  // namespace uhmm
