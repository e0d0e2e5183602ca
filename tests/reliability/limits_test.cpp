// Resource limits: device memory smaller than the working set, allocation failures (injected),
// vm.max_map_count, ten thousand subscriptions, and the resources a device holds (threads,
// descriptors) when it is closed or its process exits with data still on it. Each test checks the
// data oracle afterwards: nothing may be lost, whatever failed.
#include <dirent.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "hmmkit/base/fault_injection.hpp"
#include "hmmkit/mirror/address_space.hpp"
#include "hmmkit/mirror/range_fault.hpp"
#include "hmmkit/svm.hpp"
#include "reliability_support.hpp"
#include "test_support.hpp"

// Sanitizer runtimes map memory of their own at any time and abort when that fails.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define HMMKIT_RELIABILITY_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define HMMKIT_RELIABILITY_SANITIZED 1
#endif
#endif
#ifdef HMMKIT_RELIABILITY_SANITIZED
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif

namespace hmmkit::test {
namespace {

using svm::Device;
using svm::KernelContext;
using svm::Location;
using svm::Residency;

std::unique_ptr<Device> OpenOrNull(size_t memory_bytes, Status* why) {
  svm::DeviceOptions o;
  o.memory_bytes = memory_bytes;
  o.compute_units = 2;
  auto dev = Device::Open(o);
  if (!dev.ok()) {
    *why = dev.status();
    return nullptr;
  }
  return std::move(*dev);
}

// NOLINTBEGIN(bugprone-macro-parentheses): `var` is the name being declared
#define HMMKIT_OPEN_SVM_OR_SKIP(var, bytes)                                             \
  Status var##_why;                                                                     \
  std::unique_ptr<Device> var = OpenOrNull(bytes, &var##_why);                          \
  if (!var && var##_why.errno_value() == ENOTSUP) GTEST_SKIP() << var##_why.ToString(); \
  ASSERT_NE(var, nullptr) << var##_why.ToString()
// NOLINTEND(bugprone-macro-parentheses)

size_t CountEntries(const char* dir) {
  DIR* d = opendir(dir);
  if (d == nullptr) return 0;
  size_t n = 0;
  while (dirent* e = readdir(d))
    if (e->d_name[0] != '.') ++n;
  closedir(d);
  return n - (std::string(dir) == "/proc/self/fd" ? 1 : 0);  // the DIR's own descriptor
}
size_t Threads() {
  return CountEntries("/proc/self/task");
}
// Open descriptors, less the process-wide /proc/self/mountinfo watch that the VMA reader opens
// lazily on first need and keeps until exit (a cache, not something a device owns).
size_t Fds() {
  size_t n = 0;
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) {
    std::error_code ec;
    const std::string target = std::filesystem::read_symlink(e.path(), ec).string();
    n += target.size() < 10 || target.compare(target.size() - 10, 10, "/mountinfo") != 0;
  }
  return n;
}
// Threads that the device joined may still be leaving the kernel's task list: wait (bounded).
size_t ThreadsSettledAt(size_t want) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  size_t n = Threads();
  while (n > want && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::yield();
    n = Threads();
  }
  return n;
}

// ---- Device memory exhaustion -------------------------------------------------------------------

TEST(LimitsTest, WorkingSetFourTimesDeviceMemoryIsEvictedAndKeepsEveryByte) {
  // Given a device with 4 MiB of memory and a 16 MiB working set
  HMMKIT_OPEN_SVM_OR_SKIP(dev, 4 * kMiB);
  Mapping m = Mapping::AlignedAnon(16 * kMiB, 2 * kMiB);
  auto* w = reinterpret_cast<uint64_t*>(m.data());
  const size_t n = m.size() / sizeof(uint64_t);
  for (size_t i = 0; i < n; ++i) w[i] = i;
  // When kernels update every word twice, with the device pinned to device placement
  ASSERT_TRUE(dev->Advise(m.data(), m.size(), svm::Advice::kSetPreferredLocation).ok());
  for (int pass = 0; pass < 2; ++pass) {
    Status st =
        dev->Launch(n, [&](KernelContext& k, size_t i) { k.Store(&w[i], k.Load(&w[i]) + 3); });
    ASSERT_TRUE(st.ok()) << st.ToString();
  }
  // Then device memory was recycled by eviction, and every word holds its value
  const svm::DeviceStats s = dev->stats();
  EXPECT_GT(s.evictions, 0u);
  EXPECT_GT(s.bytes_to_device, 4 * kMiB);
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(w[i], i + 6) << i;
  std::printf(
      "[ measured ] 16 MiB over 4 MiB: evictions %llu, to device %llu MiB, to system %llu "
      "MiB, remote maps %llu\n",
      (unsigned long long)s.evictions, (unsigned long long)(s.bytes_to_device >> 20),
      (unsigned long long)(s.bytes_to_system >> 20), (unsigned long long)s.remote_maps);
}

// ---- Allocation failures ------------------------------------------------------------------------

TEST(LimitsTest, DeviceAllocFailureLeavesDataInSystemMemoryAndKernelsStillRun) {
  HMMKIT_OPEN_SVM_OR_SKIP(dev, 16 * kMiB);
  Mapping m = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB);
  auto* w = reinterpret_cast<uint64_t*>(m.data());
  const size_t n = m.size() / sizeof(uint64_t);
  for (size_t i = 0; i < n; ++i) w[i] = ~i;
  {
    // Given every device allocation failing with ENOMEM
    inject::ScopedPlan plan(inject::Site::kDeviceAlloc, {});
    // When the buffer is prefetched and a kernel updates it
    Status pf = dev->Prefetch(m.data(), m.size(), Location::kDevice);
    Status ln =
        dev->Launch(n, [&](KernelContext& k, size_t i) { k.Store(&w[i], k.Load(&w[i]) ^ 1); });
    if (inject::Fired(inject::Site::kDeviceAlloc) == 0)
      FAIL() << "the device_alloc injection site never fired on this path";
    // Then the prefetch fails cleanly with ENOMEM (or is served remotely), the kernel runs on
    // system memory, and no page went to the device
    EXPECT_TRUE(pf.ok() || pf.errno_value() == ENOMEM) << pf.ToString();
    EXPECT_TRUE(ln.ok()) << ln.ToString();
    auto r = dev->QueryResidency(m.data(), m.size());
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(*r, Residency::kSystem) << svm::ToString(*r);
  }
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(w[i], ~i ^ 1) << i;
  // And once the failures stop, the same buffer migrates
  ASSERT_TRUE(dev->Prefetch(m.data(), m.size(), Location::kDevice).ok());
  auto r = dev->QueryResidency(m.data(), m.size());
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, Residency::kDevice) << svm::ToString(*r);
}

