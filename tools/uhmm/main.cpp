// tools/uhmm: the `uhmm` command-line tool.
//
//   uhmm demo [--size 1GiB] [--device-memory SIZE] [--json] ...
//   uhmm run --dmirror -- PROGRAM ARGS...
//
// Exit codes: 0 success, 1 the demo's data did not verify, 2 an error (a bad
// command line or a failing library call; one line on stderr).
#include <CLI/CLI.hpp>

#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "demo.hpp"
#include "run.hpp"
#include "size.hpp"

namespace {

// A CLI11 option callback target that parses a byte size.
CLI::Option* add_size_option(CLI::App& app, const std::string& name, std::uint64_t& target,
                             const std::string& description) {
  return app
      .add_option_function<std::string>(
          name,
          [&target, name](const std::string& text) {
            const auto v = uhmm::tool::parse_size(text);
            if (!v) throw CLI::ValidationError(name, "'" + text + "' is not a size (e.g. 1GiB, 16MiB, 4096)");
            target = *v;
          },
          description)
      ->type_name("SIZE");
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "uhmm: user-space Heterogeneous Memory Management.\n"
      "Manages ordinary process memory that can migrate to a device and back;\n"
      "this tool demonstrates it with the built-in simulated device."};
  app.name("uhmm");
  app.require_subcommand(1);
  app.footer(
      "Run 'uhmm <subcommand> --help' for a subcommand's options, e.g.\n"
      "  uhmm demo --size 256MiB\n"
      "Needs userfaultfd for user and kernel faults: run as root, or with access\n"
      "to /dev/userfaultfd.");

  uhmm::tool::DemoOptions demo;
  std::string device_memory_text;
  bool no_progress = false;
  std::uint64_t corrupt_offset = 0;
  CLI::App* demo_cmd =
      app.add_subcommand("demo", "Round-trip a buffer through the simulated device and verify every byte");
  demo_cmd->footer(
      "Maps a managed buffer, fills it on the CPU with a known pattern, migrates it\n"
      "to device memory in 2 MiB batches (progress on stderr), runs a device kernel\n"
      "that transforms every 8-byte word (x -> (x ^ mask) + 1), then reads it back\n"
      "on the CPU -- each page comes back on the CPU fault -- checking every word.\n"
      "Prints bandwidths, fault latency and page counts (a table, or JSON).\n"
      "Exit status: 0 verified, 1 data mismatch, 2 error (one line on stderr).\n"
      "Sizes accept B, K/KiB, M/MiB, G/GiB, T/TiB (powers of 1024) and KB/MB/GB/TB\n"
      "(powers of 1000), e.g. 1GiB, 256MiB, 1.5G.\n"
      "Example: uhmm demo --size 256MiB --json");
  add_size_option(*demo_cmd, "-s,--size", demo.size, "Bytes of managed memory to round-trip (multiple of 4 KiB)")
      ->default_str("1GiB");
  add_size_option(*demo_cmd, "--device-memory", demo.device_memory,
                  "Simulated device memory (default: --size plus 64 MiB)");
  demo_cmd->add_flag("--json", demo.json, "Print the figures as JSON on stdout instead of a table");
  demo_cmd->add_flag("-q,--quiet", no_progress, "No progress output on stderr");
  demo_cmd->add_option("--dma-threads", demo.dma_threads, "DMA engine worker threads of the simulated device")
      ->type_name("N")
      ->capture_default_str()
      ->check(CLI::Range(0u, 64u).description(""));
  demo_cmd->add_option("--fault-threads", demo.fault_threads, "Fault-service threads (0: one per CPU)")
      ->type_name("N")
      ->capture_default_str()
      ->check(CLI::Range(0u, 256u).description(""));
  demo_cmd
      ->add_option("--corrupt-offset", corrupt_offset,
                   "Testing aid: corrupt the word at this byte offset on the device before\n"
                   "the read-back, to show how a mismatch is reported")
      ->type_name("BYTES")
      ->group("Testing");

  bool dmirror = false;
  std::vector<std::string> program;
  CLI::App* run_cmd = app.add_subcommand("run", "Run a program with emulated devices");
  run_cmd->footer(
      "--dmirror preloads libuhmm-dmirror.so (appended to LD_PRELOAD): the program's\n"
      "/dev/hmm_dmirror0 and 1 (the kernel's HMM test device) are emulated by uhmm,\n"
      "with no change to the program.  The program replaces this process; its exit\n"
      "status is the command's.  127: it could not be run.\n"
      "Example: uhmm run --dmirror -- ./hmm-tests");
  run_cmd->add_flag("--dmirror", dmirror, "Emulate the kernel's HMM test device (/dev/hmm_dmirror*)")->required();
  run_cmd->add_option("program", program, "PROGRAM and its arguments (after --)")->required()->expected(1, -1);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == static_cast<int>(CLI::ExitCodes::Success)) return app.exit(e);  // --help
    std::fprintf(stderr, "uhmm: error: %s (see 'uhmm --help')\n", e.what());
    return uhmm::tool::kExitError;
  }

  try {
    if (demo_cmd->parsed()) {
      demo.progress = !no_progress;
      if (demo_cmd->count("--corrupt-offset") != 0) demo.corrupt_offset = corrupt_offset;
      return uhmm::tool::run_demo(demo);
    }
    if (run_cmd->parsed()) return uhmm::tool::run_with_dmirror(program);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "uhmm: error: %s\n", e.what());
    return uhmm::tool::kExitError;
  }
  return uhmm::tool::kExitError;
}
