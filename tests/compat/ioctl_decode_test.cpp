// The ioctl decoding of the dmirror library, without a device: struct
// copy-in and copy-out, the shared range checks, unknown commands, and the
// /proc/self/maps parsing that decides what the device adopts.
#include <sys/mman.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cerrno>
#include <cstdint>
#include <vector>

#include "compat/dmirror_abi.hpp"
#include "compat/ioctl_decode.hpp"
#include "compat/maps.hpp"

namespace uhmm::compat {
namespace {

// Records what reaches the device and answers with a set errno and outputs.
class FakeHandler final : public CommandHandler {
 public:
  int run(DmirrorOp op, DmirrorCmd& cmd) override {
    ++calls;
    seen_op = op;
    seen = cmd;
    cmd.cpages = 7;
    cmd.faults = 3;
    return answer;
  }
  int calls = 0;
  int answer = 0;
  DmirrorOp seen_op{};
  DmirrorCmd seen{};
};

std::uintptr_t addr_of(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }

TEST(IoctlDecode, RequestValuesAreTheKernels) {
  DmirrorOp op{};
  ASSERT_TRUE(decode_request(0xC0284800UL, &op));
  EXPECT_EQ(op, DmirrorOp::kRead);
  ASSERT_TRUE(decode_request(0xC0284808UL, &op));
  EXPECT_EQ(op, DmirrorOp::kFlags);
  // A sign-extended 32-bit constant is the same command word.
  ASSERT_TRUE(decode_request(0xFFFFFFFFC0284803UL, &op));
  EXPECT_EQ(op, DmirrorOp::kMigrateToSys);
  EXPECT_FALSE(decode_request(0xC0284809UL, &op));
  EXPECT_FALSE(decode_request(_IOWR('H', 0, std::uint32_t), &op));  // right number, wrong size
}

TEST(IoctlDecode, SuccessCopiesOutputsBackAndZeroesThemFirst) {
  FakeHandler h;
  DmirrorCmd cmd{0x10000, 0x1234, 2, 99, 98};
  EXPECT_EQ(dispatch_ioctl(h, dmirror_request(DmirrorOp::kSnapshot), addr_of(&cmd)), 0);
  EXPECT_EQ(h.calls, 1);
  EXPECT_EQ(h.seen_op, DmirrorOp::kSnapshot);
  EXPECT_EQ(h.seen.cpages, 0u);  // zeroed before the device saw it
  EXPECT_EQ(h.seen.faults, 0u);
  EXPECT_EQ(cmd.cpages, 7u);
  EXPECT_EQ(cmd.faults, 3u);
  EXPECT_EQ(cmd.addr, 0x10000u);
  EXPECT_EQ(cmd.npages, 2u);
}

TEST(IoctlDecode, FailureLeavesTheCallersStructAlone) {
  FakeHandler h;
  h.answer = ENOENT;
  DmirrorCmd cmd{0x10000, 0x1234, 2, 99, 98};
  EXPECT_EQ(dispatch_ioctl(h, dmirror_request(DmirrorOp::kMigrateToDev), addr_of(&cmd)), ENOENT);
  EXPECT_EQ(cmd.cpages, 99u);
  EXPECT_EQ(cmd.faults, 98u);
}

TEST(IoctlDecode, BadStructPointerIsEfault) {
  FakeHandler h;
  EXPECT_EQ(dispatch_ioctl(h, dmirror_request(DmirrorOp::kRead), 0), EFAULT);
  // The last bytes of the struct fall on an unmapped page.
  void* two = ::mmap(nullptr, 2 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(two, MAP_FAILED);
  ASSERT_EQ(::munmap(static_cast<char*>(two) + 4096, 4096), 0);
  EXPECT_EQ(dispatch_ioctl(h, dmirror_request(DmirrorOp::kRead), addr_of(two) + 4096 - 16), EFAULT);
  EXPECT_EQ(h.calls, 0);
  ::munmap(two, 4096);
}

TEST(IoctlDecode, RangeChecksAreEinval) {
  FakeHandler h;
  const unsigned long req = dmirror_request(DmirrorOp::kRead);
  DmirrorCmd unaligned{0x10001, 0, 1, 0, 0};
  EXPECT_EQ(dispatch_ioctl(h, req, addr_of(&unaligned)), EINVAL);
  DmirrorCmd empty{0x10000, 0, 0, 0, 0};
  EXPECT_EQ(dispatch_ioctl(h, req, addr_of(&empty)), EINVAL);
  DmirrorCmd wraps{~std::uint64_t{0} - 4095, 0, 2, 0, 0};
  EXPECT_EQ(dispatch_ioctl(h, req, addr_of(&wraps)), EINVAL);
  DmirrorCmd size_wraps_to_zero{0x10000, 0, std::uint64_t{1} << 52, 0, 0};
  EXPECT_EQ(dispatch_ioctl(h, req, addr_of(&size_wraps_to_zero)), EINVAL);
  EXPECT_EQ(h.calls, 0);
  EXPECT_EQ(unaligned.cpages, 0u);
}

TEST(IoctlDecode, UnknownCommandIsEinvalAfterTheCopyIn) {
  FakeHandler h;
  DmirrorCmd cmd{0x10000, 0, 1, 5, 5};
  EXPECT_EQ(dispatch_ioctl(h, _IOWR('H', 0x09, DmirrorCmd), addr_of(&cmd)), EINVAL);
  EXPECT_EQ(h.calls, 0);
  EXPECT_EQ(cmd.cpages, 5u);
  // The struct is read first, as the kernel does: a bad pointer wins.
  EXPECT_EQ(dispatch_ioctl(h, _IOWR('H', 0x09, DmirrorCmd), 8), EFAULT);
}

TEST(IoctlDecode, PageCountOnlyKeepsTheBitsTheRangeCheckSaw) {
  DmirrorCmd cmd{0x10000, 0, (std::uint64_t{1} << 52) + 3, 0, 0};
  EXPECT_EQ(cmd_pages(cmd), 3u);
}

TEST(Maps, ParsesKindsAndAdoptability) {
  const char* text =
      "7f0000000000-7f0000002000 rw-p 00000000 00:00 0 \n"
      "7f0000002000-7f0000003000 r--p 00000000 00:00 0\n"
      "7f0000003000-7f0000004000 rw-s 00000000 00:01 1234                       /dev/zero (deleted)\n"
      "7f0000004000-7f0000005000 rw-p 00001000 08:01 5678                       /usr/lib/libc.so\n"
      "555500000000-555500021000 rw-p 00000000 00:00 0                          [heap]\n"
      "7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]\n"
      "garbage line\n";
  const std::vector<Mapping> maps = parse_maps(text);
  ASSERT_EQ(maps.size(), 6u);
  EXPECT_TRUE(maps[0].adoptable());
  EXPECT_EQ(maps[0].prot, PROT_READ | PROT_WRITE);
  EXPECT_FALSE(maps[1].adoptable());  // read-only
  EXPECT_TRUE(maps[2].shared);
  EXPECT_FALSE(maps[2].adoptable());
  EXPECT_FALSE(maps[3].anonymous);
  EXPECT_TRUE(maps[4].adoptable());  // [heap]
  EXPECT_FALSE(maps[5].adoptable());  // [stack]
}

TEST(Maps, SplitsARangeIntoMappingsAndGaps) {
  const std::vector<Mapping> maps = parse_maps(
      "1000-3000 rw-p 00000000 00:00 0\n"
      "5000-6000 r--p 00000000 00:00 0\n");
  const std::vector<Piece> p = split_range(maps, 0x2000, 0x7000);
  ASSERT_EQ(p.size(), 4u);
  EXPECT_EQ(p[0].start, 0x2000u);
  EXPECT_EQ(p[0].end, 0x3000u);
  EXPECT_EQ(p[0].mapping, &maps[0]);
  EXPECT_EQ(p[1].mapping, nullptr);  // 0x3000-0x5000
  EXPECT_EQ(p[2].mapping, &maps[1]);
  EXPECT_EQ(p[3].start, 0x6000u);
  EXPECT_EQ(p[3].end, 0x7000u);
  EXPECT_EQ(p[3].mapping, nullptr);
}

TEST(Maps, ReadsThisProcess) {
  static int probe = 0;
  auto maps = read_maps();
  ASSERT_TRUE(maps.is_ok());
  const auto p = reinterpret_cast<std::uintptr_t>(&probe);
  bool found = false;
  for (const Mapping& m : *maps) found = found || (m.start <= p && p < m.end);
  EXPECT_TRUE(found);
}

}  // namespace
}  // namespace uhmm::compat
