// End-to-end randomized stress: CPU writers, a CPU/device reader and a
// migrator hammer one 16 MiB managed range at once.  Deterministic seeds;
// bounded by an operation budget and a wall-clock budget (whichever ends
// first), so it stays short under sanitizers.
//
// Page ownership keeps the shadow copy race-free:
//   page % 4 == 0   written only by writer 0
//   page % 4 == 1   written only by writer 1
//   page % 4 >= 2   written once before the threads start, then read only
// At the end every byte of the range is checked against the shadow.
// Meanwhile a fifth thread changes scratch ranges behind uhmm's back
// (munmap, mremap, MADV_DONTNEED) and forks, checking each result.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <random>
#include <string>
#include <tuple>
#include <thread>
#include <vector>

#include "e2e/test_support.hpp"
#include "uhmm/uhmm.hpp"

// The in-thread instance serves faults inside SIGBUS handlers, which
// allocate: see in_thread_faults_test.cpp.
extern "C" const char* __tsan_default_options() { return "report_signal_unsafe=0"; }

namespace uhmm {
namespace {

using test::pattern_word;

constexpr std::size_t kRangeBytes = 16 << 20;
constexpr std::size_t kPages = kRangeBytes / kPageSize;
constexpr std::uint32_t kSeed = 12345;

// Parameters: the fault mode, and whether a fifth thread changes scratch
// ranges behind uhmm's back (munmap, mremap, MADV_DONTNEED, fork).
class StressTest : public ::testing::TestWithParam<std::tuple<FaultMode, bool>> {};

TEST_P(StressTest, RandomCpuAccessAndMigrationsKeepEveryByte) {
  AddressSpaceOptions options;
  options.fault_mode = std::get<0>(GetParam());
  const bool with_changes = std::get<1>(GetParam());
  auto as_r = AddressSpace::create(options);
  ASSERT_TRUE(as_r.is_ok()) << as_r.status().to_string();
  auto as = std::move(*as_r);
  sim::SimDeviceOptions o;
  o.memory_bytes = 32 << 20;
  o.warm_memory = false;
  auto dev_r = sim::SimDevice::create(o);
  ASSERT_TRUE(dev_r.is_ok()) << dev_r.status().to_string();
  auto dev = std::move(*dev_r);
  const std::uint64_t device_pages = dev->free_pages();

  auto base_r = as->map(kRangeBytes);
  ASSERT_TRUE(base_r.is_ok());
  const VirtAddr base = *base_r;
  auto* mem = base.as<volatile std::uint64_t>();

  // Shadow: what every word must hold.  Written pages start as pattern too.
  std::vector<std::uint64_t> shadow(kPages * test::kWordsPerPage);
  for (std::size_t i = 0; i < kPages; ++i)
    for (std::size_t k = 0; k < test::kWordsPerPage; ++k) {
      shadow[i * test::kWordsPerPage + k] = pattern_word(i, k);
      mem[i * test::kWordsPerPage + k] = pattern_word(i, k);
    }
  ASSERT_TRUE(test::settles(*as));

  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(3);
  auto time_left = [&] { return std::chrono::steady_clock::now() < deadline; };
  std::atomic<int> running_writers{2};
  std::atomic<std::uint64_t> writes{0}, reads{0}, device_reads{0}, migrations{0};
  std::atomic<std::uint64_t> read_errors{0}, api_errors{0};

  auto writer = [&](unsigned id) {
    std::mt19937_64 rng(kSeed + id);
    for (int op = 0; op < 200000 && time_left(); ++op) {
      const std::size_t page = (rng() % (kPages / 4)) * 4 + id;
      const std::size_t word = rng() % (test::kWordsPerPage - 8);
      const std::size_t count = 1 + rng() % 8;
      for (std::size_t k = word; k < word + count; ++k) {
        const std::uint64_t v = rng();
        mem[page * test::kWordsPerPage + k] = v;
        shadow[page * test::kWordsPerPage + k] = v;
      }
      writes.fetch_add(1, std::memory_order_relaxed);
    }
    running_writers.fetch_sub(1);
  };

  auto migrator = [&] {
    std::mt19937_64 rng(kSeed + 10);
    while (running_writers.load() > 0 && time_left()) {
      const std::size_t pages = 16 + rng() % (kPagesPerHugePage - 16 + 1);  // 64 KiB .. 2 MiB
      const std::size_t first = rng() % (kPages - pages + 1);
      const VirtAddr a = base + first * kPageSize;
      auto r = (rng() % 3 != 0) ? dev->migrate_to_device(*as, a, pages * kPageSize)
                                : dev->migrate_to_system(*as, a, pages * kPageSize);
      if (!r.is_ok()) api_errors.fetch_add(1);
      migrations.fetch_add(1, std::memory_order_relaxed);
    }
  };

  // Reads only read-only pages (page % 4 >= 2): their value never changes.
  auto reader = [&] {
    std::mt19937_64 rng(kSeed + 20);
    std::vector<std::byte> buf(kPageSize);
    while (running_writers.load() > 0 && time_left()) {
      const std::size_t page = (rng() % (kPages / 4)) * 4 + 2 + rng() % 2;
      switch (rng() % 4) {
        case 0: {  // a whole page through the CPU
          if (!test::page_has_pattern((base + page * kPageSize).ptr(), page)) read_errors.fetch_add(1);
          break;
        }
        case 1: {  // one word through the CPU
          const std::size_t k = rng() % test::kWordsPerPage;
          if (mem[page * test::kWordsPerPage + k] != pattern_word(page, k)) read_errors.fetch_add(1);
          break;
        }
        case 2: {  // through the kernel (process_vm_readv)
          if (!as->read(base + page * kPageSize, buf).is_ok()) api_errors.fetch_add(1);
          else if (!test::buffer_has_pattern(buf.data(), page)) read_errors.fetch_add(1);
          break;
        }
        default: {  // from the device's side, wherever the page is
          if (!dev->device_read(*as, base + page * kPageSize, buf).is_ok()) api_errors.fetch_add(1);
          else if (!test::buffer_has_pattern(buf.data(), page)) read_errors.fetch_add(1);
          device_reads.fetch_add(1, std::memory_order_relaxed);
          break;
        }
      }
      reads.fetch_add(1, std::memory_order_relaxed);
    }
  };

  // Changes behind uhmm's back, on scratch ranges of their own, while the
  // rest runs: munmap of a part, mremap, MADV_DONTNEED, and fork (whose
  // child checks the scratch range and the read-only pages of the main one).
  std::atomic<std::uint64_t> changes{0}, change_errors{0};
  auto changer = [&] {
    std::mt19937_64 rng(kSeed + 30);
    constexpr std::size_t kScratch = 2 * kPagesPerHugePage;
    for (std::uint64_t round = 0; running_writers.load() > 0 && time_left(); ++round) {
      auto m = as->map(kScratch * kPageSize);
      if (!m.is_ok()) {
        change_errors.fetch_add(1);
        break;
      }
      VirtAddr scratch = *m;
      const std::uint64_t salt = 1000000 + round * kScratch;
      test::fill_range(scratch, kScratch, salt);
      if (!dev->migrate_to_device(*as, scratch + kPagesPerHugePage / 2 * kPageSize, kScratch / 2 * kPageSize)
               .is_ok())
        change_errors.fetch_add(1);
      const std::size_t lo = rng() % (kScratch / 2), n = 1 + rng() % (kScratch / 4);
      bool gone = false;
      switch (round % 4) {
        case 0: {  // munmap of a part: the rest stays intact
          ::munmap((scratch + lo * kPageSize).ptr(), n * kPageSize);
          for (std::size_t i = 0; i < kScratch; ++i)
            if ((i < lo || i >= lo + n) && !test::page_has_pattern((scratch + i * kPageSize).ptr(), salt + i))
              change_errors.fetch_add(1);
          ::munmap(scratch.ptr(), kScratch * kPageSize);
          gone = true;
          break;
        }
        case 1: {  // mremap elsewhere: everything comes along
          void* to = ::mremap(scratch.ptr(), kScratch * kPageSize, kScratch * kPageSize, MREMAP_MAYMOVE);
          if (to == MAP_FAILED) {
            change_errors.fetch_add(1);
            break;
          }
          scratch = VirtAddr::of(to);
          if (!test::range_has_pattern(scratch, kScratch, salt)) change_errors.fetch_add(1);
          ::munmap(scratch.ptr(), kScratch * kPageSize);
          gone = true;
          break;
        }
        case 2: {  // MADV_DONTNEED of a part: zeros there, data elsewhere
          ::madvise((scratch + lo * kPageSize).ptr(), n * kPageSize, MADV_DONTNEED);
          for (std::size_t i = 0; i < kScratch; ++i) {
            const auto* w = (scratch + i * kPageSize).as<volatile std::uint64_t>();
            const bool ok = (i >= lo && i < lo + n) ? w[0] == 0 && w[test::kWordsPerPage - 1] == 0
                                                    : static_cast<bool>(test::page_has_pattern((scratch + i * kPageSize).ptr(), salt + i));
            if (!ok) change_errors.fetch_add(1);
          }
          break;
        }
        default: {  // fork: the child sees the data of fork time
          if (round % 8 != 3) break;
          const pid_t pid = ::fork();
          if (pid == 0) {
            ::alarm(20);
            if (!test::range_has_pattern(scratch, kScratch, salt)) ::_exit(1);
            for (std::size_t page = 2; page < kPages; page += 4)
              if (!test::page_has_pattern((base + page * kPageSize).ptr(), page)) ::_exit(2);
            ::_exit(0);
          }
          int status = 0;
          if (pid < 0 || ::waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
            change_errors.fetch_add(1);
          break;
        }
      }
      if (!gone && !as->unmap(scratch).is_ok()) change_errors.fetch_add(1);
      changes.fetch_add(1, std::memory_order_relaxed);
    }
  };

  std::vector<std::thread> threads;
  if (with_changes) threads.emplace_back(changer);
  threads.emplace_back(writer, 0u);
  threads.emplace_back(writer, 1u);
  threads.emplace_back(migrator);
  threads.emplace_back(reader);
  for (auto& t : threads) t.join();

  EXPECT_EQ(read_errors.load(), 0u);
  EXPECT_EQ(api_errors.load(), 0u);
  EXPECT_EQ(change_errors.load(), 0u);
  if (with_changes) {
    EXPECT_GT(changes.load(), 0u);
  }
  EXPECT_GT(writes.load(), 0u);
  EXPECT_GT(reads.load(), 0u);
  EXPECT_GT(migrations.load(), 0u);
  EXPECT_GT(as->stats().get(Counter::pgmigrate_to_device), 0u);
  EXPECT_EQ(as->stats().get(Counter::migrate_to_ram_fail), 0u);
  ASSERT_TRUE(test::settles(*as));
  UHMM_EXPECT_INVARIANTS(*as);

  // Every word of the range against the shadow (device pages fault back).
  std::size_t mismatches = 0;
  for (std::size_t w = 0; w < shadow.size(); ++w) {
    if (mem[w] != shadow[w] && ++mismatches <= 5)
      ADD_FAILURE() << "page " << w / test::kWordsPerPage << " word " << w % test::kWordsPerPage << ": "
                    << std::hex << mem[w] << " != " << shadow[w];
  }
  EXPECT_EQ(mismatches, 0u);
  ASSERT_TRUE(test::settles_to(dev->pagemap(), 0));
  EXPECT_EQ(dev->free_pages(), device_pages);
  EXPECT_EQ(test::count_states(*as, base, kPages).system, kPages);
  UHMM_EXPECT_INVARIANTS(*as);
  RecordProperty("writes", static_cast<int>(writes.load()));
  RecordProperty("reads", static_cast<int>(reads.load()));
  RecordProperty("migrations", static_cast<int>(migrations.load()));
}

std::string stress_name(const ::testing::TestParamInfo<std::tuple<FaultMode, bool>>& p) {
  return test::fault_mode_name(std::get<0>(p.param)) +
         (std::get<1>(p.param) ? "WithChanges" : "");
}

INSTANTIATE_TEST_SUITE_P(FaultModes, StressTest,
                         ::testing::Combine(::testing::Values(FaultMode::kServiceThreads, FaultMode::kInThread),
                                            ::testing::Bool()),
                         stress_name);

}  // namespace
}  // namespace uhmm
