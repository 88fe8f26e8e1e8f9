// compat: splitting a command's range by the program's mappings (maps.hpp).
#include "compat/maps.hpp"


#include <algorithm>
#include <cerrno>
#include <charconv>

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

Result<std::string> smaps_vm_flags(std::uintptr_t start) {
  auto text = platform::read_proc_text("/proc/self/smaps");
  if (!text) return text.status();
  // Entries start with "start-end perms ..."; the VmFlags line ends each.
  bool ours = false;
  std::string_view rest = *text;
  while (!rest.empty()) {
    const auto nl = rest.find('\n');
    const std::string_view line = rest.substr(0, nl);
    rest.remove_prefix(nl == std::string_view::npos ? rest.size() : nl + 1);
    const auto dash = line.find('-');
    const auto space = line.find(' ');
    if (dash != std::string_view::npos && space != std::string_view::npos && dash < space) {
      std::uintptr_t s = 0;
      const auto r = std::from_chars(line.data(), line.data() + dash, s, 16);
      if (r.ec == std::errc{} && r.ptr == line.data() + dash) {
        ours = s == start;
        continue;
      }
    }
    constexpr std::string_view kKey = "VmFlags:";
    if (ours && line.substr(0, kKey.size()) == kKey) return std::string(line.substr(kKey.size()));
  }
  return Status::error(ENOENT, "no mapping starts there");
}

namespace {
bool has_vm_flag(std::string_view flags, std::string_view mnemonic) {
  for (std::size_t i = 0; i < flags.size();) {
    const std::size_t b = flags.find_first_not_of(' ', i);
    if (b == std::string_view::npos) break;
    const std::size_t e = std::min(flags.find(' ', b), flags.size());
    if (flags.substr(b, e - b) == mnemonic) return true;
    i = e;
  }
  return false;
}
}  // namespace

bool migrate_vma_refuses(std::uintptr_t start) {
  auto flags = smaps_vm_flags(start);
  return flags && (has_vm_flag(*flags, "ht") || has_vm_flag(*flags, "io") || has_vm_flag(*flags, "pf"));
}

bool is_hugetlb(std::uintptr_t start) {
  auto flags = smaps_vm_flags(start);
  return flags && has_vm_flag(*flags, "ht");
}

}  // namespace uhmm::compat
