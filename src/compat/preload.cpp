// compat: the interposed libc entry points of libuhmm-dmirror.so.  Device
// paths and device fds go to DmirrorProcess; reads of fds open on the
// process's own pagemap are patched (pagemap.hpp); everything else goes
// straight to libc's own function (dlsym RTLD_NEXT).
// docs/adr/0005-dmirror-emulation.md.
//
// Each wrapper is declared under a C++ name of its own with the libc
// symbol as its assembler name, so that it does not clash with the
// declarations (and exception specifications) of the libc headers.
#include <dlfcn.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdarg>
#include <cstdint>
#include <cstring>
#include <exception>
#include <new>
#include <optional>

#include "compat/dmirror_abi.hpp"
#include "compat/dmirror_device.hpp"
#include "compat/pagemap.hpp"

#define UHMM_EXPORT extern "C" __attribute__((visibility("default")))

UHMM_EXPORT int uhmm_dm_open(const char* path, int flags, ...) __asm__("open");
UHMM_EXPORT int uhmm_dm_open64(const char* path, int flags, ...) __asm__("open64");
UHMM_EXPORT int uhmm_dm_openat(int dirfd, const char* path, int flags, ...) __asm__("openat");
UHMM_EXPORT int uhmm_dm_openat64(int dirfd, const char* path, int flags, ...) __asm__("openat64");
UHMM_EXPORT int uhmm_dm_open_2(const char* path, int flags) __asm__("__open_2");
UHMM_EXPORT int uhmm_dm_open64_2(const char* path, int flags) __asm__("__open64_2");
UHMM_EXPORT int uhmm_dm_openat_2(int dirfd, const char* path, int flags) __asm__("__openat_2");
UHMM_EXPORT int uhmm_dm_openat64_2(int dirfd, const char* path, int flags) __asm__("__openat64_2");
UHMM_EXPORT int uhmm_dm_close(int fd) __asm__("close");
UHMM_EXPORT int uhmm_dm_ioctl(int fd, unsigned long request, ...) __asm__("ioctl");
UHMM_EXPORT void* uhmm_dm_mmap(void* addr, size_t len, int prot, int flags, int fd, off_t off) __asm__("mmap");
UHMM_EXPORT void* uhmm_dm_mmap64(void* addr, size_t len, int prot, int flags, int fd, off_t off) __asm__("mmap64");
UHMM_EXPORT int uhmm_dm_mprotect(void* addr, size_t len, int prot) __asm__("mprotect");
UHMM_EXPORT int uhmm_dm_dup(int fd) __asm__("dup");
UHMM_EXPORT int uhmm_dm_dup2(int fd, int copy) __asm__("dup2");
UHMM_EXPORT int uhmm_dm_dup3(int fd, int copy, int flags) __asm__("dup3");
UHMM_EXPORT int uhmm_dm_fcntl(int fd, int cmd, ...) __asm__("fcntl");
UHMM_EXPORT int uhmm_dm_fcntl64(int fd, int cmd, ...) __asm__("fcntl64");
UHMM_EXPORT ssize_t uhmm_dm_read(int fd, void* buf, size_t n) __asm__("read");
UHMM_EXPORT ssize_t uhmm_dm_read_chk(int fd, void* buf, size_t n, size_t buflen) __asm__("__read_chk");
UHMM_EXPORT ssize_t uhmm_dm_pread(int fd, void* buf, size_t n, off_t off) __asm__("pread");
UHMM_EXPORT ssize_t uhmm_dm_pread64(int fd, void* buf, size_t n, off_t off) __asm__("pread64");
UHMM_EXPORT ssize_t uhmm_dm_pread_chk(int fd, void* buf, size_t n, off_t off, size_t buflen) __asm__("__pread_chk");
UHMM_EXPORT ssize_t uhmm_dm_pread64_chk(int fd, void* buf, size_t n, off_t off, size_t buflen) __asm__("__pread64_chk");
UHMM_EXPORT ssize_t uhmm_dm_preadv(int fd, const struct iovec* iov, int iovcnt, off_t off) __asm__("preadv");
UHMM_EXPORT ssize_t uhmm_dm_preadv64(int fd, const struct iovec* iov, int iovcnt, off_t off) __asm__("preadv64");

