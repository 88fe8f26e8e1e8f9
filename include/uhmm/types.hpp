// uhmm/types.hpp: the vocabulary every other header uses.
//
// Glossary (units matter; each has its own type so that mixing them does not
// compile):
//   page              4 KiB of virtual memory, kPageSize bytes.
//   huge page         2 MiB, kHugePageSize bytes, 512 pages, naturally aligned.
//   VirtAddr          a byte address in the process's virtual address space.
//   Vpn               a virtual page number: VirtAddr >> kPageShift.
//   PageCount         a number of pages (never bytes).
//   DevicePfn         a device page frame number.  Device pfns live in their
//                     own numbering space above kDevicePfnBase, so they can
//                     never be confused with a system pfn (see below).
//   system pfn        the host address of a CPU-addressable page >> kPageShift
//                     (in user space the "physical" frame of a system page is
//                     the staging page that holds its data while migrating).
//   device page       a page of device memory, described by a DevicePage.
//   managed range     virtual memory registered with an AddressSpace (a Region).
//
// The whole story of a CPU fault on a device page is told once, in
// docs/walkthrough-cpu-fault.md.
#pragma once

#include <compare>
#include <cstddef>
#include <cstdint>

namespace uhmm {

inline constexpr unsigned kPageShift = 12;
inline constexpr std::size_t kPageSize = std::size_t{1} << kPageShift;
inline constexpr unsigned kHugePageShift = 21;
inline constexpr std::size_t kHugePageSize = std::size_t{1} << kHugePageShift;
inline constexpr std::size_t kPagesPerHugePage = kHugePageSize / kPageSize;

/// A number of pages.
struct PageCount {
  std::uint64_t value = 0;
  constexpr std::size_t bytes() const { return static_cast<std::size_t>(value) << kPageShift; }
  constexpr auto operator<=>(const PageCount&) const = default;
};

/// A virtual page number.
struct Vpn {
  std::uint64_t value = 0;
  constexpr auto operator<=>(const Vpn&) const = default;
  constexpr Vpn operator+(std::uint64_t n) const { return Vpn{value + n}; }
  constexpr std::uint64_t operator-(Vpn other) const { return value - other.value; }
};

/// A virtual byte address in this process.
struct VirtAddr {
  std::uintptr_t value = 0;

  static VirtAddr of(const void* p) { return VirtAddr{reinterpret_cast<std::uintptr_t>(p)}; }
  void* ptr() const { return reinterpret_cast<void*>(value); }
  template <class T> T* as() const { return reinterpret_cast<T*>(value); }

  constexpr bool page_aligned() const { return (value & (kPageSize - 1)) == 0; }
  constexpr bool huge_aligned() const { return (value & (kHugePageSize - 1)) == 0; }
  constexpr VirtAddr page_down() const { return VirtAddr{value & ~(kPageSize - 1)}; }
  constexpr VirtAddr huge_down() const { return VirtAddr{value & ~(kHugePageSize - 1)}; }
  constexpr Vpn vpn() const { return Vpn{value >> kPageShift}; }
  static constexpr VirtAddr from_vpn(Vpn v) { return VirtAddr{v.value << kPageShift}; }

  constexpr VirtAddr operator+(std::size_t bytes) const { return VirtAddr{value + bytes}; }
  constexpr VirtAddr operator+(PageCount n) const { return VirtAddr{value + n.bytes()}; }
  constexpr std::size_t operator-(VirtAddr other) const { return value - other.value; }
  constexpr auto operator<=>(const VirtAddr&) const = default;
};

/// Device page frame numbers start here; everything below is a system pfn.
inline constexpr std::uint64_t kDevicePfnBase = std::uint64_t{1} << 40;

/// A device page frame number.
struct DevicePfn {
  std::uint64_t value = 0;
  constexpr auto operator<=>(const DevicePfn&) const = default;
  constexpr DevicePfn operator+(std::uint64_t n) const { return DevicePfn{value + n}; }
  constexpr std::uint64_t operator-(DevicePfn other) const { return value - other.value; }
};

/// A half-open range of device pfns.
struct DevicePfnRange {
  DevicePfn first;
  PageCount count;
  constexpr DevicePfn end() const { return first + count.value; }
  constexpr bool contains(DevicePfn pfn) const { return pfn >= first && pfn < end(); }
  constexpr bool overlaps(const DevicePfnRange& o) const {
    return first < o.end() && o.first < end();
  }
};

inline constexpr bool is_device_pfn(std::uint64_t pfn) { return pfn >= kDevicePfnBase; }

}  // namespace uhmm
