// hmmkit::svm::Device on the emulated backend: kernels over malloc'd, stack and mmap'd memory,
// prefetch, and the error paths of a launch.
#include "hmmkit/svm.hpp"

#include <sys/mman.h>

#include <atomic>
#include <cstdlib>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "test_support.hpp"

namespace hmmkit::test {
namespace {

using svm::Device;
using svm::KernelContext;

// Globals: one in .data (a private file mapping), one in .bss.
uint64_t g_data_counter = 5;
uint64_t g_bss_table[4096];

class SvmApiTest : public ::testing::Test {
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
  std::unique_ptr<Device> dev_;
};

TEST_F(SvmApiTest, UnknownBackendIsEnodevAndNamesTheKnownOnes) {
  svm::DeviceOptions o;
  o.backend = "nosuch";
  auto dev = Device::Open(o);
  EXPECT_EQ(dev.status().errno_value(), ENODEV);
  EXPECT_NE(dev.status().ToString().find("emu"), std::string::npos);
}

TEST_F(SvmApiTest, KernelUpdatesPrivateStackAndSharedMemoryInPlace) {
  // A dedicated 2 MiB-aligned private buffer: a range never takes in memory merged into the VMA
  // from elsewhere (under ASan its allocator metadata; see docs/svm.md, known limits).
  const size_t n = 50000;
  Mapping priv = Mapping::AlignedAnon(2 << 20, 2 << 20);
  auto* heap = reinterpret_cast<int64_t*>(priv.data());
  for (size_t i = 0; i < n; ++i) heap[i] = int64_t(i);
  int32_t stack[64];
  for (int i = 0; i < 64; ++i) stack[i] = i;
  Mapping shared(PageSize(), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS);
  auto* sh = reinterpret_cast<uint32_t*>(shared.data());
  sh[0] = 7;
  ASSERT_TRUE(dev_->Launch(n,
                           [&](KernelContext& k, size_t i) {
                             k.Store(&heap[i], k.Load(&heap[i]) * 3);
                             if (i < 64) k.Store(&stack[i], k.Load(&stack[i]) + 1);
                             if (i == 0) k.Store(&sh[0], k.Load(&sh[0]) + 35);
                           })
                  .ok());
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(heap[i], int64_t(3 * i)) << i;
  for (int i = 0; i < 64; ++i) ASSERT_EQ(stack[i], i + 1);
  EXPECT_EQ(sh[0], 42u);
  auto s = dev_->stats();
  EXPECT_GT(s.device_faults, 0u);
  EXPECT_GE(s.remote_maps, 2u) << "shared memory and the main stack are mapped remotely";
  EXPECT_GE(s.bytes_to_device, n * sizeof(int64_t)) << "the private buffer migrated";
}

TEST_F(SvmApiTest, KernelReachesGlobalsInDataAndBss) {
  ASSERT_TRUE(dev_->Launch(4096,
                           [&](KernelContext& k, size_t i) {
                             k.Store(&g_bss_table[i], uint64_t(i) * 3);
                             k.AtomicAdd(&g_data_counter, uint64_t(1));
                           })
                  .ok());
  for (size_t i = 0; i < 4096; ++i) ASSERT_EQ(g_bss_table[i], 3 * i) << i;
  EXPECT_EQ(g_data_counter, 5u + 4096u);
  // hmmkit's own statics share those mappings: they are reached remotely, never migrated
  EXPECT_NE(*dev_->QueryResidency(&g_data_counter, 8), svm::Residency::kDevice);
}

TEST_F(SvmApiTest, PrefetchedMemoryDoesNotFault) {
  const size_t n = 4096;
  Mapping pm = Mapping::AlignedAnon(2 << 20, 2 << 20);
  auto* p = reinterpret_cast<uint32_t*>(pm.data());
  for (size_t i = 0; i < n; ++i) p[i] = uint32_t(i);
  Mapping om = Mapping::AlignedAnon(2 << 20, 2 << 20);
  auto* out = reinterpret_cast<uint64_t*>(om.data());
  // When both buffers are prefetched before the launch
  ASSERT_TRUE(dev_->Prefetch(p, n * sizeof(uint32_t), svm::Location::kDevice).ok());
  ASSERT_TRUE(dev_->Prefetch(out, n * sizeof(uint64_t), svm::Location::kDevice).ok());
  const uint64_t before = dev_->stats().device_faults;
  ASSERT_TRUE(dev_->Launch(n, [&](KernelContext& k,
                                  size_t i) { k.Store(&out[i], uint64_t(k.Load(&p[i])) * 2); })
                  .ok());
  // Then the kernel ran without a single device fault
  EXPECT_EQ(dev_->stats().device_faults, before);
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(out[i], 2 * uint64_t(i)) << i;
  ASSERT_TRUE(dev_->Prefetch(p, n * sizeof(uint32_t), svm::Location::kSystem).ok());
  EXPECT_GT(dev_->stats().bytes_to_system, 0u);
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(p[i], uint32_t(i));
}

TEST_F(SvmApiTest, LaunchErrorsNameTheAddressAndReason) {
  Mapping ro(PageSize(), PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS);
  auto* rp = reinterpret_cast<uint32_t*>(ro.data());
  Status st = dev_->Launch(1, [&](KernelContext& k, size_t) { k.Store(rp, 1u); });
  EXPECT_EQ(st.errno_value(), EPERM) << st.ToString();
  EXPECT_NE(st.ToString().find("read-only"), std::string::npos) << st.ToString();

  auto* gp = static_cast<uint32_t*>(UnmappedAddress());
  ASSERT_NE(gp, nullptr);
  st = dev_->Launch(1, [&](KernelContext& k, size_t) { (void)k.Load(gp); });
  EXPECT_EQ(st.errno_value(), EFAULT) << st.ToString();

  alignas(8) char buf[16] = {};
  st = dev_->Launch(1, [&](KernelContext& k, size_t) {
    (void)k.Load(reinterpret_cast<const uint32_t*>(buf + 2));
  });
  EXPECT_EQ(st.errno_value(), EINVAL) << st.ToString();
}

TEST_F(SvmApiTest, DeviceAtomicsAreCoherentWithCpuAtomics) {
  // Given a counter in private memory (it migrates) and one in shared memory (mapped remotely)
  Mapping priv = Mapping::AlignedAnon(2 << 20, 2 << 20);
  Mapping shared(PageSize(), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS);
  auto* pc = reinterpret_cast<uint64_t*>(priv.data());
  auto* sc = reinterpret_cast<uint32_t*>(shared.data());
  constexpr size_t kDevice = 20000, kCpu = 20000;
  // When the device and a CPU thread increment the shared counter at the same time
  std::thread cpu([&] {
    for (size_t i = 0; i < kCpu; ++i) std::atomic_ref<uint32_t>(*sc).fetch_add(1);
  });
  Status st = dev_->Launch(kDevice, [&](KernelContext& k, size_t) {
    k.AtomicAdd(sc, 1u);
    k.AtomicAdd(pc, uint64_t(2));
  });
  cpu.join();
  ASSERT_TRUE(st.ok()) << st.ToString();
  // Then no increment was lost on either side
  EXPECT_EQ(std::atomic_ref<uint32_t>(*sc).load(), kDevice + kCpu);
  EXPECT_EQ(*pc, 2 * kDevice);
  EXPECT_GE(dev_->stats().atomics, 2 * kDevice);
  // Exchange and compare-exchange return the old value
  uint64_t seen[3] = {};
  ASSERT_TRUE(dev_->Launch(1,
                           [&](KernelContext& k, size_t) {
                             seen[0] = k.AtomicExchange(pc, uint64_t(5));
                             seen[1] =
                                 k.AtomicCompareExchange(pc, uint64_t(4), uint64_t(9));  // no match
                             seen[2] =
                                 k.AtomicCompareExchange(pc, uint64_t(5), uint64_t(7));  // match
                           })
                  .ok());
  EXPECT_EQ(seen[0], 2 * kDevice);
  EXPECT_EQ(seen[1], 5u);
  EXPECT_EQ(seen[2], 5u);
  EXPECT_EQ(*pc, 7u);
}

TEST_F(SvmApiTest, AtomicErrorsFailTheLaunch) {
  Mapping ro(PageSize(), PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS);
  auto* rp = reinterpret_cast<uint64_t*>(ro.data());
  Status st = dev_->Launch(1, [&](KernelContext& k, size_t) { k.AtomicAdd(rp, uint64_t(1)); });
  EXPECT_EQ(st.errno_value(), EPERM) << st.ToString();
  alignas(8) char buf[16] = {};
  st = dev_->Launch(
      1, [&](KernelContext& k, size_t) { k.AtomicAdd(reinterpret_cast<uint32_t*>(buf + 2), 1u); });
  EXPECT_EQ(st.errno_value(), EINVAL) << st.ToString();
}

TEST_F(SvmApiTest, StreamRunsInOrderAndFencesCarryResults) {
  auto stream = dev_->CreateStream();
  Mapping m = Mapping::AlignedAnon(2 << 20, 2 << 20);
  auto* p = reinterpret_cast<uint64_t*>(m.data());
  const size_t n = 1000;
  // Three dependent launches, queued without waiting
  svm::Fence f1 = stream->Launch(n, [&](KernelContext& k, size_t i) { k.Store(&p[i], i); });
  svm::Fence f2 =
      stream->Launch(n, [&](KernelContext& k, size_t i) { k.Store(&p[i], k.Load(&p[i]) * 2); });
  svm::Fence f3 = stream->Prefetch(p, n * sizeof(uint64_t), svm::Location::kSystem);
  ASSERT_TRUE(f3.Wait().ok());
  // Then each ran after the one before it
  EXPECT_TRUE(f1.Ready());
  EXPECT_TRUE(f2.Ready());
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(p[i], 2 * i) << i;
  EXPECT_TRUE(stream->Synchronize().ok());
  // A failing operation fails its fence and the next Synchronize, not the operations after it
  Mapping ro(PageSize(), PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS);
  auto* rp = reinterpret_cast<uint64_t*>(ro.data());
  svm::Fence bad = stream->Launch(1, [&](KernelContext& k, size_t) { k.Store(rp, uint64_t(1)); });
  svm::Fence good = stream->Launch(1, [&](KernelContext& k, size_t) { k.Store(&p[0], 99ul); });
  EXPECT_EQ(bad.Wait().errno_value(), EPERM);
  EXPECT_TRUE(good.Wait().ok());
  EXPECT_EQ(p[0], 99u);
  EXPECT_EQ(stream->Synchronize().errno_value(), EPERM);
  EXPECT_TRUE(stream->Synchronize().ok()) << "the error was reported once";
  EXPECT_TRUE(svm::Fence().Ready());
  EXPECT_TRUE(stream->Signal().Wait().ok());
}

TEST_F(SvmApiTest, FenceWaitForTimesOutWhileTheKernelCannotFinish) {
  auto stream = dev_->CreateStream();
  Mapping m(PageSize(), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS);
  auto* gate = reinterpret_cast<uint32_t*>(m.data());
  // The kernel spins until the CPU opens the gate: its fence cannot be signalled before that
  svm::Fence f = stream->Launch(1, [&](KernelContext& k, size_t) {
    while (k.AtomicAdd(gate, 0u) == 0) {
    }
  });
  EXPECT_EQ(f.WaitFor(std::chrono::milliseconds(20)).errno_value(), ETIMEDOUT);
  EXPECT_FALSE(f.Ready());
  std::atomic_ref<uint32_t>(*gate).store(1);
  EXPECT_TRUE(f.Wait().ok());
  EXPECT_TRUE(f.Ready());
}

TEST_F(SvmApiTest, AdviceSteersPlacementAndResidencyReportsIt) {
  Mapping a = Mapping::AlignedAnon(2 << 20, 2 << 20);
  Mapping b = Mapping::AlignedAnon(2 << 20, 2 << 20);
  auto* pa = reinterpret_cast<uint64_t*>(a.data());
  auto* pb = reinterpret_cast<uint64_t*>(b.data());
  const size_t n = (2 << 20) / sizeof(uint64_t);
  EXPECT_EQ(*dev_->QueryResidency(pa, a.size()), svm::Residency::kUnpopulated);
  for (size_t i = 0; i < n; ++i) pa[i] = pb[i] = i;
  EXPECT_EQ(*dev_->QueryResidency(pa, a.size()), svm::Residency::kSystem);
  // b prefers system memory: the device reads it where it is
  ASSERT_TRUE(
      dev_->Advise(pb, b.size(), svm::Advice::kSetPreferredLocation, svm::Location::kSystem).ok());
  uint64_t sum = 0;
  ASSERT_TRUE(dev_->Launch(n,
                           [&](KernelContext& k, size_t i) {
                             k.Store(&pa[i], k.Load(&pa[i]) + 1);
                             if (i % 512 == 0) k.AtomicAdd(&sum, k.Load(&pb[i]));
                           })
                  .ok());
  EXPECT_EQ(*dev_->QueryResidency(pa, a.size()), svm::Residency::kDevice);
  EXPECT_EQ(*dev_->QueryResidency(pb, b.size()), svm::Residency::kSystem);
  uint64_t expect = 0;
  for (size_t i = 0; i < n; i += 512) expect += i;
  EXPECT_EQ(sum, expect);
  // Half of a back on the CPU: mixed
  ASSERT_TRUE(dev_->Prefetch(pa, a.size() / 2, svm::Location::kSystem).ok());
  EXPECT_EQ(*dev_->QueryResidency(pa, a.size()), svm::Residency::kMixed);
  EXPECT_STREQ(svm::ToString(svm::Residency::kMixed), "mixed");
  // Every advice can be set and unset
  for (auto adv :
       {svm::Advice::kSetReadMostly, svm::Advice::kUnsetReadMostly, svm::Advice::kSetAccessedBy,
        svm::Advice::kUnsetAccessedBy, svm::Advice::kUnsetPreferredLocation})
    EXPECT_TRUE(dev_->Advise(pb, b.size(), adv).ok()) << int(adv);
}

TEST_F(SvmApiTest, AdviseAndResidencyErrors) {
  Mapping m(PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  EXPECT_EQ(dev_->Advise(m.data(), 0, svm::Advice::kSetReadMostly).errno_value(), EINVAL);
  EXPECT_EQ(dev_->Advise(m.data(), 8, svm::Advice(42)).errno_value(), EINVAL);
  EXPECT_EQ(dev_->QueryResidency(m.data(), 0).errno_value(), EINVAL);
  void* g = UnmappedAddress();
  ASSERT_NE(g, nullptr);
  EXPECT_EQ(dev_->Advise(g, 8, svm::Advice::kSetReadMostly).errno_value(), EFAULT);
  auto r = dev_->QueryResidency(g, 8);
  EXPECT_EQ(r.errno_value(), EFAULT);
  EXPECT_NE(r.status().ToString().find("not mapped"), std::string::npos);
  EXPECT_EQ(dev_->Prefetch(g, 8, svm::Location::kDevice).errno_value(), EFAULT);
}

TEST(SvmApiOptionsTest, BadOptionsAreEinval) {
  svm::DeviceOptions o;
  o.compute_units = 0;
  EXPECT_EQ(Device::Open(o).status().errno_value(), EINVAL);
  o = {};
  o.prefetch_threshold = 2;
  EXPECT_EQ(Device::Open(o).status().errno_value(), EINVAL);
  // Device memory in a DRM object that cannot be had fails the open: no silent memfd instead.
  o = {};
  o.memory = "gpu-ram";
  EXPECT_EQ(Device::Open(o).status().errno_value(), EINVAL);
  o.memory = "drm:/dev/dri/card-does-not-exist";
  auto missing = Device::Open(o);
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().errno_value(), ENOENT);
  EXPECT_NE(missing.status().message().find("card-does-not-exist"), std::string::npos);
}

TEST(SvmApiCountersTest, HotRemoteMemoryIsPromotedByAccessCounters) {
  svm::DeviceOptions o;
  o.memory_bytes = size_t(16) << 20;
  o.compute_units = 1;
  o.migrate_on_fault = false;  // everything starts remote
  o.access_counter_threshold = 64;
  auto dev = Device::Open(o);
  if (dev.status().errno_value() == ENOTSUP) GTEST_SKIP() << dev.status().ToString();
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  Mapping m = Mapping::AlignedAnon(2 << 20, 2 << 20);
  auto* p = reinterpret_cast<uint64_t*>(m.data());
  for (size_t i = 0; i < 512; ++i) p[i] = i;
  // The kernel keeps reading until its memory is device-resident (the counter thread migrates it
  // asynchronously; no timing is assumed, only that promotion eventually happens)
  Status st = (*dev)->Launch(1, [&](KernelContext& k, size_t) {
    for (size_t round = 0;; ++round) {
      for (size_t i = 0; i < 512; ++i) (void)k.Load(&p[i]);
      if ((*dev)->stats().counter_promotions > 0) return;
    }
  });
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_GE((*dev)->stats().counter_promotions, 1u);
  EXPECT_EQ(*(*dev)->QueryResidency(p, 512 * sizeof(uint64_t)), svm::Residency::kDevice);
  for (size_t i = 0; i < 512; ++i) ASSERT_EQ(p[i], i);
}

}  // namespace
}  // namespace hmmkit::test
