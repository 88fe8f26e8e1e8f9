#include "platform/uffd.hpp"

#include "platform/maps.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>

namespace uhmm::platform {

namespace {
constexpr unsigned long kUserfaultfdIocNew = _IO(0xAA, 0x00);

int open_raw(int flags, std::string* why) {
  int fd = static_cast<int>(::syscall(SYS_userfaultfd, flags));
  if (fd >= 0) return fd;
  const int syscall_errno = errno;
  int dev = ::open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
  if (dev >= 0) {
    fd = ::ioctl(dev, kUserfaultfdIocNew, flags);
    const int e = errno;
    ::close(dev);
    if (fd >= 0) return fd;
    *why = "userfaultfd(2): " + errno_text(syscall_errno) + "; /dev/userfaultfd ioctl: " + errno_text(e);
    errno = e;
    return -1;
  }
  *why = "userfaultfd(2): " + errno_text(syscall_errno) + "; /dev/userfaultfd: " + errno_text(errno);
  errno = syscall_errno;
  return -1;
}
}  // namespace

std::string errno_text(int err) { return errno_name(err) + " (" + std::strerror(err) + ")"; }

Uffd::~Uffd() {
  if (fd_ >= 0) ::close(fd_);
}

Uffd& Uffd::operator=(Uffd&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = other.fd_;
    features_ = other.features_;
    on_busy_ = std::move(other.on_busy_);
    other.fd_ = -1;
  }
  return *this;
}

Result<Uffd> Uffd::open(std::uint64_t features, bool nonblocking) {
  std::string why;
  const int fd = open_raw(O_CLOEXEC | (nonblocking ? O_NONBLOCK : 0), &why);
  if (fd < 0) {
    return Status::error(EPERM,
                         "cannot open a userfaultfd that serves kernel-mode faults (" + why +
                             "); run as root, or give access to /dev/userfaultfd");
  }
  Uffd u;
  u.fd_ = fd;
  struct uffdio_api api {};
  api.api = UFFD_API;
  api.features = features;
  if (::ioctl(fd, UFFDIO_API, &api) != 0) {
    const int e = errno;
    // Ask again with no features to learn what the kernel offers.
    std::string missing;
    Uffd probe;
    std::string ignored;
    probe.fd_ = open_raw(O_CLOEXEC, &ignored);
    if (probe.fd_ >= 0) {
      struct uffdio_api all {};
      all.api = UFFD_API;
      if (::ioctl(probe.fd_, UFFDIO_API, &all) == 0) {
        char buf[64];
        std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(features & ~all.features));
        missing = std::string(", missing feature bits ") + buf;
      }
    }
    return Status::error(ENOSYS, "userfaultfd API handshake failed: " + errno_text(e) + missing +
                                     " (uhmm needs Linux >= 6.8 for UFFDIO_MOVE)");
  }
  u.features_ = api.features;
  return u;
}

Status Uffd::register_range(VirtAddr start, std::size_t len, std::uint64_t mode) {
  struct uffdio_register reg {};
  reg.range.start = start.value;
  reg.range.len = len;
  reg.mode = mode;
  if (::ioctl(fd_, UFFDIO_REGISTER, &reg) != 0) {
    const int e = errno;
    return Status::error(e == EBUSY ? EBUSY : EINVAL, "UFFDIO_REGISTER: " + errno_text(e));
  }
  return Status::ok();
}

Status Uffd::unregister_range(VirtAddr start, std::size_t len) {
  struct uffdio_range r {};
  r.start = start.value;
  r.len = len;
  if (::ioctl(fd_, UFFDIO_UNREGISTER, &r) != 0) {
    const int e = errno;
    return Status::error(e, "UFFDIO_UNREGISTER: " + errno_text(e));
  }
  return Status::ok();
}

PartialResult Uffd::move(VirtAddr dst, VirtAddr src, std::size_t len, std::uint64_t mode) {
  PartialResult r;
  while (r.bytes_done < len) {
    UffdioMove m{};
    m.dst = dst.value + r.bytes_done;
    m.src = src.value + r.bytes_done;
    m.len = len - r.bytes_done;
    m.mode = mode;
    const int rc = ::ioctl(fd_, kUffdioMove, &m);
    const int e = rc == 0 ? 0 : errno;
    if (m.move > 0) r.bytes_done += static_cast<std::size_t>(m.move);
    if (rc == 0 && m.move <= 0) {  // nothing moved but no error: treat as done
      r.bytes_done = len;
      break;
    }
    if (rc != 0) {
      if (e == EAGAIN && (!on_busy_ || on_busy_())) continue;
      r.error = e;
      return r;
    }
  }
  return r;
}

