// FileCache: real files in a temporary directory, every byte checked in the
// mappings and, after closing, on disk with plain read(2).  Each test runs
// with both fault modes.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <random>
#include <setjmp.h>
#include <sys/mman.h>
#include <string>
#include <thread>
#include <vector>

#include "file_test_support.hpp"
#include "uhmm/uhmm.hpp"

// In-thread mode serves faults inside SIGBUS handlers (docs/adr/0004).
extern "C" const char* __tsan_default_options() { return "report_signal_unsafe=0"; }

namespace uhmm {
namespace {

class FileCacheTest : public ::testing::TestWithParam<FaultMode> {
 protected:
  void SetUp() override {
    as = address_space_for(GetParam());
    ASSERT_TRUE(as);
  }
  void TearDown() override { as.reset(); }

  std::unique_ptr<FileCache> open(const std::string& path, int flags = O_RDWR, FileCacheOptions o = {}) {
    auto r = FileCache::open(*as, path, flags, 0600, o);
    EXPECT_TRUE(r.is_ok()) << r.status().to_string();
    return r.is_ok() ? std::move(*r) : nullptr;
  }
  // Writes `bytes` of pattern `seed` to `path` and opens it read-write,
  // flushing every `flush` (0: only when asked).
  std::unique_ptr<FileCache> open_written(const std::string& path, std::uint64_t bytes, unsigned seed,
                                          std::chrono::milliseconds flush) {
    write_file(path, bytes, seed);
    FileCacheOptions o;
    o.flush_interval = flush;
    return open(path, O_RDWR, o);
  }

