// Runs the built `uhmm` CLI as a child process and checks `uhmm demo`.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

extern char** environ;

namespace {

struct RunResult {
  int exit_code = -1;  // -1: did not exit normally
  std::string out;
  std::string err;
};

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// Runs UHMM_CLI_PATH with `args`, stdout and stderr captured in temp files.
RunResult run_cli(const std::vector<std::string>& args) {
  char out_path[] = "/tmp/uhmm_cli_out_XXXXXX";
  char err_path[] = "/tmp/uhmm_cli_err_XXXXXX";
  const int out_fd = ::mkstemp(out_path);
  const int err_fd = ::mkstemp(err_path);
  EXPECT_GE(out_fd, 0);
  EXPECT_GE(err_fd, 0);

  std::vector<std::string> argv_s{UHMM_CLI_PATH};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, out_fd, 1);
  posix_spawn_file_actions_adddup2(&actions, err_fd, 2);
  RunResult r;
  pid_t pid = 0;
  const int rc = ::posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  EXPECT_EQ(rc, 0) << "posix_spawn " << argv[0];
  if (rc == 0) {
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    if (WIFEXITED(status)) r.exit_code = WEXITSTATUS(status);
  }
  ::close(out_fd);
  ::close(err_fd);
  r.out = slurp(out_path);
  r.err = slurp(err_path);
  ::unlink(out_path);
  ::unlink(err_path);
  return r;
}

TEST(UhmmCliDemo, SixteenMiBRoundTripVerifiesAndMovesEveryPageBothWays) {
  const RunResult r = run_cli({"demo", "--size", "16MiB", "--json"});
  ASSERT_EQ(r.exit_code, 0) << "stdout:\n" << r.out << "\nstderr:\n" << r.err;
  nlohmann::json j;
  ASSERT_NO_THROW(j = nlohmann::json::parse(r.out)) << r.out;
  EXPECT_EQ(j.at("bytes").get<std::uint64_t>(), 16u << 20);
  EXPECT_TRUE(j.at("verified").get<bool>());
  EXPECT_EQ(j.at("mismatches").get<std::uint64_t>(), 0u);
  EXPECT_TRUE(j.at("first_mismatch").is_null());
  EXPECT_EQ(j.at("pages_to_device").get<std::uint64_t>(), 4096u);
  EXPECT_EQ(j.at("pages_to_ram").get<std::uint64_t>(), 4096u);
  // Every page came back because the CPU touched it: through a fault, or
  // prefetched because a sequential stream of faults announced it (so
  // there is at least one fault, and never more than one per page).
  const auto faults = j.at("device_private_faults").get<std::uint64_t>();
  EXPECT_GE(faults, 1u);
  EXPECT_LE(faults, 4096u);
  EXPECT_GT(j.at("to_device_gbps").get<double>(), 0.0);
  EXPECT_GT(j.at("back_by_fault_gbps").get<double>(), 0.0);
  EXPECT_GT(j.at("fault_latency_p50_ns").get<std::uint64_t>(), 0u);
  EXPECT_GE(j.at("fault_latency_p99_ns").get<std::uint64_t>(), j.at("fault_latency_p50_ns").get<std::uint64_t>());
}

TEST(UhmmCliDemo, TableOutputSaysVerifiedOk) {
  const RunResult r = run_cli({"demo", "--size", "4MiB", "--quiet"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("verified"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("OK"), std::string::npos) << r.out;
  EXPECT_TRUE(r.err.empty()) << r.err;  // --quiet: no progress
}

TEST(UhmmCliDemo, ZeroSizeFailsWithOneErrorLine) {
  const RunResult r = run_cli({"demo", "--size", "0"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_TRUE(r.out.empty()) << r.out;
  ASSERT_FALSE(r.err.empty());
  EXPECT_EQ(r.err.rfind("uhmm: error:", 0), 0u) << r.err;
  EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << "one line expected: " << r.err;
}

TEST(UhmmCliDemo, MalformedSizeIsAnError) {
  const RunResult r = run_cli({"demo", "--size", "lots"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("uhmm: error:"), std::string::npos) << r.err;
}

TEST(UhmmCliDemo, TooLittleDeviceMemoryIsAnError) {
  const RunResult r = run_cli({"demo", "--size", "8MiB", "--device-memory", "4MiB", "--quiet"});
  EXPECT_EQ(r.exit_code, 2) << r.out << r.err;
  EXPECT_NE(r.err.find("ENOMEM"), std::string::npos) << r.err;
}

TEST(UhmmCliDemo, CorruptedWordIsReportedAsMismatch) {
  const RunResult r = run_cli({"demo", "--size", "4MiB", "--json", "--quiet", "--corrupt-offset", "12345"});
  ASSERT_EQ(r.exit_code, 1) << r.out << r.err;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_FALSE(j.at("verified").get<bool>());
  EXPECT_EQ(j.at("mismatches").get<std::uint64_t>(), 1u);
  EXPECT_EQ(j.at("first_mismatch").at("offset").get<std::uint64_t>(), 12345u & ~7u);
}

TEST(UhmmCli, HelpDescribesDemo) {
  const RunResult r = run_cli({"--help"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_NE(r.out.find("demo"), std::string::npos) << r.out;
  const RunResult d = run_cli({"demo", "--help"});
  EXPECT_EQ(d.exit_code, 0);
  EXPECT_NE(d.out.find("--size"), std::string::npos) << d.out;
  EXPECT_NE(d.out.find("--json"), std::string::npos) << d.out;
}

}  // namespace
