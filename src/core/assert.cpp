#include "core/assert.hpp"

#include <array>
#include <cstdio>
#include <cstdlib>

#include "core/sync.hpp"

namespace uhmm {
namespace detail {
void check_failed(const char* expr, const char* file, int line, const char* msg) {
  std::fprintf(stderr, "uhmm: invariant broken at %s:%d: %s (%s)\n", file, line, msg, expr);
  std::abort();
}
}  // namespace detail

namespace lock_rank {
#if UHMM_DCHECK_ENABLED
namespace {
// Ranks held by this thread, innermost last.  Small fixed stack: uhmm never
// nests more than a few locks.
struct Held {
  std::array<LockRank, 16> ranks{};
  unsigned depth = 0;
};
thread_local Held t_held;
}  // namespace

void acquired(LockRank rank) {
  Held& h = t_held;
  if (h.depth > 0 && rank != LockRank::kLeaf) {
    UHMM_CHECK(static_cast<unsigned>(h.ranks[h.depth - 1]) < static_cast<unsigned>(rank),
               "lock order violated (docs/locking.md)");
  }
  UHMM_CHECK(h.depth < h.ranks.size(), "too many nested locks");
  h.ranks[h.depth++] = rank;
}

void taken_without_waiting(LockRank rank) {
  // A try-lock never waits, so it cannot close a cycle: any order is fine.
  Held& h = t_held;
  UHMM_CHECK(h.depth < h.ranks.size(), "too many nested locks");
  h.ranks[h.depth++] = rank;
}

void released(LockRank rank) {
  Held& h = t_held;
  // Locks may be released out of order; remove the innermost matching rank.
  for (unsigned i = h.depth; i > 0; --i) {
    if (h.ranks[i - 1] == rank) {
      for (unsigned j = i - 1; j + 1 < h.depth; ++j) h.ranks[j] = h.ranks[j + 1];
      --h.depth;
      return;
    }
  }
  UHMM_CHECK(false, "released a lock that was not held");
}
#else
void acquired(LockRank) {}
void taken_without_waiting(LockRank) {}
void released(LockRank) {}
#endif
}  // namespace lock_rank
}  // namespace uhmm
