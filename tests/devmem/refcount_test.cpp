// Device page refcounts, locks, page_free and unregistering with pages in use.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <thread>
#include <vector>

#include "devmem_test_util.hpp"
#include "uhmm/device_memory.hpp"

namespace uhmm {
namespace {

using namespace testing_devmem;
using std::chrono::milliseconds;

struct RefcountTest : ::testing::Test {
  void SetUp() override {
    auto m = DevicePagemap::create(valid_config(PagemapType::kPrivate, 16, &frees));
    ASSERT_TRUE(m.is_ok()) << m.status().to_string();
    map = std::move(*m);
  }
  FreeCounter frees;
  std::unique_ptr<DevicePagemap> map;
};

TEST(FolioInit, TakesAnAlignedLargePageWholeOrNothing) {
  FreeCounter frees;
  constexpr std::uint64_t kPages = kPagesPerHugePage + 100;  // one large page fits, at index 0
  auto m = DevicePagemap::create(valid_config(PagemapType::kPrivate, kPages, &frees));
  ASSERT_TRUE(m.is_ok()) << m.status().to_string();
  DevicePagemap& map = **m;
  ASSERT_EQ(map.range().first.value % kPagesPerHugePage, 0u);
  EXPECT_EQ(zone_device_folio_init(map.page_at(1), kDeviceFolioOrder).code(), EINVAL) << "misaligned head";
  EXPECT_EQ(zone_device_folio_init(map.page_at(0), 3).code(), EINVAL) << "unsupported order";
  // A page of the folio in use: refused, and no page taken.
  zone_device_page_init(map.page_at(300));
  EXPECT_EQ(zone_device_folio_init(map.page_at(0), kDeviceFolioOrder).code(), EINVAL);
  EXPECT_EQ(map.page_at(0).refcount(), 0u);
  EXPECT_EQ(map.pages_in_use(), 1u);
  map.page_at(300).unlock();
  map.page_at(300).put();
  // Order 0 is one page.
  ASSERT_TRUE(zone_device_folio_init(map.page_at(7), 0).is_ok());
  EXPECT_EQ(map.pages_in_use(), 1u);
  EXPECT_EQ(zone_device_folio_init(map.page_at(7), 0).code(), EINVAL) << "in use";
  map.page_at(7).unlock();
  map.page_at(7).put();
  // One that fits: 512 pages, each referenced and locked; page_free for each.
  ASSERT_TRUE(zone_device_folio_init(map.page_at(0), kDeviceFolioOrder).is_ok());
  EXPECT_EQ(map.pages_in_use(), kPagesPerHugePage);
  for (std::uint64_t k = 0; k < kPagesPerHugePage; ++k) {
    DevicePage& p = map.page_at(k);
    ASSERT_EQ(p.refcount(), 1u) << k;
    ASSERT_TRUE(p.is_locked()) << k;
    p.unlock();
    p.put();
  }
  EXPECT_EQ(frees.calls.load(), static_cast<int>(2 + kPagesPerHugePage));
  EXPECT_EQ(map.pages_in_use(), 0u);
}

TEST(FolioInit, ALargePagePastTheEndOfItsMapIsRefused) {
  auto m = DevicePagemap::create(valid_config(PagemapType::kPrivate, kPagesPerHugePage + 100));
  ASSERT_TRUE(m.is_ok()) << m.status().to_string();
  // Page 512 is aligned, but only 100 pages follow it.
  EXPECT_EQ(zone_device_folio_init((*m)->page_at(kPagesPerHugePage), kDeviceFolioOrder).code(), EINVAL);
  EXPECT_EQ((*m)->pages_in_use(), 0u);
}

TEST_F(RefcountTest, InitMakesRefcountOneAndLocked) {
  DevicePage& p = map->page_at(3);
  EXPECT_EQ(p.refcount(), 0u);
  EXPECT_FALSE(p.is_locked());
  EXPECT_EQ(map->pages_in_use(), 0u);
  zone_device_page_init(p);
  EXPECT_EQ(p.refcount(), 1u);
  EXPECT_TRUE(p.is_locked());
  EXPECT_EQ(map->pages_in_use(), 1u);
  // The lock is really held.
  EXPECT_FALSE(p.trylock());
  p.unlock();
  EXPECT_FALSE(p.is_locked());
  p.put();
  EXPECT_EQ(frees.calls.load(), 1);
}

TEST_F(RefcountTest, PageFreeRunsOnceWhenTheLastReferenceGoes) {
  DevicePage& p = map->page_at(5);
  zone_device_page_init(p);
  p.unlock();
  p.get();
  p.get();
  EXPECT_EQ(p.refcount(), 3u);
  p.put();
  p.put();
  EXPECT_EQ(p.refcount(), 1u);
  EXPECT_EQ(frees.calls.load(), 0) << "page_free while the page is still referenced";
  EXPECT_EQ(map->pages_in_use(), 1u);
  p.put();
  EXPECT_EQ(p.refcount(), 0u);
  EXPECT_EQ(frees.calls.load(), 1);
  EXPECT_EQ(frees.last.load(), &p);
  EXPECT_EQ(frees.refcount_seen.load(), 0u) << "page_free must see the page free";
  EXPECT_EQ(map->pages_in_use(), 0u);
}

TEST_F(RefcountTest, OnePageFreePerLifetime) {
  DevicePage& p = map->page_at(0);
  for (int life = 1; life <= 5; ++life) {
    zone_device_page_init(p);
    p.unlock();
    p.get();
    p.put();
    EXPECT_EQ(frees.calls.load(), life - 1);
    p.put();
    EXPECT_EQ(frees.calls.load(), life);
  }
}

TEST_F(RefcountTest, TryGet) {
  DevicePage& p = map->page_at(1);
  EXPECT_FALSE(p.try_get());  // free page: no reference
  EXPECT_EQ(p.refcount(), 0u);
  zone_device_page_init(p);
  EXPECT_TRUE(p.try_get());
  EXPECT_EQ(p.refcount(), 2u);
  p.put();
  p.unlock();
  p.put();
  EXPECT_FALSE(p.try_get());
  EXPECT_EQ(frees.calls.load(), 1);
}

TEST_F(RefcountTest, PagesInUseCountsPagesNotReferences) {
  for (std::uint64_t i = 0; i < 4; ++i) {
    zone_device_page_init(map->page_at(i));
    map->page_at(i).unlock();
  }
  map->page_at(0).get();
  map->page_at(0).get();
  EXPECT_EQ(map->pages_in_use(), 4u);
  map->page_at(0).put();
  map->page_at(0).put();
  EXPECT_EQ(map->pages_in_use(), 4u);
  for (std::uint64_t i = 0; i < 4; ++i) {
    map->page_at(i).put();
    EXPECT_EQ(map->pages_in_use(), 3 - i);
  }
  EXPECT_EQ(frees.calls.load(), 4);
}

TEST_F(RefcountTest, FreeClearsTheReverseMap) {
  DevicePage& p = map->page_at(2);
  zone_device_page_init(p);
  int fake_space = 0;
  auto* as = reinterpret_cast<AddressSpace*>(&fake_space);  // only stored, never used
  p.set_mapping(as, VirtAddr{0x7000'0000'0000});
  EXPECT_EQ(p.mapping().address_space, as);
  EXPECT_EQ(p.mapping().address, VirtAddr{0x7000'0000'0000});
  p.clear_mapping();
  EXPECT_EQ(p.mapping().address_space, nullptr);
  p.set_mapping(as, VirtAddr{0x1000});
  p.unlock();
  p.put();
  EXPECT_EQ(p.mapping().address_space, nullptr);
  EXPECT_EQ(p.mapping().address, VirtAddr{0});
}

TEST_F(RefcountTest, ZoneDeviceDataBelongsToTheDriver) {
  DevicePage& p = map->page_at(7);
  int payload = 0;
  p.zone_device_data = &payload;
  EXPECT_EQ(DevicePagemap::page_from_pfn(p.pfn())->zone_device_data, &payload);
  p.zone_device_data = nullptr;
}

TEST_F(RefcountTest, LockWaitsForUnlockFromAnotherThread) {
  DevicePage& p = map->page_at(4);
  ASSERT_TRUE(p.trylock());
  std::atomic<bool> acquired{false};
  std::thread t([&] {
    p.lock();
    acquired.store(true);
    p.unlock();
  });
  p.unlock();
  t.join();
  EXPECT_TRUE(acquired.load());
  EXPECT_FALSE(p.is_locked());
}

TEST_F(RefcountTest, UnregisterWithAPageInUseIsEbusyAndKeepsTheMap) {
  DevicePage& p = map->page_at(9);
  zone_device_page_init(p);
  p.unlock();
  const auto t0 = std::chrono::steady_clock::now();
  Status s = map->unregister(milliseconds(30));
  const auto waited = std::chrono::steady_clock::now() - t0;
  EXPECT_EQ(s.code(), EBUSY) << s.to_string();
  EXPECT_GE(waited, milliseconds(30)) << "gave up before its patience ran out";
  EXPECT_TRUE(map->registered());
  EXPECT_EQ(frees.calls.load(), 0);
  // Still registered and usable.
  EXPECT_EQ(DevicePagemap::page_from_pfn(p.pfn()), &p);
  DevicePage& q = map->page_at(10);
  zone_device_page_init(q);
  q.unlock();
  EXPECT_EQ(map->pages_in_use(), 2u);
  q.put();
  EXPECT_EQ(frees.calls.load(), 1);
  EXPECT_EQ(map->unregister(milliseconds(0)).code(), EBUSY);
  // Once the page is put, unregistering succeeds.
  p.put();
  EXPECT_EQ(frees.calls.load(), 2);
  EXPECT_TRUE(map->unregister(milliseconds(0)).is_ok());
  EXPECT_FALSE(map->registered());
  EXPECT_EQ(DevicePagemap::page_from_pfn(p.pfn()), nullptr);
}

TEST_F(RefcountTest, UnregisterWaitsForTheLastPut) {
  DevicePage& p = map->page_at(11);
  zone_device_page_init(p);
  p.unlock();
  std::atomic<bool> go{false};
  std::thread t([&] {
    while (!go.load()) std::this_thread::yield();
    p.put();
  });
  go.store(true);
  // Generous patience: returns as soon as the put lands.
  Status s = map->unregister(milliseconds(10000));
  t.join();
  EXPECT_TRUE(s.is_ok()) << s.to_string();
  EXPECT_FALSE(map->registered());
  EXPECT_EQ(frees.calls.load(), 1);
}

TEST_F(RefcountTest, ConcurrentGetPutFreesExactlyOncePerLifetime) {
  constexpr int kThreads = 4;
  constexpr int kLifetimes = 200;
  constexpr int kChurn = 50;
  DevicePage& p = map->page_at(12);
  for (int life = 1; life <= kLifetimes; ++life) {
    zone_device_page_init(p);
    p.unlock();
    // Each thread gets its own reference up front, churns, then drops it,
    // racing the others (and this thread) for the last put.
    for (int t = 0; t < kThreads; ++t) p.get();
    std::atomic<int> ready{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&] {
        ready.fetch_add(1);
        while (ready.load() < kThreads + 1) std::this_thread::yield();
        for (int i = 0; i < kChurn; ++i) {
          if (p.try_get()) p.put();
          p.get();
          p.put();
        }
        p.put();
      });
    }
    ready.fetch_add(1);
    p.put();
    for (auto& th : threads) th.join();
    ASSERT_EQ(p.refcount(), 0u) << "lifetime " << life;
    ASSERT_EQ(frees.calls.load(), life) << "lifetime " << life;
    ASSERT_EQ(map->pages_in_use(), 0u);
  }
}

class RefcountDeathTest : public RefcountTest {
 protected:
  void SetUp() override {
    GTEST_FLAG_SET(death_test_style, "threadsafe");
    RefcountTest::SetUp();
  }
};

TEST_F(RefcountDeathTest, GetOnAFreePageAborts) {
  EXPECT_DEATH(map->page_at(0).get(), "get\\(\\) on a free device page");
}

TEST_F(RefcountDeathTest, PutOnAFreePageAborts) {
  EXPECT_DEATH(map->page_at(0).put(), "put\\(\\) on a free device page");
}

TEST_F(RefcountDeathTest, InitOfAPageInUseAborts) {
  DevicePage& p = map->page_at(0);
  zone_device_page_init(p);
  p.unlock();
  EXPECT_DEATH(zone_device_page_init(p), "page in use");
  p.put();
}

}  // namespace
}  // namespace uhmm
