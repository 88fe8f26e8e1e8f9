// platform/uffd.hpp: userfaultfd and memory-mapping syscalls, nothing else.
//
// Debian 12's UAPI headers predate UFFDIO_MOVE and UFFDIO_POISON; their
// values (from the 6.8 UAPI) are defined here and the kernel's support is
// probed at run time.
#pragma once

#include <linux/userfaultfd.h>
#include <sys/ioctl.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "uhmm/status.hpp"
#include "uhmm/types.hpp"

namespace uhmm::platform {

// Feature bits newer than the installed headers.
inline constexpr std::uint64_t kFeaturePoison = std::uint64_t{1} << 14;
inline constexpr std::uint64_t kFeatureWpAsync = std::uint64_t{1} << 15;
inline constexpr std::uint64_t kFeatureMove = std::uint64_t{1} << 16;

struct UffdioMove {
  std::uint64_t dst;
  std::uint64_t src;
  std::uint64_t len;
  std::uint64_t mode;
  std::int64_t move;
};
struct UffdioPoison {
  struct uffdio_range range;
  std::uint64_t mode;
  std::int64_t updated;
};
inline constexpr unsigned long kUffdioMove = _IOWR(UFFDIO, 0x05, UffdioMove);
inline constexpr unsigned long kUffdioPoison = _IOWR(UFFDIO, 0x08, UffdioPoison);
inline constexpr std::uint64_t kMoveModeDontWake = 1u << 0;
inline constexpr std::uint64_t kMoveModeAllowSrcHoles = 1u << 1;
inline constexpr std::uint64_t kContinueModeWp = 1u << 1;

/// The outcome of a range operation that may stop part way (MOVE, COPY).
struct PartialResult {
  std::size_t bytes_done = 0;  // bytes completed before `error`
  int error = 0;               // 0 when the whole range completed
};

/// An owned userfaultfd.
class Uffd {
 public:
  Uffd() = default;
  ~Uffd();
  Uffd(Uffd&& other) noexcept : fd_(other.fd_), features_(other.features_), on_busy_(std::move(other.on_busy_)) {
    other.fd_ = -1;
  }
  Uffd& operator=(Uffd&& other) noexcept;
  Uffd(const Uffd&) = delete;
  Uffd& operator=(const Uffd&) = delete;

  /// Opens a userfaultfd that also serves kernel-mode faults (syscalls on
  /// managed buffers), trying the syscall and then /dev/userfaultfd, and
  /// negotiates `features` (every bit must be supported).
  static Result<Uffd> open(std::uint64_t features, bool nonblocking);

  int fd() const { return fd_; }
  std::uint64_t features() const { return features_; }

  Status register_range(VirtAddr start, std::size_t len, std::uint64_t mode);
  Status unregister_range(VirtAddr start, std::size_t len);

  /// UFFDIO_MOVE, continuing after EAGAIN while on_busy allows; stops at
  /// the first other error.
  PartialResult move(VirtAddr dst, VirtAddr src, std::size_t len, std::uint64_t mode);
  /// UFFDIO_COPY, continuing after EAGAIN while on_busy allows.
  /// `write_protect`: the pages arrive write-protected (a range registered
  /// in WP mode; with kFeatureWpAsync the first write just clears the bit).
  PartialResult copy(VirtAddr dst, const void* src, std::size_t len, bool wake, bool write_protect = false);
  /// Called when MOVE or COPY fails with EAGAIN; it retries if this returns
  /// true and returns EAGAIN otherwise (without a hook: retries).  The
  /// kernel says EAGAIN while an event (munmap, madvise, mremap) waits to be
  /// read from this uffd, so a caller that may be the only reader must read
  /// here, not spin.  Set before other threads use the uffd.
  void set_on_busy(std::function<bool()> fn) { on_busy_ = std::move(fn); }
  Status zeropage(VirtAddr dst, std::size_t len, bool wake);
  /// UFFDIO_CONTINUE: maps the page cache's pages of a shared range
  /// registered in minor mode (EAGAIN retried as for COPY), stopping at the
  /// first page that fails: EFAULT when the page cache lacks it, EEXIST when
  /// it is mapped already.
  PartialResult continue_range(VirtAddr dst, std::size_t len, bool wake, bool write_protect);
  Status poison(VirtAddr dst, std::size_t len);
  Status wake(VirtAddr start, std::size_t len);

 private:
  int fd_ = -1;
  std::uint64_t features_ = 0;
  std::function<bool()> on_busy_;
};

/// PAGEMAP_SCAN on /proc/self/pagemap (Linux >= 6.7; the installed headers
/// predate it): appends to `out` the ranges of [start, start+len) whose
/// pages were written since they were last write-protected (present pages
/// without the userfaultfd write-protect bit).  `reprotect` write-protects
/// every page of the range in the same walk, atomically with the test (the
/// range must be registered in WP mode with kFeatureWpAsync); it also puts
/// write-protect markers in empty page-table slots, so that pages the
/// kernel maps later (from the page cache) start protected.
Status scan_written(VirtAddr start, std::size_t len, bool reprotect,
                    std::vector<std::pair<VirtAddr, VirtAddr>>* out);

/// PAGEMAP_SCAN too: whether every page of [start, start + length) is
/// present and mapped by huge (PMD) entries of the kernel's page table.
/// EOPNOTSUPP on kernels without PAGEMAP_SCAN.
Result<bool> huge_mapped(VirtAddr start, std::size_t length);

/// Whether, by the kernel's settings as text, a private anonymous mapping
/// advised MADV_HUGEPAGE takes the kernel's huge-page path on a read fault
/// of an empty 2 MiB block without allocating anything: `enabled` is the
/// text of /sys/kernel/mm/transparent_hugepage/enabled (not "[never]"),
/// `use_zero_page` that of .../use_zero_page ("1").
bool huge_read_faults_from(std::string_view enabled, std::string_view use_zero_page);
/// The same for this process, from sysfs and prctl(PR_GET_THP_DISABLE);
/// false when either cannot be read.
bool huge_read_faults_available();

/// Maps anonymous private memory, PROT_READ|PROT_WRITE unless told otherwise.
Result<VirtAddr> map_anonymous(std::size_t len, int prot, bool noreserve);
/// Same, aligned to `align` (a power of two).
Result<VirtAddr> map_anonymous_aligned(std::size_t len, std::size_t align, int prot, bool noreserve);
Status unmap(VirtAddr start, std::size_t len);
Status advise(VirtAddr start, std::size_t len, int advice);

/// True if [start, start+len) is covered by exactly one private anonymous
/// mapping with the given protection (from /proc/self/maps).
bool is_private_anonymous_mapping(VirtAddr start, std::size_t len, int* prot_out);

/// Calls mincore() and reports residency per page into `out` (1 = resident).
Status resident_pages(VirtAddr start, std::size_t len, unsigned char* out);

/// Copies [from, from+len) of this process into `to` through /proc/self/mem:
/// whatever the range's protection (PROT_NONE included), and without ever
/// faulting: a page that is not present in a userfaultfd-registered range
/// fails the read (EIO) instead of waiting for a fault service, as does an
/// address nothing maps.
Status read_own_memory(VirtAddr from, void* to, std::size_t len);

std::string errno_text(int err);

}  // namespace uhmm::platform
