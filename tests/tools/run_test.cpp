// `uhmm run --dmirror`: runs the built CLI as a child and checks the
// environment it hands the program, its exit status, and (in builds
// without a sanitizer) a real dmirror program run through it.
#include <gtest/gtest.h>
#include <spawn.h>
#include <grp.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace {

struct Outcome {
  int exit_code = -1;
  std::string out;
};

// Runs the CLI with `args` and exactly the environment `env`; stdout captured.
Outcome run_cli(const std::vector<std::string>& args, const std::vector<std::string>& env) {
  char out_path[] = "/tmp/uhmm_run_out_XXXXXX";
  const int out_fd = ::mkstemp(out_path);
  EXPECT_GE(out_fd, 0);
  std::vector<std::string> argv_s{UHMM_CLI_PATH};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv, envp;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<std::string> env_s = env;
  for (auto& e : env_s) envp.push_back(e.data());
  envp.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, out_fd, 1);
  pid_t pid = -1;
  Outcome o;
  if (::posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), envp.data()) == 0) {
    int status = 0;
    ::waitpid(pid, &status, 0);
    if (WIFEXITED(status)) o.exit_code = WEXITSTATUS(status);
  }
  posix_spawn_file_actions_destroy(&actions);
  ::close(out_fd);
  std::ifstream in(out_path);
  std::ostringstream s;
  s << in.rdbuf();
  o.out = s.str();
  ::unlink(out_path);
  return o;
}

// A sanitized libuhmm-dmirror.so cannot be preloaded into a program that
// does not load the sanitizer's runtime first (ASan refuses to start), so in
// sanitizer builds the tests that run a program under the library skip; the
// release build runs them.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define UHMM_SKIP_UNDER_SANITIZER() GTEST_SKIP() << "a sanitized preload library needs the sanitizer runtime first"
#else
#define UHMM_SKIP_UNDER_SANITIZER() (void)0
#endif

std::string preload_line(const std::string& env_output) {
  std::istringstream in(env_output);
  for (std::string line; std::getline(in, line);)
    if (line.rfind("LD_PRELOAD=", 0) == 0) return line.substr(11);
  return "<none>";
}

TEST(RunDmirror, SetsLdPreloadToTheLibrary) {
  UHMM_SKIP_UNDER_SANITIZER();
  const Outcome o = run_cli({"run", "--dmirror", "--", "/usr/bin/env"}, {"PATH=/usr/bin:/bin"});
  ASSERT_EQ(o.exit_code, 0);
  const std::string preload = preload_line(o.out);
  EXPECT_NE(preload.find("libuhmm-dmirror.so"), std::string::npos) << preload;
  EXPECT_EQ(preload.find(':'), std::string::npos) << preload;
}

TEST(RunDmirror, AppendsToAnExistingPreload) {
  UHMM_SKIP_UNDER_SANITIZER();
  // The library itself stands in for "something already preloaded".
  const Outcome probe = run_cli({"run", "--dmirror", "--", "/usr/bin/env"}, {"PATH=/usr/bin:/bin"});
  const std::string lib = preload_line(probe.out);
  const Outcome o =
      run_cli({"run", "--dmirror", "--", "/usr/bin/env"}, {"PATH=/usr/bin:/bin", "LD_PRELOAD=" + lib});
  ASSERT_EQ(o.exit_code, 0);
  EXPECT_EQ(preload_line(o.out), lib + ":" + lib);
}

TEST(RunDmirror, PassesArgumentsAndExitStatus) {
  UHMM_SKIP_UNDER_SANITIZER();
  const Outcome o = run_cli({"run", "--dmirror", "--", "/bin/sh", "-c", "echo \"$0-$1\"; exit 7", "a", "b"},
                            {"PATH=/usr/bin:/bin"});
  EXPECT_EQ(o.exit_code, 7);
  EXPECT_EQ(o.out, "a-b\n");
}

TEST(RunDmirror, Errors) {
  EXPECT_EQ(run_cli({"run", "--dmirror", "--", "/nonexistent/program"}, {}).exit_code, 127);
  EXPECT_EQ(run_cli({"run", "--dmirror"}, {}).exit_code, 2);         // no program
  EXPECT_EQ(run_cli({"run", "--", "/usr/bin/env"}, {}).exit_code, 2);  // nothing to emulate
}

#ifdef UHMM_DMIRROR_ABI_TEST_PATH
TEST(RunDmirror, RunsAnUnmodifiedDmirrorProgram) {
  UHMM_SKIP_UNDER_SANITIZER();
  const Outcome o = run_cli({"run", "--dmirror", "--", UHMM_DMIRROR_ABI_TEST_PATH}, {"PATH=/usr/bin:/bin"});
  if (o.exit_code == 77) GTEST_SKIP() << "no userfaultfd for kernel-mode faults here";
  EXPECT_EQ(o.exit_code, 0) << o.out;
}

// Without a userfaultfd that serves kernel-mode faults (an unprivileged
// user, vm.unprivileged_userfaultfd = 0, no access to /dev/userfaultfd) the
// library says so in one line on stderr and the open fails with an errno:
// the ABI test then skips (77), as it does on a machine without the device.
TEST(RunDmirror, WithoutAUserfaultfdOpeningFailsWithOneLineOnStderr) {
  UHMM_SKIP_UNDER_SANITIZER();
  if (::geteuid() != 0) GTEST_SKIP() << "needs root, to run the program as an unprivileged user";
  std::ifstream sysctl("/proc/sys/vm/unprivileged_userfaultfd");
  int unprivileged = 1;
  if (!(sysctl >> unprivileged) || unprivileged != 0) GTEST_SKIP() << "unprivileged users may use userfaultfd here";
  char err_path[] = "/tmp/uhmm_run_err_XXXXXX";
  const int err_fd = ::mkstemp(err_path);
  ASSERT_GE(err_fd, 0);
  const pid_t pid = ::fork();
  if (pid == 0) {
    constexpr uid_t kNobody = 65534;
    if (::setgroups(0, nullptr) != 0 || ::setgid(kNobody) != 0 || ::setuid(kNobody) != 0) ::_exit(120);
    ::dup2(err_fd, 2);
    char cli[] = UHMM_CLI_PATH, run[] = "run", dmirror[] = "--dmirror", dashes[] = "--",
         program[] = UHMM_DMIRROR_ABI_TEST_PATH, path_env[] = "PATH=/usr/bin:/bin";
    char* argv[] = {cli, run, dmirror, dashes, program, nullptr};
    char* envp[] = {path_env, nullptr};
    ::execve(cli, argv, envp);
    ::_exit(127);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ::close(err_fd);
  std::ifstream in(err_path);
  std::vector<std::string> ours;
  std::string all, line;
  while (std::getline(in, line)) {
    all += line + "\n";
    if (line.rfind("uhmm-dmirror:", 0) == 0) ours.push_back(line);
  }
  ::unlink(err_path);
  ASSERT_TRUE(WIFEXITED(status));
  if (WEXITSTATUS(status) == 126 || WEXITSTATUS(status) == 127)
    GTEST_SKIP() << "the build is not reachable for an unprivileged user: " << all;
  EXPECT_EQ(WEXITSTATUS(status), 77) << all;
  ASSERT_EQ(ours.size(), 1u) << all;
  EXPECT_NE(ours[0].find("userfaultfd"), std::string::npos) << ours[0];
  EXPECT_NE(all.find("cannot open /dev/hmm_dmirror0: Operation not permitted"), std::string::npos) << all;
}
#endif

}  // namespace
