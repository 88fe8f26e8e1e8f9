#include "platform/copy.hpp"

#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace uhmm::platform {

void copy_streaming(void* dst, const void* src, std::size_t bytes) {
  auto* d = static_cast<unsigned char*>(dst);
  const auto* s = static_cast<const unsigned char*>(src);
#if defined(__SSE2__)
  constexpr std::size_t kLine = 64;
  if (((reinterpret_cast<std::uintptr_t>(d) | reinterpret_cast<std::uintptr_t>(s)) & 15) == 0 && bytes >= kLine) {
    const std::size_t body = bytes - bytes % kLine;
    for (std::size_t i = 0; i < body; i += kLine) {
      const __m128i a = _mm_load_si128(reinterpret_cast<const __m128i*>(s + i));
      const __m128i b = _mm_load_si128(reinterpret_cast<const __m128i*>(s + i + 16));
      const __m128i c = _mm_load_si128(reinterpret_cast<const __m128i*>(s + i + 32));
      const __m128i e = _mm_load_si128(reinterpret_cast<const __m128i*>(s + i + 48));
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), a);
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 16), b);
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 32), c);
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 48), e);
    }
    // Non-temporal stores are weakly ordered: without the fence a flag set
    // after the copy could be seen before the data.
    _mm_sfence();
    d += body;
    s += body;
    bytes -= body;
  }
#endif
  if (bytes > 0) std::memcpy(d, s, bytes);
}

}  // namespace uhmm::platform
