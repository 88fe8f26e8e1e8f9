// compat: splitting a command's range by the program's mappings (maps.hpp).
#include "compat/maps.hpp"

#include <algorithm>

namespace uhmm::compat {

std::vector<Piece> split_range(const std::vector<Mapping>& maps, std::uintptr_t start, std::uintptr_t end) {
  std::vector<Piece> out;
  std::uintptr_t cur = start;
  auto it = std::upper_bound(maps.begin(), maps.end(), start,
                             [](std::uintptr_t a, const Mapping& m) { return a < m.end; });
  while (cur < end) {
    if (it == maps.end() || it->start >= end) {
      out.push_back(Piece{cur, end, nullptr});
      break;
    }
    if (it->start > cur) {
      out.push_back(Piece{cur, it->start, nullptr});
      cur = it->start;
    }
    const std::uintptr_t e = std::min(it->end, end);
    out.push_back(Piece{cur, e, &*it});
    cur = e;
    ++it;
  }
  return out;
}

}  // namespace uhmm::compat