TEST(LimitsTest, SystemAllocFailureOnTheWayBackKeepsDataOnTheDevice) {
  HMMKIT_OPEN_SVM_OR_SKIP(dev, 16 * kMiB);
  // Given a buffer on the device
  Mapping m = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB);
  auto* w = reinterpret_cast<uint64_t*>(m.data());
  const size_t n = m.size() / sizeof(uint64_t);
  for (size_t i = 0; i < n; ++i) w[i] = i * 5;
  ASSERT_TRUE(dev->Prefetch(m.data(), m.size(), Location::kDevice).ok());
  auto r = dev->QueryResidency(m.data(), m.size());
  ASSERT_TRUE(r.ok());
  ASSERT_EQ(*r, Residency::kDevice) << svm::ToString(*r);
  {
    // When it is prefetched back while system (staging) allocations fail
    inject::ScopedPlan plan(inject::Site::kSystemAlloc, {});
    Status st = dev->Prefetch(m.data(), m.size(), Location::kSystem);
    if (inject::Fired(inject::Site::kSystemAlloc) == 0)
      FAIL() << "the system_alloc injection site never fired on this path";
    // Then the prefetch fails with ENOMEM and the pages stay on the device (not touched by the CPU
    // here: its fault-back would need the same allocation)
    EXPECT_EQ(st.errno_value(), ENOMEM) << st.ToString();
    r = dev->QueryResidency(m.data(), m.size());
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(*r, Residency::kDevice) << svm::ToString(*r);
  }
  // And once allocations work again, the CPU reads every word
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(w[i], i * 5) << i;
}

