// compat: ioctl decoding (ioctl_decode.hpp).
#include "compat/ioctl_decode.hpp"

#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "uhmm/types.hpp"

namespace uhmm::compat {

namespace {

// process_vm_readv/writev move at most about 2 GiB per call, and may stop
// short at an inaccessible page: go on until done or stuck.
template <class Fn>
bool copy_loop(std::size_t len, Fn&& one_call) {
  std::size_t done = 0;
  while (done < len) {
    const std::size_t chunk = std::min<std::size_t>(len - done, std::size_t{1} << 30);
    const ssize_t n = one_call(done, chunk);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    done += static_cast<std::size_t>(n);
  }
  return true;
}

}  // namespace

bool copy_from_user(void* dst, std::uintptr_t user, std::size_t len) {
  return copy_loop(len, [&](std::size_t off, std::size_t n) {
    const iovec local{static_cast<char*>(dst) + off, n};
    const iovec remote{reinterpret_cast<void*>(user + off), n};
    return ::process_vm_readv(::getpid(), &local, 1, &remote, 1, 0);
  });
}

bool copy_to_user(std::uintptr_t user, const void* src, std::size_t len) {
  return copy_loop(len, [&](std::size_t off, std::size_t n) {
    const iovec local{const_cast<char*>(static_cast<const char*>(src)) + off, n};
    const iovec remote{reinterpret_cast<void*>(user + off), n};
    return ::process_vm_writev(::getpid(), &local, 1, &remote, 1, 0);
  });
}

bool decode_request(unsigned long request, DmirrorOp* op) {
  const auto word = static_cast<std::uint32_t>(request);
  for (unsigned nr = 0; nr < kDmirrorOpCount; ++nr) {
    if (word == static_cast<std::uint32_t>(dmirror_request(static_cast<DmirrorOp>(nr)))) {
      *op = static_cast<DmirrorOp>(nr);
      return true;
    }
  }
  return false;
}

int dispatch_ioctl(CommandHandler& handler, unsigned long request, std::uintptr_t arg) {
  DmirrorCmd cmd{};
  if (!copy_from_user(&cmd, arg, sizeof cmd)) return EFAULT;
  // Wrapping arithmetic on purpose: npages 0, and a count whose byte size
  // wraps past the end of the address space, both fail this one test.
  const std::uint64_t size = cmd.npages << kPageShift;
  if ((cmd.addr & (kPageSize - 1)) != 0 || cmd.addr + size <= cmd.addr) return EINVAL;
  cmd.cpages = 0;
  cmd.faults = 0;
  DmirrorOp op{};
  if (!decode_request(request, &op)) return EINVAL;
  if (const int err = handler.run(op, cmd); err != 0) return err;
  if (!copy_to_user(arg, &cmd, sizeof cmd)) return EFAULT;
  return 0;
}

}  // namespace uhmm::compat