  TempDir dir;
  std::unique_ptr<AddressSpace> as;
};

TEST_P(FileCacheTest, MappingsReadTheFileAndSeeEachOthersWrites) {
  const std::string path = dir.file("data");
  const std::uint64_t size = 9 * kPageSize + 123;  // a partial last page
  write_file(path, size, 1);
  auto cache = open(path);
  ASSERT_TRUE(cache);
  EXPECT_EQ(cache->size(), size);
  auto a = cache->map(0, size);
  auto b = cache->map(0, size);
  ASSERT_TRUE(a.is_ok() && b.is_ok());
  auto* pa = static_cast<std::uint8_t*>(a->ptr());
  auto* pb = static_cast<std::uint8_t*>(b->ptr());
  for (std::uint64_t i = 0; i < size; ++i) ASSERT_EQ(pa[i], pattern(i, 1)) << i;
  // The tail of the last page past the end reads zeros, as for a file mapping.
  for (std::uint64_t i = size; i < 10 * kPageSize; ++i) ASSERT_EQ(pa[i], 0) << i;
  for (std::uint64_t i = 0; i < size; i += 97) pa[i] = pattern(i, 2);
  for (std::uint64_t i = 0; i < size; i += 97) ASSERT_EQ(pb[i], pattern(i, 2)) << i;
  // read() and write() go through the same pages.
  std::vector<std::byte> buf(5000);
  ASSERT_TRUE(cache->read(kPageSize + 7, buf));
  for (std::size_t i = 0; i < buf.size(); ++i)
    ASSERT_EQ(static_cast<std::uint8_t>(buf[i]), pb[kPageSize + 7 + i]) << i;
  for (auto& x : buf) x = std::byte{0x5a};
  ASSERT_TRUE(cache->write(3 * kPageSize - 10, buf));
  for (std::size_t i = 0; i < buf.size(); ++i) ASSERT_EQ(pa[3 * kPageSize - 10 + i], 0x5a) << i;
  std::vector<std::uint8_t> expect(pa, pa + size);
  ASSERT_TRUE(cache->close());
  EXPECT_EQ(read_file(path), expect);
}

TEST_P(FileCacheTest, SyncWritesWrittenPagesOnlyAndKeepsTracking) {
  const std::string path = dir.file("data");
  auto cache = open_written(path, 16 * kPageSize, 3, std::chrono::milliseconds(0));
  ASSERT_TRUE(cache);
  auto a = cache->map(0, 16 * kPageSize);
  ASSERT_TRUE(a.is_ok());
  auto* p = static_cast<std::uint8_t*>(a->ptr());
  for (std::uint64_t i = 0; i < 16 * kPageSize; ++i) ASSERT_EQ(p[i], pattern(i, 3));  // all read in
  EXPECT_EQ(cache->dirty_pages(), 0u);
  p[5 * kPageSize + 1] = 0xee;
  p[9 * kPageSize] = 0xdd;
  EXPECT_EQ(cache->dirty_pages(), 2u);
  ASSERT_TRUE(cache->sync());
  EXPECT_EQ(cache->dirty_pages(), 0u);
  auto disk = read_file(path);
  ASSERT_EQ(disk.size(), 16 * kPageSize);
  EXPECT_EQ(disk[5 * kPageSize + 1], 0xee);
  EXPECT_EQ(disk[9 * kPageSize], 0xdd);
  // Protected again: the next write is seen too.
  p[5 * kPageSize + 2] = 0xcc;
  EXPECT_EQ(cache->dirty_pages(), 1u);
  ASSERT_TRUE(cache->sync(SyncMode::kDurable));
  EXPECT_EQ(read_file(path)[5 * kPageSize + 2], 0xcc);
}

TEST_P(FileCacheTest, UnmapAndApplicationMunmapLoseNothing) {
  const std::string path = dir.file("data");
  auto cache = open_written(path, 8 * kPageSize, 4, std::chrono::milliseconds(0));
  ASSERT_TRUE(cache);
  auto a = cache->map(0, 4 * kPageSize);
  auto b = cache->map(4 * kPageSize, 4 * kPageSize);
  ASSERT_TRUE(a.is_ok() && b.is_ok());
  std::memset(a->ptr(), 0x11, 4 * kPageSize);
  std::memset(b->ptr(), 0x22, 4 * kPageSize);
  EXPECT_EQ(as->unmap(*a).code(), EINVAL);  // the cache's, not the address space's to drop
  ASSERT_TRUE(cache->unmap(*a));
  // Behind uhmm's back: the written bits go with the page tables.
  ASSERT_EQ(::munmap(b->ptr(), 4 * kPageSize), 0);
  ASSERT_TRUE(cache->sync());
  auto disk = read_file(path);
  for (std::uint64_t i = 0; i < 8 * kPageSize; ++i) ASSERT_EQ(disk[i], i < 4 * kPageSize ? 0x11 : 0x22) << i;
  EXPECT_EQ(cache->unmap(*a).code(), EINVAL);
}

TEST_P(FileCacheTest, DiscardAndMremapBehindUhmmsBackLoseNothing) {
  const std::string path = dir.file("data");
  auto cache = open_written(path, 8 * kPageSize, 11, std::chrono::milliseconds(0));
  ASSERT_TRUE(cache);
  auto a = cache->map(0, 4 * kPageSize);
  auto b = cache->map(4 * kPageSize, 4 * kPageSize);
  ASSERT_TRUE(a.is_ok() && b.is_ok());
  std::memset(a->ptr(), 0x44, 4 * kPageSize);
  // The page tables go, the pages stay in the cache, as for a file mapping.
  ASSERT_EQ(::madvise(a->ptr(), 4 * kPageSize, MADV_DONTNEED), 0);
  EXPECT_EQ(static_cast<std::uint8_t*>(a->ptr())[kPageSize], 0x44);
  std::memset(b->ptr(), 0x55, 2 * kPageSize);
  void* target = ::mmap(nullptr, 4 * kPageSize, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(target, MAP_FAILED);
  void* moved = ::mremap(b->ptr(), 4 * kPageSize, 4 * kPageSize, MREMAP_MAYMOVE | MREMAP_FIXED, target);
  ASSERT_NE(moved, MAP_FAILED);
  auto* m = static_cast<std::uint8_t*>(moved);
  EXPECT_EQ(m[0], 0x55);
  std::memset(m + 2 * kPageSize, 0x66, 2 * kPageSize);  // written only at the new place
  ASSERT_TRUE(cache->sync());
  auto disk = read_file(path);
  for (std::uint64_t i = 0; i < 8 * kPageSize; ++i)
    ASSERT_EQ(disk[i], i < 4 * kPageSize ? 0x44 : (i < 6 * kPageSize ? 0x55 : 0x66)) << i;
  // The moved mapping is still the cache's: a later write there is tracked.
  m[3 * kPageSize] = 0x67;
  ASSERT_TRUE(cache->close());
  EXPECT_EQ(read_file(path)[7 * kPageSize], 0x67);
}

sigjmp_buf g_sigbus_jump;
void on_test_sigbus(int sig, siginfo_t* info, void* uc) {
  if (handle_sigbus(sig, info, uc)) return;  // an in-thread fault uhmm served
  siglongjmp(g_sigbus_jump, 1);
}

// True if reading `p` raises a SIGBUS that uhmm does not serve (the
// kernel's, past the end of the object).
bool read_raises_sigbus(const volatile std::uint8_t* p) {
  struct sigaction sa {}, prev {};
  sa.sa_sigaction = on_test_sigbus;
  sa.sa_flags = SA_SIGINFO;
  EXPECT_EQ(::sigaction(SIGBUS, &sa, &prev), 0);
  volatile bool faulted = false;  // set across a siglongjmp
  if (sigsetjmp(g_sigbus_jump, 1) == 0) {
    (void)*p;
  } else {
    faulted = true;
  }
  EXPECT_EQ(::sigaction(SIGBUS, &prev, nullptr), 0);
  return faulted;
}

TEST_P(FileCacheTest, AccessPastTheEndRaisesSigbus) {
  const std::string path = dir.file("data");
  write_file(path, kPageSize + 10, 12);
  auto cache = open(path);
  ASSERT_TRUE(cache);
  auto a = cache->map(0, 4 * kPageSize);
  ASSERT_TRUE(a.is_ok());
  auto* p = static_cast<volatile std::uint8_t*>(a->ptr());
  EXPECT_EQ(p[kPageSize + 9], pattern(kPageSize + 9, 12));
  EXPECT_EQ(p[kPageSize + 10], 0);
  EXPECT_TRUE(read_raises_sigbus(p + 2 * kPageSize));
}

// write() past the end behaves as pwrite(2) does on the file: the object
// and the file grow, the gap reads zeros, and in every mapping the pages
// that came inside the object stop raising SIGBUS.
TEST_P(FileCacheTest, WritePastTheEndGrowsTheObjectLikePwrite) {
  const std::string path = dir.file("data");
  const std::uint64_t size = kPageSize + 100;
  auto cache = open_written(path, size, 15, std::chrono::milliseconds(0));
  ASSERT_TRUE(cache);
  auto a = cache->map(0, 4 * kPageSize);
  ASSERT_TRUE(a.is_ok());
  auto* p = static_cast<volatile std::uint8_t*>(a->ptr());
  EXPECT_EQ(p[kPageSize + 99], pattern(kPageSize + 99, 15));
  EXPECT_TRUE(read_raises_sigbus(p + 3 * kPageSize));
  const std::vector<std::byte> data(200, std::byte{0x7e});
  const std::uint64_t at = 3 * kPageSize + 50;
  ASSERT_TRUE(cache->write(at, data));
  EXPECT_EQ(cache->size(), at + data.size());
  for (std::uint64_t i = size; i < 4 * kPageSize; ++i)
    ASSERT_EQ(p[i], i >= at && i < at + data.size() ? 0x7e : 0) << i;
  std::vector<std::byte> gap(kPageSize);
  ASSERT_TRUE(cache->read(2 * kPageSize, gap));
  for (std::byte b : gap) ASSERT_EQ(b, std::byte{0});
  // Appending at the end, and storing through the mapping in the new part.
  const std::byte one{0x31};
  ASSERT_TRUE(cache->write(cache->size(), {&one, 1}));
  p[2 * kPageSize + 7] = 0x44;
  EXPECT_EQ(cache->write(~std::uint64_t{0} - 10, data).code(), EFBIG);
  EXPECT_EQ(cache->size(), at + data.size() + 1);
  ASSERT_TRUE(cache->close());
  const auto disk = read_file(path);
  ASSERT_EQ(disk.size(), at + data.size() + 1);
  for (std::uint64_t i = 0; i < disk.size(); ++i) {
    std::uint8_t want = i < size ? pattern(i, 15) : 0;
    if (i >= at) want = i < at + data.size() ? 0x7e : 0x31;
    if (i == 2 * kPageSize + 7) want = 0x44;
    ASSERT_EQ(disk[i], want) << i;
  }
}

TEST_P(FileCacheTest, TruncateDropsPagesAndGrowingReadsZeros) {
  const std::string path = dir.file("data");
  write_file(path, 8 * kPageSize, 5);
  auto cache = open(path);
  ASSERT_TRUE(cache);
  auto a = cache->map(0, 8 * kPageSize);
  ASSERT_TRUE(a.is_ok());
  auto* p = static_cast<std::uint8_t*>(a->ptr());
  std::memset(p, 0x77, 8 * kPageSize);  // every page dirty
  const std::uint64_t cut = 3 * kPageSize + 100;
  ASSERT_TRUE(cache->truncate(cut));
  EXPECT_EQ(cache->size(), cut);
  for (std::uint64_t i = cut; i < 4 * kPageSize; ++i) ASSERT_EQ(p[i], 0) << i;
  ASSERT_TRUE(cache->truncate(8 * kPageSize));
  for (std::uint64_t i = 0; i < 8 * kPageSize; ++i) ASSERT_EQ(p[i], i < cut ? 0x77 : 0) << i;
  p[7 * kPageSize] = 0x99;
  ASSERT_TRUE(cache->close());
  auto disk = read_file(path);
  ASSERT_EQ(disk.size(), 8 * kPageSize);
  for (std::uint64_t i = 0; i < 8 * kPageSize; ++i)
    ASSERT_EQ(disk[i], i < cut ? 0x77 : (i == 7 * kPageSize ? 0x99 : 0)) << i;
}

TEST_P(FileCacheTest, BadInputGetsClearErrors) {
  const std::string path = dir.file("data");
  write_file(path, 4 * kPageSize, 6);
  {
    auto ro = open(path, O_RDONLY);
    ASSERT_TRUE(ro);
    EXPECT_EQ(ro->map(0, kPageSize, PROT_READ | PROT_WRITE).code(), EACCES);
    EXPECT_TRUE(ro->map(0, kPageSize, PROT_READ).is_ok());
    std::byte one{1};
    EXPECT_EQ(ro->write(0, {&one, 1}).code(), EBADF);
    EXPECT_EQ(ro->truncate(0).code(), EBADF);
    // One cache per file.
    EXPECT_EQ(FileCache::open(*as, path, O_RDWR).status().code(), EBUSY);
  }
  auto cache = open(path);
  ASSERT_TRUE(cache);
  EXPECT_EQ(cache->map(100, kPageSize).code(), EINVAL);
  EXPECT_EQ(cache->map(0, 0).code(), EINVAL);
  EXPECT_EQ(cache->map(0, kPageSize, PROT_WRITE | PROT_EXEC).code(), EINVAL);
  std::byte buf[8];
  EXPECT_EQ(cache->read(4 * kPageSize - 4, buf).code(), EINVAL);
  EXPECT_EQ(FileCache::open(*as, dir.file("missing"), O_RDWR).status().code(), ENOENT);
  EXPECT_EQ(FileCache::open(*as, dir.file(""), O_RDONLY).status().code(), EINVAL);  // a directory
  EXPECT_EQ(FileCache::create_anonymous(*as, 100).status().code(), EINVAL);
  ASSERT_TRUE(cache->close());
  EXPECT_EQ(cache->sync().code(), EBADF);
}

TEST_P(FileCacheTest, WriteErrorReachesSyncAndPagesStayDirty) {
  const std::string path = dir.file("data");
  auto cache = open_written(path, 4 * kPageSize, 7, std::chrono::milliseconds(0));
  ASSERT_TRUE(cache);
  auto a = cache->map(0, 4 * kPageSize);
  ASSERT_TRUE(a.is_ok());
  static_cast<std::uint8_t*>(a->ptr())[3 * kPageSize] = 0x42;
  // A file size limit makes the writeback's pwrite fail (EFBIG), as a full
  // disk would (ENOSPC): the error is the kernel's, on the real path.
  struct rlimit old {};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
  struct sigaction ign {}, prev {};
  ign.sa_handler = SIG_IGN;
  ASSERT_EQ(::sigaction(SIGXFSZ, &ign, &prev), 0);
  struct rlimit small = old;
  small.rlim_cur = kPageSize;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  const Status failed = cache->sync(SyncMode::kDurable);
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &old), 0);
  ASSERT_EQ(::sigaction(SIGXFSZ, &prev, nullptr), 0);
  EXPECT_EQ(failed.code(), EFBIG) << failed.to_string();
  EXPECT_EQ(cache->dirty_pages(), 1u);
  EXPECT_EQ(read_file(path)[3 * kPageSize], pattern(3 * kPageSize, 7));
  ASSERT_TRUE(cache->sync());
  EXPECT_EQ(cache->dirty_pages(), 0u);
  EXPECT_EQ(read_file(path)[3 * kPageSize], 0x42);
}

// A real full disk: a 64 KiB tmpfs, mounted in a child's own mount
// namespace (needs root; skipped otherwise).
TEST_P(FileCacheTest, FullDiskReachesSyncAndTheDataStaysDirty) {
  const std::string mnt = dir.file("small");
  ASSERT_EQ(::mkdir(mnt.c_str(), 0700), 0);
  as.reset();  // fork with no threads: the child's allocator locks are free (ASan's are not fork-safe)
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    if (::unshare(CLONE_NEWNS) != 0 || ::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0 ||
        ::mount("uhmm-test", mnt.c_str(), "tmpfs", 0, "size=64k") != 0)
      ::_exit(77);
    constexpr std::uint64_t kPages = 32;  // twice what fits
    const std::string path = mnt + "/data";
    const int fd = ::open(path.c_str(), O_RDWR | O_CREAT, 0600);
    if (fd < 0 || ::ftruncate(fd, kPages * kPageSize) != 0) ::_exit(10);
    ::close(fd);
    AddressSpaceOptions o;
    o.fault_mode = GetParam();
    auto space = AddressSpace::create(o);
    if (!space) ::_exit(11);
    FileCacheOptions fo;
    fo.flush_interval = std::chrono::milliseconds(0);
    auto c = FileCache::open(**space, path, O_RDWR, 0600, fo);
    if (!c) ::_exit(12);
    auto m = (*c)->map(0, kPages * kPageSize);
    if (!m) ::_exit(13);
    for (std::uint64_t i = 0; i < kPages * kPageSize; ++i) static_cast<std::uint8_t*>(m->ptr())[i] = pattern(i, 13);
    if ((*c)->sync(SyncMode::kDurable).code() != ENOSPC) ::_exit(14);
    if ((*c)->dirty_pages() == 0) ::_exit(15);  // what did not fit stays dirty
    // Make room: drop the second half.  Everything left reaches the disk.
    if (!(*c)->truncate(kPages / 2 * kPageSize)) ::_exit(16);
    if (!(*c)->sync(SyncMode::kDurable) || (*c)->dirty_pages() != 0) ::_exit(17);
    if (!(*c)->close()) ::_exit(18);
    const auto disk = read_file(path);
    if (disk.size() != kPages / 2 * kPageSize) ::_exit(19);
    for (std::uint64_t i = 0; i < disk.size(); ++i)
      if (disk[i] != pattern(i, 13)) ::_exit(20);
    ::_exit(0);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  if (WEXITSTATUS(status) == 77) GTEST_SKIP() << "cannot mount a small tmpfs here (needs root)";
  EXPECT_EQ(WEXITSTATUS(status), 0) << "the child's check that failed (see the exit codes in the test)";
}

TEST_P(FileCacheTest, ConcurrentWritersAndWritebackLoseNothing) {
  const std::string path = dir.file("data");
  constexpr std::uint64_t kPages = 64;
  auto cache = open_written(path, kPages * kPageSize, 8, std::chrono::milliseconds(1));  // the flusher races too
  ASSERT_TRUE(cache);
  auto a = cache->map(0, kPages * kPageSize);
  auto b = cache->map(0, kPages * kPageSize);
  ASSERT_TRUE(a.is_ok() && b.is_ok());
  std::atomic<bool> done{false};
  std::vector<std::thread> writers;
  for (unsigned t = 0; t < 4; ++t) {
    writers.emplace_back([&, t] {
      auto* p = static_cast<volatile std::uint32_t*>((t % 2 ? *b : *a).ptr());
      for (std::uint32_t round = 1; round <= 200; ++round)
        for (std::uint64_t pg = t; pg < kPages; pg += 4) p[pg * kPageSize / 4 + round % 1024] = round;
    });
  }
  std::thread syncer([&] {
    while (!done.load()) ASSERT_TRUE(cache->sync());
  });
  for (auto& w : writers) w.join();
  done = true;
  syncer.join();
  std::vector<std::uint8_t> expect(static_cast<std::uint8_t*>(a->ptr()),
                                   static_cast<std::uint8_t*>(a->ptr()) + kPages * kPageSize);
  ASSERT_TRUE(cache->close());
  EXPECT_EQ(read_file(path), expect);
}

// Truncations race with faults and read()/write(): nothing read before a
// cut may come back past it, and what lies inside stays intact.
TEST_P(FileCacheTest, TruncateRacingWithLoadsLeavesNoStaleBytes) {
  const std::string path = dir.file("data");
  constexpr std::uint64_t kPages = 64;
  constexpr std::uint64_t kCut = 16 * kPageSize + kPageSize / 2;
  write_file(path, kPages * kPageSize, 14);
  FileCacheOptions o;
  o.flush_interval = std::chrono::milliseconds(0);
  o.fault_around_pages = 4;
  auto cache = open(path, O_RDWR, o);
  ASSERT_TRUE(cache);
  auto a = cache->map(0, kPages * kPageSize);
  ASSERT_TRUE(a.is_ok());
  auto* p = static_cast<volatile std::uint8_t*>(a->ptr());
  std::atomic<bool> done{false};
  std::atomic<int> unexpected{0};
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < 3; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      std::byte buf[3000]{};  // thread 0 writes zeros
      while (!done.load()) {
        const std::uint64_t off = rng() % (kPages * kPageSize - sizeof buf);
        const Status s = t == 0 ? cache->write(off, buf) : cache->read(off, buf);
        if (!s && s.code() != EINVAL && unexpected.fetch_add(1) == 0)
          ADD_FAILURE() << "thread " << t << ": " << s.to_string();
        (void)p[rng() % 16 * kPageSize];  // always inside: faults race too
      }
    });
  }
  for (int round = 0; round < 200; ++round) {
    ASSERT_TRUE(cache->truncate(kCut));
    ASSERT_TRUE(cache->truncate(kPages * kPageSize));
  }
  done = true;
  for (auto& t : threads) t.join();
  EXPECT_EQ(unexpected.load(), 0);
  // The last cut zeroed everything past it; only writes after it (thread 0
  // stopped) could have put data there, and those are zeros too.
  ASSERT_TRUE(cache->truncate(kCut));
  ASSERT_TRUE(cache->truncate(kPages * kPageSize));
  for (std::uint64_t i = kCut; i < kPages * kPageSize; ++i) ASSERT_EQ(p[i], 0) << i;
  for (std::uint64_t i = 0; i < kCut; ++i)
    ASSERT_TRUE(p[i] == pattern(i, 14) || p[i] == 0) << i;  // the file's, or thread 0's zeros
  std::vector<std::uint8_t> expect(kPages * kPageSize);
  for (std::uint64_t i = 0; i < expect.size(); ++i) expect[i] = p[i];
  ASSERT_TRUE(cache->close());
  EXPECT_EQ(read_file(path), expect);
}

