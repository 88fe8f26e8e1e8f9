// tools/uhmm: `uhmm run` (run.hpp).
#include "run.hpp"

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "demo.hpp"

namespace uhmm::tool {

namespace {
constexpr const char* kLibName = "libuhmm-dmirror.so";
}

std::optional<std::string> find_dmirror_library(const std::string& exe) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path dir = fs::weakly_canonical(fs::path(exe), ec).parent_path();
  std::vector<fs::path> candidates{dir / kLibName, dir / ".." / "lib" / kLibName};
#ifdef UHMM_DMIRROR_BUILD_PATH
  candidates.emplace_back(UHMM_DMIRROR_BUILD_PATH);
#endif
  for (const fs::path& p : candidates)
    if (fs::is_regular_file(p, ec)) return fs::weakly_canonical(p, ec).string();
  return std::nullopt;
}

std::string append_preload(const char* existing, const std::string& lib) {
  if (existing == nullptr || *existing == '\0') return lib;
  return std::string(existing) + ":" + lib;
}

int run_with_dmirror(const std::vector<std::string>& argv) {
  char self[4096];
  const ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
  const std::string exe = n > 0 ? std::string(self, static_cast<std::size_t>(n)) : std::string();
  const auto lib = find_dmirror_library(exe);
  if (!lib) {
    std::fprintf(stderr, "uhmm: error: %s not found next to %s or in its ../lib\n", kLibName, exe.c_str());
    return kExitError;
  }
  const std::string preload = append_preload(std::getenv("LD_PRELOAD"), *lib);
  if (::setenv("LD_PRELOAD", preload.c_str(), 1) != 0) {
    std::fprintf(stderr, "uhmm: error: cannot set LD_PRELOAD: %s\n", std::strerror(errno));
    return kExitError;
  }
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  ::execvp(args[0], args.data());
  std::fprintf(stderr, "uhmm: error: cannot run %s: %s\n", argv[0].c_str(), std::strerror(errno));
  return 127;  // as a shell says "command not found / not executable"
}

}  // namespace uhmm::tool
