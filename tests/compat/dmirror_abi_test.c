/* A program written against the kernel's HMM test device, as an outside
 * user would write it: its own struct and command definitions, real open
 * and ioctl calls.  Run under LD_PRELOAD=libuhmm-dmirror.so
 * (tests/compat/CMakeLists.txt).  Exit 0: every check passed; 1: a check
 * failed (each failure is printed); 77: the device cannot be emulated here
 * (no userfaultfd for kernel-mode faults). */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

struct dm_cmd {
  uint64_t addr, ptr, npages, cpages, faults;
};
#define DM_READ _IOWR('H', 0x00, struct dm_cmd)
#define DM_WRITE _IOWR('H', 0x01, struct dm_cmd)
#define DM_TO_DEV _IOWR('H', 0x02, struct dm_cmd)
#define DM_TO_SYS _IOWR('H', 0x03, struct dm_cmd)
#define DM_SNAPSHOT _IOWR('H', 0x04, struct dm_cmd)
#define DM_EXCLUSIVE _IOWR('H', 0x05, struct dm_cmd)
#define DM_CHECK_EXCLUSIVE _IOWR('H', 0x06, struct dm_cmd)
#define DM_RELEASE _IOWR('H', 0x07, struct dm_cmd)
#define DM_FLAGS _IOWR('H', 0x08, struct dm_cmd)

#define PAGE 4096UL
#define N 16UL

extern int __open_2(const char *path, int flags);

static int failures;
#define CHECK(cond)                                                   \
  do {                                                                \
    if (!(cond)) {                                                    \
      fprintf(stderr, "%s:%d: check failed: %s (errno %d %s)\n", __FILE__, __LINE__, #cond, errno, strerror(errno)); \
      ++failures;                                                     \
    }                                                                 \
  } while (0)

static int cmd(int fd, unsigned long req, void *addr, void *ptr, uint64_t npages, struct dm_cmd *out) {
  struct dm_cmd c = {(uint64_t)(uintptr_t)addr, (uint64_t)(uintptr_t)ptr, npages, 0xdead, 0xbeef};
  int r = ioctl(fd, req, &c);
  if (out) *out = c;
  return r;
}

static char *map_rw(unsigned long pages) {
  char *p = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    perror("mmap");
    exit(1);
  }
  return p;
}

static void fill(char *p, unsigned long pages, unsigned seed) {
  for (unsigned long i = 0; i < pages * PAGE / sizeof(unsigned); ++i) ((unsigned *)p)[i] = seed + (unsigned)i;
}

static int same(const char *p, unsigned long pages, unsigned seed) {
  for (unsigned long i = 0; i < pages * PAGE / sizeof(unsigned); ++i)
    if (((const unsigned *)p)[i] != seed + (unsigned)i) return 0;
  return 1;
}

static void test_open_entries(void) {
  int fd = openat(AT_FDCWD, "/dev/hmm_dmirror0", O_RDWR);
  CHECK(fd >= 0);
  close(fd);
  fd = __open_2("/dev/hmm_dmirror1", O_RDWR);
  CHECK(fd >= 0);
  close(fd);
  /* 2 and 3 are emulated device-coherent devices (test_coherent). */
  fd = open("/dev/hmm_dmirror2", O_RDWR);
  CHECK(fd >= 0);
  close(fd);
  fd = open("/dev/hmm_dmirror3", O_RDWR);
  CHECK(fd >= 0);
  close(fd);
  errno = 0;
  CHECK(open("/dev/hmm_dmirror4", O_RDWR) == -1); /* not a device path: the real open, which finds nothing */
}

static void test_errors(int fd) {
  char *buf = map_rw(N), *out = map_rw(N);
  struct dm_cmd c;
  errno = 0;
  CHECK(ioctl(fd, _IOWR('H', 0x09, struct dm_cmd), &(struct dm_cmd){(uintptr_t)buf, (uintptr_t)out, 1, 0, 0}) == -1 &&
        errno == EINVAL);
  errno = 0;
  CHECK(ioctl(fd, DM_READ, (void *)8) == -1 && errno == EFAULT);
  errno = 0;
  CHECK(cmd(fd, DM_READ, buf, out, 0, &c) == -1 && errno == EINVAL);
  errno = 0;
  CHECK(cmd(fd, DM_READ, buf + 1, out, 1, &c) == -1 && errno == EINVAL);
  errno = 0;
  CHECK(cmd(fd, DM_READ, buf, (void *)8, 1, &c) == -1 && errno == EFAULT); /* bad ptr */
  munmap(buf, N * PAGE);
  munmap(out, N * PAGE);
}