TEST(LimitsTest, DmirrorFailedDeviceAllocationIsEnomemAndTheDataStays) {
  HMMKIT_OPEN_DMIRROR_OR_SKIP(h, 0);
  const size_t pages = 16;
  Mapping m(pages * PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  for (size_t i = 0; i < m.size(); ++i) m.data()[i] = char(i % 251);
  std::vector<char> bounce(m.size());
  int err;
  {
    // Given every device allocation failing
    inject::ScopedPlan plan(inject::Site::kDeviceAlloc, {});
    // When the range is migrated to the device
    err = DmirrorCmd(h.get(), HMM_DMIRROR_MIGRATE_TO_DEV, m.addr(), bounce.data(), pages);
    if (inject::Fired(inject::Site::kDeviceAlloc) == 0)
      FAIL() << "the device_alloc injection site never fired on this path";
    // Then ENOMEM, and every page is still in system memory
    EXPECT_EQ(err, ENOMEM) << strerror(err);
    EXPECT_EQ(DevicePages(h.get(), m.addr(), pages), 0);
  }
  for (size_t i = 0; i < m.size(); ++i) ASSERT_EQ(m.data()[i], char(i % 251)) << i;
  // And HMM_DMIRROR_FLAG_FAIL_ALLOC fails exactly one allocation the same way
  ASSERT_EQ(DmirrorCmd(h.get(), HMM_DMIRROR_FLAGS, 0, nullptr, HMM_DMIRROR_FLAG_FAIL_ALLOC), 0);
  err = DmirrorCmd(h.get(), HMM_DMIRROR_MIGRATE_TO_DEV, m.addr(), bounce.data(), pages);
  EXPECT_TRUE(err == 0 || err == ENOMEM) << strerror(err);
  if (err == ENOMEM) {
    EXPECT_EQ(DevicePages(h.get(), m.addr(), pages), 0);
    err = DmirrorCmd(h.get(), HMM_DMIRROR_MIGRATE_TO_DEV, m.addr(), bounce.data(), pages);
  }
  EXPECT_EQ(err, 0) << strerror(err);
  EXPECT_EQ(DevicePages(h.get(), m.addr(), pages), long(pages));
  for (size_t i = 0; i < m.size(); ++i) ASSERT_EQ(m.data()[i], char(i % 251)) << i;
}

// ---- vm.max_map_count
// ----------------------------------------------------------------------------

size_t ReadMaxMapCount() {
  std::ifstream f("/proc/sys/vm/max_map_count");
  size_t v = 0;
  f >> v;
  return v;
}
size_t CountVmas() {
  std::ifstream f("/proc/self/maps");
  size_t n = 0;
  for (std::string line; std::getline(f, line);) ++n;
  return n;
}

// Splits one big mapping into single-page VMAs (alternating protections) until the kernel refuses
// with ENOMEM: the process then sits at vm.max_map_count. Unmapped on destruction.
class MapCountFiller {
 public:
  explicit MapCountFiller(size_t pages)
      : m_(pages * PageSize(), PROT_READ | PROT_WRITE,
           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE) {
    for (size_t i = 1; i + 1 < pages; i += 2) {
      if (mprotect(m_.page(i), PageSize(), PROT_READ) != 0) {
        hit_errno_ = errno;
        return;
      }
      ++splits_;
    }
  }
  int hit_errno() const { return hit_errno_; }
  size_t splits() const { return splits_; }
  void Release() { m_.Unmap(); }

 private:
  Mapping m_;
  int hit_errno_ = 0;
  size_t splits_ = 0;
};

// The bound: a limit far above the default 65530 would make the test slow.
constexpr size_t kMaxMapCountTested = 300000;

#define HMMKIT_SKIP_MAP_COUNT_IF_UNTESTABLE(limit)                                      \
  if (kSanitized) GTEST_SKIP() << "sanitizer runtimes abort when their own mmap fails"; \
  if ((limit) == 0 || (limit) > kMaxMapCountTested)                                     \
  GTEST_SKIP() << "vm.max_map_count " << (limit) << " is above the bound " << kMaxMapCountTested

// Runs an API call; an exception escaping hmmkit's Status API is recorded in `threw` and turned
// into EIO.
template <class F>
Status NoThrow(const char* what, std::string* threw, F&& f) {
  try {
    return f();
  } catch (const std::exception& e) {
    *threw += std::string(what) + " threw " + e.what() + "; ";
    return Status::FromErrno(EIO, e.what());
  }
}

TEST(LimitsTest, AtMaxMapCountSvmCallsFailCleanlyAndWorkAfterRelease) {
  const size_t limit = ReadMaxMapCount();
  HMMKIT_SKIP_MAP_COUNT_IF_UNTESTABLE(limit);
  // Given an open device and a written buffer, then a process at vm.max_map_count
  HMMKIT_OPEN_SVM_OR_SKIP(dev, 16 * kMiB);
  Mapping m = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB);
  auto* w = reinterpret_cast<uint64_t*>(m.data());
  const size_t n = m.size() / sizeof(uint64_t);
  for (size_t i = 0; i < n; ++i) w[i] = i;
  const size_t before = CountVmas();
  MapCountFiller filler(2 * (limit - std::min(limit, before)) + 64);
  ASSERT_EQ(filler.hit_errno(), ENOMEM) << "the map limit was not reached";
  // When the device prefetches it, and a kernel sums it
  std::string threw;
  Status pf = NoThrow("Prefetch", &threw,
                      [&] { return dev->Prefetch(m.data(), m.size(), Location::kDevice); });
  std::atomic<uint64_t> sum{0};
  Status ln = NoThrow("Launch", &threw, [&] {
    return dev->Launch(n, [&](KernelContext& k, size_t i) { sum += k.Load(&w[i]); });
  });
  // Then each either works or fails cleanly with ENOMEM (EAGAIN: no thread could be started)
  const bool clean_pf = pf.ok() || pf.errno_value() == ENOMEM || pf.errno_value() == EAGAIN;
  const bool clean_ln = ln.ok() || ln.errno_value() == ENOMEM || ln.errno_value() == EAGAIN;
  if (threw.empty()) {
    EXPECT_TRUE(clean_pf) << pf.ToString();
    EXPECT_TRUE(clean_ln) << ln.ToString();
  }
  if (ln.ok()) {
    EXPECT_EQ(sum.load(), uint64_t(n) * (n - 1) / 2);
  }
  std::printf(
      "[ measured ] max_map_count %zu, VMAs before %zu, splits %zu: prefetch %s, launch %s\n",
      limit, before, filler.splits(), pf.ToString().c_str(), ln.ToString().c_str());
  // And after the VMAs are released, everything works and no byte changed
  filler.Release();
  ASSERT_TRUE(dev->Prefetch(m.data(), m.size(), Location::kDevice).ok());
  sum = 0;
  ASSERT_TRUE(dev->Launch(n, [&](KernelContext& k, size_t i) { sum += k.Load(&w[i]); }).ok());
  EXPECT_EQ(sum.load(), uint64_t(n) * (n - 1) / 2);
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(w[i], i) << i;
  HMMKIT_FAIL_IF_LIBRARY_BUG(
      !threw.empty(), "an exception escaped the Status API at the map limit: "
                          << threw << "(EmuSvmDevice::Launch starts std::threads per launch)");
}

