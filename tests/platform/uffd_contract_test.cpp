// The kernel behaviour uhmm's event handling relies on
// (docs/address-space-events.md): a call that changes a registered range
// and raises a userfaultfd event (MADV_DONTNEED: REMOVE, munmap: UNMAP)
// does not return before that event has been read.  A kernel that let it
// return earlier would break the rule that an access after the change sees
// the change.  And until it is read, moves into the uffd's ranges fail.
#include <gtest/gtest.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#include "platform/uffd.hpp"

namespace uhmm {
namespace {

constexpr std::size_t kLen = 16 * kPageSize;

// Runs `change` on another thread with nobody reading the uffd, checks it
// is still waiting, then reads one message and checks that it returns.
void expect_waits_for_read(platform::Uffd& uffd, std::uint8_t event, const std::function<void()>& change) {
  std::atomic<bool> returned{false};
  std::thread changer([&] {
    change();
    returned.store(true);
  });
  // Not a timing assertion: a slow machine can only make this pass
  // wrongly, never fail wrongly.
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_FALSE(returned.load()) << "the change returned before its event was read";
  struct uffd_msg msg;
  ssize_t got = -1;
  for (int i = 0; i < 1000 && got <= 0; ++i) {
    got = ::read(uffd.fd(), &msg, sizeof msg);
    if (got <= 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ASSERT_EQ(got, static_cast<ssize_t>(sizeof msg));
  EXPECT_EQ(msg.event, event);
  changer.join();
  EXPECT_TRUE(returned.load());
}

TEST(UffdContract, DiscardAndUnmapWaitUntilTheirEventIsRead) {
  auto uffd = platform::Uffd::open(UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP, /*nonblocking=*/true);
  ASSERT_TRUE(uffd.is_ok()) << uffd.status().to_string();
  void* p = ::mmap(nullptr, kLen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(p, MAP_FAILED);
  std::memset(p, 7, kLen);
  const VirtAddr base = VirtAddr::of(p);
  ASSERT_TRUE(uffd->register_range(base, kLen, UFFDIO_REGISTER_MODE_MISSING).is_ok());

  expect_waits_for_read(*uffd, UFFD_EVENT_REMOVE, [&] { ::madvise(p, kPageSize, MADV_DONTNEED); });
  EXPECT_EQ(static_cast<volatile char*>(p)[kPageSize], 7);  // the rest is untouched
  expect_waits_for_read(*uffd, UFFD_EVENT_UNMAP, [&] { ::munmap((base + 8 * kPageSize).ptr(), 8 * kPageSize); });
  // Unregistered first: nobody would read this munmap's event.
  ASSERT_TRUE(uffd->unregister_range(base, 8 * kPageSize).is_ok());
  ::munmap(p, 8 * kPageSize);
}

// migrate_vma_setup moves pages out through a range registered with the
// managed uffd so that the kernel refuses the move while the application's
// change of any registered range is unread (docs/address-space-events.md,
// case 3); finalize's installs rely on the same refusal.
TEST(UffdContract, MovesIntoARegisteredRangeFailWhileAChangeIsUnread) {
  auto uffd = platform::Uffd::open(UFFD_FEATURE_EVENT_UNMAP | platform::kFeatureMove, /*nonblocking=*/true);
  if (!uffd.is_ok()) GTEST_SKIP() << "no UFFDIO_MOVE: " << uffd.status().to_string();
  uffd->set_on_busy([] { return false; });  // EAGAIN comes back here
  void* gone = ::mmap(nullptr, kLen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  void* into = ::mmap(nullptr, kLen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  void* from = ::mmap(nullptr, kLen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_TRUE(gone != MAP_FAILED && into != MAP_FAILED && from != MAP_FAILED);
  std::memset(from, 7, kLen);
  ASSERT_TRUE(uffd->register_range(VirtAddr::of(gone), kLen, UFFDIO_REGISTER_MODE_MISSING).is_ok());
  ASSERT_TRUE(uffd->register_range(VirtAddr::of(into), kLen, UFFDIO_REGISTER_MODE_MISSING).is_ok());

  std::thread changer([&] { ::munmap(gone, kLen); });  // returns once its UNMAP is read
  struct pollfd readable {
    uffd->fd(), POLLIN, 0
  };
  ASSERT_EQ(::poll(&readable, 1, 5000), 1) << "no UNMAP event";
  const platform::PartialResult refused = uffd->move(VirtAddr::of(into), VirtAddr::of(from), kPageSize, 0);
  EXPECT_EQ(refused.error, EAGAIN) << "a move went through with a change unread";
  EXPECT_EQ(refused.bytes_done, 0u);
  struct uffd_msg msg;
  ASSERT_EQ(::read(uffd->fd(), &msg, sizeof msg), static_cast<ssize_t>(sizeof msg));
  EXPECT_EQ(msg.event, UFFD_EVENT_UNMAP);
  changer.join();
  const platform::PartialResult moved = uffd->move(VirtAddr::of(into), VirtAddr::of(from), kPageSize, 0);
  EXPECT_EQ(moved.error, 0);
  EXPECT_EQ(static_cast<volatile char*>(into)[0], 7);
  ASSERT_TRUE(uffd->unregister_range(VirtAddr::of(into), kLen).is_ok());
  ::munmap(into, kLen);
  ::munmap(from, kLen);
}

// read_own_memory (/proc/self/mem) reads what nothing else may (PROT_NONE)
// and never waits for a fault service: a missing page of a registered
// range fails the read, where process_vm_readv would sleep until someone
// resolved the fault.  Coherent frames left in place are copied this way.
TEST(UffdContract, ReadingOwnMemoryNeverFaults) {
  void* hidden = ::mmap(nullptr, kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(hidden, MAP_FAILED);
  std::memset(hidden, 0x5a, kPageSize);
  ASSERT_EQ(::mprotect(hidden, kPageSize, PROT_NONE), 0);
  std::vector<unsigned char> buf(kPageSize, 0);
  ASSERT_TRUE(platform::read_own_memory(VirtAddr::of(hidden), buf.data(), kPageSize).is_ok());
  EXPECT_EQ(buf[0], 0x5a);
  EXPECT_EQ(buf[kPageSize - 1], 0x5a);

  auto uffd = platform::Uffd::open(0, /*nonblocking=*/true);
  ASSERT_TRUE(uffd.is_ok()) << uffd.status().to_string();
  void* missing = ::mmap(nullptr, kPageSize, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(missing, MAP_FAILED);
  ASSERT_TRUE(uffd->register_range(VirtAddr::of(missing), kPageSize, UFFDIO_REGISTER_MODE_MISSING).is_ok());
  // Nobody serves this uffd: a faulting read would hang the test.
  EXPECT_EQ(platform::read_own_memory(VirtAddr::of(missing), buf.data(), kPageSize).code(), EIO);
  struct pollfd readable {
    uffd->fd(), POLLIN, 0
  };
  EXPECT_EQ(::poll(&readable, 1, 0), 0) << "the read raised a fault";

  ASSERT_EQ(::munmap(hidden, kPageSize), 0);
  EXPECT_EQ(platform::read_own_memory(VirtAddr::of(hidden), buf.data(), kPageSize).code(), EIO);
  ASSERT_TRUE(uffd->unregister_range(VirtAddr::of(missing), kPageSize).is_ok());
  ::munmap(missing, kPageSize);
}

}  // namespace
}  // namespace uhmm
