/* Preload (LD_PRELOAD) into a test that hangs: a thread sent SIGURG prints
 * its backtrace to stderr.  gdb cannot attach to a process whose thread
 * sleeps in a killable userfault wait (ptrace cannot stop it); this works
 * for every thread in an interruptible wait or running.  Build:
 *   cc -shared -fPIC -O1 -o /tmp/bt.so tools/debug/backtrace_on_signal.c
 * Resolve the offsets with addr2line -f -C -i -e <binary>. */
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>

static void print_backtrace(int sig) {
  (void)sig;
  void* frames[64];
  const int n = backtrace(frames, 64);
  char line[64];
  const int len = snprintf(line, sizeof line, "=== tid %ld\n", (long)syscall(SYS_gettid));
  (void)!write(2, line, (size_t)len);
  backtrace_symbols_fd(frames, n, 2);
}

__attribute__((constructor)) static void install(void) {
  void* warm[2];
  (void)backtrace(warm, 2); /* loads libgcc now, not inside the handler */
  struct sigaction sa = {0};
  sa.sa_handler = print_backtrace;
  sa.sa_flags = SA_RESTART;
  sigaction(SIGURG, &sa, 0);
}