TEST(LimitsTest, AtMaxMapCountDmirrorCommandsFailCleanlyAndWorkAfterRelease) {
  const size_t limit = ReadMaxMapCount();
  HMMKIT_SKIP_MAP_COUNT_IF_UNTESTABLE(limit);
  HMMKIT_OPEN_DMIRROR_OR_SKIP(h, 0);
  const size_t pages = 64;
  Mapping m(pages * PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  for (size_t i = 0; i < m.size(); ++i) m.data()[i] = char(i % 241);
  std::vector<char> bounce(m.size());
  const size_t before = CountVmas();
  MapCountFiller filler(2 * (limit - std::min(limit, before)) + 64);
  ASSERT_EQ(filler.hit_errno(), ENOMEM) << "the map limit was not reached";
  // When the device reads (mirrors) and migrates the buffer at the limit
  const int rd = DmirrorCmd(h.get(), HMM_DMIRROR_READ, m.addr(), bounce.data(), pages);
  const int mg = DmirrorCmd(h.get(), HMM_DMIRROR_MIGRATE_TO_DEV, m.addr(), bounce.data(), pages);
  // Then each works or fails with ENOMEM (ENOENT: pages that could not move stayed)
  EXPECT_TRUE(rd == 0 || rd == ENOMEM) << strerror(rd);
  EXPECT_TRUE(mg == 0 || mg == ENOMEM || mg == ENOENT) << strerror(mg);
  if (rd == 0) {
    EXPECT_EQ(std::memcmp(bounce.data(), m.data(), m.size()), 0);
  }
  std::printf("[ measured ] max_map_count %zu: dmirror read %s, migrate %s\n", limit, strerror(rd),
              strerror(mg));
  // And after release the commands work and the data is intact
  filler.Release();
  EXPECT_EQ(DmirrorCmd(h.get(), HMM_DMIRROR_MIGRATE_TO_DEV, m.addr(), bounce.data(), pages), 0);
  EXPECT_EQ(DmirrorCmd(h.get(), HMM_DMIRROR_READ, m.addr(), bounce.data(), pages), 0);
  for (size_t i = 0; i < m.size(); ++i) ASSERT_EQ(bounce[i], char(i % 241)) << i;
  for (size_t i = 0; i < m.size(); ++i) ASSERT_EQ(m.data()[i], char(i % 241)) << i;
}

// ---- Many subscriptions -------------------------------------------------------------------------

class CountingOps : public IntervalNotifierOps {
 public:
  void Invalidate(IntervalNotifier& sub, const NotifierRange& range, uint64_t cur_seq) override {
    std::lock_guard<std::mutex> l(mu_);
    sub.SetSeq(cur_seq);
    if (range.event == InvalidateEvent::kUnmap) ++unmaps_;
    ++calls_;
    cv_.notify_all();
  }
  size_t calls() {
    std::lock_guard<std::mutex> l(mu_);
    return calls_;
  }
  // Waits (bounded: a failsafe, the event normally arrives within milliseconds) for `n` unmaps.
  size_t WaitForUnmaps(size_t n) {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait_for(l, std::chrono::seconds(30), [&] { return unmaps_ >= n; });
    return unmaps_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  size_t calls_ = 0;
  size_t unmaps_ = 0;
};

TEST(LimitsTest, TenThousandSubscriptionsAreAllInvalidatedByOneMunmapAndRemovedCleanly) {
  auto as = MakeAddressSpace();
  ASSERT_NE(as, nullptr);
  if (as->monitor() == nullptr) GTEST_SKIP() << "no userfaultfd monitor";
  constexpr size_t kSubs = 10000;
  // Given 10,000 one-page subscriptions over a watched 10,000-page mapping
  Mapping m(kSubs * PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  CountingOps ops;
  std::vector<std::unique_ptr<IntervalNotifier>> subs;
  for (size_t i = 0; i < kSubs; ++i) {
    subs.push_back(std::make_unique<IntervalNotifier>());
    ASSERT_TRUE(
        as->notifiers().Insert(*subs.back(), m.addr() + i * PageSize(), PageSize(), ops).ok());
  }
  EXPECT_EQ(as->notifiers().size(), kSubs);
  std::vector<uint64_t> pfns(kSubs);
  Range r;
  r.notifier = subs[0].get();
  r.notifier_seq = subs[0]->ReadBegin();
  r.start = m.addr();
  r.end = m.end();
  r.hmm_pfns = pfns;
  ASSERT_TRUE(RangeFault(*as, r).ok());  // snapshot only: makes the whole range watched
  std::vector<uint64_t> seqs(kSubs);
  for (size_t i = 0; i < kSubs; ++i) seqs[i] = subs[i]->ReadBegin();
  // When the mapping is unmapped
  const auto t0 = std::chrono::steady_clock::now();
  m.Unmap();
  // Then every subscription is called once with kUnmap and sees its sequence move
  EXPECT_EQ(ops.WaitForUnmaps(kSubs), kSubs);
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(ops.calls(), kSubs);
  size_t stale = 0;
  for (size_t i = 0; i < kSubs; ++i) stale += subs[i]->ReadRetry(seqs[i]) ? 1 : 0;
  EXPECT_EQ(stale, kSubs);
  std::printf("[ measured ] munmap -> %zu callbacks in %.1f ms\n", kSubs, ms);
  // And removing them leaves an empty tree that calls nobody
  for (auto& s : subs) as->notifiers().Remove(*s);
  EXPECT_EQ(as->notifiers().size(), 0u);
  EXPECT_EQ(as->notifiers().Invalidate({m.addr(), m.addr() + kSubs * PageSize()}), 0u);
  EXPECT_EQ(ops.calls(), kSubs);
}

// ---- Closing a device, exiting a process --------------------------------------------------------

TEST(LimitsTest, ClosingADeviceWithDataOnItReleasesThreadsAndFdsAndKeepsTheData) {
  // Given the process after one open/close (one-time set-up: loader registration, features probe)
  { HMMKIT_OPEN_SVM_OR_SKIP(warm, 4 * kMiB); }
  const size_t threads0 = Threads(), fds0 = Fds();
  Mapping m = Mapping::AlignedAnon(4 * kMiB, 2 * kMiB);
  auto* w = reinterpret_cast<uint64_t*>(m.data());
  const size_t n = m.size() / sizeof(uint64_t);
  size_t threads_open = 0, fds_open = 0;
  {
    // When a device is opened, its kernel writes the buffer, which then lives on the device
    HMMKIT_OPEN_SVM_OR_SKIP(dev, 16 * kMiB);
    ASSERT_TRUE(dev->Launch(n, [&](KernelContext& k, size_t i) { k.Store(&w[i], i * 7); }).ok());
    ASSERT_TRUE(dev->Prefetch(m.data(), m.size(), Location::kDevice).ok());
    auto r = dev->QueryResidency(m.data(), m.size());
    ASSERT_TRUE(r.ok());
    ASSERT_EQ(*r, Residency::kDevice) << svm::ToString(*r);
    threads_open = Threads();
    fds_open = Fds();
    // and closed
  }
  // Then the threads and descriptors are back to what they were
  EXPECT_EQ(ThreadsSettledAt(threads0), threads0);
  EXPECT_EQ(Fds(), fds0);
  std::printf("[ measured ] svm device: threads %zu -> %zu -> %zu, fds %zu -> %zu -> %zu\n",
              threads0, threads_open, Threads(), fds0, fds_open, Fds());
  // And the CPU reads every word the device wrote
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(w[i], i * 7) << i;
}

TEST(LimitsTest, DmirrorHandlesReleaseWhatTheyTookOnClose) {
  const size_t threads0 = Threads(), fds0 = Fds();
  // Given the devices' process context, created by the first open (it lives until exit, as the
  // kernel module would)
  { HMMKIT_OPEN_DMIRROR_OR_SKIP(first, 0); }
  const size_t threads1 = Threads(), fds1 = Fds();
  const size_t pages = 32;
  Mapping m(pages * PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  for (size_t i = 0; i < m.size(); ++i) m.data()[i] = char(i % 239);
  std::vector<char> bounce(m.size());
  for (int round = 0; round < 3; ++round) {
    // When a handle migrates data to its device and is closed
    DmirrorHandle h(0);
    ASSERT_GE(h.get(), 0) << strerror(h.open_errno());
    ASSERT_EQ(DmirrorCmd(h.get(), HMM_DMIRROR_MIGRATE_TO_DEV, m.addr(), bounce.data(), pages), 0);
  }
  // Then no thread or descriptor was left behind by the handles, and the data is intact
  EXPECT_EQ(ThreadsSettledAt(threads1), threads1);
  EXPECT_EQ(Fds(), fds1);
  std::printf("[ measured ] dmirror context: +%zd threads, +%zd fds (kept until exit)\n",
              ssize_t(threads1) - ssize_t(threads0), ssize_t(fds1) - ssize_t(fds0));
  for (size_t i = 0; i < m.size(); ++i) ASSERT_EQ(m.data()[i], char(i % 239)) << i;
}

// Waits for `pid` (bounded failsafe: the child is killed after `limit`). Returns the wait status,
// or -1 on timeout.
int WaitBounded(pid_t pid, std::chrono::seconds limit) {
  const int pidfd = int(syscall(SYS_pidfd_open, pid, 0));
  if (pidfd >= 0) {
    pollfd p{pidfd, POLLIN, 0};
    const int ready = poll(&p, 1, int(std::chrono::milliseconds(limit).count()));
    close(pidfd);
    if (ready == 0) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
      return -1;
    }
  }
  int status = 0;
  if (waitpid(pid, &status, 0) != pid) return -1;
  return status;
}

// Exit codes of the children below.
enum ChildExit {
  kChildOk = 0,
  kChildSkip = 77,
  kChildOpen = 10,
  kChildWork = 11,
  kChildNotThere = 12
};

const char* ForkUnsafeReason() {
  // A child of a multi-threaded process must not start threads under TSan; a fresh ctest process
  // has only the main thread here.
  if (ForkWithMonitorUnavailableReason() != nullptr && Threads() != 1)
    return ForkWithMonitorUnavailableReason();
  return nullptr;
}

// The child: open a device, put data on it (migrated, or written through a remote mapping), check
// it, and exit without closing anything: static destructors and atexit handlers run with the
// device open. Returns a ChildExit code.
int SvmChild(const Mapping& m, bool migrate) {
  svm::DeviceOptions o;
  o.memory_bytes = 8 * kMiB;
  o.migrate_on_fault = migrate;
  o.access_counter_threshold = migrate ? o.access_counter_threshold : 0;  // no promotion either
  auto dev = Device::Open(o);
  if (!dev.ok()) return dev.status().errno_value() == ENOTSUP ? kChildSkip : kChildOpen;
  auto* w = reinterpret_cast<uint64_t*>(m.data());
  const size_t n = m.size() / sizeof(uint64_t);
  if (!(*dev)->Launch(n, [&](KernelContext& k, size_t i) { k.Store(&w[i], i); }).ok())
    return kChildWork;
  // Migrating on fault, some pages may still be served remotely (the policy decides; under ASan
  // the device works in page-sized ranges): data on the device is what the test needs.
  auto r = (*dev)->QueryResidency(m.data(), m.size());
  const bool there = r.ok() && (migrate ? (*r == Residency::kDevice || *r == Residency::kMixed)
                                        : *r == Residency::kSystem);
  if (!there) return kChildNotThere;
  (void)dev->release();  // never closed
  return kChildOk;
}

int DmirrorChild(const Mapping& m, bool migrate) {
  const size_t pages = m.size() / PageSize();
  const int h = hmm_dmirror_open(0);
  if (h < 0) return errno == ENOTSUP ? kChildSkip : kChildOpen;
  std::vector<char> bounce(m.size(), 0x3d);
  const unsigned long req = migrate ? HMM_DMIRROR_MIGRATE_TO_DEV : HMM_DMIRROR_WRITE;
  if (DmirrorCmd(h, req, m.addr(), bounce.data(), pages) != 0) return kChildWork;
  if (DevicePages(h, m.addr(), pages) != (migrate ? long(pages) : 0)) return kChildNotThere;
  return kChildOk;  // the handle stays open
}

// Forks, runs `child` there and exit()s with its code; expects exit status 0, within a minute.
template <class Child>
void ExpectChildExitsZero(Child&& child) {
  if (const char* why = ForkUnsafeReason()) GTEST_SKIP() << why;
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) std::exit(child());
  const int status = WaitBounded(pid, std::chrono::seconds(60));
  ASSERT_NE(status, -1) << "the child hung";
  ASSERT_TRUE(WIFEXITED(status)) << "killed by signal " << WTERMSIG(status);
  if (WEXITSTATUS(status) == kChildSkip) GTEST_SKIP() << "no userfaultfd in the child";
  EXPECT_EQ(WEXITSTATUS(status), kChildOk);
}

TEST(LimitsTest, ChildExitingWithSvmDataMigratedToTheDeviceExitsZero) {
  Mapping m = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB);
  ExpectChildExitsZero([&] { return SvmChild(m, /*migrate=*/true); });
}

TEST(LimitsTest, ChildExitingWithAnOpenSvmDeviceExitsZero) {
  Mapping m = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB);
  ExpectChildExitsZero([&] { return SvmChild(m, /*migrate=*/false); });
}

TEST(LimitsTest, ChildExitingWithDmirrorDataMigratedToTheDeviceExitsZero) {
  Mapping m(16 * PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  std::memset(m.data(), 0x6b, m.size());
  ExpectChildExitsZero([&] { return DmirrorChild(m, /*migrate=*/true); });
  // And the parent's copy is untouched by the child's migration
  for (size_t i = 0; i < m.size(); ++i) ASSERT_EQ(m.data()[i], 0x6b) << i;
}

TEST(LimitsTest, ChildExitingWithAnOpenDmirrorHandleExitsZero) {
  Mapping m(16 * PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  std::memset(m.data(), 0x6b, m.size());
  ExpectChildExitsZero([&] { return DmirrorChild(m, /*migrate=*/false); });
  // And the parent's copy is untouched by the child's writes
  for (size_t i = 0; i < m.size(); ++i) ASSERT_EQ(m.data()[i], 0x6b) << i;
}

}  // namespace
}  // namespace hmmkit::test
