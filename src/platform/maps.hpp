// platform: the process's mappings, as /proc/self/maps lists them.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "uhmm/status.hpp"
#include "uhmm/types.hpp"

namespace uhmm::platform {

struct Mapping {
  std::uintptr_t start = 0;
  std::uintptr_t end = 0;
  int prot = 0;          // PROT_READ | PROT_WRITE | PROT_EXEC bits
  bool shared = false;   // 's' in the permissions
  bool anonymous = false;  // no file behind it: inode 0 and no name, [heap], [stack] or [anon:...]
  std::string name;

  /// Private anonymous memory other than the main stack: what uhmm can
  /// manage (AddressSpace::adopt also wants it read-write).
  bool private_anonymous() const { return !shared && anonymous && name != "[stack]"; }
  /// Whether AddressSpace::adopt accepts it: private anonymous, read-write.
  bool adoptable() const;
};

/// Parses the text of /proc/<pid>/maps.  Lines that do not parse are skipped.
std::vector<Mapping> parse_maps(std::string_view text);
/// The whole text of a /proc file, read with plain syscalls (no stdio,
/// nothing a preload library interposes).  EIO if it cannot be read.
Result<std::string> read_proc_text(const char* path);
/// /proc/self/maps, parsed.  EIO if it cannot be read.
Result<std::vector<Mapping>> read_maps();
/// The mapping holding `addr`, if any (nullopt also when the maps cannot be read).
std::optional<Mapping> mapping_at(VirtAddr addr);

/// From the text of /proc/<pid>/smaps: whether the mapping holding `addr`
/// lists `flag` (two letters, e.g. "nh" for MADV_NOHUGEPAGE) in its
/// VmFlags.  nullopt if no mapping holds `addr` or it has no VmFlags line.
std::optional<bool> smaps_has_flag(std::string_view smaps, std::uintptr_t addr, std::string_view flag);
/// The same for this process, from /proc/self/smaps (nullopt also when it
/// cannot be read).
std::optional<bool> mapping_has_flag(VirtAddr addr, std::string_view flag);

}  // namespace uhmm::platform
