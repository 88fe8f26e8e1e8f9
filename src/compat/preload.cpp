// compat: the interposed libc entry points of libuhmm-dmirror.so.  Device
// paths and device fds go to DmirrorProcess; everything else goes straight
// to libc's own function (dlsym RTLD_NEXT).  docs/adr/0005-dmirror-emulation.md.
//
// Each wrapper is declared under a C++ name of its own with the libc
// symbol as its assembler name, so that it does not clash with the
// declarations (and exception specifications) of the libc headers.
#include <dlfcn.h>
#include <fcntl.h>
#include <sys/mman.h>

#include <atomic>
#include <cerrno>
#include <cstdarg>
#include <cstdint>
#include <cstring>
#include <exception>
#include <new>

#include "compat/dmirror_abi.hpp"
#include "compat/dmirror_device.hpp"

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

// openat's path resolution: only absolute device paths are recognised.
int device_minor_at(int /*dirfd*/, const char* path) { return device_minor(path); }

}  // namespace

int uhmm_dm_open(const char* path, int flags, ...) {
  if (const int minor = device_minor(path); minor >= 0) return open_device(minor, flags);
  mode_t mode = 0;
  if (needs_mode(flags)) {
    va_list ap;
    va_start(ap, flags);
    mode = va_arg(ap, mode_t);
    va_end(ap);
  }
  return UHMM_NEXT(OpenFn, "open")(path, flags, mode);
}

int uhmm_dm_open64(const char* path, int flags, ...) {
  if (const int minor = device_minor(path); minor >= 0) return open_device(minor, flags);
  mode_t mode = 0;
  if (needs_mode(flags)) {
    va_list ap;
    va_start(ap, flags);
    mode = va_arg(ap, mode_t);
    va_end(ap);
  }
  return UHMM_NEXT(OpenFn, "open64")(path, flags, mode);
}

int uhmm_dm_openat(int dirfd, const char* path, int flags, ...) {
  if (const int minor = device_minor_at(dirfd, path); minor >= 0) return open_device(minor, flags);
  mode_t mode = 0;
  if (needs_mode(flags)) {
    va_list ap;
    va_start(ap, flags);
    mode = va_arg(ap, mode_t);
    va_end(ap);
  }
  return UHMM_NEXT(OpenatFn, "openat")(dirfd, path, flags, mode);
}

int uhmm_dm_openat64(int dirfd, const char* path, int flags, ...) {
  if (const int minor = device_minor_at(dirfd, path); minor >= 0) return open_device(minor, flags);
  mode_t mode = 0;
  if (needs_mode(flags)) {
    va_list ap;
    va_start(ap, flags);
    mode = va_arg(ap, mode_t);
    va_end(ap);
  }
  return UHMM_NEXT(OpenatFn, "openat64")(dirfd, path, flags, mode);
}

int uhmm_dm_open_2(const char* path, int flags) {
  if (const int minor = device_minor(path); minor >= 0) return open_device(minor, flags);
  return UHMM_NEXT(Open2Fn, "__open_2")(path, flags);
}

int uhmm_dm_open64_2(const char* path, int flags) {
  if (const int minor = device_minor(path); minor >= 0) return open_device(minor, flags);
  return UHMM_NEXT(Open2Fn, "__open64_2")(path, flags);
}

int uhmm_dm_openat_2(int dirfd, const char* path, int flags) {
  if (const int minor = device_minor_at(dirfd, path); minor >= 0) return open_device(minor, flags);
  return UHMM_NEXT(Openat2Fn, "__openat_2")(dirfd, path, flags);
}

int uhmm_dm_openat64_2(int dirfd, const char* path, int flags) {
  if (const int minor = device_minor_at(dirfd, path); minor >= 0) return open_device(minor, flags);
  return UHMM_NEXT(Openat2Fn, "__openat64_2")(dirfd, path, flags);
}

int uhmm_dm_close(int fd) {
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
    try {
      if (const auto r = DmirrorProcess::instance().ioctl(fd, request, reinterpret_cast<std::uintptr_t>(arg)))
        return *r == 0 ? 0 : fail(*r);
    } catch (const std::bad_alloc&) {
      return fail(ENOMEM);
    } catch (...) {
      return fail(EIO);
    }
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
}  // namespace

void* uhmm_dm_mmap(void* addr, size_t len, int prot, int flags, int fd, off_t off) {
  const MmapFn next = UHMM_NEXT(MmapFn, "mmap");
  if (fd >= 0 && !(flags & MAP_ANONYMOUS) && DmirrorProcess::maybe_device_fd(fd) &&
      DmirrorProcess::instance().is_device_fd(fd))
    return map_device(next, addr, len, prot, flags);
  return next(addr, len, prot, flags, fd, off);
}

void* uhmm_dm_mmap64(void* addr, size_t len, int prot, int flags, int fd, off_t off) {
  const MmapFn next = UHMM_NEXT(MmapFn, "mmap64");
  if (fd >= 0 && !(flags & MAP_ANONYMOUS) && DmirrorProcess::maybe_device_fd(fd) &&
      DmirrorProcess::instance().is_device_fd(fd))
    return map_device(next, addr, len, prot, flags);
  return next(addr, len, prot, flags, fd, off);
}