namespace {

using uhmm::compat::DmirrorProcess;

// libc's own function `name`, looked up once.
template <class Fn>
Fn next_fn(std::atomic<Fn>& cache, const char* name) {
  Fn f = cache.load(std::memory_order_acquire);
  if (f == nullptr) {
    f = reinterpret_cast<Fn>(::dlsym(RTLD_NEXT, name));
    cache.store(f, std::memory_order_release);
  }
  return f;
}

#define UHMM_NEXT(type, name)                        \
  ([]() -> type {                                    \
    static std::atomic<type> cache{nullptr};         \
    return next_fn<type>(cache, name);               \
  }())

using OpenFn = int (*)(const char*, int, ...);
using OpenatFn = int (*)(int, const char*, int, ...);
using Open2Fn = int (*)(const char*, int);
using Openat2Fn = int (*)(int, const char*, int);
using CloseFn = int (*)(int);
using IoctlFn = int (*)(int, unsigned long, ...);
using MmapFn = void* (*)(void*, size_t, int, int, int, off_t);
using DupFn = int (*)(int);
using Dup2Fn = int (*)(int, int);
using Dup3Fn = int (*)(int, int, int);
using FcntlFn = int (*)(int, int, ...);
using ReadFn = ssize_t (*)(int, void*, size_t);
using ReadChkFn = ssize_t (*)(int, void*, size_t, size_t);
using PreadFn = ssize_t (*)(int, void*, size_t, off_t);
using PreadChkFn = ssize_t (*)(int, void*, size_t, off_t, size_t);
using PreadvFn = ssize_t (*)(int, const struct iovec*, int, off_t);

// The minor an absolute device path names, or -1 for any other path.
int device_minor(const char* path) {
  constexpr std::size_t n = sizeof(uhmm::compat::kDmirrorPathPrefix) - 1;
  if (path == nullptr || std::strncmp(path, uhmm::compat::kDmirrorPathPrefix, n) != 0) return -1;
  const char c = path[n];
  if (c < '0' || c >= '0' + uhmm::compat::kDmirrorMinors || path[n + 1] != '\0') return -1;
  return c - '0';
}

int fail(int err) {
  errno = err;
  return -1;
}

int open_device(int minor, int flags) {
  try {
    auto fd = DmirrorProcess::instance().open(minor, flags);
    return fd ? *fd : fail(fd.code());
  } catch (const std::bad_alloc&) {
    return fail(ENOMEM);
  } catch (...) {
    return fail(EIO);
  }
}

bool needs_mode(int flags) { return (flags & O_CREAT) != 0 || (flags & O_TMPFILE) == O_TMPFILE; }

// An fd just opened on `path`: recorded if it is the process's pagemap.
// (Absolute paths only, like the device paths.)
int noted(const char* path, int fd) {
  if (fd >= 0 && uhmm::compat::is_own_pagemap_path(path)) {
    const int saved = errno;
    uhmm::compat::PagemapFds::opened(fd);
    errno = saved;
  }
  return fd;
}

// The open* entries' optional third argument, read only when the flags say
// it is there (va_start must run in the variadic function itself).
#define UHMM_MODE_ARG(flags, mode)  \
  mode_t mode = 0;                  \
  if (needs_mode(flags)) {          \
    va_list ap;                     \
    va_start(ap, flags);            \
    mode = va_arg(ap, mode_t);      \
    va_end(ap);                     \
  }

// openat's path resolution: only absolute device paths are recognised.
int device_minor_at(int /*dirfd*/, const char* path) { return device_minor(path); }

}  // namespace

int uhmm_dm_open(const char* path, int flags, ...) {
  if (const int minor = device_minor(path); minor >= 0) return open_device(minor, flags);
  UHMM_MODE_ARG(flags, mode);
  return noted(path, UHMM_NEXT(OpenFn, "open")(path, flags, mode));
}

int uhmm_dm_open64(const char* path, int flags, ...) {
  if (const int minor = device_minor(path); minor >= 0) return open_device(minor, flags);
  UHMM_MODE_ARG(flags, mode);
  return noted(path, UHMM_NEXT(OpenFn, "open64")(path, flags, mode));
}

int uhmm_dm_openat(int dirfd, const char* path, int flags, ...) {
  if (const int minor = device_minor_at(dirfd, path); minor >= 0) return open_device(minor, flags);
  UHMM_MODE_ARG(flags, mode);
  return noted(path, UHMM_NEXT(OpenatFn, "openat")(dirfd, path, flags, mode));
}