PartialResult Uffd::copy(VirtAddr dst, const void* src, std::size_t len, bool wake, bool write_protect) {
  PartialResult r;
  while (r.bytes_done < len) {
    struct uffdio_copy c {};
    c.dst = dst.value + r.bytes_done;
    c.src = reinterpret_cast<std::uintptr_t>(src) + r.bytes_done;
    c.len = len - r.bytes_done;
    c.mode = (wake ? 0 : UFFDIO_COPY_MODE_DONTWAKE) | (write_protect ? UFFDIO_COPY_MODE_WP : 0);
    const int rc = ::ioctl(fd_, UFFDIO_COPY, &c);
    const int e = rc == 0 ? 0 : errno;
    if (c.copy > 0) r.bytes_done += static_cast<std::size_t>(c.copy);
    if (rc != 0) {
      if (e == EAGAIN && (!on_busy_ || on_busy_())) continue;
      r.error = e;
      return r;
    }
  }
  return r;
}

PartialResult Uffd::continue_range(VirtAddr dst, std::size_t len, bool wake, bool write_protect) {
  PartialResult r;
  while (r.bytes_done < len) {
    struct uffdio_continue c {};
    c.range.start = dst.value + r.bytes_done;
    c.range.len = len - r.bytes_done;
    c.mode = (wake ? 0 : UFFDIO_CONTINUE_MODE_DONTWAKE) | (write_protect ? kContinueModeWp : 0);
    const int rc = ::ioctl(fd_, UFFDIO_CONTINUE, &c);
    const int e = rc == 0 ? 0 : errno;
    if (c.mapped > 0) r.bytes_done += static_cast<std::size_t>(c.mapped);
    if (rc == 0) break;
    if (e == EAGAIN && (!on_busy_ || on_busy_())) continue;
    r.error = e;
    return r;
  }
  return r;
}

Status Uffd::zeropage(VirtAddr dst, std::size_t len, bool wake) {
  struct uffdio_zeropage z {};
  z.range.start = dst.value;
  z.range.len = len;
  z.mode = wake ? 0 : UFFDIO_ZEROPAGE_MODE_DONTWAKE;
  if (::ioctl(fd_, UFFDIO_ZEROPAGE, &z) != 0) {
    const int e = errno;
    return Status::error(e, "UFFDIO_ZEROPAGE: " + errno_text(e));
  }
  return Status::ok();
}

Status Uffd::poison(VirtAddr dst, std::size_t len) {
  UffdioPoison p{};
  p.range.start = dst.value;
  p.range.len = len;
  p.mode = 0;
  if (::ioctl(fd_, kUffdioPoison, &p) != 0) {
    const int e = errno;
    return Status::error(e, "UFFDIO_POISON: " + errno_text(e));
  }
  return Status::ok();
}

Status Uffd::wake(VirtAddr start, std::size_t len) {
  struct uffdio_range r {};
  r.start = start.value;
  r.len = len;
  if (::ioctl(fd_, UFFDIO_WAKE, &r) != 0) {
    const int e = errno;
    return Status::error(e, "UFFDIO_WAKE: " + errno_text(e));
  }
  return Status::ok();
}

Result<VirtAddr> map_anonymous(std::size_t len, int prot, bool noreserve) {
  void* p = ::mmap(nullptr, len, prot, MAP_PRIVATE | MAP_ANONYMOUS | (noreserve ? MAP_NORESERVE : 0), -1, 0);
  if (p == MAP_FAILED) {
    const int e = errno;
    return Status::error(e == ENOMEM ? ENOMEM : e, "mmap: " + errno_text(e));
  }
  return VirtAddr::of(p);
}

Result<VirtAddr> map_anonymous_aligned(std::size_t len, std::size_t align, int prot, bool noreserve) {
  auto raw = map_anonymous(len + align, prot, noreserve);
  if (!raw) return raw.status();
  const std::uintptr_t base = raw->value;
  const std::uintptr_t aligned = (base + align - 1) & ~(align - 1);
  if (aligned > base) ::munmap(reinterpret_cast<void*>(base), aligned - base);
  const std::uintptr_t tail = base + len + align - (aligned + len);
  if (tail > 0) ::munmap(reinterpret_cast<void*>(aligned + len), tail);
  return VirtAddr{aligned};
}

bool huge_read_faults_from(std::string_view enabled, std::string_view use_zero_page) {
  const bool thp_on = enabled.find("[always]") != std::string_view::npos || enabled.find("[madvise]") != std::string_view::npos;
  return thp_on && !use_zero_page.empty() && use_zero_page.front() == '1';
}

bool huge_read_faults_available() {
  if (::prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0) != 0) return false;  // 1: disabled; -1: cannot tell
  Result<std::string> enabled = read_proc_text("/sys/kernel/mm/transparent_hugepage/enabled");
  Result<std::string> zero_page = read_proc_text("/sys/kernel/mm/transparent_hugepage/use_zero_page");
  return enabled && zero_page && huge_read_faults_from(*enabled, *zero_page);
}

Status unmap(VirtAddr start, std::size_t len) {
  if (::munmap(start.ptr(), len) != 0) {
    const int e = errno;
    return Status::error(e, "munmap: " + errno_text(e));
  }
  return Status::ok();
}

Status advise(VirtAddr start, std::size_t len, int advice) {
  if (::madvise(start.ptr(), len, advice) != 0) {
    const int e = errno;
    return Status::error(e, "madvise: " + errno_text(e));
  }
  return Status::ok();
}