static void test_read_write(int fd) {
  char *buf = map_rw(N), *out = map_rw(N);
  struct dm_cmd c;
  fill(buf, N, 100);
  CHECK(cmd(fd, DM_READ, buf, out, N, &c) == 0);
  CHECK(c.cpages == N && c.faults == 1);
  CHECK(same(out, N, 100));
  CHECK(cmd(fd, DM_READ, buf, out, N, &c) == 0);
  CHECK(c.cpages == N && c.faults == 0); /* all mirrored now */
  fill(out, N, 200);
  CHECK(cmd(fd, DM_WRITE, buf, out, N, &c) == 0);
  CHECK(c.cpages == N && c.faults == 0);
  CHECK(same(buf, N, 200));
  /* After munmap the mirror drops the range: a READ there is EFAULT. */
  munmap(buf + 8 * PAGE, 8 * PAGE);
  errno = 0;
  CHECK(cmd(fd, DM_READ, buf, out, N, &c) == -1 && errno == EFAULT && c.cpages == 0xdead);
  munmap(buf, 8 * PAGE);

  char *ro = mmap(NULL, N * PAGE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  errno = 0;
  CHECK(cmd(fd, DM_WRITE, ro, out, N, &c) == -1 && errno == EPERM);
  CHECK(cmd(fd, DM_READ, ro, out, N, &c) == 0 && c.faults == 1);
  mprotect(ro, N * PAGE, PROT_NONE);
  errno = 0;
  CHECK(cmd(fd, DM_READ, ro, out, N, &c) == -1 && errno == EFAULT);
  munmap(ro, N * PAGE);
  munmap(out, N * PAGE);
}

static void test_migrate(int fd) {
  char *buf = map_rw(N), *out = map_rw(N);
  unsigned char snap[N];
  struct dm_cmd c;
  fill(buf, N, 300);
  CHECK(cmd(fd, DM_TO_DEV, buf, out, N, &c) == 0);
  CHECK(c.cpages == N);
  CHECK(same(out, N, 300));
  CHECK(cmd(fd, DM_SNAPSHOT, buf, snap, N, &c) == 0 && c.cpages == N);
  for (unsigned long i = 0; i < N; ++i) CHECK(snap[i] == 0x22);
  /* The device reads its own pages without a fault. */
  memset(out, 0, N * PAGE);
  CHECK(cmd(fd, DM_READ, buf, out, N, &c) == 0 && c.faults == 0 && same(out, N, 300));
  /* A CPU access brings one page back. */
  CHECK(((unsigned *)(buf + 3 * PAGE))[0] == 300 + 3 * PAGE / sizeof(unsigned));
  CHECK(cmd(fd, DM_SNAPSHOT, buf, snap, N, &c) == 0);
  CHECK(snap[3] == 0x02 && snap[2] == 0x22 && snap[4] == 0x22);
  /* A syscall on a device page works as on the kernel. */
  int pipefd[2];
  CHECK(pipe(pipefd) == 0);
  CHECK(write(pipefd[1], buf + 5 * PAGE, PAGE) == (ssize_t)PAGE);
  CHECK(read(pipefd[0], out, PAGE) == (ssize_t)PAGE);
  CHECK(memcmp(out, buf + 5 * PAGE, PAGE) == 0);
  close(pipefd[0]);
  close(pipefd[1]);
  /* Back to system memory: only the pages still on the device move. */
  CHECK(cmd(fd, DM_TO_SYS, buf, out, N, &c) == 0);
  CHECK(c.cpages == N - 2);
  CHECK(cmd(fd, DM_SNAPSHOT, buf, snap, N, &c) == 0);
  for (unsigned long i = 0; i < N; ++i) CHECK(snap[i] == 0x02);
  CHECK(same(buf, N, 300));
  /* munmap of part of a migrated range keeps the rest. */
  CHECK(cmd(fd, DM_TO_DEV, buf, out, N, &c) == 0);
  munmap(buf + 4 * PAGE, 4 * PAGE);
  CHECK(cmd(fd, DM_SNAPSHOT, buf, snap, N, &c) == 0);
  CHECK(snap[4] == 0xFF && snap[7] == 0xFF && snap[8] == 0x22);
  CHECK(same(buf, 4, 300));
  CHECK(same(buf + 8 * PAGE, 8, 300 + 8 * PAGE / sizeof(unsigned)));
  munmap(buf, 4 * PAGE);
  munmap(buf + 8 * PAGE, 8 * PAGE);
  munmap(out, N * PAGE);
}

static void test_snapshot_kinds(int fd) {
  char *buf = map_rw(4), *out = map_rw(4);
  unsigned char snap[4];
  struct dm_cmd c;
  buf[0] = 1;                            /* page 0 populated writable, 1 untouched */
  mprotect(buf + 2 * PAGE, PAGE, PROT_READ);
  (void)*(volatile char *)(buf + 2 * PAGE); /* page 2 read-only, populated */
  mprotect(buf + 3 * PAGE, PAGE, PROT_NONE);
  CHECK(cmd(fd, DM_SNAPSHOT, buf, snap, 4, &c) == 0);
  CHECK(snap[0] == 0x02);
  CHECK(snap[1] == 0x00);
  CHECK((snap[2] & 0x0F) == 0x01); /* 0x01, or 0x11 where the kernel maps the zero page */
  CHECK(snap[3] == 0xFF);
  munmap(buf, 4 * PAGE);
  munmap(out, 4 * PAGE);
}

static void test_shared_refuses(int fd) {
  char *sh = mmap(NULL, N * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  char *out = map_rw(N);
  struct dm_cmd c;
  fill(sh, N, 400);
  errno = 0;
  CHECK(cmd(fd, DM_TO_DEV, sh, out, N, &c) == -1 && errno == ENOENT);
  CHECK(cmd(fd, DM_READ, sh, out, N, &c) == 0 && same(out, N, 400)); /* still readable in place */
  fill(out, N, 401);
  CHECK(cmd(fd, DM_WRITE, sh, out, N, &c) == 0 && same(sh, N, 401));
  munmap(sh, N * PAGE);
  munmap(out, N * PAGE);
}

static void test_fail_alloc(int fd) {
  char *buf = map_rw(2), *out = map_rw(2);
  struct dm_cmd c;
  fill(buf, 2, 500);
  CHECK(cmd(fd, DM_FLAGS, buf, NULL, 1, &c) == 0);
  errno = 0;
  CHECK(cmd(fd, DM_TO_DEV, buf, out, 1, &c) == -1 && errno == ENOENT); /* the one page was not migrated */
  CHECK(cmd(fd, DM_TO_DEV, buf, out, 2, &c) == 0 && c.cpages == 2); /* once only */
  CHECK(same(buf, 2, 500)); /* the CPU takes both pages back */
  /* The flag belongs to the fd that set it, as the kernel's per-open flag:
   * another fd of the same device migrates as usual, and the next migration
   * through the fd that set it still fails once. */
  int other = open("/dev/hmm_dmirror0", O_RDWR);
  CHECK(other >= 0);
  CHECK(cmd(other, DM_FLAGS, buf, NULL, 1, &c) == 0);
  CHECK(cmd(fd, DM_TO_DEV, buf, out, 1, &c) == 0 && c.cpages == 1);
  errno = 0;
  CHECK(cmd(other, DM_TO_DEV, buf + PAGE, out, 1, &c) == -1 && errno == ENOENT);
  CHECK(cmd(other, DM_TO_DEV, buf + PAGE, out, 1, &c) == 0 && c.cpages == 1);
  /* FLAGS replaces the fd's flags: a value without bit 0 disarms it before
   * it fires (0 itself is refused, as any npages 0). */
  CHECK(cmd(fd, DM_TO_SYS, buf, out, 2, &c) == 0 && c.cpages == 2);
  CHECK(cmd(fd, DM_FLAGS, buf, NULL, 1, &c) == 0);
  errno = 0;
  CHECK(cmd(fd, DM_FLAGS, buf, NULL, 0, &c) == -1 && errno == EINVAL);
  CHECK(cmd(fd, DM_FLAGS, buf, NULL, 2, &c) == 0);
  CHECK(cmd(fd, DM_TO_DEV, buf, out, 1, &c) == 0 && c.cpages == 1);
  close(other); /* evicts the device: every page back */
  CHECK(same(buf, 2, 500));
  munmap(buf, 2 * PAGE);
  munmap(out, 2 * PAGE);
}

/* Device memory grows in chunks on demand: a range larger than the first
 * chunk moves whole, and every page, in every chunk, keeps its data.  The
 * chunk is 256 MiB unless the library's test knob makes it smaller (ctest
 * runs this program a second time so); with 256 MiB chunks this only moves
 * 4 MiB. */
static void test_device_memory_growth(int fd) {
  const char *knob = getenv("UHMM_DMIRROR_CHUNK_BYTES");
  unsigned long chunk = knob ? strtoul(knob, NULL, 10) : 256UL << 20;
  unsigned long pages = chunk > (8UL << 20) ? 1024 : 3 * chunk / PAGE + 5;
  char *buf = map_rw(pages), *out = map_rw(pages);
  unsigned char *snap = malloc(pages);
  struct dm_cmd c;
  fill(buf, pages, 550);
  CHECK(cmd(fd, DM_TO_DEV, buf, out, pages, &c) == 0 && c.cpages == pages && same(out, pages, 550));
  CHECK(cmd(fd, DM_SNAPSHOT, buf, snap, pages, &c) == 0);
  unsigned long on_device = 0;
  for (unsigned long i = 0; i < pages; ++i) on_device += snap[i] == 0x22;
  CHECK(on_device == pages);
  memset(out, 0, pages * PAGE);
  CHECK(cmd(fd, DM_READ, buf, out, pages, &c) == 0 && same(out, pages, 550));
  CHECK(cmd(fd, DM_TO_SYS, buf, out, pages, &c) == 0 && c.cpages == pages);
  CHECK(same(buf, pages, 550));
  free(snap);
  munmap(buf, pages * PAGE);
  munmap(out, pages * PAGE);
}

static void test_exclusive(int fd) {
  char *buf = map_rw(4), *out = map_rw(4);
  struct dm_cmd c;
  fill(buf, 4, 600);
  CHECK(cmd(fd, DM_EXCLUSIVE, buf, out, 4, &c) == 0 && c.cpages == 4);
  CHECK(same(out, 4, 600));
  errno = 0;
  CHECK(cmd(fd, DM_CHECK_EXCLUSIVE, buf, NULL, 4, &c) == -1 && errno == EPERM);
  for (unsigned long i = 0; i < 4; ++i) ((unsigned *)(buf + i * PAGE))[0] += 1; /* CPU access revokes */
  CHECK(cmd(fd, DM_CHECK_EXCLUSIVE, buf, NULL, 4, &c) == 0);
  CHECK(((unsigned *)(buf + PAGE))[0] == 600 + PAGE / sizeof(unsigned) + 1);
  munmap(buf, 4 * PAGE);
  munmap(out, 4 * PAGE);
}

static void test_release_and_close(int fd) {
  char *buf = map_rw(N), *out = map_rw(N);
  unsigned char snap[N];
  struct dm_cmd c;
  fill(buf, N, 700);
  CHECK(cmd(fd, DM_TO_DEV, buf, out, N, &c) == 0);
  CHECK(cmd(fd, DM_RELEASE, buf, NULL, N, &c) == 0);
  CHECK(cmd(fd, DM_SNAPSHOT, buf, snap, N, &c) == 0);
  for (unsigned long i = 0; i < N; ++i) CHECK(snap[i] == 0x02);
  /* A second fd of the same device: closing it evicts the device. */
  int fd2 = open("/dev/hmm_dmirror0", O_RDWR);
  CHECK(fd2 >= 0);
  CHECK(cmd(fd2, DM_TO_DEV, buf, out, N, &c) == 0);
  CHECK(cmd(fd, DM_SNAPSHOT, buf, snap, N, &c) == 0 && snap[0] == 0x22);
  close(fd2);
  CHECK(cmd(fd, DM_SNAPSHOT, buf, snap, N, &c) == 0);
  for (unsigned long i = 0; i < N; ++i) CHECK(snap[i] == 0x02);
  CHECK(same(buf, N, 700));
  /* Another device's pages show as NONE to this one. */
  int other = open("/dev/hmm_dmirror1", O_RDWR);
  CHECK(other >= 0);
  CHECK(cmd(other, DM_TO_DEV, buf, out, N, &c) == 0);
  CHECK(cmd(fd, DM_SNAPSHOT, buf, snap, N, &c) == 0 && snap[0] == 0x00);
  CHECK(cmd(other, DM_SNAPSHOT, buf, snap, N, &c) == 0 && snap[0] == 0x22);
  close(other);
  CHECK(same(buf, N, 700));
  /* A dup of a device fd is the same open device: its commands work, and
   * closing one of the copies releases nothing; the last close evicts. */
  int d1 = open("/dev/hmm_dmirror0", O_RDWR);
  CHECK(d1 >= 0);
  int d2 = dup(d1);
  CHECK(d2 >= 0);
  CHECK(cmd(d1, DM_TO_DEV, buf, out, N, &c) == 0 && c.cpages == N);
  CHECK(cmd(d2, DM_SNAPSHOT, buf, snap, N, &c) == 0 && snap[0] == 0x22 && snap[N - 1] == 0x22);
  close(d1);
  CHECK(cmd(fd, DM_SNAPSHOT, buf, snap, N, &c) == 0 && snap[0] == 0x22); /* still on the device */
  const int d3 = 211;
  CHECK(dup2(d2, d3) == d3);
  close(d2);
  memset(out, 0, N * PAGE);
  CHECK(cmd(d3, DM_READ, buf, out, N, &c) == 0 && same(out, N, 700));
  CHECK(cmd(fd, DM_SNAPSHOT, buf, snap, N, &c) == 0 && snap[N - 1] == 0x22);
  close(d3); /* the last copy: evicts */
  CHECK(cmd(fd, DM_SNAPSHOT, buf, snap, N, &c) == 0);
  for (unsigned long i = 0; i < N; ++i) CHECK(snap[i] == 0x02);
  CHECK(same(buf, N, 700));
  munmap(buf, N * PAGE);
  munmap(out, N * PAGE);
}

static void test_fork(int fd) {
  char *buf = map_rw(N), *out = map_rw(N);
  struct dm_cmd c;
  fill(buf, N, 800);
  CHECK(cmd(fd, DM_TO_DEV, buf, out, N, &c) == 0);
  pid_t pid = fork();
  if (pid == 0) {
    if (!same(buf, N, 800)) _exit(2);
    /* The inherited fd works in the child, on the child's memory. */
    char *cb = map_rw(N), *co = map_rw(N);
    fill(cb, N, 900);
    if (cmd(fd, DM_TO_DEV, cb, co, N, &c) != 0 || !same(co, N, 900)) _exit(3);
    if (!same(cb, N, 900)) _exit(4);
    _exit(0);
  }
  /* The parent's pages, shared copy-on-write with the child and not
   * written since the fork, migrate as the kernel migrates them: while the
   * child still maps them, and after it exited. */
  memset(out, 0, N * PAGE);
  CHECK(cmd(fd, DM_TO_DEV, buf, out, N, &c) == 0 && c.cpages == N && same(out, N, 800));
  CHECK(cmd(fd, DM_TO_SYS, buf, out, N, &c) == 0 && c.cpages == N && same(buf, N, 800));
  int status = 0;
  CHECK(waitpid(pid, &status, 0) == pid);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) fprintf(stderr, "child status %d\n", status);
  CHECK(same(buf, N, 800));
  memset(out, 0, N * PAGE);
  CHECK(cmd(fd, DM_TO_DEV, buf, out, N, &c) == 0 && c.cpages == N && same(out, N, 800));
  CHECK(cmd(fd, DM_TO_SYS, buf, out, N, &c) == 0 && c.cpages == N && same(buf, N, 800));
  munmap(buf, N * PAGE);
  munmap(out, N * PAGE);
}

static void test_device_mmap(int fd) {
  unsigned char snap[2];
  struct dm_cmd c;
  char *m = mmap(NULL, 2 * PAGE, PROT_READ, MAP_PRIVATE, fd, 0);
  CHECK(m != MAP_FAILED);
  if (m == MAP_FAILED) return;
  CHECK(m[0] == 0 && m[PAGE] == 0);
  CHECK(cmd(fd, DM_SNAPSHOT, m, snap, 2, &c) == 0 && (snap[0] & 0x03) == 0x01);
  munmap(m, 2 * PAGE);
}

/* The 64-bit pagemap entry of `p`, read through `how`: 0 pread, 1 lseek+read, 2 preadv. */
#define PM_PRESENT (1ULL << 63)
#define PM_SWAP (1ULL << 62)
#define PM_FILE (1ULL << 61)
static uint64_t pagemap_entry(int pm, const void *p, int how) {
  uint64_t w = 0;
  off_t off = (off_t)((uintptr_t)p / PAGE * 8);
  ssize_t got = -1;
  if (how == 0) {
    got = pread(pm, &w, 8, off);
  } else if (how == 1) {
    if (lseek(pm, off, SEEK_SET) == off) got = read(pm, &w, 8);
  } else {
    /* Two vectors, this page's entry in the first (the kernel reads each
     * vector on its own: each must hold whole entries). */
    uint64_t next = 0;
    struct iovec iov[2] = {{&w, 8}, {&next, 8}};
    got = preadv(pm, iov, 2, off) - 8;
  }
  CHECK(got == 8);
  return w;
}

/* An fd number past 65535 if the fd limit can be raised that far, else the
 * highest one it allows. */
static int high_fd(void) {
  const rlim_t want = 70001;
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return -1;
  if (rl.rlim_cur < want) {
    struct rlimit up = {want, rl.rlim_max == RLIM_INFINITY || rl.rlim_max > want ? rl.rlim_max : want};
    if (setrlimit(RLIMIT_NOFILE, &up) != 0) {
      rl.rlim_cur = rl.rlim_max;
      (void)setrlimit(RLIMIT_NOFILE, &rl);
    }
    (void)getrlimit(RLIMIT_NOFILE, &rl);
  }
  if (rl.rlim_cur < want) fprintf(stderr, "note: fd limit %lu: fd %lu stands for one past 65535\n", (unsigned long)rl.rlim_cur, (unsigned long)rl.rlim_cur - 1);
  return (int)(rl.rlim_cur < want ? rl.rlim_cur - 1 : want - 1);
}

/* A device-private page reads as swapped in the program's own pagemap, as
 * the kernel reports it; back in system memory it is present again. */
static void test_pagemap(int fd) {
  char *buf = map_rw(4), *out = map_rw(4);
  struct dm_cmd c;
  int pm = open("/proc/self/pagemap", O_RDONLY);
  CHECK(pm >= 0);
  if (pm < 0) return;
  fill(buf, 4, 1000);
  for (int how = 0; how < 3; ++how) CHECK((pagemap_entry(pm, buf, how) & (PM_PRESENT | PM_SWAP)) == PM_PRESENT);
  CHECK(cmd(fd, DM_TO_DEV, buf, out, 4, &c) == 0);
  for (int how = 0; how < 3; ++how)
    for (unsigned long i = 0; i < 4; ++i)
      CHECK((pagemap_entry(pm, buf + i * PAGE, how) & (PM_PRESENT | PM_SWAP)) == PM_SWAP);
  /* A read spanning pages: each entry patched on its own; the output page stays present. */
  uint64_t words[5];
  CHECK(pread(pm, words, sizeof words, (off_t)((uintptr_t)buf / PAGE * 8)) == (ssize_t)sizeof words);
  for (int i = 0; i < 4; ++i) CHECK((words[i] & (PM_PRESENT | PM_SWAP)) == PM_SWAP);
  CHECK((pagemap_entry(pm, out, 0) & (PM_PRESENT | PM_SWAP)) == PM_PRESENT);
  /* A CPU access brings page 1 back: present again, its neighbours still swapped. */
  CHECK(((unsigned *)(buf + PAGE))[0] == 1000 + PAGE / sizeof(unsigned));
  CHECK((pagemap_entry(pm, buf + PAGE, 0) & (PM_PRESENT | PM_SWAP)) == PM_PRESENT);
  CHECK((pagemap_entry(pm, buf + 2 * PAGE, 0) & (PM_PRESENT | PM_SWAP)) == PM_SWAP);
  CHECK(cmd(fd, DM_TO_SYS, buf, out, 4, &c) == 0);
  for (unsigned long i = 0; i < 4; ++i)
    CHECK((pagemap_entry(pm, buf + i * PAGE, 1) & (PM_PRESENT | PM_SWAP)) == PM_PRESENT);
  /* Held exclusively by the device: a swap-like entry too, until the CPU touches it. */
  CHECK(cmd(fd, DM_EXCLUSIVE, buf, out, 1, &c) == 0);
  CHECK((pagemap_entry(pm, buf, 0) & (PM_PRESENT | PM_SWAP)) == PM_SWAP);
  buf[0] ^= 1;
  CHECK((pagemap_entry(pm, buf, 0) & (PM_PRESENT | PM_SWAP)) == PM_PRESENT);
  /* Another path to the same file, and a closed fd number reused by another file, are handled. */
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/pagemap", (int)getpid());
  int pm2 = open(path, O_RDONLY);
  CHECK(pm2 >= 0);
  CHECK(cmd(fd, DM_TO_DEV, buf, out, 4, &c) == 0);
  CHECK((pagemap_entry(pm2, buf + 3 * PAGE, 0) & (PM_PRESENT | PM_SWAP)) == PM_SWAP);
  close(pm2);
  /* Copies of the pagemap fd read patched entries too, whatever their
   * number: dup, fcntl, and dup2 to a number past 65535 (or the highest
   * the fd limit allows, when it cannot be raised that far). */
  int copies[3] = {dup(pm), fcntl(pm, F_DUPFD_CLOEXEC, 100), dup2(pm, high_fd())};
  for (int k = 0; k < 3; ++k) {
    CHECK(copies[k] >= 0);
    if (copies[k] < 0) continue;
    for (unsigned long i = 0; i < 4; ++i)
      CHECK((pagemap_entry(copies[k], buf + i * PAGE, k) & (PM_PRESENT | PM_SWAP)) == PM_SWAP);
    close(copies[k]);
  }
  close(pm);
  CHECK(cmd(fd, DM_TO_SYS, buf, out, 4, &c) == 0);
  CHECK(same(buf, 4, 1000) == 0 && ((unsigned *)buf)[1] == 1001); /* page 0 byte 0 flipped above */
  munmap(buf, 4 * PAGE);
  munmap(out, 4 * PAGE);
}

/* mprotect of memory the device uses: the device sees the new protection
 * at once (its mirror drops the range), the data stays. */
static void test_mprotect(int fd) {
  char *buf = map_rw(N), *out = map_rw(N);
  struct dm_cmd c;
  fill(buf, N, 1100);
  /* Held exclusively, then made read-only (the kernel selftest's sequence). */
  CHECK(cmd(fd, DM_EXCLUSIVE, buf, out, N, &c) == 0);
  CHECK(mprotect(buf, N * PAGE, PROT_READ) == 0);
  CHECK(cmd(fd, DM_CHECK_EXCLUSIVE, buf, NULL, N, &c) == 0); /* the protection change revoked it */
  fill(out, N, 1101);
  errno = 0;
  CHECK(cmd(fd, DM_WRITE, buf, out, N, &c) == -1 && errno == EPERM);
  CHECK(same(buf, N, 1100));
  errno = 0;
  CHECK(cmd(fd, DM_EXCLUSIVE, buf, out, N, &c) == -1); /* not writable */
  CHECK(cmd(fd, DM_READ, buf, out, N, &c) == 0 && same(out, N, 1100));
  /* Back to read-write: the device writes again. */
  CHECK(mprotect(buf, N * PAGE, PROT_READ | PROT_WRITE) == 0);
  fill(out, N, 1102);
  CHECK(cmd(fd, DM_WRITE, buf, out, N, &c) == 0);
  CHECK(same(buf, N, 1102));
  /* On the device, then read-only: the device's pages lose their write access. */
  CHECK(cmd(fd, DM_TO_DEV, buf, out, N, &c) == 0);
  CHECK(mprotect(buf + 4 * PAGE, 4 * PAGE, PROT_READ) == 0); /* part of the range */
  errno = 0;
  CHECK(cmd(fd, DM_WRITE, buf, out, N, &c) == -1 && errno == EPERM);
  CHECK(cmd(fd, DM_WRITE, buf, out, 4, &c) == 0); /* the writable part still works */
  CHECK(same(buf, N, 1102));
  /* PROT_NONE: the device cannot read it either, and migration refuses. */
  CHECK(mprotect(buf, N * PAGE, PROT_NONE) == 0);
  errno = 0;
  CHECK(cmd(fd, DM_READ, buf, out, N, &c) == -1 && errno == EFAULT);
  errno = 0;
  CHECK(cmd(fd, DM_TO_DEV, buf, out, N, &c) == -1 && errno == EINVAL);
  /* A protection uhmm does not manage (execute): applied, data intact, and
   * back to read-write the range migrates again. */
  CHECK(mprotect(buf, N * PAGE, PROT_READ | PROT_EXEC) == 0);
  CHECK(same(buf, N, 1102));
  errno = 0;
  CHECK(cmd(fd, DM_TO_DEV, buf, out, N, &c) == -1 && errno == ENOENT);
  CHECK(mprotect(buf, N * PAGE, PROT_READ | PROT_WRITE) == 0);
  CHECK(cmd(fd, DM_TO_DEV, buf, out, N, &c) == 0 && same(out, N, 1102));
  CHECK(cmd(fd, DM_TO_SYS, buf, out, N, &c) == 0);
  CHECK(same(buf, N, 1102));
  /* Bad input: libc's errors. */
  errno = 0;
  CHECK(mprotect(buf + 1, PAGE, PROT_READ) == -1 && errno == EINVAL);
  munmap(buf, N * PAGE);
  munmap(out, N * PAGE);
}

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
#ifndef MREMAP_DONTUNMAP
#define MREMAP_DONTUNMAP 4
#endif

static int zeros(const char *p, unsigned long pages) {
  for (unsigned long i = 0; i < pages * PAGE; ++i)
    if (p[i] != 0) return 0;
  return 1;
}

/* mremap of a range that is on the device: the data is at the new address,
 * where the device can use it again. */
static void test_mremap(int fd) {
  char *buf = map_rw(N), *out = map_rw(N);
  struct dm_cmd c;
  fill(buf, N, 1200);
  CHECK(cmd(fd, DM_TO_DEV, buf, out, N, &c) == 0);
  char *target = map_rw(N); /* a place to move to (MREMAP_FIXED replaces it) */
  char *moved = mremap(buf, N * PAGE, N * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, target);
  CHECK(moved == target);
  if (moved != target) return;
  CHECK(same(moved, N, 1200));
  CHECK(cmd(fd, DM_TO_DEV, moved, out, N, &c) == 0 && same(out, N, 1200));
  /* MREMAP_DONTUNMAP: the data moves, the old range stays mapped and empty. */
  char *again = mremap(moved, N * PAGE, N * PAGE, MREMAP_MAYMOVE | MREMAP_DONTUNMAP, NULL);
  if (again == MAP_FAILED && errno == EINVAL) {
    fprintf(stderr, "note: MREMAP_DONTUNMAP not supported here\n");
  } else {
    CHECK(again != MAP_FAILED);
    if (again == MAP_FAILED) return;
    CHECK(same(again, N, 1200));
    CHECK(zeros(moved, N));
    CHECK(cmd(fd, DM_READ, moved, out, N, &c) == 0 && zeros(out, N));
    CHECK(cmd(fd, DM_TO_DEV, again, out, N, &c) == 0 && same(out, N, 1200));
    CHECK(cmd(fd, DM_TO_SYS, again, out, N, &c) == 0 && same(again, N, 1200));
    munmap(again, N * PAGE);
  }
  munmap(moved, N * PAGE);
  munmap(out, N * PAGE);
}

/* MADV_DONTNEED of migrated pages: zeros.  MADV_FREE: each page keeps its
 * data or reads as zeros (the kernel frees lazily), never anything else. */
static void test_madvise(int fd) {
  char *buf = map_rw(N), *out = map_rw(N);
  struct dm_cmd c;
  fill(buf, N, 1300);
  CHECK(cmd(fd, DM_TO_DEV, buf, out, N, &c) == 0);
  CHECK(madvise(buf, N / 2 * PAGE, MADV_DONTNEED) == 0);
  CHECK(zeros(buf, N / 2));
  CHECK(same(buf + N / 2 * PAGE, N / 2, 1300 + N / 2 * PAGE / sizeof(unsigned)));
  CHECK(cmd(fd, DM_READ, buf, out, N / 2, &c) == 0 && zeros(out, N / 2));
  fill(buf, N, 1301);
  CHECK(cmd(fd, DM_TO_DEV, buf, out, N, &c) == 0);
  CHECK(madvise(buf, N * PAGE, MADV_FREE) == 0);
  for (unsigned long i = 0; i < N; ++i) {
    const char *pg = buf + i * PAGE;
    CHECK(zeros(pg, 1) || same(pg, 1, 1301 + (unsigned)(i * PAGE / sizeof(unsigned))));
  }
  CHECK(cmd(fd, DM_READ, buf, out, N, &c) == 0 && memcmp(out, buf, N * PAGE) == 0);
  munmap(buf, N * PAGE);
  munmap(out, N * PAGE);
}

/* A transparent huge page keeps every byte through migration both ways. */
static void test_thp(int fd) {
  const unsigned long huge = 2UL << 20, pages = huge / PAGE;
  char *raw = map_rw(2 * pages);
  char *buf = (char *)(((uintptr_t)raw + huge - 1) & ~(huge - 1));
  char *out = map_rw(pages);
  struct dm_cmd c;
  CHECK(madvise(buf, huge, MADV_HUGEPAGE) == 0);
  fill(buf, pages, 1400);
  if (madvise(buf, huge, MADV_COLLAPSE) != 0)
    fprintf(stderr, "note: MADV_COLLAPSE: %s (skipped)\n", strerror(errno));
  CHECK(same(buf, pages, 1400));
  CHECK(cmd(fd, DM_TO_DEV, buf, out, pages, &c) == 0 && c.cpages == pages);
  CHECK(same(out, pages, 1400));
  CHECK(cmd(fd, DM_TO_SYS, buf, out, pages, &c) == 0);
  CHECK(same(buf, pages, 1400));
  /* Again, back by CPU faults this time. */
  CHECK(cmd(fd, DM_TO_DEV, buf, out, pages, &c) == 0);
  CHECK(same(buf, pages, 1400));
  munmap(raw, 2 * pages * PAGE);
  munmap(out, pages * PAGE);
}

static long meminfo(const char *key) {
  FILE *f = fopen("/proc/meminfo", "r");
  char line[128];
  long value = -1;
  const size_t len = strlen(key);
  while (f && fgets(line, sizeof line, f))
    if (strncmp(line, key, len) == 0 && line[len] == ':') value = strtol(line + len + 1, NULL, 10);
  if (f) fclose(f);
  return value;
}

static int set_nr_hugepages(long n) {
  FILE *f = fopen("/proc/sys/vm/nr_hugepages", "w");
  if (!f) return -1;
  const int ok = fprintf(f, "%ld\n", n) > 0;
  return fclose(f) == 0 && ok ? 0 : -1;
}

/* hugetlb: the device reads and writes it in place; it cannot migrate
 * (migrate_vma refuses a hugetlb mapping: EINVAL); fork keeps it.  As root
 * the test reserves the huge page it needs, and gives it back after. */
static void test_hugetlb(int fd) {
  const unsigned long huge = 2UL << 20, pages = huge / PAGE;
  const long total = meminfo("HugePages_Total");
  int raised = 0;
  if (meminfo("Hugepagesize") == 2048 && meminfo("HugePages_Free") < 1 && total >= 0 && geteuid() == 0)
    raised = set_nr_hugepages(total + 1) == 0;
  char *buf = meminfo("HugePages_Free") >= 1
                  ? mmap(NULL, huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0)
                  : MAP_FAILED;
  if (buf == MAP_FAILED) {
    fprintf(stderr, "note: no hugetlb page could be reserved (skipped)\n");
    if (raised) set_nr_hugepages(total);
    return;
  }
  char *out = map_rw(pages);
  unsigned char snap[8];
  struct dm_cmd c;
  fill(buf, pages, 1500);
  CHECK(cmd(fd, DM_READ, buf, out, pages, &c) == 0 && same(out, pages, 1500));
  CHECK(cmd(fd, DM_SNAPSHOT, buf, snap, 8, &c) == 0);
  for (int i = 0; i < 8; ++i) CHECK(snap[i] == 0x06); /* writable, mapped by a 2 MiB entry */
  fill(out, 1, 1510); /* the device writes one page in place */
  CHECK(cmd(fd, DM_WRITE, buf + 3 * PAGE, out, 1, &c) == 0);
  CHECK(same(buf + 3 * PAGE, 1, 1510));
  fill(buf + 3 * PAGE, 1, 1500 + 3 * PAGE / sizeof(unsigned));
  errno = 0;
  CHECK(cmd(fd, DM_TO_DEV, buf, out, pages, &c) == -1 && errno == EINVAL);
  CHECK(same(buf, pages, 1500));
  const pid_t pid = fork();
  if (pid == 0) _exit(same(buf, pages, 1500) ? 0 : 1);
  int status = 0;
  CHECK(pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0);
  CHECK(same(buf, pages, 1500));
  munmap(buf, huge);
  munmap(out, pages * PAGE);
  if (raised) CHECK(set_nr_hugepages(total) == 0);
}

/* A private file mapping: pages the program wrote (copied on write, so
 * anonymous) migrate; clean file pages do not (ENOENT), as on the kernel.
 * The file never changes: a private mapping is never written back. */
static void test_private_file(int fd) {
  char path[] = "/tmp/uhmm-dmirror-XXXXXX";
  int file = mkstemp(path);
  CHECK(file >= 0);
  if (file < 0) return;
  unlink(path);
  char *pattern = map_rw(N), *out = map_rw(N), *disk = map_rw(N);
  unsigned char snap[N];
  struct dm_cmd c;
  const unsigned long half = N / 2, written = N / 2; /* page `written`: clean until the device writes it */
  fill(pattern, N, 1600);
  CHECK(write(file, pattern, N * PAGE) == (ssize_t)(N * PAGE));
  char *buf = mmap(NULL, N * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, file, 0);
  CHECK(buf != MAP_FAILED);
  if (buf == MAP_FAILED) return;
  /* The first half copied on write (same bytes, but written), the second
   * half read, so mapped as clean file pages. */
  for (unsigned long i = 0; i < N; ++i) {
    volatile char *p = buf + i * PAGE;
    if (i < half) *p = *p;
    else (void)*p;
  }
  CHECK(cmd(fd, DM_SNAPSHOT, buf, snap, N, &c) == 0);
  for (unsigned long i = 0; i < N; ++i) CHECK(snap[i] == (i < half ? 0x02 : 0x01)); /* clean: mapped read-only */
  errno = 0;
  CHECK(cmd(fd, DM_TO_DEV, buf + half * PAGE, out, N - half, &c) == -1 && errno == ENOENT); /* clean only */
  /* A mix: the copied pages move, the clean ones stay, and the command
   * fails with ENOENT since not every page is on the device afterwards. */
  errno = 0;
  CHECK(cmd(fd, DM_TO_DEV, buf, out, N, &c) == -1 && errno == ENOENT && c.cpages == 0xdead);
  CHECK(cmd(fd, DM_SNAPSHOT, buf, snap, N, &c) == 0);
  for (unsigned long i = 0; i < N; ++i) CHECK(snap[i] == (i < half ? 0x22 : 0x01));
  /* The program's pagemap agrees: clean pages are the file's (present, bit
   * 61), the written ones are on the device (swapped, no bit 61). */
  int pm = open("/proc/self/pagemap", O_RDONLY);
  CHECK(pm >= 0);
  for (unsigned long i = 0; pm >= 0 && i < N; ++i)
    CHECK((pagemap_entry(pm, buf + i * PAGE, (int)(i % 3)) & (PM_PRESENT | PM_SWAP | PM_FILE)) ==
          (i < half ? PM_SWAP : PM_PRESENT | PM_FILE));
  /* The copied pages alone: every page is on the device, with its data. */
  memset(out, 0, N * PAGE);
  CHECK(cmd(fd, DM_TO_DEV, buf, out, half, &c) == 0 && c.cpages == half);
  CHECK(same(out, half, 1600));
  /* Back, and over again from system memory. */
  CHECK(cmd(fd, DM_TO_SYS, buf, out, N, &c) == 0 && c.cpages == half);
  CHECK(cmd(fd, DM_SNAPSHOT, buf, snap, N, &c) == 0);
  for (unsigned long i = 0; i < N; ++i) CHECK(snap[i] == (i < half ? 0x02 : 0x01));
  memset(out, 0, N * PAGE);
  CHECK(cmd(fd, DM_TO_DEV, buf, out, half, &c) == 0 && c.cpages == half);
  CHECK(same(out, half, 1600));
  /* The device reads all of it, its own pages and the clean ones. */
  memset(out, 0, N * PAGE);
  CHECK(cmd(fd, DM_READ, buf, out, N, &c) == 0 && c.cpages == N && same(out, N, 1600));
  /* A CPU access brings a migrated page back, with its data. */
  CHECK(((unsigned *)(buf + PAGE))[5] == 1600 + PAGE / sizeof(unsigned) + 5);
  CHECK(cmd(fd, DM_SNAPSHOT, buf, snap, N, &c) == 0);
  CHECK(snap[0] == 0x22 && snap[1] == 0x02 && snap[2] == 0x22 && snap[half] == 0x01);
  /* A device write copies a clean page, as the kernel's write fault does:
   * that page migrates from then on, its clean neighbour still does not.
   * The neighbour is tried on another device: this fd's mirror holds it
   * since the READ, and the kernel's MIGRATE_TO_DEV then finds it there
   * and succeeds without moving it. */
  fill(out, 1, 1650);
  CHECK(cmd(fd, DM_WRITE, buf + written * PAGE, out, 1, &c) == 0 && c.cpages == 1);
  CHECK(cmd(fd, DM_TO_DEV, buf + written * PAGE, out, 1, &c) == 0 && c.cpages == 1 && same(out, 1, 1650));
  int other = open("/dev/hmm_dmirror1", O_RDWR);
  CHECK(other >= 0);
  errno = 0;
  CHECK(cmd(other, DM_TO_DEV, buf + (written + 1) * PAGE, out, 1, &c) == -1 && errno == ENOENT);
  close(other);
  CHECK(cmd(fd, DM_SNAPSHOT, buf, snap, N, &c) == 0 && snap[written] == 0x22 && snap[written + 1] == 0x01);
  /* The page the device wrote is anonymous now in pagemap too. */
  if (pm >= 0) {
    CHECK((pagemap_entry(pm, buf + written * PAGE, 0) & (PM_SWAP | PM_FILE)) == PM_SWAP);
    CHECK((pagemap_entry(pm, buf + (written + 1) * PAGE, 0) & (PM_PRESENT | PM_FILE)) == (PM_PRESENT | PM_FILE));
    close(pm);
  }
  /* Back to system memory: the pages still on the device move (not page
   * 1, which the CPU took back), data intact. */
  CHECK(cmd(fd, DM_TO_SYS, buf, out, N, &c) == 0 && c.cpages == half);
  CHECK(same(buf, half, 1600) && same(buf + written * PAGE, 1, 1650));
  CHECK(same(buf + (written + 1) * PAGE, N - written - 1, 1600 + (written + 1) * PAGE / sizeof(unsigned)));
  /* The file is what was written to it, never what the mapping holds. */
  CHECK(pread(file, disk, N * PAGE, 0) == (ssize_t)(N * PAGE) && same(disk, N, 1600));
  /* A CPU write copies a clean page too, as the kernel's write fault does:
   * it migrates from then on, with the CPU's data (tried on another device,
   * whose mirror has never held the page). */
  {
    const unsigned long cpu = N - 1;
    ((volatile unsigned *)(buf + cpu * PAGE))[0] = 0x5eed;
    int dev1 = open("/dev/hmm_dmirror1", O_RDWR);
    CHECK(dev1 >= 0);
    memset(out, 0, PAGE);
    CHECK(cmd(dev1, DM_TO_DEV, buf + cpu * PAGE, out, 1, &c) == 0 && c.cpages == 1);
    CHECK(((unsigned *)out)[0] == 0x5eed && ((unsigned *)out)[1] == 1600 + cpu * PAGE / sizeof(unsigned) + 1);
    CHECK(cmd(dev1, DM_SNAPSHOT, buf + cpu * PAGE, snap, 1, &c) == 0 && snap[0] == 0x22);
    close(dev1); /* evicts: the page comes back */
    CHECK(((volatile unsigned *)(buf + cpu * PAGE))[0] == 0x5eed);
    /* Its clean neighbour still refuses. */
    dev1 = open("/dev/hmm_dmirror1", O_RDWR);
    errno = 0;
    CHECK(cmd(dev1, DM_TO_DEV, buf + (cpu - 1) * PAGE, out, 1, &c) == -1 && errno == ENOENT);
    close(dev1);
  }
  /* fork with pages on the device: the child sees every byte; there a page
   * it writes migrates, a clean one still refuses. */
  CHECK(cmd(fd, DM_TO_DEV, buf, out, half, &c) == 0);
  pid_t pid = fork();
  if (pid == 0) {
    char *co = map_rw(1);
    if (!same(buf, half, 1600) || !same(buf + written * PAGE, 1, 1650)) _exit(2);
    ((volatile char *)buf)[0] = buf[0];
    if (cmd(fd, DM_TO_DEV, buf, co, 1, &c) != 0 || !same(co, 1, 1600)) _exit(3);
    if (cmd(fd, DM_TO_DEV, buf + (written + 1) * PAGE, co, 1, &c) != -1 || errno != ENOENT) _exit(4);
    _exit(0);
  }
  int status = 0;
  CHECK(waitpid(pid, &status, 0) == pid);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) fprintf(stderr, "child status %d\n", status);
  CHECK(same(buf, half, 1600) && same(buf + written * PAGE, 1, 1650));
  /* munmap forgets the clean pages: fresh anonymous memory at the same
   * place migrates whole. */
  munmap(buf, N * PAGE);
  char *again = mmap(buf, N * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
  if (again == buf) {
    fill(again, N, 1660);
    CHECK(cmd(fd, DM_TO_DEV, again, out, N, &c) == 0 && c.cpages == N && same(out, N, 1660));
    CHECK(cmd(fd, DM_TO_SYS, again, out, N, &c) == 0 && same(again, N, 1660));
  } else {
    fprintf(stderr, "note: the unmapped range was taken meanwhile (munmap check skipped)\n");
  }
  if (again != MAP_FAILED) munmap(again, N * PAGE);
  close(file);
  munmap(pattern, N * PAGE);
  munmap(out, N * PAGE);
  munmap(disk, N * PAGE);
}

/* A device READ racing another thread's munmap of the range: an error or
 * the right data, never a crash or a hang (alarm() fails the test). */
struct unmapper {
  char *buf;
  unsigned long pages;
};
static void *unmap_it(void *arg) {
  struct unmapper *u = arg;
  munmap(u->buf, u->pages * PAGE);
  return NULL;
}
static void test_read_vs_munmap(int fd) {
  char *out = map_rw(N);
  unsigned ok = 0, failed = 0;
  alarm(60);
  for (int round = 0; round < 300; ++round) {
    char *buf = map_rw(N);
    struct dm_cmd c;
    fill(buf, N, 1700);
    if (round % 2) CHECK(cmd(fd, DM_TO_DEV, buf, out, N, &c) == 0);
    struct unmapper u = {buf, N};
    pthread_t t;
    CHECK(pthread_create(&t, NULL, unmap_it, &u) == 0);
    memset(out, 0, N * PAGE);
    if (cmd(fd, round % 3 ? DM_READ : DM_TO_DEV, buf, out, N, &c) == 0) {
      /* Success means the data: the library once read its own bounce
       * buffer, mapped into the hole the munmap had just left, as the range. */
      if (!same(out, N, 1700)) {
        unsigned long w = 0;
        while (((const unsigned *)out)[w] == 1700 + (unsigned)w) ++w;
        fprintf(stderr, "round %d (%s after %s): word %lu is %#x, not %#x\n", round, round % 3 ? "READ" : "MIGRATE_TO_DEV",
                round % 2 ? "MIGRATE_TO_DEV" : "fill", w, ((const unsigned *)out)[w], 1700 + (unsigned)w);
      }
      CHECK(same(out, N, 1700));
      ++ok;
    } else {
      CHECK(errno == EFAULT || errno == EINVAL || errno == ENOENT || errno == EBUSY);
      ++failed;
    }
    pthread_join(t, NULL);
  }
  alarm(0);
  fprintf(stderr, "read vs munmap: %u read, %u failed\n", ok, failed);
  munmap(out, N * PAGE);
}

/* Device-coherent memory (minors 2 and 3): migrated pages stay mapped for
 * the CPU, which uses them in place, without migrating them back. */
static void test_coherent(void) {
  int c2 = open("/dev/hmm_dmirror2", O_RDWR), c3 = open("/dev/hmm_dmirror3", O_RDWR);
  CHECK(c2 >= 0 && c3 >= 0);
  if (c2 < 0 || c3 < 0) return;
  char *buf = map_rw(N), *out = map_rw(N);
  unsigned char snap[N];
  struct dm_cmd c;
  fill(buf, N, 700);
  CHECK(cmd(c2, DM_TO_DEV, buf, out, N, &c) == 0 && c.cpages == N);
  CHECK(same(out, N, 700));
  CHECK(cmd(c2, DM_SNAPSHOT, buf, snap, N, &c) == 0);
  for (unsigned long i = 0; i < N; ++i) CHECK(snap[i] == 0x42); /* own coherent page, writable */
  /* Another device sees them as a remote coherent page. */
  CHECK(cmd(c3, DM_SNAPSHOT, buf, snap, N, &c) == 0);
  for (unsigned long i = 0; i < N; ++i) CHECK(snap[i] == 0x52);
  /* The CPU reads and writes them in place: no migration back. */
  CHECK(same(buf, N, 700));
  ((unsigned *)(buf + 3 * PAGE))[0] = 0xC0FFEE;
  CHECK(cmd(c2, DM_SNAPSHOT, buf, snap, N, &c) == 0);
  for (unsigned long i = 0; i < N; ++i) CHECK(snap[i] == 0x42);
  /* The device sees the CPU's write, from its mirror (no fault round). */
  memset(out, 0, N * PAGE);
  CHECK(cmd(c2, DM_READ, buf, out, N, &c) == 0 && c.faults == 0);
  CHECK(((unsigned *)(out + 3 * PAGE))[0] == 0xC0FFEE);
  ((unsigned *)(buf + 3 * PAGE))[0] = 700 + 3 * PAGE / sizeof(unsigned);
  /* A device write is seen by the CPU, and the page stays on the device. */
  fill(out, 1, 800);
  CHECK(cmd(c2, DM_WRITE, buf + 5 * PAGE, out, 1, &c) == 0);
  CHECK(same(buf + 5 * PAGE, 1, 800));
  fill(buf + 5 * PAGE, 1, 700 + 5 * PAGE / sizeof(unsigned));
  CHECK(cmd(c2, DM_SNAPSHOT, buf, snap, N, &c) == 0 && snap[5] == 0x42);
  /* Migrating to the other coherent device takes no page of the first: ENOENT, as the kernel. */
  errno = 0;
  CHECK(cmd(c3, DM_TO_DEV, buf, out, N, &c) == -1 && errno == ENOENT);
  /* Back to system memory (SELECT_DEVICE_COHERENT): every page moves, data intact. */
  CHECK(cmd(c3, DM_TO_SYS, buf, out, N, &c) == 0 && c.cpages == 0); /* not its pages */
  CHECK(cmd(c2, DM_TO_SYS, buf, out, N, &c) == 0 && c.cpages == N);
  CHECK(cmd(c2, DM_SNAPSHOT, buf, snap, N, &c) == 0);
  for (unsigned long i = 0; i < N; ++i) CHECK(snap[i] == 0x02);
  CHECK(same(buf, N, 700));
  /* fork copies coherent pages: the child reads them and its writes stay
   * its own; the parent's stay on the device. */
  CHECK(cmd(c2, DM_TO_DEV, buf, out, N, &c) == 0 && c.cpages == N);
  pid_t pid = fork();
  if (pid == 0) {
    if (!same(buf, N, 700)) _exit(1);
    fill(buf, N, 950);
    _exit(same(buf, N, 950) ? 0 : 2);
  }
  int status = 0;
  CHECK(pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0);
  CHECK(same(buf, N, 700));
  CHECK(cmd(c2, DM_SNAPSHOT, buf, snap, N, &c) == 0 && snap[0] == 0x42 && snap[N - 1] == 0x42);
  CHECK(cmd(c2, DM_TO_SYS, buf, out, N, &c) == 0 && c.cpages == N);
  /* EXCLUSIVE through a coherent device, as through a private one; fork
   * revokes it and both sides keep the data. */
  char *ex = map_rw(4);
  fill(ex, 4, 960);
  CHECK(cmd(c2, DM_EXCLUSIVE, ex, out, 4, &c) == 0 && c.cpages == 4 && same(out, 4, 960));
  errno = 0;
  CHECK(cmd(c2, DM_CHECK_EXCLUSIVE, ex, NULL, 4, &c) == -1 && errno == EPERM);
  pid = fork();
  if (pid == 0) _exit(same(ex, 4, 960) ? 0 : 1);
  CHECK(pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0);
  CHECK(cmd(c2, DM_CHECK_EXCLUSIVE, ex, NULL, 4, &c) == 0);
  CHECK(same(ex, 4, 960));
  CHECK(cmd(c2, DM_EXCLUSIVE, ex, out, 4, &c) == 0 && c.cpages == 4);
  for (unsigned long i = 0; i < 4; ++i) ((unsigned *)(ex + i * PAGE))[0] += 1; /* CPU access revokes */
  CHECK(cmd(c2, DM_CHECK_EXCLUSIVE, ex, NULL, 4, &c) == 0);
  CHECK(((unsigned *)(ex + 2 * PAGE))[0] == 960 + 2 * PAGE / sizeof(unsigned) + 1);
  munmap(ex, 4 * PAGE);
  /* RELEASE evicts the device, and so does closing it. */
  CHECK(cmd(c2, DM_TO_DEV, buf, out, N, &c) == 0 && c.cpages == N);
  CHECK(cmd(c2, DM_RELEASE, buf, out, N, &c) == 0);
  CHECK(cmd(c2, DM_SNAPSHOT, buf, snap, N, &c) == 0 && snap[0] == 0x02 && snap[N - 1] == 0x02);
  CHECK(same(buf, N, 700));
  CHECK(cmd(c2, DM_TO_DEV, buf, out, N, &c) == 0 && c.cpages == N);
  close(c2);
  CHECK(cmd(c3, DM_SNAPSHOT, buf, snap, N, &c) == 0 && snap[0] == 0x02 && snap[N - 1] == 0x02);
  CHECK(same(buf, N, 700));
  close(c3);
  munmap(buf, N * PAGE);
  munmap(out, N * PAGE);
}

int main(void) {
  int fd = open("/dev/hmm_dmirror0", O_RDWR);
  if (fd < 0 && errno != ENOENT && errno != ENOMEM) {
    fprintf(stderr, "SKIP: cannot open /dev/hmm_dmirror0: %s\n", strerror(errno));
    return 77;
  }
  if (fd < 0) {
    fprintf(stderr, "open /dev/hmm_dmirror0: %s (is libuhmm-dmirror.so preloaded?)\n", strerror(errno));
    return 1;
  }
  test_open_entries();
  test_errors(fd);
  test_read_write(fd);
  test_migrate(fd);
  test_snapshot_kinds(fd);
  test_shared_refuses(fd);
  test_fail_alloc(fd);
  test_device_memory_growth(fd);
  test_exclusive(fd);
  test_release_and_close(fd);
  test_fork(fd);
  test_device_mmap(fd);
  test_pagemap(fd);
  test_mprotect(fd);
  test_mremap(fd);
  test_madvise(fd);
  test_thp(fd);
  test_hugetlb(fd);
  test_private_file(fd);
  test_read_vs_munmap(fd);
  test_coherent();
  close(fd);
  if (failures) fprintf(stderr, "%d check(s) failed\n", failures);
  else printf("dmirror_abi_test: all checks passed\n");
  return failures ? 1 : 0;
}