int uhmm_dm_openat64(int dirfd, const char* path, int flags, ...) {
  if (const int minor = device_minor_at(dirfd, path); minor >= 0) return open_device(minor, flags);
  UHMM_MODE_ARG(flags, mode);
  return noted(path, UHMM_NEXT(OpenatFn, "openat64")(dirfd, path, flags, mode));
}

int uhmm_dm_open_2(const char* path, int flags) {
  if (const int minor = device_minor(path); minor >= 0) return open_device(minor, flags);
  return noted(path, UHMM_NEXT(Open2Fn, "__open_2")(path, flags));
}

int uhmm_dm_open64_2(const char* path, int flags) {
  if (const int minor = device_minor(path); minor >= 0) return open_device(minor, flags);
  return noted(path, UHMM_NEXT(Open2Fn, "__open64_2")(path, flags));
}

int uhmm_dm_openat_2(int dirfd, const char* path, int flags) {
  if (const int minor = device_minor_at(dirfd, path); minor >= 0) return open_device(minor, flags);
  return noted(path, UHMM_NEXT(Openat2Fn, "__openat_2")(dirfd, path, flags));
}

int uhmm_dm_openat64_2(int dirfd, const char* path, int flags) {
  if (const int minor = device_minor_at(dirfd, path); minor >= 0) return open_device(minor, flags);
  return noted(path, UHMM_NEXT(Openat2Fn, "__openat64_2")(dirfd, path, flags));
}

namespace {
// Runs an emulated call: its result as libc would return it (0, or -1 with
// errno), or nullopt when the call is not the emulation's to answer.
// Nothing may unwind into the program.
template <class Fn>
std::optional<int> handled(Fn&& call) {
  try {
    if (const auto r = call()) return *r == 0 ? 0 : fail(*r);
    return std::nullopt;
  } catch (const std::bad_alloc&) {
    return fail(ENOMEM);
  } catch (...) {
    return fail(EIO);
  }
}
}  // namespace

int uhmm_dm_close(int fd) {
  if (uhmm::compat::PagemapFds::maybe(fd)) uhmm::compat::PagemapFds::closed(fd);
  if (DmirrorProcess::maybe_device_fd(fd)) {
    try {
      (void)DmirrorProcess::instance().close(fd);  // evicts the device if fd is one; the fd itself is closed below either way
    } catch (...) {
      // Nothing to report through close(): the fd still goes.
    }
  }
  return UHMM_NEXT(CloseFn, "close")(fd);
}

int uhmm_dm_ioctl(int fd, unsigned long request, ...) {
  va_list ap;
  va_start(ap, request);
  void* arg = va_arg(ap, void*);
  va_end(ap);
  if (DmirrorProcess::maybe_device_fd(fd)) {
    if (const auto r = handled([&] { return DmirrorProcess::instance().ioctl(fd, request, reinterpret_cast<std::uintptr_t>(arg)); }))
      return *r;
  }
  return UHMM_NEXT(IoctlFn, "ioctl")(fd, request, arg);
}

namespace {
// A device fd's mapping: fresh zeroed private pages, populated (so that a
// read-only one snapshots as READ, as the kernel's inserted pages do).
void* map_device(MmapFn next, void* addr, size_t len, int prot, int flags) {
  const int anon = (flags & ~MAP_TYPE) | MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE;
  return next(addr, len, prot, anon, -1, 0);
}

void* mmap_through(MmapFn next, void* addr, size_t len, int prot, int flags, int fd, off_t off) {
  if (fd >= 0 && !(flags & MAP_ANONYMOUS) && DmirrorProcess::maybe_device_fd(fd) &&
      DmirrorProcess::instance().is_device_fd(fd))
    return map_device(next, addr, len, prot, flags);
  return next(addr, len, prot, flags, fd, off);
}
}  // namespace

void* uhmm_dm_mmap(void* addr, size_t len, int prot, int flags, int fd, off_t off) {
  return mmap_through(UHMM_NEXT(MmapFn, "mmap"), addr, len, prot, flags, fd, off);
}