bool is_private_anonymous_mapping(VirtAddr start, std::size_t len, int* prot_out) {
  const std::optional<Mapping> m = mapping_at(start);
  if (!m || start.value + len > m->end || !m->private_anonymous()) return false;
  if (prot_out) *prot_out = m->prot;
  return true;
}

Status resident_pages(VirtAddr start, std::size_t len, unsigned char* out) {
  if (::mincore(start.ptr(), len, out) != 0) {
    const int e = errno;
    return Status::error(e, "mincore: " + errno_text(e));
  }
  return Status::ok();
}

Status read_own_memory(VirtAddr from, void* to, std::size_t len) {
  // Opened per call: a descriptor kept open would, in a forked child, still
  // read the parent's memory.
  const int fd = ::open("/proc/self/mem", O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int e = errno;
    return Status::error(e, "open /proc/self/mem: " + errno_text(e));
  }
  std::size_t done = 0;
  int error = 0;
  while (done < len) {
    const ssize_t n = ::pread(fd, static_cast<char*>(to) + done, len - done, static_cast<off_t>(from.value + done));
    if (n > 0) {
      done += static_cast<std::size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    error = n == 0 ? EIO : errno;
    break;
  }
  ::close(fd);
  if (error != 0) return Status::error(error, "reading /proc/self/mem: " + errno_text(error));
  return Status::ok();
}

namespace {
// The PAGEMAP_SCAN ABI (include/uapi/linux/fs.h, Linux 6.7).
struct PageRegion {
  std::uint64_t start;
  std::uint64_t end;
  std::uint64_t categories;
};
struct PmScanArg {
  std::uint64_t size;
  std::uint64_t flags;
  std::uint64_t start;
  std::uint64_t end;
  std::uint64_t walk_end;
  std::uint64_t vec;
  std::uint64_t vec_len;
  std::uint64_t max_pages;
  std::uint64_t category_inverted;
  std::uint64_t category_mask;
  std::uint64_t category_anyof_mask;
  std::uint64_t return_mask;
};
constexpr unsigned long kPagemapScan = _IOWR('f', 16, PmScanArg);
constexpr std::uint64_t kPmScanWpMatching = 1u << 0;
constexpr std::uint64_t kPmScanCheckWpAsync = 1u << 1;
constexpr std::uint64_t kPageIsWritten = 1u << 1;
constexpr std::uint64_t kPageIsHuge = 1u << 6;
}  // namespace

Status scan_written(VirtAddr start, std::size_t len, bool reprotect,
                    std::vector<std::pair<VirtAddr, VirtAddr>>* out) {
  const int fd = ::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::error(errno, "open /proc/self/pagemap: " + errno_text(errno));
  PageRegion regions[64];
  std::uint64_t cur = start.value;
  const std::uint64_t end = start.value + len;
  Status result;
  while (cur < end) {
    PmScanArg arg{};
    arg.size = sizeof arg;
    arg.flags = reprotect ? (kPmScanWpMatching | kPmScanCheckWpAsync) : 0;
    arg.start = cur;
    arg.end = end;
    arg.vec = reinterpret_cast<std::uintptr_t>(regions);
    arg.vec_len = 64;
    arg.category_mask = kPageIsWritten;
    arg.return_mask = kPageIsWritten;
    const long n = ::ioctl(fd, kPagemapScan, &arg);
    if (n < 0) {
      result = Status::error(errno, "PAGEMAP_SCAN: " + errno_text(errno));
      break;
    }
    for (long i = 0; i < n; ++i)
      out->emplace_back(VirtAddr{static_cast<std::uintptr_t>(regions[i].start)},
                        VirtAddr{static_cast<std::uintptr_t>(regions[i].end)});
    // The kernel stops early when the vector is full: go on from there.
    if (arg.walk_end <= cur) break;
    cur = arg.walk_end;
  }
  ::close(fd);
  return result;
}

Result<bool> huge_mapped(VirtAddr start, std::size_t length) {
  // Opened for each call (a few microseconds), as above: a cached
  // descriptor would name the parent after a fork, and the application
  // could close it and reuse its number for a file that then gets our ioctl.
  const int fd = ::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::error(EOPNOTSUPP, "/proc/self/pagemap cannot be opened");
  PageRegion regions[2];
  PmScanArg arg{};
  arg.size = sizeof arg;
  arg.start = start.value;
  arg.end = start.value + length;
  arg.vec = reinterpret_cast<std::uintptr_t>(regions);
  arg.vec_len = 2;
  arg.category_mask = kPageIsHuge;  // only huge-mapped pages are reported
  arg.return_mask = kPageIsHuge;
  const long n = ::ioctl(fd, kPagemapScan, &arg);
  const int failed = errno;
  ::close(fd);
  if (n < 0) {
    return Status::error(failed == ENOTTY || failed == EINVAL ? EOPNOTSUPP : failed,
                         "PAGEMAP_SCAN: " + errno_text(failed));
  }
  return n == 1 && regions[0].start == arg.start && regions[0].end == arg.end;
}

}  // namespace uhmm::platform
