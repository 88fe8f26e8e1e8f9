// platform: /proc/self/maps (maps.hpp).
#include "platform/maps.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdio>

namespace uhmm::platform {

bool Mapping::adoptable() const {
  return !shared && anonymous && prot == (PROT_READ | PROT_WRITE) && name != "[stack]";
}

namespace {

bool parse_hex(std::string_view s, std::uintptr_t* out) {
  const auto r = std::from_chars(s.data(), s.data() + s.size(), *out, 16);
  return r.ec == std::errc{} && r.ptr == s.data() + s.size();
}

// Splits off the next space-separated field.
std::string_view next_field(std::string_view& line) {
  const auto b = line.find_first_not_of(' ');
  if (b == std::string_view::npos) {
    line = {};
    return {};
  }
  line.remove_prefix(b);
  const auto e = line.find(' ');
  std::string_view f = line.substr(0, e);
  line.remove_prefix(e == std::string_view::npos ? line.size() : e);
  return f;
}

// Splits off the next line (without its newline).
std::string_view next_line(std::string_view& text) {
  const auto nl = text.find('\n');
  const std::string_view line = text.substr(0, nl);
  text.remove_prefix(nl == std::string_view::npos ? text.size() : nl + 1);
  return line;
}

// "lo-hi", both hexadecimal, as a mapping's header starts.
bool parse_range(std::string_view range, std::uintptr_t* lo, std::uintptr_t* hi) {
  const auto dash = range.find('-');
  return dash != std::string_view::npos && parse_hex(range.substr(0, dash), lo) && parse_hex(range.substr(dash + 1), hi);
}

}  // namespace

std::vector<Mapping> parse_maps(std::string_view text) {
  std::vector<Mapping> out;
  while (!text.empty()) {
    std::string_view line = next_line(text);
    const std::string_view range = next_field(line), perms = next_field(line);
    next_field(line);  // offset
    next_field(line);  // device
    const std::string_view inode = next_field(line);
    Mapping m;
    if (perms.size() < 4 || inode.empty() || !parse_range(range, &m.start, &m.end) || m.end <= m.start) continue;
    const auto b = line.find_first_not_of(' ');
    m.name = b == std::string_view::npos ? std::string() : std::string(line.substr(b));
    m.prot = (perms[0] == 'r' ? PROT_READ : 0) | (perms[1] == 'w' ? PROT_WRITE : 0) | (perms[2] == 'x' ? PROT_EXEC : 0);
    m.shared = perms[3] == 's';
    m.anonymous = inode == "0" && (m.name.empty() || m.name == "[heap]" || m.name == "[stack]" ||
                                   m.name.rfind("[anon:", 0) == 0);
    out.push_back(std::move(m));
  }
  return out;
}

Result<std::string> read_proc_text(const char* path) {
  // Read with plain syscalls: no stdio buffers, and nothing interposed.
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::error(EIO, std::string("cannot open ") + path);
  std::string text;
  char buf[16384];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      ::close(fd);
      return Status::error(EIO, std::string("cannot read ") + path);
    }
    if (n == 0) break;
    text.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fd);
  return text;
}

Result<std::vector<Mapping>> read_maps() {
  auto text = read_proc_text("/proc/self/maps");
  if (!text) return text.status();
  return parse_maps(*text);
}

std::optional<Mapping> mapping_at(VirtAddr addr) {
  auto maps = read_maps();
  if (!maps.is_ok()) return std::nullopt;
  for (Mapping& m : *maps)
    if (addr.value >= m.start && addr.value < m.end) return std::move(m);
  return std::nullopt;
}

std::optional<bool> smaps_has_flag(std::string_view smaps, std::uintptr_t addr, std::string_view flag) {
  bool inside = false;
  while (!smaps.empty()) {
    // A mapping's header starts with its range; the lines after it are
    // "Key: value" fields, whose first word ends with ':'.
    std::string_view rest = next_line(smaps);
    const std::string_view first = next_field(rest);
    if (first.empty()) continue;
    if (first.back() != ':') {
      std::uintptr_t lo = 0, hi = 0;
      if (!parse_range(first, &lo, &hi)) continue;
      if (inside) return std::nullopt;  // the mapping ended without VmFlags
      inside = addr >= lo && addr < hi;
      continue;
    }
    if (!inside || first != "VmFlags:") continue;
    for (std::string_view f = next_field(rest); !f.empty(); f = next_field(rest))
      if (f == flag) return true;
    return false;
  }
  return std::nullopt;
}

std::optional<bool> mapping_has_flag(VirtAddr addr, std::string_view flag) {
  auto text = read_proc_text("/proc/self/smaps");
  if (!text.is_ok()) return std::nullopt;
  return smaps_has_flag(*text, addr.value, flag);
}

}  // namespace uhmm::platform