// The application grows a mapping uhmm made with mremap, in place or while
// moving it.  No event tells uhmm; the grown part maps the object further
// on, as a file mapping would.  A store there to a page the cache holds
// already reaches no fault at all, yet must reach the file; a page the
// cache lacks is read from the file; past the end of the object, SIGBUS.
void grow_mapping_with_mremap(AddressSpace& as, const std::string& path, bool move) {
  write_file(path, 8 * kPageSize, 17);
  FileCacheOptions o;
  o.flush_interval = std::chrono::milliseconds(0);
  o.fault_around_pages = 1;
  auto r = FileCache::open(as, path, O_RDWR, 0600, o);
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  auto& cache = *r;
  auto full = cache->map(0, 8 * kPageSize);
  auto a = cache->map(0, 12 * kPageSize);
  ASSERT_TRUE(full.is_ok() && a.is_ok());
  auto* pf = static_cast<volatile std::uint8_t*>(full->ptr());
  for (std::uint64_t pg = 0; pg < 6; ++pg) ASSERT_EQ(pf[pg * kPageSize], pattern(pg * kPageSize, 17));  // 6, 7 not
  void* target = MAP_FAILED;
  if (move) {
    target = ::mmap(nullptr, 12 * kPageSize, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ASSERT_NE(target, MAP_FAILED);
  }
  // Room to grow into, made behind uhmm's back, and nothing in between that
  // could map something there.
  ASSERT_EQ(::munmap(static_cast<std::uint8_t*>(a->ptr()) + 4 * kPageSize, 8 * kPageSize), 0);
  void* grown = move ? ::mremap(a->ptr(), 4 * kPageSize, 12 * kPageSize, MREMAP_MAYMOVE | MREMAP_FIXED, target)
                     : ::mremap(a->ptr(), 4 * kPageSize, 12 * kPageSize, 0);
  if (!move && grown == MAP_FAILED) GTEST_SKIP() << "something was mapped right after the range meanwhile";
  ASSERT_EQ(grown, move ? target : a->ptr());
  ASSERT_TRUE(cache->sync());  // the munmap counted the pages there written
  auto* p = static_cast<volatile std::uint8_t*>(grown);
  p[5 * kPageSize + 1] = 0x51;  // a page the cache holds: no fault reaches uhmm
  ASSERT_TRUE(cache->sync());
  EXPECT_EQ(read_file(path)[5 * kPageSize + 1], 0x51);
  EXPECT_EQ(p[6 * kPageSize + 2], pattern(6 * kPageSize + 2, 17));  // one it lacks: read in
  p[7 * kPageSize] = 0x52;
  EXPECT_EQ(pf[7 * kPageSize], 0x52);  // one page of the cache, seen by both mappings
  EXPECT_TRUE(read_raises_sigbus(p + 9 * kPageSize));
  // The cache's unmap takes the whole grown mapping.
  ASSERT_TRUE(cache->unmap(VirtAddr::of(grown)));
  EXPECT_EQ(::msync(static_cast<std::uint8_t*>(grown) + 8 * kPageSize, kPageSize, MS_ASYNC), -1);
  EXPECT_EQ(errno, ENOMEM);
  ASSERT_TRUE(cache->close());
  const auto disk = read_file(path);
  ASSERT_EQ(disk.size(), 8 * kPageSize);
  for (std::uint64_t i = 0; i < disk.size(); ++i) {
    const std::uint8_t want = i == 5 * kPageSize + 1 ? 0x51 : (i == 7 * kPageSize ? 0x52 : pattern(i, 17));
    ASSERT_EQ(disk[i], want) << i;
  }
}

TEST_P(FileCacheTest, MremapGrowingAMappingInPlaceServesTheGrownPartFromTheFile) {
  grow_mapping_with_mremap(*as, dir.file("data"), /*move=*/false);
}

TEST_P(FileCacheTest, MremapMovingAndGrowingAMappingServesTheGrownPartFromTheFile) {
  grow_mapping_with_mremap(*as, dir.file("data"), /*move=*/true);
}

// The address space goes first, against the old contract: its destructor
// writes the caches' mappings back and unmaps them; the caches stay open
// without mappings, and read, write, sync and close as before.
TEST_P(FileCacheTest, DestroyingTheAddressSpaceFirstWritesBackAndKeepsTheCache) {
  const std::string path = dir.file("data");
  auto cache = open_written(path, 4 * kPageSize, 16, std::chrono::milliseconds(0));
  auto flushed = open_written(dir.file("flushed"), 4 * kPageSize, 18, std::chrono::milliseconds(1));
  auto anon = FileCache::create_anonymous(*as, 4 * kPageSize);
  ASSERT_TRUE(cache && flushed && anon.is_ok());
  auto a = cache->map(0, 4 * kPageSize);
  auto b = cache->map(kPageSize, kPageSize, PROT_READ);
  auto f = flushed->map(0, 4 * kPageSize);  // its flusher runs while the address space goes
  ASSERT_TRUE(a.is_ok() && b.is_ok() && f.is_ok() && (*anon)->map(0, kPageSize).is_ok());
  std::memset(a->ptr(), 0x21, 2 * kPageSize);
  std::memset(f->ptr(), 0x22, 4 * kPageSize);
  as.reset();
  auto disk = read_file(path);
  ASSERT_EQ(disk.size(), 4 * kPageSize);
  for (std::uint64_t i = 0; i < disk.size(); ++i) ASSERT_EQ(disk[i], i < 2 * kPageSize ? 0x21 : pattern(i, 16)) << i;
  EXPECT_EQ(cache->map(0, kPageSize).code(), ENODEV);
  EXPECT_EQ((*anon)->map(0, kPageSize).code(), ENODEV);
  EXPECT_EQ(cache->unmap(*a).code(), EINVAL);
  const std::byte mark[3] = {std::byte{0x23}, std::byte{0x24}, std::byte{0x25}};
  ASSERT_TRUE(cache->write(3 * kPageSize, mark));
  std::byte out{};
  ASSERT_TRUE(cache->read(kPageSize, {&out, 1}));
  EXPECT_EQ(out, std::byte{0x21});
  EXPECT_EQ(cache->dirty_pages(), 1u);
  ASSERT_TRUE(cache->sync());
  EXPECT_EQ(read_file(path)[3 * kPageSize + 2], 0x25);
  ASSERT_TRUE(cache->close());
  flushed.reset();  // closes in its destructor, with no address space to touch
  for (std::uint8_t byte : read_file(dir.file("flushed"))) ASSERT_EQ(byte, 0x22);
}

TEST_P(FileCacheTest, PeriodicFlushWritesBack) {
  const std::string path = dir.file("data");
  auto cache = open_written(path, 2 * kPageSize, 9, std::chrono::milliseconds(5));
  ASSERT_TRUE(cache);
  auto a = cache->map(0, 2 * kPageSize);
  ASSERT_TRUE(a.is_ok());
  static_cast<std::uint8_t*>(a->ptr())[kPageSize + 3] = 0xab;
  // No sync: the flusher gets it there (the test's timeout bounds the wait).
  while (read_file(path)[kPageSize + 3] != 0xab) std::this_thread::sleep_for(std::chrono::milliseconds(1));
}

TEST_P(FileCacheTest, SharedAnonymousMappingsShareZeroFilledPages) {
  auto r = FileCache::create_anonymous(*as, 8 * kPageSize);
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  auto& cache = *r;
  auto a = cache->map(0, 8 * kPageSize);
  auto b = cache->map(2 * kPageSize, 2 * kPageSize);
  ASSERT_TRUE(a.is_ok() && b.is_ok());
  auto* pa = static_cast<std::uint8_t*>(a->ptr());
  auto* pb = static_cast<std::uint8_t*>(b->ptr());
  for (std::uint64_t i = 0; i < 8 * kPageSize; ++i) ASSERT_EQ(pa[i], 0);
  pb[10] = 0x31;
  EXPECT_EQ(pa[2 * kPageSize + 10], 0x31);
  pa[3 * kPageSize] = 0x32;
  EXPECT_EQ(pb[kPageSize], 0x32);
  std::byte out;
  ASSERT_TRUE(cache->read(3 * kPageSize, {&out, 1}));
  EXPECT_EQ(out, std::byte{0x32});
  EXPECT_TRUE(cache->sync());
}

TEST_P(FileCacheTest, ForkedChildGetsNoMappingAndClearErrors) {
  const std::string path = dir.file("data");
  write_file(path, 2 * kPageSize, 10);
  auto cache = open(path);
  ASSERT_TRUE(cache);
  auto a = cache->map(0, 2 * kPageSize);
  ASSERT_TRUE(a.is_ok());
  static_cast<volatile std::uint8_t*>(a->ptr())[0] = 1;
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    if (cache->sync().code() != ECHILD) ::_exit(2);
    // Another cache of the file, here or in any process: refused.
    if (FileCache::open(*as, path, O_RDWR).status().code() != EBUSY) ::_exit(4);
    ::signal(SIGSEGV, SIG_DFL);
    (void)static_cast<volatile std::uint8_t*>(a->ptr())[0];  // not mapped here
    ::_exit(3);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFSIGNALED(status)) << "exit " << WEXITSTATUS(status);
  EXPECT_EQ(WTERMSIG(status), SIGSEGV);
}

