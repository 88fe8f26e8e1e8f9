// tools/uhmm: `uhmm demo`, a buffer's round trip through the simulated device.
#pragma once

#include <cstdint>
#include <optional>

namespace uhmm::tool {

struct DemoOptions {
  std::uint64_t size = std::uint64_t{1} << 30;  // bytes of managed memory
  std::uint64_t device_memory = 0;               // 0: size plus slack
  unsigned dma_threads = 2;
  unsigned fault_threads = 0;  // 0: one per CPU
  bool json = false;
  bool progress = true;
  /// Testing aid: flip one word on the device (at this byte offset) after
  /// the kernel, so verification must fail.
  std::optional<std::uint64_t> corrupt_offset;
};

/// Exit codes: 0 verified, 1 data mismatch, 2 error (bad option or a
/// library call failed; one line on stderr).
inline constexpr int kExitOk = 0;
inline constexpr int kExitMismatch = 1;
inline constexpr int kExitError = 2;

/// Slack added to --size when --device-memory is not given.
inline constexpr std::uint64_t kDeviceSlack = std::uint64_t{64} << 20;

int run_demo(const DemoOptions& options);

}  // namespace uhmm::tool
