// copy_streaming: every byte copied, nothing around the destination
// touched, whatever the size and alignment.
#include "platform/copy.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace uhmm::platform {
namespace {

constexpr std::size_t kGuard = 128;
constexpr unsigned char kUntouched = 0xA5;

struct CopyStreaming : ::testing::TestWithParam<std::tuple<std::size_t, std::size_t, std::size_t>> {};

TEST_P(CopyStreaming, CopiesEveryByteAndTouchesNothingElse) {
  const auto [bytes, src_offset, dst_offset] = GetParam();
  // 64-byte aligned buffers, so the offsets decide the alignment.
  std::vector<std::uint64_t> src_words((bytes + 2 * kGuard) / 8 + 8);
  std::vector<std::uint64_t> dst_words(src_words.size());
  auto* src = reinterpret_cast<unsigned char*>(src_words.data()) + kGuard + src_offset;
  auto* dst_base = reinterpret_cast<unsigned char*>(dst_words.data());
  auto* dst = dst_base + kGuard + dst_offset;
  for (std::size_t i = 0; i < bytes; ++i) src[i] = static_cast<unsigned char>(i * 131 + 7);
  for (std::size_t i = 0; i < dst_words.size() * 8; ++i) dst_base[i] = kUntouched;

  copy_streaming(dst, src, bytes);

  for (std::size_t i = 0; i < bytes; ++i) ASSERT_EQ(dst[i], static_cast<unsigned char>(i * 131 + 7)) << "byte " << i;
  for (unsigned char* p = dst_base; p < dst; ++p) ASSERT_EQ(*p, kUntouched) << "before, at " << (dst - p);
  for (unsigned char* p = dst + bytes; p < dst_base + dst_words.size() * 8; ++p)
    ASSERT_EQ(*p, kUntouched) << "after, at " << (p - dst - bytes);
}

INSTANTIATE_TEST_SUITE_P(SizesAndAlignments, CopyStreaming,
                         ::testing::Combine(::testing::Values(std::size_t{0}, std::size_t{63}, std::size_t{64},
                                                              std::size_t{4096 + 48}, std::size_t{2 << 20}),
                                            ::testing::Values(std::size_t{0}, std::size_t{8}),
                                            ::testing::Values(std::size_t{0}, std::size_t{1})));

}  // namespace
}  // namespace uhmm::platform
