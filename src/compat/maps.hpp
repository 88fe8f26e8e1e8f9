// compat: the program's mappings, as /proc/self/maps lists them, and how the
// dmirror library treats each (docs/adr/0005-dmirror-emulation.md).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "platform/maps.hpp"
#include "uhmm/status.hpp"

namespace uhmm::compat {

// The parsing is the platform layer's (platform/maps.hpp).
using platform::Mapping;
using platform::parse_maps;
using platform::read_maps;

/// [start, end) of a command's range that lies inside one mapping, or in
/// no mapping at all (mapping == nullptr).
struct Piece {
  std::uintptr_t start = 0;
  std::uintptr_t end = 0;
  const Mapping* mapping = nullptr;
};
/// Splits [start, end) by `maps` (sorted, as the kernel lists them).
std::vector<Piece> split_range(const std::vector<Mapping>& maps, std::uintptr_t start, std::uintptr_t end);

/// The "VmFlags:" field of /proc/self/smaps for the mapping starting at
/// `start` (two-letter codes separated by spaces; proc(5)).  ENOENT if no
/// mapping starts there, EIO if smaps cannot be read.
Result<std::string> smaps_vm_flags(std::uintptr_t start);
/// Whether the mapping starting at `start` is one the kernel's migrate_vma
/// refuses outright (EINVAL): hugetlb, I/O or pure-PFN.  False when smaps
/// cannot tell.
bool migrate_vma_refuses(std::uintptr_t start);
/// Whether the mapping starting at `start` is hugetlb.
bool is_hugetlb(std::uintptr_t start);

}  // namespace uhmm::compat
