#include "size.hpp"

#include <fmt/format.h>

#include <cctype>
#include <cmath>

namespace uhmm::tool {

std::optional<std::uint64_t> parse_size(std::string_view text) {
  std::size_t i = 0;
  while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) ++i;
  const std::size_t num_start = i;
  long double integer = 0;
  bool digits = false;
  while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) {
    integer = integer * 10 + (text[i] - '0');
    digits = true;
    ++i;
  }
  long double fraction = 0, scale = 1;
  if (i < text.size() && text[i] == '.') {
    ++i;
    while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) {
      scale /= 10;
      fraction += (text[i] - '0') * scale;
      digits = true;
      ++i;
    }
  }
  if (!digits || i == num_start) return std::nullopt;
  while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) ++i;
  std::string unit;
  for (; i < text.size(); ++i) {
    if (std::isspace(static_cast<unsigned char>(text[i]))) break;
    unit += static_cast<char>(std::tolower(static_cast<unsigned char>(text[i])));
  }
  while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) ++i;
  if (i != text.size()) return std::nullopt;

  long double mult = 0;
  if (unit.empty() || unit == "b") mult = 1;
  else if (unit == "k" || unit == "ki" || unit == "kib") mult = 1024.0L;
  else if (unit == "m" || unit == "mi" || unit == "mib") mult = 1024.0L * 1024;
  else if (unit == "g" || unit == "gi" || unit == "gib") mult = 1024.0L * 1024 * 1024;
  else if (unit == "t" || unit == "ti" || unit == "tib") mult = 1024.0L * 1024 * 1024 * 1024;
  else if (unit == "kb") mult = 1e3L;
  else if (unit == "mb") mult = 1e6L;
  else if (unit == "gb") mult = 1e9L;
  else if (unit == "tb") mult = 1e12L;
  else return std::nullopt;

  const long double bytes = (integer + fraction) * mult;
  if (bytes > 1.8e19L) return std::nullopt;
  const long double rounded = std::floor(bytes);
  if (rounded != bytes) return std::nullopt;  // a fraction of a byte
  return static_cast<std::uint64_t>(rounded);
}

std::string format_size(std::uint64_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  unsigned u = 0;
  while (v >= 1024 && u + 1 < std::size(kUnits)) {
    v /= 1024;
    ++u;
  }
  if (u == 0) return fmt::format("{} B", bytes);
  return fmt::format("{:.{}f} {}", v, v < 10 ? 2 : (v < 100 ? 1 : 0), kUnits[u]);
}

}  // namespace uhmm::tool
