// compat: decoding an ioctl on a dmirror fd, before any device work.
//
// The rules every command shares (dmirror-abi.md, "Command struct"): the
// struct is copied in (EFAULT), `addr` must be page aligned and
// addr + npages pages must not wrap or be empty (EINVAL), the outputs are
// zeroed, an unknown command is EINVAL, and the struct is copied back only
// when the command succeeds.  Kept apart from the device so that it can be
// tested without one (tests/compat/ioctl_decode_test.cpp).
#pragma once

#include <cstddef>
#include <cstdint>

#include "compat/dmirror_abi.hpp"

namespace uhmm::compat {

/// The device side of one fd.  `cmd` has passed the shared checks and its
/// outputs are zero; run() fills them and returns 0 or an errno.
class CommandHandler {
 public:
  virtual ~CommandHandler() = default;
  virtual int run(DmirrorOp op, DmirrorCmd& cmd) = 0;
};

/// Decodes and runs one ioctl(fd, request, arg) on a device fd: 0, or the
/// errno the ioctl fails with.  Only the low 32 bits of `request` count (the
/// kernel's command word is 32-bit, so a sign-extended constant matches).
int dispatch_ioctl(CommandHandler& handler, unsigned long request, std::uintptr_t arg);

/// The page count a validated command covers: npages as the range check
/// saw it (npages << 12 wraps, as in the kernel, so only the low 52 bits count).
inline std::uint64_t cmd_pages(const DmirrorCmd& cmd) { return (cmd.npages << 12) >> 12; }

/// The command a request word names, or false for an unknown one.
bool decode_request(unsigned long request, DmirrorOp* op);

/// Fault-safe copies between the library and the calling process's memory
/// (process_vm_readv/writev on itself): false if any byte is not accessible.
/// A device-resident page in `user` is brought back by the kernel's fault path.
bool copy_from_user(void* dst, std::uintptr_t user, std::size_t len);
bool copy_to_user(std::uintptr_t user, const void* src, std::size_t len);

}  // namespace uhmm::compat
