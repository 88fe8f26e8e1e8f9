// The sim device's DMA engine: coalescing, worker split, fault injection,
// and the link model (a lower bound on transfer time, which a sleeping
// model can only ever exceed, so the check cannot flake).
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <vector>

#include "devices/sim/dma_engine.hpp"

namespace uhmm::sim {
namespace {

std::vector<CopyOp> page_ops(std::vector<std::byte>& src, std::vector<std::byte>& dst, std::size_t pages,
                             bool reverse_dst) {
  std::vector<CopyOp> ops;
  for (std::size_t i = 0; i < pages; ++i) {
    const std::size_t d = reverse_dst ? pages - 1 - i : i;
    ops.push_back(CopyOp{src.data() + i * kPageSize, dst.data() + d * kPageSize});
  }
  return ops;
}

TEST(DmaEngine, CopiesEveryPageInlineAndOnWorkers) {
  for (std::size_t inline_bytes : {std::size_t{0}, std::size_t{1} << 30}) {
    FaultInjection faults;
    DmaEngine dma(2, LinkModel{}, inline_bytes, faults);
    constexpr std::size_t kPages = 300;
    std::vector<std::byte> src(kPages * kPageSize), dst(kPages * kPageSize);
    for (std::size_t i = 0; i < src.size(); ++i) src[i] = static_cast<std::byte>(i * 7 + i / kPageSize);
    // Destinations in reverse order: nothing coalesces, every page is its own copy.
    auto ops = page_ops(src, dst, kPages, true);
    dma.copy(ops);
    for (std::size_t i = 0; i < kPages; ++i) {
      EXPECT_TRUE(ops[i].ok);
      ASSERT_EQ(std::memcmp(dst.data() + (kPages - 1 - i) * kPageSize, src.data() + i * kPageSize, kPageSize), 0)
          << "page " << i << " inline_bytes " << inline_bytes;
    }
  }
}

// Contiguous pages coalesce into runs long enough (kStreamingCopyBytes) to
// bypass the cache: the data arrives all the same, on the workers and on
// the caller, and is visible once copy() returns.
TEST(DmaEngine, CopiesLongContiguousRunsThatBypassTheCache) {
  for (std::size_t inline_bytes : {std::size_t{0}, std::size_t{1} << 30}) {
    FaultInjection faults;
    DmaEngine dma(2, LinkModel{}, inline_bytes, faults);
    constexpr std::size_t kPages = 3 * kStreamingCopyBytes / kPageSize + 5;
    std::vector<std::byte> src(kPages * kPageSize), dst(kPages * kPageSize);
    for (std::size_t i = 0; i < src.size(); ++i) src[i] = static_cast<std::byte>(i * 13 + i / kPageSize);
    auto ops = page_ops(src, dst, kPages, false);
    dma.copy(ops);
    for (const CopyOp& op : ops) EXPECT_TRUE(op.ok);
    ASSERT_EQ(std::memcmp(dst.data(), src.data(), src.size()), 0) << "inline_bytes " << inline_bytes;
  }
}

TEST(DmaEngine, NullSourceZeroFills) {
  FaultInjection faults;
  DmaEngine dma(1, LinkModel{}, 0, faults);
  std::vector<std::byte> dst(4 * kPageSize, std::byte{0xAB});
  std::vector<CopyOp> ops;
  for (std::size_t i = 0; i < 4; ++i) ops.push_back(CopyOp{nullptr, dst.data() + i * kPageSize});
  dma.copy(ops);
  for (std::byte b : dst) ASSERT_EQ(b, std::byte{0});
}

TEST(DmaEngine, InjectedCopyFailureFailsExactlyThatPageAndLeavesOthersCopied) {
  FaultInjection faults;
  DmaEngine dma(2, LinkModel{}, 1 << 30, faults);  // inline: deterministic order
  constexpr std::size_t kPages = 16;
  std::vector<std::byte> src(kPages * kPageSize, std::byte{1}), dst(kPages * kPageSize, std::byte{0});
  auto ops = page_ops(src, dst, kPages, false);  // contiguous: one coalesced run, split by the failure
  faults.fail_copy_after(5);
  dma.copy(ops);
  for (std::size_t i = 0; i < kPages; ++i) {
    EXPECT_EQ(ops[i].ok, i != 5) << i;
    EXPECT_EQ(dst[i * kPageSize], i == 5 ? std::byte{0} : std::byte{1}) << i;
  }
  // The knob fires once.
  std::fill(dst.begin(), dst.end(), std::byte{0});
  dma.copy(ops);
  for (std::size_t i = 0; i < kPages; ++i) EXPECT_TRUE(ops[i].ok) << i;
}

// A link of 64 MiB/s (1 MiB takes >= 15.6 ms) with `latency` per transfer.
LinkModel slow_link(std::chrono::milliseconds latency) {
  LinkModel link;
  link.setup_latency = latency;
  link.bytes_per_second = 64.0 * 1024 * 1024;
  return link;
}

TEST(DmaEngine, LinkModelAddsSetupLatencyAndBandwidthTime) {
  FaultInjection faults;
  DmaEngine dma(2, slow_link(std::chrono::milliseconds(20)), 0, faults);
  constexpr std::size_t kPages = 256;  // 1 MiB
  std::vector<std::byte> src(kPages * kPageSize), dst(kPages * kPageSize);
  auto ops = page_ops(src, dst, kPages, false);
  const auto t0 = std::chrono::steady_clock::now();
  dma.copy(ops);
  const auto took = std::chrono::steady_clock::now() - t0;
  EXPECT_GE(took, std::chrono::milliseconds(20) + std::chrono::microseconds(15600));
}

// A started batch large enough is shared among the workers: every page
// arrives, in order or not, and the future is ready only once all have.
TEST(DmaEngine, StartSharesALargeBatchAmongTheWorkers) {
  for (bool reverse : {false, true}) {
    FaultInjection faults;
    DmaEngine dma(2, LinkModel{}, 0, faults);
    constexpr std::size_t kPages = 4 * kPagesPerShare + 3;
    std::vector<std::byte> src(kPages * kPageSize), dst(kPages * kPageSize);
    for (std::size_t i = 0; i < src.size(); ++i) src[i] = static_cast<std::byte>(i * 11 + i / kPageSize);
    auto ops = page_ops(src, dst, kPages, reverse);
    dma.start(ops).wait();
    for (std::size_t i = 0; i < kPages; ++i) {
      EXPECT_TRUE(ops[i].ok);
      const std::size_t d = reverse ? kPages - 1 - i : i;
      ASSERT_EQ(std::memcmp(dst.data() + d * kPageSize, src.data() + i * kPageSize, kPageSize), 0)
          << "page " << i << (reverse ? " reversed" : "");
    }
  }
}

// The link model still counts a shared batch as one transfer: its set-up
// latency and its bytes at the link's bandwidth.
TEST(DmaEngine, ASharedBatchTakesTheLinkModelsTimeForTheWholeTransfer) {
  FaultInjection faults;
  DmaEngine dma(2, slow_link(std::chrono::milliseconds(20)), 0, faults);
  constexpr std::size_t kPages = 2 * kPagesPerShare;  // 2 MiB: two shares
  std::vector<std::byte> src(kPages * kPageSize, std::byte{3}), dst(kPages * kPageSize);
  auto ops = page_ops(src, dst, kPages, false);
  const auto t0 = std::chrono::steady_clock::now();
  dma.start(ops).wait();
  const auto took = std::chrono::steady_clock::now() - t0;
  EXPECT_GE(took, std::chrono::milliseconds(20) + std::chrono::microseconds(31200));
  EXPECT_EQ(dst.front(), std::byte{3});
  EXPECT_EQ(dst.back(), std::byte{3});
}

// Transfers share the link: two started together take the link's time for
// both, one after the other, while each set-up latency delays only its own
// transfer.
TEST(DmaEngine, TransfersStartedTogetherShareTheLink) {
  FaultInjection faults;
  DmaEngine dma(2, slow_link(std::chrono::milliseconds(10)), 0, faults);
  constexpr std::size_t kPages = 256;  // 1 MiB each
  std::vector<std::byte> src1(kPages * kPageSize, std::byte{5}), dst1(kPages * kPageSize);
  std::vector<std::byte> src2(kPages * kPageSize, std::byte{6}), dst2(kPages * kPageSize);
  auto first = page_ops(src1, dst1, kPages, false);
  auto second = page_ops(src2, dst2, kPages, false);
  const auto t0 = std::chrono::steady_clock::now();
  auto f1 = dma.start(first);
  auto f2 = dma.start(second);
  f1.wait();
  const auto first_took = std::chrono::steady_clock::now() - t0;
  f2.wait();
  const auto both_took = std::chrono::steady_clock::now() - t0;
  // Alone on the link, each would be done after 10 + 15.6 ms.
  EXPECT_GE(first_took, std::chrono::milliseconds(10) + std::chrono::microseconds(15600));
  EXPECT_GE(both_took, std::chrono::milliseconds(10) + std::chrono::microseconds(2 * 15600));
  EXPECT_EQ(dst1.front(), std::byte{5});
  EXPECT_EQ(dst2.back(), std::byte{6});
}

}  // namespace
}  // namespace uhmm::sim
