// Bad input to the application API (hmmkit/svm.hpp and hmmkit/svm.h): ranges that wrap past the
// top of the address space, PROT_NONE memory, memory that never migrates (MAP_SHARED, files),
// misuse of C handles and fences, and threads racing on one device or stream. Each call must fail
// with its documented errno (or be a documented no-op) and leave the bytes and their residency as
// they were.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "hmmkit/svm.h"
#include "hmmkit/svm.hpp"
#include "reliability_support.hpp"
#include "test_support.hpp"

namespace hmmkit::test {
namespace {

using svm::Device;
using svm::KernelContext;
using svm::Location;
using svm::Residency;

class SvmBadInputTest : public ::testing::Test {
 protected:
  void SetUp() override {
    svm::DeviceOptions o;
    o.memory_bytes = size_t(16) << 20;
    o.compute_units = 2;
    auto dev = Device::Open(o);
    if (dev.status().errno_value() == ENOTSUP) GTEST_SKIP() << dev.status().ToString();
    ASSERT_TRUE(dev.ok()) << dev.status().ToString();
    dev_ = std::move(*dev);
  }
  static void Fill(const Mapping& m) {
    for (size_t i = 0; i < m.size(); ++i) m.data()[i] = char(i * 13 + 5);
  }
  static bool Intact(const Mapping& m) {
    for (size_t i = 0; i < m.size(); ++i)
      if (m.data()[i] != char(i * 13 + 5)) return false;
    return true;
  }
  std::unique_ptr<Device> dev_;
};

TEST_F(SvmBadInputTest, WrappingRangesAreRefusedAndMoveNothing) {
  // Given a written 2 MiB-aligned private buffer, in system memory
  Mapping m = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB);
  Fill(m);
  // And a length that takes p + len past the top of the address space
  const size_t wrap = SIZE_MAX - m.addr() + 1 + PageSize();  // p + wrap == one page above 0
  // When the range calls get it
  bool prefetch_accepted = false;
  for (Location to : {Location::kDevice, Location::kSystem}) {
    Status st = dev_->Prefetch(m.data(), wrap, to);
    prefetch_accepted |= st.ok();
    EXPECT_EQ(st.errno_value(), EINVAL) << "Prefetch to " << int(to) << ": " << st.ToString();
  }
  // SIZE_MAX, which page rounding wraps to an empty range
  Status huge = dev_->Prefetch(m.data(), SIZE_MAX, Location::kDevice);
  prefetch_accepted |= huge.ok();
  // (A zero length is a no-op for Prefetch, where Advise and QueryResidency say EINVAL)
  EXPECT_TRUE(dev_->Prefetch(m.data(), 0, Location::kDevice).ok());
  EXPECT_EQ(huge.errno_value(), EINVAL) << huge.ToString();
  // Then Advise and QueryResidency refuse it as a bad range (EINVAL)
  Status adv = dev_->Advise(m.data(), wrap, svm::Advice::kSetPreferredLocation);
  EXPECT_EQ(adv.errno_value(), EINVAL) << adv.ToString();
  auto res = dev_->QueryResidency(m.data(), wrap);
  EXPECT_EQ(res.errno_value(), EINVAL)
      << (res.ok() ? std::string("Ok: ") + svm::ToString(*res) : res.status().ToString());
  // And nothing moved
  EXPECT_EQ(dev_->stats().bytes_to_device, 0u);
  auto after = dev_->QueryResidency(m.data(), m.size());
  ASSERT_TRUE(after.ok()) << after.status().ToString();
  EXPECT_EQ(*after, Residency::kSystem);
  EXPECT_TRUE(Intact(m));
  // And Prefetch refuses it too (its contract: EFAULT for addresses without a mapping)
  HMMKIT_FAIL_IF_LIBRARY_BUG(prefetch_accepted,
                             "Prefetch(p, len) with p + len past 2^64 returns Ok and does nothing "
                             "(EmuSvmDevice::Pages wraps; expected EINVAL)");
}

TEST_F(SvmBadInputTest, UnalignedRangesAreWidenedToWholePages) {
  // Given a written buffer
  Mapping m = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB);
  Fill(m);
  // When every call gets a range that starts and ends inside a page
  char* p = m.data() + 1;
  const size_t len = m.size() - 2;
  ASSERT_TRUE(dev_->Advise(p, len, svm::Advice::kSetPreferredLocation).ok());
  ASSERT_TRUE(dev_->Prefetch(p, len, Location::kDevice).ok());
  // Then they act on the whole first and last pages too, and the bytes are intact
  auto r = dev_->QueryResidency(m.data(), m.size());
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, Residency::kDevice) << svm::ToString(*r);
  auto edge = dev_->QueryResidency(m.data() + m.size() - 1, 1);
  ASSERT_TRUE(edge.ok());
  EXPECT_EQ(*edge, Residency::kDevice) << svm::ToString(*edge);
  ASSERT_TRUE(dev_->Prefetch(p, len, Location::kSystem).ok());
  r = dev_->QueryResidency(m.data(), m.size());
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, Residency::kSystem) << svm::ToString(*r);
  EXPECT_TRUE(Intact(m));
}