void* uhmm_dm_mmap64(void* addr, size_t len, int prot, int flags, int fd, off_t off) {
  return mmap_through(UHMM_NEXT(MmapFn, "mmap64"), addr, len, prot, flags, fd, off);
}

// mprotect of memory uhmm manages goes through uhmm (ADR 0005, "mprotect");
// before the first device open, and for everything else, straight to libc.
int uhmm_dm_mprotect(void* addr, size_t len, int prot) {
  using MprotectFn = int (*)(void*, size_t, int);
  if (DmirrorProcess::address_space() != nullptr) {
    if (const auto r = handled([&] { return DmirrorProcess::instance().mprotect(reinterpret_cast<std::uintptr_t>(addr), len, prot); }))
      return *r;
  }
  return UHMM_NEXT(MprotectFn, "mprotect")(addr, len, prot);
}

// ---- pagemap reads -----------------------------------------------------------

namespace {
using uhmm::compat::PagemapFds;

// `copy` was just made from `fd` (dup*, F_DUPFD): a copy of a pagemap fd
// reads patched entries too.  errno is kept.
int noted_dup(int fd, int copy) {
  if (copy >= 0 && (PagemapFds::maybe(fd) || PagemapFds::maybe(copy))) {
    const int saved = errno;
    PagemapFds::duplicated(fd, copy);
    errno = saved;
  }
  // A copy of a device fd is the same open device.
  if (copy >= 0 && (DmirrorProcess::maybe_device_fd(fd) || DmirrorProcess::maybe_device_fd(copy))) {
    const int saved = errno;
    try {
      DmirrorProcess::instance().duplicated(fd, copy);
    } catch (...) {
      // The copy then stays a plain fd to the program (its ioctls fail).
    }
    errno = saved;
  }
  return copy;
}

// fcntl's optional argument is an int, a long or a pointer: passed on as
// one register-sized value, as libc itself reads it.
int fcntl_via(FcntlFn next, int fd, int cmd, void* arg) {
  const int r = next(fd, cmd, arg);
  return cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC ? noted_dup(fd, r) : r;
}
}  // namespace

int uhmm_dm_dup(int fd) { return noted_dup(fd, UHMM_NEXT(DupFn, "dup")(fd)); }

int uhmm_dm_dup2(int fd, int copy) { return noted_dup(fd, UHMM_NEXT(Dup2Fn, "dup2")(fd, copy)); }

int uhmm_dm_dup3(int fd, int copy, int flags) { return noted_dup(fd, UHMM_NEXT(Dup3Fn, "dup3")(fd, copy, flags)); }

int uhmm_dm_fcntl(int fd, int cmd, ...) {
  va_list ap;
  va_start(ap, cmd);
  void* arg = va_arg(ap, void*);
  va_end(ap);
  return fcntl_via(UHMM_NEXT(FcntlFn, "fcntl"), fd, cmd, arg);
}

int uhmm_dm_fcntl64(int fd, int cmd, ...) {
  va_list ap;
  va_start(ap, cmd);
  void* arg = va_arg(ap, void*);
  va_end(ap);
  FcntlFn next = UHMM_NEXT(FcntlFn, "fcntl64");
  if (next == nullptr) next = UHMM_NEXT(FcntlFn, "fcntl");  // a libc older than fcntl64
  return fcntl_via(next, fd, cmd, arg);
}

