// tools/uhmm: `uhmm run --dmirror -- PROGRAM ARGS...`: runs a program with
// the dmirror preload library (docs/adr/0005-dmirror-emulation.md), so that
// its /dev/hmm_dmirror* devices are emulated by uhmm.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace uhmm::tool {

/// Where libuhmm-dmirror.so is: next to the `uhmm` binary, in ../lib from
/// it (an installed tree), or where this build tree put it.  nullopt if
/// none of those exists.  `exe` is the path of the running binary.
std::optional<std::string> find_dmirror_library(const std::string& exe);

/// The LD_PRELOAD value that adds `lib` after what `existing` (may be null
/// or empty) already preloads.
std::string append_preload(const char* existing, const std::string& lib);

/// Sets LD_PRELOAD and execs `argv` (searched in PATH).  Returns only on
/// failure, after one line on stderr: 127 if the program cannot be run, 2
/// if the library cannot be found.
int run_with_dmirror(const std::vector<std::string>& argv);

}  // namespace uhmm::tool