TEST_F(SvmBadInputTest, ProtNoneIsEfaultForEveryCallAndStaysInPlace) {
  // Given a written buffer made PROT_NONE
  Mapping m = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB);
  Fill(m);
  ASSERT_EQ(mprotect(m.data(), m.size(), PROT_NONE), 0);
  // When the device prefetches it or a kernel reads it
  Status pf = dev_->Prefetch(m.data(), m.size(), Location::kDevice);
  Status ld = dev_->Launch(1, [&](KernelContext& k, size_t) { (void)k.Load(m.data()); });
  // Then the prefetch does nothing (Ok: the memory has a mapping, and a prefetch is a hint) or is
  // EFAULT, and the load fails the launch
  EXPECT_TRUE(pf.ok() || pf.errno_value() == EFAULT) << pf.ToString();
  EXPECT_FALSE(ld.ok());
  // And nothing was copied, and the bytes are where they were
  EXPECT_EQ(dev_->stats().bytes_to_device, 0u);
  ASSERT_EQ(mprotect(m.data(), m.size(), PROT_READ | PROT_WRITE), 0);
  EXPECT_TRUE(Intact(m));
  // And the launch's error is EFAULT, as for hmm_range_fault (svm.hpp: EPERM is for writes to
  // read-only memory)
  HMMKIT_FAIL_IF_LIBRARY_BUG(ld.errno_value() == EPERM,
                             "a load from PROT_NONE memory fails the launch with EPERM, not "
                             "EFAULT (SvmManager, svm_manager.cpp 'device access to PROT_NONE'): "
                                 << ld.ToString());
  EXPECT_EQ(ld.errno_value(), EFAULT) << ld.ToString();
}

TEST_F(SvmBadInputTest, SharedAndFileMemoryIsNeverMigratedButStaysUsable) {
  // Given a written MAP_SHARED memfd and a private mapping of a regular file
  Mapping shared = Mapping::Memfd(2 * kMiB);
  Fill(shared);
  Mapping file = Mapping::TmpFile(2 * kMiB, "/tmp", MAP_PRIVATE);
  Fill(file);
  for (Mapping* m : {&shared, &file}) {
    // When it is prefetched to the device and a kernel updates it
    Status pf = dev_->Prefetch(m->data(), m->size(), Location::kDevice);
    EXPECT_TRUE(pf.ok()) << pf.ToString();
    auto* words = reinterpret_cast<uint64_t*>(m->data());
    ASSERT_TRUE(
        dev_->Launch(16, [&](KernelContext& k,
                             size_t i) { k.Store(&words[i * 512], k.Load(&words[i * 512]) + 1); })
            .ok());
    // Then its pages stayed in system memory (mapped remotely) and the kernel's stores are there
    auto r = dev_->QueryResidency(m->data(), m->size());
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(*r, Residency::kSystem) << svm::ToString(*r);
    for (size_t i = 0; i < 16; ++i) words[i * 512] -= 1;
    EXPECT_TRUE(Intact(*m));
  }
  EXPECT_EQ(dev_->stats().bytes_to_device, 0u);
}

TEST_F(SvmBadInputTest, ConcurrentCallsOnOneDeviceEachSeeTheirOwnResult) {
  // Given four threads sharing one device, each with its own buffer
  constexpr int kThreads = 4;
  std::vector<Mapping> bufs;
  for (int t = 0; t < kThreads; ++t) bufs.push_back(Mapping::AlignedAnon(2 * kMiB, 2 * kMiB));
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      auto* w = reinterpret_cast<uint32_t*>(bufs[size_t(t)].data());
      const size_t n = 2 * kMiB / sizeof(uint32_t);
      for (int round = 0; round < 3; ++round) {
        // When they launch, prefetch both ways and query, interleaved with bad calls
        if (!dev_->Launch(n, [&](KernelContext& k,
                                 size_t i) { k.Store(&w[i], k.Load(&w[i]) + uint32_t(t + 1)); })
                 .ok())
          bad++;
        if (dev_->Advise(w, 0, svm::Advice::kSetReadMostly).errno_value() != EINVAL) bad++;
        if (!dev_->Prefetch(w, 2 * kMiB, round % 2 ? Location::kDevice : Location::kSystem).ok())
          bad++;
        if (!dev_->QueryResidency(w, 2 * kMiB).ok()) bad++;
      }
    });
  }
  for (auto& th : threads) th.join();
  // Then every call got its own answer, and each buffer holds exactly its thread's updates
  EXPECT_EQ(bad.load(), 0);
  for (int t = 0; t < kThreads; ++t) {
    auto* w = reinterpret_cast<uint32_t*>(bufs[size_t(t)].data());
    for (size_t i = 0; i < 2 * kMiB / sizeof(uint32_t); i += 997)
      ASSERT_EQ(w[i], uint32_t(3 * (t + 1))) << t << " " << i;
  }
}

