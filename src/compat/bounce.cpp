// compat: the bounce-buffer arena (bounce.hpp).
#include "compat/bounce.hpp"

#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>

#include "uhmm/types.hpp"

namespace uhmm::compat {

namespace {

std::size_t pages_up(std::size_t bytes) { return (bytes + kPageSize - 1) & ~(kPageSize - 1); }

// Straight to the kernel: the preload library interposes mprotect, and these
// addresses are never the program's.
int raw_mprotect(void* p, std::size_t len, int prot) {
  return static_cast<int>(::syscall(SYS_mprotect, p, len, prot));
}

}  // namespace

Result<std::unique_ptr<BounceArena>> BounceArena::reserve(std::size_t bytes) {
  const std::size_t size = pages_up(bytes);
  if (size == 0 || size < bytes) return Status::error(EINVAL, "bounce arena: bad size");
  void* p = ::mmap(nullptr, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return Status::error(ENOMEM, "cannot reserve the bounce arena");
  // A forked child builds its own runtime; the pieces made accessible later
  // keep this flag (mprotect splits the mapping, it does not replace it).
  (void)::madvise(p, size, MADV_DONTFORK);
  return std::unique_ptr<BounceArena>(new BounceArena(static_cast<std::byte*>(p), size));
}

BounceArena::BounceArena(std::byte* base, std::size_t size) : base_(base), size_(size) {
  MutexLock lock(mutex_);
  free_.add(0, size);
}

BounceArena::~BounceArena() { ::munmap(base_, size_); }

Result<std::byte*> BounceArena::take(std::size_t bytes) {
  const std::size_t len = pages_up(bytes == 0 ? 1 : bytes);
  if (len < bytes) return Status::error(ENOMEM, "bounce buffer too large");
  std::size_t off = 0;
  {
    MutexLock lock(mutex_);
    const std::optional<std::uint64_t> taken = free_.take_first_fit(len);
    if (!taken) return Status::error(ENOMEM, "bounce arena exhausted");
    off = static_cast<std::size_t>(*taken);
  }
  if (raw_mprotect(base_ + off, len, PROT_READ | PROT_WRITE) != 0) {
    const int e = errno;
    give(base_ + off, len);
    return Status::error(e == ENOMEM ? ENOMEM : e, "cannot map a bounce buffer");
  }
  return base_ + off;
}

void BounceArena::give(std::byte* p, std::size_t bytes) {
  const std::size_t len = pages_up(bytes == 0 ? 1 : bytes);
  // The pages go; the next take() of them reads zeros.  If the protection
  // cannot be taken back the piece stays accessible but unused: still ours.
  (void)::madvise(p, len, MADV_DONTNEED);
  (void)raw_mprotect(p, len, PROT_NONE);
  const auto off = static_cast<std::size_t>(p - base_);
  MutexLock lock(mutex_);
  free_.add(off, off + len);
}

}  // namespace uhmm::compat