// A child writes generations of whole pages through a mapping and syncs
// after each (one thread, no periodic flush: every page is whole whenever
// writeback copies it), and is killed at a random point, often inside a
// writeback; every page on disk must then be one generation, whole.
TEST_P(FileCacheTest, KilledWriterNeverLeavesATornPage) {
  const std::string path = dir.file("data");
  constexpr std::uint64_t kPages = 32;
  std::mt19937 rng(12345);
  as.reset();  // fork with no threads: the child's allocator locks are free (ASan's are not fork-safe)
  for (int run = 0; run < 4; ++run) {
    {
      const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
      ASSERT_GE(fd, 0);
      std::vector<std::uint8_t> zeros(kPages * kPageSize, 0);
      ASSERT_EQ(::pwrite(fd, zeros.data(), zeros.size(), 0), static_cast<ssize_t>(zeros.size()));
      ::close(fd);
    }
    int ready[2];
    ASSERT_EQ(::pipe(ready), 0);
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      AddressSpaceOptions o;
      o.fault_mode = GetParam();
      auto space = AddressSpace::create(o);
      if (!space) ::_exit(2);
      FileCacheOptions fo;
      fo.flush_interval = std::chrono::milliseconds(0);
      auto c = FileCache::open(**space, path, O_RDWR, 0600, fo);
      if (!c) ::_exit(3);
      auto m = (*c)->map(0, kPages * kPageSize);
      if (!m) ::_exit(4);
      auto* p = static_cast<volatile std::uint64_t*>(m->ptr());
      (void)!::write(ready[1], "r", 1);
      for (std::uint64_t gen = 1;; ++gen) {
        for (std::uint64_t pg = 0; pg < kPages; ++pg)
          for (std::uint64_t w = 0; w < kPageSize / 8; ++w) p[pg * kPageSize / 8 + w] = (gen & 0xff) * 0x0101010101010101ull;
        (void)(*c)->sync();
      }
    }
    ::close(ready[1]);
    char r;
    ASSERT_EQ(::read(ready[0], &r, 1), 1);
    ::close(ready[0]);
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 50000));
    ::kill(child, SIGKILL);
    int status = 0;
    ASSERT_EQ(::waitpid(child, &status, 0), child);
    ASSERT_TRUE(WIFSIGNALED(status));
    auto disk = read_file(path);
    ASSERT_EQ(disk.size(), kPages * kPageSize);
    for (std::uint64_t pg = 0; pg < kPages; ++pg)
      for (std::uint64_t i = 0; i < kPageSize; ++i)
        ASSERT_EQ(disk[pg * kPageSize + i], disk[pg * kPageSize]) << "run " << run << " page " << pg << " byte " << i;
  }
}