namespace {

// After a read of `n` bytes at pagemap offset `off` into `buf`: the
// device pages' entries as the kernel would show them.  errno is kept.
void patch_read(int fd, off_t off, void* buf, ssize_t n) {
  if (n <= 0 || off < 0) return;
  const int saved = errno;
  const uhmm::AddressSpace* as = DmirrorProcess::address_space();
  if (as != nullptr && PagemapFds::is(fd))
    uhmm::compat::patch_pagemap(*as, DmirrorProcess::file_pages(), static_cast<std::uint64_t>(off), buf,
                                static_cast<std::size_t>(n));
  errno = saved;
}

// The same for a vectored read: each 8-byte entry is gathered from the
// vectors (an entry may straddle two), patched, and scattered back.
void patch_readv(int fd, off_t off, const struct iovec* iov, int iovcnt, ssize_t n) {
  if (n <= 0 || off < 0) return;
  const int saved = errno;
  const uhmm::AddressSpace* as = DmirrorProcess::address_space();
  const bool ours = as != nullptr && PagemapFds::is(fd);
  errno = saved;
  if (!ours) return;
  std::uint64_t word = 0;
  std::size_t have = 0;  // bytes of `word` gathered
  off_t word_off = off;
  std::size_t left = static_cast<std::size_t>(n);
  // Where each byte of the current word came from, to scatter it back.
  unsigned char* from[sizeof word] = {};
  for (int v = 0; v < iovcnt && left > 0; ++v) {
    auto* base = static_cast<unsigned char*>(iov[v].iov_base);
    for (std::size_t k = 0; k < iov[v].iov_len && left > 0; ++k, --left) {
      from[have] = base + k;
      reinterpret_cast<unsigned char*>(&word)[have] = base[k];
      if (++have < sizeof word) continue;
      uhmm::compat::patch_pagemap(*as, DmirrorProcess::file_pages(), static_cast<std::uint64_t>(word_off), &word,
                                  sizeof word);
      for (std::size_t b = 0; b < sizeof word; ++b) *from[b] = reinterpret_cast<unsigned char*>(&word)[b];
      word_off += static_cast<off_t>(sizeof word);
      have = 0;
    }
  }
}

// A plain read starts at the fd's offset (read before, not atomically: a
// program sharing one pagemap fd between threads gets racy entries anyway).
off_t current_offset(int fd) {
  const int saved = errno;
  const off_t off = ::lseek(fd, 0, SEEK_CUR);
  errno = saved;
  return off;
}
}  // namespace

ssize_t uhmm_dm_read(int fd, void* buf, size_t n) {
  const ReadFn next = UHMM_NEXT(ReadFn, "read");
  if (!PagemapFds::maybe(fd)) return next(fd, buf, n);
  const off_t off = current_offset(fd);
  const ssize_t r = next(fd, buf, n);
  patch_read(fd, off, buf, r);
  return r;
}

ssize_t uhmm_dm_read_chk(int fd, void* buf, size_t n, size_t buflen) {
  const ReadChkFn next = UHMM_NEXT(ReadChkFn, "__read_chk");
  if (!PagemapFds::maybe(fd)) return next(fd, buf, n, buflen);
  const off_t off = current_offset(fd);
  const ssize_t r = next(fd, buf, n, buflen);
  patch_read(fd, off, buf, r);
  return r;
}

ssize_t uhmm_dm_pread(int fd, void* buf, size_t n, off_t off) {
  const ssize_t r = UHMM_NEXT(PreadFn, "pread")(fd, buf, n, off);
  if (PagemapFds::maybe(fd)) patch_read(fd, off, buf, r);
  return r;
}

ssize_t uhmm_dm_pread64(int fd, void* buf, size_t n, off_t off) {
  const ssize_t r = UHMM_NEXT(PreadFn, "pread64")(fd, buf, n, off);
  if (PagemapFds::maybe(fd)) patch_read(fd, off, buf, r);
  return r;
}

ssize_t uhmm_dm_pread_chk(int fd, void* buf, size_t n, off_t off, size_t buflen) {
  const ssize_t r = UHMM_NEXT(PreadChkFn, "__pread_chk")(fd, buf, n, off, buflen);
  if (PagemapFds::maybe(fd)) patch_read(fd, off, buf, r);
  return r;
}

ssize_t uhmm_dm_pread64_chk(int fd, void* buf, size_t n, off_t off, size_t buflen) {
  const ssize_t r = UHMM_NEXT(PreadChkFn, "__pread64_chk")(fd, buf, n, off, buflen);
  if (PagemapFds::maybe(fd)) patch_read(fd, off, buf, r);
  return r;
}

ssize_t uhmm_dm_preadv(int fd, const struct iovec* iov, int iovcnt, off_t off) {
  const ssize_t r = UHMM_NEXT(PreadvFn, "preadv")(fd, iov, iovcnt, off);
  if (PagemapFds::maybe(fd)) patch_readv(fd, off, iov, iovcnt, r);
  return r;
}

ssize_t uhmm_dm_preadv64(int fd, const struct iovec* iov, int iovcnt, off_t off) {
  const ssize_t r = UHMM_NEXT(PreadvFn, "preadv64")(fd, iov, iovcnt, off);
  if (PagemapFds::maybe(fd)) patch_readv(fd, off, iov, iovcnt, r);
  return r;
}
