// platform: copying memory that the copying thread will not read again.
#pragma once

#include <cstddef>

namespace uhmm::platform {

/// Copies `bytes` from `src` to `dst` (which must not overlap) with
/// non-temporal stores where the CPU has them (x86-64: SSE2, always): the
/// destination goes to memory without first being read into the cache (no
/// read-for-ownership) and without evicting the caller's working set.  On
/// this kind of machine that is about twice as fast as glibc's memcpy for
/// pieces of 64 KiB to 2 MiB, which glibc copies through the cache
/// (docs/performance.md, "Copies that bypass the cache"), and slower for a
/// copy the caller reads right after.  Pieces that are not 16-byte aligned
/// on both sides, and a tail short of 64 bytes, go through memcpy.  The
/// stores are complete (fenced) on return, so a release that follows
/// publishes them like ordinary stores.
void copy_streaming(void* dst, const void* src, std::size_t bytes);

}  // namespace uhmm::platform
