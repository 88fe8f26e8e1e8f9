// compat: pagemap patching (pagemap.hpp).
#include "compat/pagemap.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

namespace uhmm::compat {

std::uint64_t pagemap_word(std::uint64_t kernel, const PageInfo& info, bool file_page) {
  using State = PageInfo::State;
  const std::uint64_t kept = kernel & ~(kPmPresent | kPmSwap | kPmMmapExclusive | kPmFrameMask);
  switch (info.state) {
    case State::kDevicePrivate:
    case State::kDeviceExclusive:
      // Locked: on its way to or from the device, a migration entry.
      return kept | kPmSwap | (info.locked ? 0 : kPmMmapExclusive);
    case State::kSystem:
    case State::kDeviceCoherent:
      if (info.locked && !(kernel & (kPmPresent | kPmSwap))) return kept | kPmSwap;
      // Never on a device (clean pages refuse migration): only a page the
      // CPU maps can be the file's.
      if (file_page && info.state == State::kSystem && (kernel & kPmPresent)) return kernel | kPmFile;
      return kernel;
    case State::kNone:
      return kernel;
  }
  return kernel;
}

void patch_pagemap(const AddressSpace& as, const FilePageMarks* files, std::uint64_t offset, void* buf,
                   std::size_t bytes) {
  const std::uint64_t first_vpn = offset / sizeof(std::uint64_t);
  auto* p = static_cast<unsigned char*>(buf);
  for (std::size_t i = 0; i + sizeof(std::uint64_t) <= bytes; i += sizeof(std::uint64_t)) {
    const Vpn vpn{first_vpn + i / sizeof(std::uint64_t)};
    // Beyond the user address space (pagemap covers it too): nothing of ours.
    if (vpn.value >= (std::uint64_t{1} << (47 - kPageShift))) break;
    const PageInfo info = as.page_info(VirtAddr::from_vpn(vpn));
    if (info.state == PageInfo::State::kNone) continue;
    std::uint64_t w;
    std::memcpy(&w, p + i, sizeof w);  // the program's buffer need not be aligned
    const bool file_page = files != nullptr && info.state == PageInfo::State::kSystem && (w & kPmPresent) &&
                           files->contains(vpn);
    const std::uint64_t patched = pagemap_word(w, info, file_page);
    if (patched != w) std::memcpy(p + i, &patched, sizeof patched);
  }
}

Result<std::vector<std::uint64_t>> read_own_pagemap(std::uintptr_t start, std::uintptr_t end) {
  std::vector<std::uint64_t> words((end - start) / kPageSize);
  const int fd = ::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::error(EIO, "cannot open /proc/self/pagemap");
  const auto want = static_cast<ssize_t>(words.size() * sizeof(std::uint64_t));
  const ssize_t got = ::pread(fd, words.data(), static_cast<std::size_t>(want),
                              static_cast<off_t>((start >> kPageShift) * sizeof(std::uint64_t)));
  ::close(fd);
  if (got != want) return Status::error(EIO, "cannot read /proc/self/pagemap");
  return words;
}

bool is_own_pagemap_path(const char* path) {
  if (path == nullptr || std::strncmp(path, "/proc/", 6) != 0) return false;
  const char* rest = path + 6;
  if (std::strcmp(rest, "self/pagemap") == 0 || std::strcmp(rest, "thread-self/pagemap") == 0) return true;
  char* end = nullptr;
  const long pid = std::strtol(rest, &end, 10);
  return end != rest && pid == static_cast<long>(::getpid()) && std::strcmp(end, "/pagemap") == 0;
}

PagemapFds::Block* PagemapFds::block(int fd, bool make) {
  if (fd < kBlockFds) return &first_;
  std::atomic<Block*>& slot = blocks_[static_cast<unsigned>(fd) / kBlockFds];
  Block* b = slot.load(std::memory_order_acquire);
  if (b != nullptr || !make) return b;
  // mmap, not new: this runs inside the interposed open and dup, which
  // must not depend on malloc's state.  Zero pages are a valid empty Block.
  void* m = ::mmap(nullptr, sizeof(Block), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) return nullptr;
  auto* fresh = static_cast<Block*>(m);
  if (slot.compare_exchange_strong(b, fresh, std::memory_order_acq_rel)) return fresh;
  ::munmap(m, sizeof(Block));  // another thread mapped it first: b is its block
  return b;
}

void PagemapFds::opened(int fd) {
  if (fd < 0) return;
  struct stat st {};
  if (::fstat(fd, &st) != 0) return;
  Block* b = block(fd, true);
  if (b == nullptr) return;
  const int i = fd % kBlockFds;
  b->inodes[i].store(st.st_ino, std::memory_order_relaxed);
  b->marks[static_cast<unsigned>(i) / 64].fetch_or(std::uint64_t{1} << (i % 64), std::memory_order_acq_rel);
}

void PagemapFds::duplicated(int fd, int copy) {
  if (copy < 0 || copy == fd) return;
  if (is(fd)) {
    opened(copy);
  } else if (maybe(copy)) {
    closed(copy);
  }
}

void PagemapFds::closed(int fd) {
  if (fd < 0) return;
  Block* b = block(fd, false);
  if (b == nullptr) return;
  const int i = fd % kBlockFds;
  b->marks[static_cast<unsigned>(i) / 64].fetch_and(~(std::uint64_t{1} << (i % 64)), std::memory_order_acq_rel);
}

bool PagemapFds::is(int fd) {
  if (!maybe(fd)) return false;
  struct stat st {};
  return ::fstat(fd, &st) == 0 && st.st_ino == block(fd, false)->inodes[fd % kBlockFds].load(std::memory_order_relaxed);
}

}  // namespace uhmm::compat
