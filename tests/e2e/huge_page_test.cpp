// 2 MiB units: a transparent huge page migrates whole and comes back whole.
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <span>
#include <sstream>
#include <string>
#include <thread>

#include "mm/address_space_impl.hpp"
#include "platform/maps.hpp"
#include "platform/uffd.hpp"
#include "uhmm/uhmm.hpp"

extern "C" const char* __tsan_default_options() { return "report_signal_unsafe=0"; }  // kInThread: ADR 0004

namespace uhmm {
namespace {

// AnonHugePages of the mapping that holds `addr`, in KiB.
std::size_t anon_huge_kib(const void* addr) {
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  bool inside = false;
  const auto a = reinterpret_cast<std::uintptr_t>(addr);
  while (std::getline(smaps, line)) {
    unsigned long lo = 0, hi = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx", &lo, &hi) == 2 && line.find(':') > line.find('-')) {
      inside = a >= lo && a < hi;
      continue;
    }
    if (inside && line.rfind("AnonHugePages:", 0) == 0) {
      std::istringstream in(line.substr(14));
      std::size_t kib = 0;
      in >> kib;
      return kib;
    }
  }
  return 0;
}

bool thp_available() {
  std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string s;
  std::getline(f, s);
  return s.find("[never]") == std::string::npos;
}

// The application's own private anonymous memory, 2 MiB-aligned.
class AlignedMapping {
 public:
  explicit AlignedMapping(std::size_t len) : len_(len) {
    raw_ = mmap(nullptr, len + kHugePageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw_ != MAP_FAILED)
      at_ = VirtAddr{(reinterpret_cast<std::uintptr_t>(raw_) + kHugePageSize - 1) & ~(kHugePageSize - 1)};
  }
  ~AlignedMapping() {
    if (raw_ != MAP_FAILED) munmap(raw_, len_ + kHugePageSize);
  }
  AlignedMapping(const AlignedMapping&) = delete;
  AlignedMapping& operator=(const AlignedMapping&) = delete;
  bool ok() const { return raw_ != MAP_FAILED; }
  VirtAddr at() const { return at_; }
  template <typename T>
  T* as() const {
    return at_.as<T>();
  }

 private:
  std::size_t len_;
  void* raw_ = MAP_FAILED;
  VirtAddr at_;
};

struct HugePages : ::testing::Test {
  void SetUp() override {
    if (!thp_available()) GTEST_SKIP() << "transparent huge pages disabled";
    as = std::move(*AddressSpace::create());
    sim::SimDeviceOptions o;
    o.memory_bytes = 16 << 20;
    o.warm_memory = false;
    dev = std::move(*sim::SimDevice::create(o));
  }
  // A fresh managed range of `len` bytes whose word i holds value(i), made
  // of huge pages by its hole faults; nullptr, with `why`, where this
  // machine gives none or uhmm cannot tell (no PAGEMAP_SCAN).
  std::uint64_t* filled_huge_range(std::size_t len, std::uint64_t (*value)(std::size_t), const char** why) {
    auto base = as->map(len);
    if (!base.is_ok()) {
      ADD_FAILURE() << base.status().to_string();
      *why = "map failed";
      return nullptr;
    }
    auto* p = base->as<std::uint64_t>();
    for (std::size_t i = 0; i < len / 8; ++i) p[i] = value(i);
    *why = "no huge pages (no CONFIG_PT_RECLAIM, or memory fragmented)";
    if (anon_huge_kib(p) != len / 1024) return nullptr;
    *why = "no PAGEMAP_SCAN (Linux < 6.7)";
    if (platform::huge_mapped(*base, len).status().code() == EOPNOTSUPP) return nullptr;
    return p;
  }

  // Empty page tables zapped so far so that a huge page could move in whole.
  std::uint64_t zaps() const { return as->stats().get(Counter::empty_table_zaps); }

