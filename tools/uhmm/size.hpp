// tools/uhmm: byte sizes on the command line ("1GiB", "16MiB", "4096") and
// in human-readable output.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace uhmm::tool {

/// Parses "<number>[unit]" where number may have a fraction ("1.5GiB") and
/// unit is B, K/KiB, M/MiB, G/GiB, T/TiB (powers of 1024, case-insensitive)
/// or KB/MB/GB/TB (powers of 1000).  nullopt when malformed or too large.
std::optional<std::uint64_t> parse_size(std::string_view text);

/// "1.00 GiB", "16.0 MiB", "512 B".
std::string format_size(std::uint64_t bytes);

}  // namespace uhmm::tool
