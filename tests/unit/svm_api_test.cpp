// hmmkit::svm::Device on the emulated backend: kernels over malloc'd, stack and mmap'd memory,
// prefetch, and the error paths of a launch.
#include "hmmkit/svm.hpp"

#include <sys/mman.h>

#include <cstdlib>
#include <vector>

#include <gtest/gtest.h>

#include "test_support.hpp"

namespace hmmkit::test {
namespace {

using svm::Device;
using svm::KernelContext;

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

  Mapping gone(PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  auto* gp = reinterpret_cast<uint32_t*>(gone.data());
  gone.Unmap();
  st = dev_->Launch(1, [&](KernelContext& k, size_t) { (void)k.Load(gp); });
  EXPECT_EQ(st.errno_value(), EFAULT) << st.ToString();

  alignas(8) char buf[16] = {};
  st = dev_->Launch(1, [&](KernelContext& k, size_t) {
    (void)k.Load(reinterpret_cast<const uint32_t*>(buf + 2));
  });
  EXPECT_EQ(st.errno_value(), EINVAL) << st.ToString();
}

}  // namespace
}  // namespace hmmkit::test
