// The pagemap entries the dmirror library shows for uhmm's page states
// (compat/pagemap.hpp), without a device, and the paths and fds it
// recognises as the process's pagemap.
#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>
#include <string>

#include "compat/pagemap.hpp"

namespace uhmm::compat {
namespace {

using State = PageInfo::State;

PageInfo info(State s, bool locked = false) {
  PageInfo i;
  i.state = s;
  i.locked = locked;
  return i;
}

constexpr std::uint64_t kSoftDirty = std::uint64_t{1} << 55;
constexpr std::uint64_t kPresentPage = kPmPresent | kPmMmapExclusive | 0x1234;  // a present page, pfn 0x1234

TEST(PagemapWord, DevicePrivatePageIsSwappedAndExclusive) {
  EXPECT_EQ(pagemap_word(0, info(State::kDevicePrivate)), kPmSwap | kPmMmapExclusive);
  // Bits the kernel keeps for any entry stay.
  EXPECT_EQ(pagemap_word(kSoftDirty, info(State::kDevicePrivate)), kSoftDirty | kPmSwap | kPmMmapExclusive);
}

TEST(PagemapWord, ExclusivePageIsSwapped) {
  EXPECT_EQ(pagemap_word(0, info(State::kDeviceExclusive)), kPmSwap | kPmMmapExclusive);
}

TEST(PagemapWord, MigratingPageIsAMigrationEntry) {
  // In a staging slot mid-migration: the kernel shows a hole, its own HMM a
  // migration entry (swapped, never "exclusively mapped").
  EXPECT_EQ(pagemap_word(0, info(State::kSystem, true)), kPmSwap);
  EXPECT_EQ(pagemap_word(0, info(State::kDevicePrivate, true)), kPmSwap);
  // Locked but still mapped (the move has not happened yet): the kernel's entry.
  EXPECT_EQ(pagemap_word(kPresentPage, info(State::kSystem, true)), kPresentPage);
}

TEST(PagemapWord, OtherStatesKeepTheKernelsEntry) {
  EXPECT_EQ(pagemap_word(kPresentPage, info(State::kSystem)), kPresentPage);
  EXPECT_EQ(pagemap_word(kPresentPage, info(State::kDeviceCoherent)), kPresentPage);  // mapped for the CPU
  EXPECT_EQ(pagemap_word(0, info(State::kNone)), 0u);
  EXPECT_EQ(pagemap_word(0, info(State::kNone, true)), 0u);  // a hole being filled
}

TEST(PagemapWord, CleanPageOfAConvertedFileMappingIsAFilePage) {
  EXPECT_EQ(pagemap_word(kPresentPage, info(State::kSystem), true), kPresentPage | kPmFile);
  // Not present: the kernel would have no page-cache page mapped there either.
  EXPECT_EQ(pagemap_word(0, info(State::kSystem), true), 0u);
  EXPECT_EQ(pagemap_word(0, info(State::kSystem, true), true), kPmSwap);  // mid-migration wins
  EXPECT_EQ(pagemap_word(kPresentPage, info(State::kSystem), false), kPresentPage);
}

TEST(PagemapPath, OnlyThisProcesssPagemap) {
  EXPECT_TRUE(is_own_pagemap_path("/proc/self/pagemap"));
  EXPECT_TRUE(is_own_pagemap_path("/proc/thread-self/pagemap"));
  EXPECT_TRUE(is_own_pagemap_path(("/proc/" + std::to_string(::getpid()) + "/pagemap").c_str()));
  EXPECT_FALSE(is_own_pagemap_path(("/proc/" + std::to_string(::getpid() + 1) + "/pagemap").c_str()));
  EXPECT_FALSE(is_own_pagemap_path("/proc/self/maps"));
  EXPECT_FALSE(is_own_pagemap_path("/proc/self/pagemap2"));
  EXPECT_FALSE(is_own_pagemap_path("proc/self/pagemap"));
  EXPECT_FALSE(is_own_pagemap_path(nullptr));
}

TEST(PagemapFdsTest, ANumberReusedByAnotherFileIsNotPagemap) {
  const int pm = ::open("/proc/self/pagemap", O_RDONLY);
  ASSERT_GE(pm, 0);
  PagemapFds::opened(pm);
  EXPECT_TRUE(PagemapFds::is(pm));
  const int other = ::open("/proc/self/maps", O_RDONLY);
  ASSERT_GE(other, 0);
  ASSERT_EQ(::dup2(other, pm), pm);  // behind the library's back
  EXPECT_TRUE(PagemapFds::maybe(pm));
  EXPECT_FALSE(PagemapFds::is(pm));
  PagemapFds::closed(pm);
  EXPECT_FALSE(PagemapFds::maybe(pm));
  ::close(other);
  ::close(pm);
}

// Any fd number is recorded, in the static block or in one mapped later;
// a copy made from a pagemap fd is one too, a copy of another file is not.
TEST(PagemapFdsTest, AnyFdNumberAndCopiesOfIt) {
  rlimit rl{};
  ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &rl), 0);
  rlimit up{70001, std::max<rlim_t>(rl.rlim_max, 70001)};
  if (::setrlimit(RLIMIT_NOFILE, &up) != 0) {
    rl.rlim_cur = rl.rlim_max;
    (void)::setrlimit(RLIMIT_NOFILE, &rl);
  }
  ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &rl), 0);
  ASSERT_GT(rl.rlim_cur, static_cast<rlim_t>(PagemapFds::kBlockFds + 8)) << "needs fds past the static block";
  std::vector<int> numbers{PagemapFds::kBlockFds + 7, static_cast<int>(rl.rlim_cur) - 1};
  if (rl.rlim_cur > 65536) numbers.push_back(65536);
  else std::printf("note: fd limit %lu, fds past 65535 not tried\n", static_cast<unsigned long>(rl.rlim_cur));
  const int pm = ::open("/proc/self/pagemap", O_RDONLY);
  ASSERT_GE(pm, 0);
  PagemapFds::opened(pm);
  const int other = ::open("/proc/self/maps", O_RDONLY);
  ASSERT_GE(other, 0);
  for (const int n : numbers) {
    SCOPED_TRACE(n);
    EXPECT_FALSE(PagemapFds::maybe(n));
    ASSERT_EQ(::dup2(pm, n), n);
    PagemapFds::duplicated(pm, n);
    EXPECT_TRUE(PagemapFds::is(n));
    // dup2 of another file over it: forgotten.
    ASSERT_EQ(::dup2(other, n), n);
    PagemapFds::duplicated(other, n);
    EXPECT_FALSE(PagemapFds::maybe(n));
    ::close(n);
    // Opened under that number directly (a program with many fds open).
    ASSERT_EQ(::dup2(pm, n), n);
    PagemapFds::opened(n);
    EXPECT_TRUE(PagemapFds::is(n));
    PagemapFds::closed(n);
    EXPECT_FALSE(PagemapFds::maybe(n));
    ::close(n);
  }
  PagemapFds::closed(pm);
  ::close(pm);
  ::close(other);
}

}  // namespace
}  // namespace uhmm::compat