// ---- Fences and streams -------------------------------------------------------------------------

TEST_F(SvmBadInputTest, FenceWaitedTwiceOrAfterItsStreamDiedGivesTheSameResult) {
  // Given a stream whose launch fails (a load from an unmapped address) and one that succeeds
  auto* hole = static_cast<uint32_t*>(UnmappedAddress());
  ASSERT_NE(hole, nullptr);
  svm::Fence failed, ok;
  {
    auto stream = dev_->CreateStream();
    failed = stream->Launch(1, [&](KernelContext& k, size_t) { (void)k.Load(hole); });
    ok = stream->Signal();
    // When the first fence is waited twice, from two threads at once
    Status a, b;
    std::thread other([&] { b = failed.Wait(); });
    a = failed.Wait();
    other.join();
    // Then both waits return the same error
    EXPECT_EQ(a.errno_value(), EFAULT) << a.ToString();
    EXPECT_EQ(b.errno_value(), EFAULT) << b.ToString();
    // And the error is reported once more by Synchronize, then cleared
    EXPECT_EQ(stream->Synchronize().errno_value(), EFAULT);
    EXPECT_TRUE(stream->Synchronize().ok());
  }
  // When the stream is gone, then its fences still answer, unchanged
  EXPECT_TRUE(failed.Ready());
  EXPECT_EQ(failed.Wait().errno_value(), EFAULT);
  EXPECT_EQ(failed.WaitFor(std::chrono::milliseconds(0)).errno_value(), EFAULT);
  EXPECT_TRUE(ok.Wait().ok());
}

TEST_F(SvmBadInputTest, StreamDestroyedWhileAnotherThreadWaitsOnItsFence) {
  // Given a stream with queued work and a thread waiting on the last fence
  Mapping m = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB);
  auto* w = reinterpret_cast<uint64_t*>(m.data());
  const size_t n = 2 * kMiB / sizeof(uint64_t);
  auto stream = dev_->CreateStream();
  for (int i = 0; i < 4; ++i)
    (void)stream->Launch(n, [&](KernelContext& k, size_t j) { k.Store(&w[j], k.Load(&w[j]) + 1); });
  svm::Fence last = stream->Signal();
  Status waited = Status::FromErrno(EIO);
  std::thread waiter([&] { waited = last.Wait(); });
  // When the stream is destroyed meanwhile (it waits for its queued work)
  stream.reset();
  waiter.join();
  // Then the waiter saw Ok and all four launches ran
  EXPECT_TRUE(waited.ok()) << waited.ToString();
  for (size_t j = 0; j < n; j += 4099) ASSERT_EQ(w[j], 4u) << j;
}

// ---- The C interface ----------------------------------------------------------------------------

void Increment(hmmkit_svm_kctx* k, size_t i, void* arg) {
  auto* p = static_cast<uint32_t*>(arg);
  hmmkit_svm_store_u32(k, &p[i], hmmkit_svm_load_u32(k, &p[i]) + 1);
}
void LoadFromArg(hmmkit_svm_kctx* k, size_t, void* arg) {
  (void)hmmkit_svm_load_u32(k, static_cast<const uint32_t*>(arg));
}