TEST_P(FileCacheTest, ASecondMappingMapsLoadedPagesAroundAFault) {
  const std::string path = dir.file("data");
  FileCacheOptions o;
  o.flush_interval = std::chrono::milliseconds(0);
  o.fault_around_pages = 16;
  write_file(path, 64 * kPageSize, 21);
  auto cache = open(path, O_RDWR, o);
  ASSERT_TRUE(cache);
  auto a = cache->map(0, 64 * kPageSize);
  auto b = cache->map(0, 64 * kPageSize);
  ASSERT_TRUE(a.is_ok() && b.is_ok());
  const auto* pa = static_cast<const volatile std::uint8_t*>(a->ptr());
  const auto* pb = static_cast<const volatile std::uint8_t*>(b->ptr());
  for (std::uint64_t pg = 0; pg < 64; ++pg) ASSERT_EQ(pa[pg * kPageSize], pattern(pg * kPageSize, 21));
  // The pages are in the cache; b maps 16 of them per fault (minor faults,
  // since the kernel does no fault-around for a userfaultfd mapping).
  const std::uint64_t faults = as->stats().get(Counter::uffd_faults);
  for (std::uint64_t pg = 0; pg < 64; ++pg) ASSERT_EQ(pb[pg * kPageSize + 1], pattern(pg * kPageSize + 1, 21));
  EXPECT_EQ(as->stats().get(Counter::uffd_faults) - faults, 4u);
}

INSTANTIATE_TEST_SUITE_P(FaultModes, FileCacheTest,
                         ::testing::Values(FaultMode::kServiceThreads, FaultMode::kInThread), fault_mode_suffix);

}  // namespace
}  // namespace uhmm
