// compat: the program's mappings, as /proc/self/maps lists them, and how the
// dmirror library treats each (docs/adr/0005-dmirror-emulation.md).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "uhmm/status.hpp"

namespace uhmm::compat {

struct Mapping {
  std::uintptr_t start = 0;
  std::uintptr_t end = 0;
  int prot = 0;          // PROT_READ | PROT_WRITE | PROT_EXEC bits
  bool shared = false;   // 's' in the permissions
  bool anonymous = false;  // no file behind it: inode 0 and no name, [heap] or [anon:...]
  std::string name;

  /// Whether uhmm can manage it (AddressSpace::adopt's rules): private,
  /// anonymous, read-write.  The main stack ([stack]) is not.
  bool adoptable() const;
};

/// Parses the text of /proc/<pid>/maps.  Lines that do not parse are skipped.
std::vector<Mapping> parse_maps(std::string_view text);
/// /proc/self/maps, parsed.  EIO if it cannot be read.
Result<std::vector<Mapping>> read_maps();

/// [start, end) of a command's range that lies inside one mapping, or in
/// no mapping at all (mapping == nullptr).
struct Piece {
  std::uintptr_t start = 0;
  std::uintptr_t end = 0;
  const Mapping* mapping = nullptr;
};
/// Splits [start, end) by `maps` (sorted, as the kernel lists them).
std::vector<Piece> split_range(const std::vector<Mapping>& maps, std::uintptr_t start, std::uintptr_t end);

}  // namespace uhmm::compat
