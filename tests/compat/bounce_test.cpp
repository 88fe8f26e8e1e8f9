// The bounce-buffer arena (compat/bounce.hpp): the library's buffers never
// take the place of memory the program has just unmapped, come zeroed, are
// reused, and are not inherited by a forked child.
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cerrno>
#include <cstddef>
#include <cstring>

#include "compat/bounce.hpp"
#include "uhmm/types.hpp"

namespace uhmm::compat {
namespace {

constexpr std::size_t kPages = 16;

std::unique_ptr<BounceArena> arena_of(std::size_t pages) {
  auto a = BounceArena::reserve(pages * kPageSize);
  EXPECT_TRUE(a.is_ok()) << a.status().to_string();
  return a ? std::move(*a) : nullptr;
}

bool overlaps(const std::byte* a, std::size_t alen, const std::byte* b, std::size_t blen) {
  return a < b + blen && b < a + alen;
}

// The race of issue 4 without the race: the program unmaps a buffer, and a
// bounce buffer of the same size is made before uhmm could have heard of
// it.  Left to the kernel, a fresh mapping takes exactly that hole.
TEST(BounceArena, NeverTakesTheHoleTheProgramJustLeft) {
  auto arena = arena_of(1024);
  ASSERT_NE(arena, nullptr);
  for (int round = 0; round < 8; ++round) {
    void* prog = ::mmap(nullptr, kPages * kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ASSERT_NE(prog, MAP_FAILED);
    ASSERT_EQ(::munmap(prog, kPages * kPageSize), 0);
    auto b = Bounce::make(*arena, kPages * kPageSize);
    ASSERT_TRUE(b.is_ok()) << b.status().to_string();
    EXPECT_TRUE(arena->contains(b->data()));
    EXPECT_FALSE(overlaps(b->data(), b->size(), static_cast<std::byte*>(prog), kPages * kPageSize));
  }
}

TEST(BounceArena, BuffersAreZeroedEvenWhenReused) {
  auto arena = arena_of(kPages);
  ASSERT_NE(arena, nullptr);
  std::byte* first = nullptr;
  {
    auto b = Bounce::make(*arena, kPages * kPageSize);
    ASSERT_TRUE(b.is_ok());
    first = b->data();
    std::memset(b->data(), 0xA5, b->size());
  }
  auto b = Bounce::make(*arena, kPages * kPageSize);
  ASSERT_TRUE(b.is_ok());
  EXPECT_EQ(b->data(), first);  // the whole arena: the same piece again
  for (std::size_t i = 0; i < b->size(); ++i) ASSERT_EQ(b->data()[i], std::byte{0}) << "byte " << i;
}

TEST(BounceArena, ExhaustionIsEnomemAndPiecesCoalesce) {
  auto arena = arena_of(3);
  ASSERT_NE(arena, nullptr);
  auto a = arena->take(kPageSize);
  auto b = arena->take(kPageSize);
  auto c = arena->take(kPageSize - 1);  // rounded up to a page
  ASSERT_TRUE(a.is_ok() && b.is_ok() && c.is_ok());
  const auto none = arena->take(1);
  ASSERT_FALSE(none.is_ok());
  EXPECT_EQ(none.code(), ENOMEM);
  // Two neighbours given back in either order make one two-page piece.
  arena->give(*b, kPageSize);
  arena->give(*a, kPageSize);
  auto two = arena->take(2 * kPageSize);
  ASSERT_TRUE(two.is_ok()) << two.status().to_string();
  EXPECT_EQ(*two, std::min(*a, *b));
  arena->give(*two, 2 * kPageSize);
  arena->give(*c, kPageSize - 1);
  auto all = arena->take(3 * kPageSize);
  EXPECT_TRUE(all.is_ok()) << all.status().to_string();
  if (all) arena->give(*all, 3 * kPageSize);
}

TEST(BounceArena, TooLargeIsEnomem) {
  auto arena = arena_of(4);
  ASSERT_NE(arena, nullptr);
  const auto r = arena->take(5 * kPageSize);
  ASSERT_FALSE(r.is_ok());
  EXPECT_EQ(r.code(), ENOMEM);
}

// A forked child builds a runtime of its own; the parent's buffers (device
// memory copied under a mirror's lock) are not its business.
TEST(BounceArena, NotInheritedByAForkedChild) {
  auto arena = arena_of(kPages);
  ASSERT_NE(arena, nullptr);
  auto b = Bounce::make(*arena, kPageSize);
  ASSERT_TRUE(b.is_ok());
  b->data()[0] = std::byte{1};
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // msync fails with ENOMEM on an address nothing maps.
    const bool gone = ::msync(b->data(), kPageSize, MS_ASYNC) != 0 && errno == ENOMEM;
    ::_exit(gone ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "the child still maps the bounce buffer";
  EXPECT_EQ(b->data()[0], std::byte{1});
}

}  // namespace
}  // namespace uhmm::compat
