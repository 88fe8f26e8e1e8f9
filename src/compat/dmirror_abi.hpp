// compat: the ABI of the kernel's HMM test device (/dev/hmm_dmirror*), as
// the dmirror preload library speaks it.  Our own definitions, with the
// values of /work/shared/docs/dmirror-abi.md (x86-64); the library's design:
// docs/adr/0005-dmirror-emulation.md.
#pragma once

#include <sys/ioctl.h>

#include <cstddef>
#include <cstdint>

namespace uhmm::compat {

/// The one argument of every command (40 bytes, all fields unsigned 64-bit).
struct DmirrorCmd {
  std::uint64_t addr;    // in: first virtual address, page aligned
  std::uint64_t ptr;     // in: the caller's buffer (npages pages, or npages bytes for SNAPSHOT)
  std::uint64_t npages;  // in: page count (FLAGS: the flags value)
  std::uint64_t cpages;  // out: pages processed
  std::uint64_t faults;  // out: device fault rounds (READ/WRITE)
};
static_assert(sizeof(DmirrorCmd) == 40);
static_assert(offsetof(DmirrorCmd, addr) == 0 && offsetof(DmirrorCmd, ptr) == 8 &&
              offsetof(DmirrorCmd, npages) == 16 && offsetof(DmirrorCmd, cpages) == 24 &&
              offsetof(DmirrorCmd, faults) == 32);

/// Command numbers (the `nr` of _IOWR('H', nr, DmirrorCmd)).
enum class DmirrorOp : unsigned {
  kRead = 0x00,
  kWrite = 0x01,
  kMigrateToDev = 0x02,
  kMigrateToSys = 0x03,
  kSnapshot = 0x04,
  kExclusive = 0x05,
  kCheckExclusive = 0x06,
  kRelease = 0x07,
  kFlags = 0x08,
};
inline constexpr unsigned kDmirrorOpCount = 9;

constexpr unsigned long dmirror_request(DmirrorOp op) {
  return _IOWR('H', static_cast<unsigned>(op), DmirrorCmd);
}
static_assert(dmirror_request(DmirrorOp::kRead) == 0xC0284800UL);
static_assert(dmirror_request(DmirrorOp::kWrite) == 0xC0284801UL);
static_assert(dmirror_request(DmirrorOp::kMigrateToDev) == 0xC0284802UL);
static_assert(dmirror_request(DmirrorOp::kMigrateToSys) == 0xC0284803UL);
static_assert(dmirror_request(DmirrorOp::kSnapshot) == 0xC0284804UL);
static_assert(dmirror_request(DmirrorOp::kExclusive) == 0xC0284805UL);
static_assert(dmirror_request(DmirrorOp::kCheckExclusive) == 0xC0284806UL);
static_assert(dmirror_request(DmirrorOp::kRelease) == 0xC0284807UL);
static_assert(dmirror_request(DmirrorOp::kFlags) == 0xC0284808UL);

/// FLAGS bit: the next destination allocation fails once.
inline constexpr std::uint64_t kDmirrorFlagFailAlloc = 1u << 0;

/// MIGRATE_TO_DEV moves at most this many pages per step.
inline constexpr std::uint64_t kMigrateStepPages = 512;
/// READ and WRITE fault pages in chunks of this many.
inline constexpr std::uint64_t kFaultChunkPages = 32;

/// SNAPSHOT: one byte per page.  A base value, ORed with an access bit and a size bit.
namespace snapshot {
inline constexpr std::uint8_t kError = 0xFF;  // no mapping, PROT_NONE, special mapping
inline constexpr std::uint8_t kNone = 0x00;
inline constexpr std::uint8_t kZero = 0x10;
inline constexpr std::uint8_t kDevPrivateLocal = 0x20;
inline constexpr std::uint8_t kDevPrivateRemote = 0x30;
inline constexpr std::uint8_t kDevCoherentLocal = 0x40;
inline constexpr std::uint8_t kDevCoherentRemote = 0x50;
inline constexpr std::uint8_t kRead = 0x01;
inline constexpr std::uint8_t kWrite = 0x02;
inline constexpr std::uint8_t kPmd = 0x04;
inline constexpr std::uint8_t kPud = 0x08;
}  // namespace snapshot

/// Minors: 0 and 1 device-private, 2 and 3 device-coherent.
inline constexpr int kDmirrorMinors = 4;
inline constexpr char kDmirrorPathPrefix[] = "/dev/hmm_dmirror";

}  // namespace uhmm::compat
