/* A plain test_hmm client, written as an unmodified hmm-tests program would be: it uses only
 * open("/dev/hmm_dmirror0"), ioctl, mmap/munmap and close, and includes <hmmkit/dmirror.h> only for
 * struct hmm_dmirror_cmd and the request numbers. It does not link hmmkit; it runs under
 *   LD_PRELOAD=libhmmkit_dmirror_shim.so dmirror_client
 * where the shim routes the device's descriptor to hmmkit. Steps: READ of written anonymous memory
 * (one fault round, data equal), MIGRATE_TO_DEV (every page moved, data equal), WRITE of new data
 * (the CPU sees it). One line per step; exit 0 when every step passed, 1 otherwise. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <hmmkit/dmirror.h>

enum { kPages = 64 };

/* Runs one command; 0 or errno. EINTR is retried. */
static int dmirror(int fd, unsigned long request, void* addr, void* bounce, unsigned long npages,
                   struct hmm_dmirror_cmd* cmd) {
  memset(cmd, 0, sizeof(*cmd));
  cmd->addr = (uintptr_t)addr;
  cmd->ptr = (uintptr_t)bounce;
  cmd->npages = npages;
  for (;;) {
    if (ioctl(fd, request, cmd) == 0) return 0;
    if (errno != EINTR) return errno;
  }
}

/* Index of the first int of p[0..n) that is not first + i * step, or -1. */
static long first_mismatch(const int* p, size_t n, int first, int step) {
  for (size_t i = 0; i < n; ++i)
    if (p[i] != first + (int)i * step) return (long)i;
  return -1;
}

static int step_failed(const char* step, const char* why) {
  printf("%-16s FAILED: %s\n", step, why);
  return 1;
}

static int run(int fd, int* buf, int* bounce, size_t page_size) {
  const size_t nints = kPages * page_size / sizeof(int);
  struct hmm_dmirror_cmd cmd;
  char why[160];
  long bad;
  int rc;

  /* READ: the device reads written anonymous memory in one fault round. */
  for (size_t i = 0; i < nints; ++i) buf[i] = (int)i;
  rc = dmirror(fd, HMM_DMIRROR_READ, buf, bounce, kPages, &cmd);
  if (rc != 0) return step_failed("READ", strerror(rc));
  if (cmd.cpages != kPages || cmd.faults != 1) {
    snprintf(why, sizeof(why), "cpages %llu faults %llu, expected %d and 1",
             (unsigned long long)cmd.cpages, (unsigned long long)cmd.faults, kPages);
    return step_failed("READ", why);
  }
  if ((bad = first_mismatch(bounce, nints, 0, 1)) >= 0) {
    snprintf(why, sizeof(why), "int %ld read as %d", bad, bounce[bad]);
    return step_failed("READ", why);
  }
  printf("%-16s ok (cpages %llu, faults %llu)\n", "READ", (unsigned long long)cmd.cpages,
         (unsigned long long)cmd.faults);

  /* MIGRATE_TO_DEV: every page moves and the device reads the data back. */
  memset(bounce, 0xFF, nints * sizeof(int));
  rc = dmirror(fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf, bounce, kPages, &cmd);
  if (rc != 0) return step_failed("MIGRATE_TO_DEV", strerror(rc));
  if (cmd.cpages != kPages) {
    snprintf(why, sizeof(why), "cpages %llu, expected %d", (unsigned long long)cmd.cpages, kPages);
    return step_failed("MIGRATE_TO_DEV", why);
  }
  if ((bad = first_mismatch(bounce, nints, 0, 1)) >= 0) {
    snprintf(why, sizeof(why), "int %ld migrated as %d", bad, bounce[bad]);
    return step_failed("MIGRATE_TO_DEV", why);
  }
  printf("%-16s ok (cpages %llu)\n", "MIGRATE_TO_DEV", (unsigned long long)cmd.cpages);

  /* WRITE: the device writes new data; the CPU sees it (device pages fault back). */
  for (size_t i = 0; i < nints; ++i) bounce[i] = -(int)i;
  rc = dmirror(fd, HMM_DMIRROR_WRITE, buf, bounce, kPages, &cmd);
  if (rc != 0) return step_failed("WRITE", strerror(rc));
  if (cmd.cpages != kPages) {
    snprintf(why, sizeof(why), "cpages %llu, expected %d", (unsigned long long)cmd.cpages, kPages);
    return step_failed("WRITE", why);
  }
  if ((bad = first_mismatch(buf, nints, 0, -1)) >= 0) {
    snprintf(why, sizeof(why), "the CPU reads int %ld as %d", bad, buf[bad]);
    return step_failed("WRITE", why);
  }
  printf("%-16s ok (cpages %llu, faults %llu)\n", "WRITE", (unsigned long long)cmd.cpages,
         (unsigned long long)cmd.faults);
  return 0;
}

int main(void) {
  const size_t page_size = (size_t)sysconf(_SC_PAGESIZE);
  const size_t len = kPages * page_size;
  int fd = open("/dev/hmm_dmirror0", O_RDWR);
  if (fd < 0) {
    fprintf(stderr, "no /dev/hmm_dmirror0: run under the hmmkit shim (open: %s)\n",
            strerror(errno));
    return 1;
  }
  printf("%-16s ok (fd %d)\n", "open", fd);

  int* buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  int* bounce = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  int failed = 1;
  if (buf == MAP_FAILED || bounce == MAP_FAILED)
    step_failed("mmap", strerror(errno));
  else
    failed = run(fd, buf, bounce, page_size);

  if (buf != MAP_FAILED) munmap(buf, len);
  if (bounce != MAP_FAILED) munmap(bounce, len);
  if (close(fd) != 0) failed = step_failed("close", strerror(errno));
  printf("%s\n", failed ? "FAIL" : "PASS");
  return failed ? 1 : 0;
}
