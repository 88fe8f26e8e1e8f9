// Shared helpers of the file suites: a temporary directory, files filled
// with a pattern, and reading a file back with plain read(2).
#pragma once

#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "uhmm/address_space.hpp"

namespace uhmm {

inline std::uint8_t pattern(std::uint64_t offset, std::uint8_t salt) {
  return static_cast<std::uint8_t>((offset * 131 + (offset >> 12) * 7 + salt) & 0xff);
}

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/uhmm-file-cache-XXXXXX";
    const char* d = ::mkdtemp(tmpl);
    EXPECT_NE(d, nullptr);
    path_ = d ? d : "";
  }
  ~TempDir() { (void)!::system(("rm -rf " + path_).c_str()); }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

inline void write_file(const std::string& path, std::uint64_t size, std::uint8_t salt) {
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
  ASSERT_GE(fd, 0);
  std::vector<std::uint8_t> buf(size);
  for (std::uint64_t i = 0; i < size; ++i) buf[i] = pattern(i, salt);
  ASSERT_EQ(::pwrite(fd, buf.data(), size, 0), static_cast<ssize_t>(size));
  ::close(fd);
}

inline std::vector<std::uint8_t> read_file(const std::string& path) {
  std::vector<std::uint8_t> out;
  const int fd = ::open(path.c_str(), O_RDONLY);
  EXPECT_GE(fd, 0);
  std::uint8_t buf[8192];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n <= 0) break;
    out.insert(out.end(), buf, buf + n);
  }
  ::close(fd);
  return out;
}

/// The test-name suffix of a fault mode, for INSTANTIATE_TEST_SUITE_P.
inline std::string fault_mode_suffix(const ::testing::TestParamInfo<FaultMode>& info) {
  return info.param == FaultMode::kInThread ? "InThread" : "ServiceThreads";
}

/// An address space serving faults in `mode`, with two service threads.
inline std::unique_ptr<AddressSpace> address_space_for(FaultMode mode) {
  AddressSpaceOptions o;
  o.fault_mode = mode;
  o.fault_threads = 2;
  auto r = AddressSpace::create(o);
  EXPECT_TRUE(r.is_ok()) << r.status().to_string();
  return r.is_ok() ? std::move(*r) : nullptr;
}

}  // namespace uhmm