  std::unique_ptr<AddressSpace> as;
  std::unique_ptr<sim::SimDevice> dev;
};

TEST_F(HugePages, AdoptedHugePagesRoundTripWhole) {
  // The application's own 2 MiB-aligned memory, backed by huge pages.
  const std::size_t len = 4 << 20;
  AlignedMapping mapping(len);
  ASSERT_TRUE(mapping.ok());
  auto* p = mapping.as<std::uint32_t>();
  ASSERT_EQ(madvise(p, len, MADV_HUGEPAGE), 0);
  for (std::size_t i = 0; i < len / 4; ++i) p[i] = static_cast<std::uint32_t>(i * 2654435761u);
  const std::size_t huge_before = anon_huge_kib(p);
  if (huge_before == 0) GTEST_SKIP() << "the kernel gave no huge page (memory fragmented?)";
  const VirtAddr base = VirtAddr::of(p);
  ASSERT_TRUE(as->adopt(base, len).is_ok());
  const auto thp_before = as->stats().get(Counter::thp_migration_success);

  auto rep = dev->migrate_to_device(*as, base, len);
  ASSERT_TRUE(rep.is_ok());
  EXPECT_EQ(rep->pages_migrated, len / kPageSize);
  EXPECT_EQ(anon_huge_kib(p), 0u);  // nothing of the range is left on the CPU
  EXPECT_EQ(as->stats().get(Counter::thp_migration_success) - thp_before, len / kHugePageSize);
  auto back = dev->migrate_to_system(*as, base, len);
  ASSERT_TRUE(back.is_ok());
  EXPECT_EQ(back->pages_migrated, len / kPageSize);
  // The 2 MiB units came back as huge pages, not split into 4 KiB pages.
  EXPECT_EQ(anon_huge_kib(p), huge_before);
  for (std::size_t i = 0; i < len / 4; ++i) ASSERT_EQ(p[i], static_cast<std::uint32_t>(i * 2654435761u)) << i;
  EXPECT_TRUE(as->check_invariants().is_ok());
  ASSERT_TRUE(as->unmap(base).is_ok());
}

// A whole aligned 2 MiB hole is filled with one huge page (where the kernel
// can drop the empty page table the fault left: CONFIG_PT_RECLAIM), and the
// unit then migrates and faults back whole.
TEST_F(HugePages, WholeBlockHoleFaultFillsAHugePageThatStaysHuge) {
  const std::size_t len = 4 << 20;
  auto base = as->map(len);
  ASSERT_TRUE(base.is_ok());
  auto* p = base->as<std::uint64_t>();
  for (std::size_t i = 0; i < len / 8; ++i) p[i] = i ^ 0x5555;
  EXPECT_EQ(as->stats().get(Counter::hole_faults), len / kHugePageSize);  // one fault per block
  const std::size_t huge = anon_huge_kib(p);
  if (huge == 0) GTEST_SKIP() << "no huge page (no CONFIG_PT_RECLAIM, or memory fragmented)";
  EXPECT_EQ(huge, len / 1024);

  ASSERT_TRUE(dev->migrate_to_device(*as, *base, len).is_ok());
  EXPECT_EQ(anon_huge_kib(p), 0u);
  // Fault the first block back: it returns whole, as a huge page.
  EXPECT_EQ(p[5], 5u ^ 0x5555);
  EXPECT_EQ(anon_huge_kib(p), kHugePageSize / 1024);
  ASSERT_TRUE(dev->migrate_to_system(*as, *base, len).is_ok());
  EXPECT_EQ(anon_huge_kib(p), len / 1024);
  for (std::size_t i = 0; i < len / 8; ++i) ASSERT_EQ(p[i], i ^ 0x5555) << i;
  EXPECT_TRUE(as->check_invariants().is_ok());
}

// A huge page that moved out whole left no page table behind (the kernel's
// deposited one went with it), so it comes back without uhmm dropping one
// first (a zap costs ~60 us per 2 MiB); a block a CPU fault touched in
// between has a table again and is zapped, where no huge-fault window
// spares it one (without kernel support for them; the next tests have them).
TEST_F(HugePages, AHugePageThatLeftWholeComesBackWithoutAZap) {
  as->impl().huge_fault_windows = false;
  const std::size_t len = 4 << 20;
  const char* why = nullptr;
  auto* p = filled_huge_range(len, [](std::size_t i) -> std::uint64_t { return i * 7; }, &why);
  if (p == nullptr) GTEST_SKIP() << why;
  const VirtAddr base = VirtAddr::of(p);
  const std::uint64_t after_fill = zaps();
  EXPECT_EQ(after_fill, len / kHugePageSize) << "each hole fault's block had the table the fault built";

  for (int round = 0; round < 3; ++round) {
    ASSERT_TRUE(dev->migrate_to_device(*as, base, len).is_ok());
    ASSERT_TRUE(dev->migrate_to_system(*as, base, len).is_ok());
    EXPECT_EQ(zaps(), after_fill) << "round " << round;
    EXPECT_EQ(anon_huge_kib(p), len / 1024) << "round " << round;
  }
  // A fault on the first block: the kernel builds a table before it asks
  // uhmm, so that block is zapped when it comes back; the second is not.
  ASSERT_TRUE(dev->migrate_to_device(*as, base, len).is_ok());
  EXPECT_EQ(p[5], 5u * 7);
  EXPECT_EQ(zaps(), after_fill + 1);
  ASSERT_TRUE(dev->migrate_to_system(*as, base, len).is_ok());
  EXPECT_EQ(zaps(), after_fill + 1);
  EXPECT_EQ(anon_huge_kib(p), len / 1024);
  for (std::size_t i = 0; i < len / 8; ++i) ASSERT_EQ(p[i], i * 7) << i;
  EXPECT_TRUE(as->check_invariants().is_ok());
}

// The same with in-thread faults: the signal, not the userfaultfd, tells
// uhmm of the fault, and with it of the table the kernel built.
TEST_F(HugePages, AnInThreadFaultsTableIsZappedBeforeItsUnitComesBack) {
  AddressSpaceOptions aopt;
  aopt.fault_mode = FaultMode::kInThread;
  as = std::move(*AddressSpace::create(aopt));
  as->impl().huge_fault_windows = false;
  const std::size_t len = 4 << 20;
  const char* why = nullptr;
  auto* p = filled_huge_range(len, [](std::size_t i) -> std::uint64_t { return i * 23; }, &why);
  if (p == nullptr) GTEST_SKIP() << why;
  const VirtAddr base = VirtAddr::of(p);
  ASSERT_TRUE(dev->migrate_to_device(*as, base, len).is_ok());
  const std::uint64_t before = zaps();
  EXPECT_EQ(p[5], 5u * 23);  // faults the first block back
  EXPECT_EQ(zaps(), before + 1);
  ASSERT_TRUE(dev->migrate_to_system(*as, base, len).is_ok());
  EXPECT_EQ(zaps(), before + 1);
  auto whole = platform::huge_mapped(base, len);
  ASSERT_TRUE(whole.is_ok());
  EXPECT_TRUE(*whole);
  for (std::size_t i = 0; i < len / 8; ++i) ASSERT_EQ(p[i], i * 23) << i;
  EXPECT_TRUE(as->check_invariants().is_ok());
}

// Huge-fault windows: from the moment a whole unit of a region leaves for
// a device, the region is advised MADV_HUGEPAGE, and a CPU fault on an
// empty block takes the kernel's huge-page path, which asks uhmm before it
// builds a page table.  So a unit faulted on, read or written, comes back
// without a zap, in either fault mode.
class HugeFaultWindows : public HugePages, public ::testing::WithParamInterface<FaultMode> {
 protected:
  void SetUp() override {
    HugePages::SetUp();
    if (IsSkipped()) return;
    AddressSpaceOptions aopt;
    aopt.fault_mode = GetParam();
    as = std::move(*AddressSpace::create(aopt));
    if (!as->impl().huge_fault_windows) GTEST_SKIP() << "no huge-page fault path (THP never, or no huge zero page)";
  }
  bool advised(const void* p, const char* flag) {
    return platform::mapping_has_flag(VirtAddr::of(p), flag).value_or(false);
  }
};

TEST_P(HugeFaultWindows, AUnitFaultedOnInTheWindowComesBackWithoutAZap) {
  const std::size_t len = 6 << 20;
  const char* why = nullptr;
  auto* p = filled_huge_range(len, [](std::size_t i) -> std::uint64_t { return i * 31; }, &why);
  if (p == nullptr) GTEST_SKIP() << why;
  const VirtAddr base = VirtAddr::of(p);
  EXPECT_TRUE(advised(p, "nh")) << "a region starts with its window closed";
  EXPECT_FALSE(advised(p, "hg"));
  ASSERT_TRUE(dev->migrate_to_device(*as, base, len).is_ok());
  EXPECT_TRUE(advised(p, "hg")) << "whole units left: the window is open";
  const std::uint64_t before = zaps();
  // Out of order, so that no prefetch stream starts and every unit's
  // return is one of these faults or the migration below.
  constexpr std::size_t kWordsPerBlock = kHugePageSize / 8;
  EXPECT_EQ(p[2 * kWordsPerBlock + 5], (2 * kWordsPerBlock + 5) * 31);  // a read fault brings the last unit back
  p[9] = 1;                                                              // a write fault the first
  EXPECT_EQ(zaps(), before) << "neither fault left a table to zap";
  for (const VirtAddr unit : {base, base + 2 * kHugePageSize}) {
    auto whole = platform::huge_mapped(unit, kHugePageSize);
    ASSERT_TRUE(whole.is_ok());
    EXPECT_TRUE(*whole);
  }
  ASSERT_TRUE(dev->migrate_to_system(*as, base, len).is_ok());
  EXPECT_EQ(zaps(), before);
  auto whole = platform::huge_mapped(base, len);
  ASSERT_TRUE(whole.is_ok());
  EXPECT_TRUE(*whole);
  for (std::size_t i = 0; i < len / 8; ++i) ASSERT_EQ(p[i], i == 9 ? 1u : i * 31) << i;
  EXPECT_TRUE(as->check_invariants().is_ok());
}

// In the window, a write fault on an empty block makes the kernel allocate
// and zero a huge page it then throws away: a region being filled for the
// first time closes its window, and a fault after that builds a table
// again, which the unit's return zaps.
TEST_P(HugeFaultWindows, AWriteToAHoleClosesTheWindow) {
  const std::size_t len = 4 << 20;
  auto base = as->map(len + kHugePageSize);  // the last block stays a hole
  ASSERT_TRUE(base.is_ok());
  auto* p = base->as<std::uint64_t>();
  for (std::size_t i = 0; i < len / 8; ++i) p[i] = ~i;
  if (anon_huge_kib(p) != len / 1024) GTEST_SKIP() << "no huge pages (no CONFIG_PT_RECLAIM, or memory fragmented)";
  ASSERT_TRUE(dev->migrate_to_device(*as, *base, len).is_ok());
  ASSERT_TRUE(advised(p, "hg"));
  p[len / 8] = 42;  // the first write to the hole block
  EXPECT_TRUE(advised(p, "nh")) << "the fill closed the window";
  const std::uint64_t before = zaps();
  EXPECT_EQ(p[3], ~std::uint64_t{3});  // a fault outside the window
  EXPECT_EQ(zaps(), before + 1) << "the fault's table was zapped before the unit came back";
  ASSERT_TRUE(dev->migrate_to_system(*as, *base, len).is_ok());
  for (std::size_t i = 0; i < len / 8; ++i) ASSERT_EQ(p[i], ~i) << i;
  EXPECT_EQ(p[len / 8], 42u);
  // The next whole unit to leave opens it again.
  ASSERT_TRUE(dev->migrate_to_device(*as, *base, kHugePageSize).is_ok());
  EXPECT_TRUE(advised(p, "hg"));
  EXPECT_EQ(p[0], ~std::uint64_t{0});
  EXPECT_TRUE(as->check_invariants().is_ok());
}

// An application that asked for transparent huge pages keeps its window
// open, holes filled or not.
TEST_P(HugeFaultWindows, TransparentHugePagesKeepTheWindowOpen) {
  AddressSpaceOptions aopt;
  aopt.fault_mode = GetParam();
  aopt.transparent_huge_pages = true;
  as = std::move(*AddressSpace::create(aopt));
  auto base = as->map(2 * kHugePageSize);
  ASSERT_TRUE(base.is_ok());
  auto* p = base->as<std::uint64_t>();
  EXPECT_TRUE(advised(p, "hg"));
  p[0] = 1;
  p[kHugePageSize / 8] = 2;
  EXPECT_TRUE(advised(p, "hg"));
  EXPECT_EQ(p[0] + p[kHugePageSize / 8], 3u);
}

INSTANTIATE_TEST_SUITE_P(FaultModes, HugeFaultWindows,
                         ::testing::Values(FaultMode::kServiceThreads, FaultMode::kInThread),
                         [](const ::testing::TestParamInfo<FaultMode>& mode) {
                           return std::string(mode.param == FaultMode::kInThread ? "InThread" : "ServiceThreads");
                         });

// Whole 2 MiB units leave through a transit block kept without a page
// table, so that a huge page moves through it as one entry.  A unit mapped
// by 4 KiB pages leaves a table there on its way; the block is then
// replaced, and the next huge page still moves, and comes back, whole.
TEST_F(HugePages, AUnitOfSmallPagesLeavesNoTableInTheWayOfTheNextHugePage) {
  const std::size_t len = 4 << 20;
  // The application's own memory, made of 4 KiB pages.
  AlignedMapping mapping(kHugePageSize);
  ASSERT_TRUE(mapping.ok());
  auto* small = mapping.as<std::uint64_t>();
  ASSERT_EQ(madvise(small, kHugePageSize, MADV_NOHUGEPAGE), 0);
  for (std::size_t i = 0; i < kHugePageSize / 8; ++i) small[i] = ~i;
  ASSERT_EQ(anon_huge_kib(small), 0u);
  const VirtAddr small_base = VirtAddr::of(small);
  ASSERT_TRUE(as->adopt(small_base, kHugePageSize).is_ok());
  // And a managed range of huge pages.
  const char* why = nullptr;
  auto* p = filled_huge_range(len, [](std::size_t i) -> std::uint64_t { return i * 11; }, &why);
  if (p == nullptr) GTEST_SKIP() << why;
  const VirtAddr base = VirtAddr::of(p);

  for (int round = 0; round < 2; ++round) {
    auto rep = dev->migrate_to_device(*as, small_base, kHugePageSize);
    ASSERT_TRUE(rep.is_ok());
    EXPECT_EQ(rep->pages_migrated, kPagesPerHugePage);
    rep = dev->migrate_to_device(*as, base, len);
    ASSERT_TRUE(rep.is_ok());
    EXPECT_EQ(rep->pages_migrated, len / kPageSize);
    ASSERT_TRUE(dev->migrate_to_system(*as, base, len).is_ok());
    EXPECT_EQ(anon_huge_kib(p), len / 1024) << "round " << round;
    ASSERT_TRUE(dev->migrate_to_system(*as, small_base, kHugePageSize).is_ok());
  }
  for (std::size_t i = 0; i < len / 8; ++i) ASSERT_EQ(p[i], i * 11) << i;
  for (std::size_t i = 0; i < kHugePageSize / 8; ++i) ASSERT_EQ(small[i], ~i) << i;
  // The application asked for 4 KiB pages there: it still has them.
  EXPECT_TRUE(as->find_region(small_base)->no_huge_pages);
  EXPECT_EQ(anon_huge_kib(small), 0u);
  EXPECT_TRUE(as->check_invariants().is_ok());
  ASSERT_TRUE(as->unmap(small_base).is_ok());
}

// A 2 MiB unit that left the CPU split (here: one of its pages moved on its
// own, which splits the huge page; in the read-back benchmark, a CPU fault
// on a block in flight) fills its staging block with 4 KiB pages.  Kept as
// a ready block, that staging block would bring the next unit it carries
// back split, and so on for good; it is emptied instead, and every unit
// comes back huge after one round trip.
TEST_F(HugePages, AUnitThatLeftSplitComesBackWhole) {
  const std::size_t len = 4 << 20;
  const char* why = nullptr;
  auto* p = filled_huge_range(len, [](std::size_t i) -> std::uint64_t { return i * 13 + 1; }, &why);
  if (p == nullptr) GTEST_SKIP() << why;
  const VirtAddr base = VirtAddr::of(p);
  // One page of the first block goes to the device and back alone.
  ASSERT_TRUE(dev->migrate_to_device(*as, base + 7 * kPageSize, kPageSize).is_ok());
  ASSERT_TRUE(dev->migrate_to_system(*as, base + 7 * kPageSize, kPageSize).is_ok());
  ASSERT_EQ(anon_huge_kib(p), kHugePageSize / 1024) << "the first block is split";
  const std::uint64_t split_before = as->stats().get(Counter::thp_split_staged);

  for (int round = 0; round < 3; ++round) {
    ASSERT_TRUE(dev->migrate_to_device(*as, base, len).is_ok());
    ASSERT_TRUE(dev->migrate_to_system(*as, base, len).is_ok());
    EXPECT_EQ(anon_huge_kib(p), len / 1024) << "round " << round;
  }
  EXPECT_EQ(as->stats().get(Counter::thp_split_staged) - split_before, 1u);
  for (std::size_t i = 0; i < len / 8; ++i) ASSERT_EQ(p[i], i * 13 + 1) << i;
  EXPECT_TRUE(as->check_invariants().is_ok());
}

// A reader that catches up with a migration back faults on a unit still in
// flight, and the kernel builds that block a page table before it queues
// the fault.  Here the one service thread is busy with another fault (a
// slow device's page) the whole time, so nobody reads the reader's fault
// before the unit goes in: the migration reads it itself, drops the table,
// and the unit comes back whole rather than split.  The reader resumes
// with the install, not when the service thread gets to its fault.
TEST_F(HugePages, AUnitReadWhileInFlightComesBackWholeThoughNoServiceThreadIsFree) {
  AddressSpaceOptions aopt;
  aopt.fault_threads = 1;
  as = std::move(*AddressSpace::create(aopt));
  auto slow_device = [](std::chrono::milliseconds per_batch) {
    sim::SimDeviceOptions o;
    o.memory_bytes = 8 << 20;
    o.warm_memory = false;
    o.prefetch_blocks = 0;
    o.link.setup_latency = per_batch;
    return std::move(*sim::SimDevice::create(o));
  };
  auto busy_dev = slow_device(std::chrono::milliseconds(400));
  auto unit_dev = slow_device(std::chrono::milliseconds(100));

  auto other = as->map(kHugePageSize);
  ASSERT_TRUE(other.is_ok());
  auto* o = other->as<std::uint64_t>();
  o[0] = 42;
  const char* why = nullptr;
  auto* p = filled_huge_range(kHugePageSize, [](std::size_t i) -> std::uint64_t { return i * 19 + 3; }, &why);
  if (p == nullptr) GTEST_SKIP() << why;
  const VirtAddr base = VirtAddr::of(p);
  ASSERT_TRUE(busy_dev->migrate_to_device(*as, *other, kHugePageSize).is_ok());
  ASSERT_TRUE(unit_dev->migrate_to_device(*as, base, kHugePageSize).is_ok());

  // The service thread takes this fault and waits 400 ms for the device.
  std::uint64_t busy_read = 0;
  std::atomic<bool> busy_done{false};
  std::thread busy([&] {
    busy_read = *static_cast<volatile std::uint64_t*>(o);
    busy_done = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  std::thread migration([&] { EXPECT_TRUE(unit_dev->migrate_to_system(*as, base, kHugePageSize).is_ok()); });
  std::this_thread::sleep_for(std::chrono::milliseconds(40));  // the unit's copy takes 100 ms
  const std::uint64_t read_in_flight = static_cast<volatile std::uint64_t*>(p)[5];
  const bool service_was_busy = !busy_done;
  migration.join();
  busy.join();

  EXPECT_EQ(read_in_flight, 5u * 19 + 3);
  EXPECT_EQ(busy_read, 42u);
  EXPECT_TRUE(service_was_busy) << "the reader should resume before its fault is served";
  auto whole = platform::huge_mapped(base, kHugePageSize);
  ASSERT_TRUE(whole.is_ok());
  EXPECT_TRUE(*whole) << "the unit came back split";
  for (std::size_t i = 0; i < kHugePageSize / 8; ++i) ASSERT_EQ(p[i], i * 19 + 3) << i;
  EXPECT_TRUE(as->check_invariants().is_ok());
}

// An adopted mapping the application marked MADV_NOHUGEPAGE keeps 4 KiB
// pages: a hole's first touch fills one page's worth of the block, and a
// whole aligned unit coming back from the device goes in split, not as one
// huge page (the kernel would not give the range huge pages either).
TEST_F(HugePages, AnAdoptedNoHugePageMappingGetsNoHugePage) {
  const std::size_t len = 4 << 20;
  AlignedMapping mapping(len);
  ASSERT_TRUE(mapping.ok());
  auto* p = mapping.as<std::uint64_t>();
  ASSERT_EQ(madvise(p, len, MADV_NOHUGEPAGE), 0);
  const VirtAddr base = VirtAddr::of(p);
  ASSERT_TRUE(as->adopt(base, len).is_ok());
  ASSERT_TRUE(as->find_region(base)->no_huge_pages);
  for (std::size_t i = 0; i < len / 8; ++i) p[i] = i * 17;  // hole faults
  EXPECT_EQ(anon_huge_kib(p), 0u);
  for (int round = 0; round < 2; ++round) {
    auto rep = dev->migrate_to_device(*as, base, len);
    ASSERT_TRUE(rep.is_ok());
    EXPECT_EQ(rep->pages_migrated, len / kPageSize);
    EXPECT_EQ(p[5 + round], (5u + round) * 17);  // a fault brings a block back
    ASSERT_TRUE(dev->migrate_to_system(*as, base, len).is_ok());
    EXPECT_EQ(anon_huge_kib(p), 0u) << "round " << round;
  }
  for (std::size_t i = 0; i < len / 8; ++i) ASSERT_EQ(p[i], i * 17) << i;
  // Never touched: no page table under the blocks at all, so a unit would
  // move in whole unless uhmm splits it.
  auto* q = p + kHugePageSize / 8;
  ASSERT_EQ(madvise(q, kHugePageSize, MADV_DONTNEED), 0);  // its table goes too (CONFIG_PT_RECLAIM)
  ASSERT_TRUE(dev->migrate_to_device(*as, base + kHugePageSize, kHugePageSize).is_ok());
  ASSERT_TRUE(dev->device_write(*as, base + kHugePageSize + 8, std::as_bytes(std::span("device", 6))).is_ok());
  ASSERT_TRUE(dev->migrate_to_system(*as, base + kHugePageSize, kHugePageSize).is_ok());
  EXPECT_EQ(std::memcmp(reinterpret_cast<char*>(q) + 8, "device", 6), 0);
  EXPECT_EQ(anon_huge_kib(p), 0u);
  EXPECT_TRUE(as->check_invariants().is_ok());
  ASSERT_TRUE(as->unmap(base).is_ok());

  // A mapping without the mark adopts as before.
  AlignedMapping plain(kHugePageSize);
  ASSERT_TRUE(plain.ok());
  ASSERT_TRUE(as->adopt(plain.at(), kHugePageSize).is_ok());
  EXPECT_FALSE(as->find_region(plain.at())->no_huge_pages);
  ASSERT_TRUE(as->unmap(plain.at()).is_ok());
}

}  // namespace
}  // namespace uhmm
