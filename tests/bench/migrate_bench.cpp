// Migration costs against baselines measured in the same run (machines here are shared and noisy:
// read the ratios, not the absolute times).
//
//   fault-back   CPU touch of a device-private page (dmirror device 0) until the thread resumes,
//                against a bare userfaultfd MISSING -> UFFDIO_COPY round trip (own uffd, own
//                handler thread): p50 and p99.
//   throughput   MIGRATE_TO_DEV then MIGRATE_TO_SYS of a buffer, in 4 KiB pages (MADV_NOHUGEPAGE)
//                and in 2 MiB chunks (aligned THP buffer), against memcpy of the same size.
//
// Usage: migrate_bench [--quick]
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "hmmkit/dmirror.h"

namespace {

using Clock = std::chrono::steady_clock;
constexpr size_t kPage = 4096;

double Percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, size_t(p * double(v.size())))];
}

void* MapAligned(size_t len, size_t align) {
  char* p = static_cast<char*>(
      mmap(nullptr, len + align, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (p == MAP_FAILED) return nullptr;
  char* a = reinterpret_cast<char*>((uintptr_t(p) + align - 1) & ~(align - 1));
  if (a > p) munmap(p, size_t(a - p));
  munmap(a + len, size_t(p + len + align - (a + len)));
  return a;
}

// Bare userfaultfd round trip: touch a missing page, a handler thread copies one in.
std::vector<double> BareUffdRoundTrips(size_t n) {
  std::vector<double> us;
  // Blocking fd and a blocking read: the fastest bare handler. (poll() on a blocking userfaultfd
  // reports POLLERR at once, so poll-then-read would still block in read.) One extra sentinel page,
  // touched last, is the handler's signal to exit once it has served it.
  int uffd = int(syscall(SYS_userfaultfd, O_CLOEXEC | UFFD_USER_MODE_ONLY));
  if (uffd < 0) {
    std::fprintf(stderr, "bare uffd unavailable: %s\n", strerror(errno));
    return us;
  }
  uffdio_api api{};
  api.api = UFFD_API;
  if (ioctl(uffd, UFFDIO_API, &api) != 0) return us;
  char* area = static_cast<char*>(
      mmap(nullptr, (n + 1) * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  uffdio_register reg{};
  reg.range.start = uintptr_t(area);
  reg.range.len = (n + 1) * kPage;
  reg.mode = UFFDIO_REGISTER_MODE_MISSING;
  if (ioctl(uffd, UFFDIO_REGISTER, &reg) != 0) return us;
  static char source[kPage] = {1};
  const uintptr_t sentinel_page = uintptr_t(area + n * kPage);
  std::thread handler([&] {
    for (bool done = false; !done;) {
      uffd_msg msg;
      if (read(uffd, &msg, sizeof msg) != sizeof msg) continue;
      if (msg.event != UFFD_EVENT_PAGEFAULT) continue;
      uffdio_copy c{};
      c.dst = msg.arg.pagefault.address & ~(kPage - 1);
      c.src = uintptr_t(source);
      c.len = kPage;
      ioctl(uffd, UFFDIO_COPY, &c);
      done = c.dst == sentinel_page;
    }
  });
  for (size_t i = 0; i < n; ++i) {
    auto t0 = Clock::now();
    volatile char c = area[i * kPage];
    (void)c;
    us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  volatile char sentinel = area[n * kPage];
  (void)sentinel;
  handler.join();
  munmap(area, (n + 1) * kPage);
  close(uffd);
  return us;
}

int Cmd(int h, unsigned long req, void* addr, void* ptr, size_t npages, hmm_dmirror_cmd* out) {
  hmm_dmirror_cmd c{};
  c.addr = uintptr_t(addr);
  c.ptr = uintptr_t(ptr);
  c.npages = npages;
  int r = hmm_dmirror_ioctl(h, req, &c);
  if (out) *out = c;
  return r;
}

// CPU fault-back of device-private pages: one migrated page per 64 KiB slot (the fault window
// brings back at most 16 pages, so each touch is one fault and one page).
std::vector<double> DeviceFaultBacks(int h, size_t n) {
  std::vector<double> us;
  const size_t slot = 16 * kPage;
  char* area = static_cast<char*>(MapAligned(n * slot, slot));
  std::vector<char> bounce(kPage);
  for (size_t i = 0; i < n; ++i) {
    char* p = area + i * slot;
    p[0] = char(i);
    if (Cmd(h, HMM_DMIRROR_MIGRATE_TO_DEV, p, bounce.data(), 1, nullptr) != 0) {
      std::fprintf(stderr, "migrate failed: %s\n", strerror(errno));
      return {};
    }
    auto t0 = Clock::now();
    volatile char c = p[0];
    us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
    if (c != char(i)) {
      std::fprintf(stderr, "fault-back returned wrong data at page %zu\n", i);
      return {};
    }
  }
  munmap(area, n * slot);
  return us;
}

struct Throughput {
  double to_dev_gbs = 0, to_sys_gbs = 0, memcpy_gbs = 0;
  bool ok = false;  // every round migrated and the data survived
};

Throughput MigrationThroughput(int h, size_t len, bool huge, int rounds) {
  Throughput t;
  char* buf = static_cast<char*>(MapAligned(len, 2u << 20));
  madvise(buf, len, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
  std::memset(buf, 7, len);
  std::vector<char> bounce(len), dst(len);
  t.ok = true;
  std::memset(dst.data(), 1, len);
  double dev_s = 1e9, sys_s = 1e9, cpy_s = 1e9;
  for (int r = 0; r < rounds; ++r) {
    auto t0 = Clock::now();
    std::memcpy(dst.data(), buf, len);
    auto t1 = Clock::now();
    hmm_dmirror_cmd c{};
    if (Cmd(h, HMM_DMIRROR_MIGRATE_TO_DEV, buf, bounce.data(), len / kPage, &c) != 0) {
      std::fprintf(stderr, "migrate to device failed: %s\n", strerror(errno));
      t.ok = false;
      break;
    }
    auto t2 = Clock::now();
    if (Cmd(h, HMM_DMIRROR_MIGRATE_TO_SYS, buf, nullptr, len / kPage, &c) != 0) {
      std::fprintf(stderr, "migrate to system failed: %s\n", strerror(errno));
      t.ok = false;
      break;
    }
    if (std::memcmp(buf, dst.data(), len) != 0) {
      std::fprintf(stderr, "data changed by the round trip\n");
      t.ok = false;
      break;
    }
    auto t3 = Clock::now();
    cpy_s = std::min(cpy_s, std::chrono::duration<double>(t1 - t0).count());
    dev_s = std::min(dev_s, std::chrono::duration<double>(t2 - t1).count());
    sys_s = std::min(sys_s, std::chrono::duration<double>(t3 - t2).count());
  }
  t.memcpy_gbs = double(len) / cpy_s / 1e9;
  t.to_dev_gbs = double(len) / dev_s / 1e9;
  t.to_sys_gbs = double(len) / sys_s / 1e9;
  munmap(buf, len);
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  const size_t faults = quick ? 200 : 2000;
  const size_t len = (quick ? 8u : 64u) << 20;
  const int rounds = quick ? 2 : 5;
  int h = hmm_dmirror_open(0);
  if (h < 0) {
    std::fprintf(stderr, "hmm_dmirror_open: %s\n", strerror(errno));
    return 1;
  }
  auto bare = BareUffdRoundTrips(faults);
  auto dev = DeviceFaultBacks(h, faults);
  if (bare.empty() || dev.empty()) return 1;
  const double b50 = Percentile(bare, 0.5), b99 = Percentile(bare, 0.99);
  const double d50 = Percentile(dev, 0.5), d99 = Percentile(dev, 0.99);
  std::printf("fault-back (us)        p50 %8.1f  p99 %8.1f\n", d50, d99);
  std::printf("bare uffd round trip   p50 %8.1f  p99 %8.1f\n", b50, b99);
  std::printf("ratio (fault-back / bare)  p50 %.2f  p99 %.2f\n", d50 / b50, d99 / b99);
  int rc = 0;
  for (bool huge : {false, true}) {
    Throughput t = MigrationThroughput(h, len, huge, rounds);
    if (!t.ok) rc = 1;
    std::printf(
        "%s %3zu MiB: to device %6.2f GB/s  to system %6.2f GB/s  memcpy %6.2f GB/s  "
        "ratios %.2f / %.2f\n",
        huge ? "2 MiB chunks" : "4 KiB pages ", len >> 20, t.to_dev_gbs, t.to_sys_gbs, t.memcpy_gbs,
        t.to_dev_gbs / t.memcpy_gbs, t.to_sys_gbs / t.memcpy_gbs);
  }
  hmm_dmirror_close(h);
  return rc;
}
