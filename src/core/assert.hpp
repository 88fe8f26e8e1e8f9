// Assertion tiers:
//   UHMM_CHECK   always on: a broken invariant that would corrupt data; aborts
//                with a message.
//   UHMM_DCHECK  debug and sanitizer builds (NDEBUG unset or UHMM_SLOW_CHECKS).
#pragma once

#include <cstdio>
#include <cstdlib>

namespace uhmm::detail {
[[noreturn]] void check_failed(const char* expr, const char* file, int line, const char* msg);
}

#define UHMM_CHECK(cond, msg)                                                       \
  do {                                                                              \
    if (__builtin_expect(!(cond), 0)) ::uhmm::detail::check_failed(#cond, __FILE__, __LINE__, msg); \
  } while (0)

#if !defined(NDEBUG) || defined(UHMM_SLOW_CHECKS)
#define UHMM_DCHECK(cond, msg) UHMM_CHECK(cond, msg)
#define UHMM_DCHECK_ENABLED 1
#else
#define UHMM_DCHECK(cond, msg) \
  do {                         \
  } while (0)
#define UHMM_DCHECK_ENABLED 0
#endif
