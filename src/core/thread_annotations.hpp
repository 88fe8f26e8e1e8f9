// Clang thread-safety annotations (no-ops on other compilers).  Build with
// clang and -Wthread-safety to check them (the "tsa" preset).
#pragma once

#if defined(__clang__)
#define UHMM_TSA(x) __attribute__((x))
#else
#define UHMM_TSA(x)
#endif

#define UHMM_CAPABILITY(x) UHMM_TSA(capability(x))
#define UHMM_SCOPED_CAPABILITY UHMM_TSA(scoped_lockable)
#define UHMM_GUARDED_BY(x) UHMM_TSA(guarded_by(x))
#define UHMM_PT_GUARDED_BY(x) UHMM_TSA(pt_guarded_by(x))
#define UHMM_REQUIRES(...) UHMM_TSA(requires_capability(__VA_ARGS__))
#define UHMM_REQUIRES_SHARED(...) UHMM_TSA(requires_shared_capability(__VA_ARGS__))
#define UHMM_ACQUIRE(...) UHMM_TSA(acquire_capability(__VA_ARGS__))
#define UHMM_ACQUIRE_SHARED(...) UHMM_TSA(acquire_shared_capability(__VA_ARGS__))
#define UHMM_RELEASE(...) UHMM_TSA(release_capability(__VA_ARGS__))
#define UHMM_RELEASE_SHARED(...) UHMM_TSA(release_shared_capability(__VA_ARGS__))
#define UHMM_TRY_ACQUIRE(...) UHMM_TSA(try_acquire_capability(__VA_ARGS__))
#define UHMM_EXCLUDES(...) UHMM_TSA(locks_excluded(__VA_ARGS__))
#define UHMM_NO_THREAD_SAFETY_ANALYSIS UHMM_TSA(no_thread_safety_analysis)