TEST(SvmCBadInputTest, NullHandlesAndUnknownEnumsAreEinvalAndChangeNothing) {
  hmmkit_svm_device* dev = nullptr;
  int rc = hmmkit_svm_open(nullptr, &dev);
  if (rc == -ENOTSUP) GTEST_SKIP() << hmmkit_svm_last_error();
  ASSERT_EQ(rc, 0) << hmmkit_svm_last_error();
  Mapping m(PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  std::memset(m.data(), 0x5a, m.size());
  int residency = -1;
  hmmkit_svm_stats stats;
  hmmkit_svm_stream* s = nullptr;
  // Given NULL handles, NULL outputs, unknown locations and advice
  // Then every call is -EINVAL with a message, and nothing was written
  EXPECT_EQ(hmmkit_svm_open(nullptr, nullptr), -EINVAL);
  EXPECT_EQ(hmmkit_svm_launch(nullptr, 1, Increment, m.data()), -EINVAL);
  EXPECT_EQ(hmmkit_svm_launch(dev, 1, nullptr, m.data()), -EINVAL);
  EXPECT_EQ(hmmkit_svm_prefetch(nullptr, m.data(), m.size(), HMMKIT_SVM_DEVICE), -EINVAL);
  EXPECT_EQ(hmmkit_svm_prefetch(dev, m.data(), m.size(), 7), -EINVAL);
  EXPECT_EQ(hmmkit_svm_advise(dev, m.data(), m.size(), 99, HMMKIT_SVM_DEVICE), -EINVAL);
  EXPECT_EQ(hmmkit_svm_advise(dev, m.data(), m.size(), -1, HMMKIT_SVM_DEVICE), -EINVAL);
  EXPECT_EQ(hmmkit_svm_advise(dev, m.data(), 0, HMMKIT_SVM_SET_READ_MOSTLY, HMMKIT_SVM_DEVICE),
            -EINVAL);
  EXPECT_EQ(hmmkit_svm_residency(dev, m.data(), m.size(), nullptr), -EINVAL);
  EXPECT_EQ(hmmkit_svm_residency(nullptr, m.data(), m.size(), &residency), -EINVAL);
  EXPECT_EQ(residency, -1);
  EXPECT_EQ(hmmkit_svm_get_stats(nullptr, &stats), -EINVAL);
  EXPECT_EQ(hmmkit_svm_stream_create(nullptr, &s), -EINVAL);
  EXPECT_EQ(s, nullptr);
  EXPECT_EQ(hmmkit_svm_stream_launch(nullptr, 1, Increment, m.data(), nullptr), -EINVAL);
  EXPECT_EQ(hmmkit_svm_stream_synchronize(nullptr), -EINVAL);
  EXPECT_EQ(hmmkit_svm_fence_wait(nullptr, -1), -EINVAL);
  EXPECT_STRNE(hmmkit_svm_last_error(), "");
  // NULL is ignored by the release functions, and a NULL fence reads as ready
  hmmkit_svm_close(nullptr);
  hmmkit_svm_stream_destroy(nullptr);
  hmmkit_svm_fence_release(nullptr);
  EXPECT_EQ(hmmkit_svm_fence_ready(nullptr), 1);
  EXPECT_STREQ(hmmkit_svm_name(nullptr), "");
  for (size_t i = 0; i < m.size(); ++i) ASSERT_EQ(m.data()[i], 0x5a) << i;
  ASSERT_EQ(hmmkit_svm_get_stats(dev, &stats), 0);
  EXPECT_EQ(stats.device_faults, 0u);
  hmmkit_svm_close(dev);
}

TEST(SvmCBadInputTest, AFenceOutlivesItsStreamAndDeviceAndAnswersTheSameTwice) {
  hmmkit_svm_device* dev = nullptr;
  int rc = hmmkit_svm_open(nullptr, &dev);
  if (rc == -ENOTSUP) GTEST_SKIP() << hmmkit_svm_last_error();
  ASSERT_EQ(rc, 0) << hmmkit_svm_last_error();
  void* hole = UnmappedAddress();
  ASSERT_NE(hole, nullptr);
  Mapping m(PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  hmmkit_svm_stream* s = nullptr;
  ASSERT_EQ(hmmkit_svm_stream_create(dev, &s), 0);
  hmmkit_svm_fence* good = nullptr;
  hmmkit_svm_fence* bad = nullptr;
  ASSERT_EQ(hmmkit_svm_stream_launch(s, 64, Increment, m.data(), &good), 0);
  ASSERT_EQ(hmmkit_svm_stream_launch(s, 1, LoadFromArg, hole, &bad), 0);
  // When the stream is destroyed and the device closed before the fences are waited
  hmmkit_svm_stream_destroy(s);
  hmmkit_svm_close(dev);
  // Then each fence gives its operation's result, the same on every wait
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(hmmkit_svm_fence_ready(good), 1);
    EXPECT_EQ(hmmkit_svm_fence_wait(good, -1), 0);
    EXPECT_EQ(hmmkit_svm_fence_wait(bad, 0), -EFAULT);
  }
  hmmkit_svm_fence_release(good);
  hmmkit_svm_fence_release(bad);
  // And the launch that succeeded left its stores in memory after the device closed
  auto* w = reinterpret_cast<uint32_t*>(m.data());
  for (size_t i = 0; i < 64; ++i) ASSERT_EQ(w[i], 1u) << i;
}

}  // namespace
}  // namespace hmmkit::test
