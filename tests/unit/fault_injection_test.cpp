// Fault injection: each site fails where the real failure would happen, and the data and the
// residency afterwards are what they were (the migration rolled back) or what was committed
// (a partial copy back), never a mix the two views disagree on.
#include "hmmkit/base/fault_injection.hpp"

#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

#include <gtest/gtest.h>

#include "hmmkit/svm.hpp"
#include "test_support.hpp"

namespace hmmkit::test {
namespace {

using inject::Plan;
using inject::ScopedPlan;
using inject::Site;
using svm::Device;
using svm::KernelContext;
using svm::Location;
using svm::Residency;

TEST(FaultInjectionPlan, SkipEveryAndCountSelectTheFailingHits) {
  ScopedPlan plan(Site::kUffdMove, Plan{.skip = 2, .every = 3, .count = 2, .error = EEXIST});
  std::vector<int> got;
  for (int i = 0; i < 12; ++i) got.push_back(inject::Check(Site::kUffdMove));
  // Hits 0,1 pass (skip); then hits 2 and 5 fail (every 3rd); count 2 ends it.
  const std::vector<int> want = {0, 0, EEXIST, 0, 0, EEXIST, 0, 0, 0, 0, 0, 0};
  EXPECT_EQ(got, want);
  EXPECT_EQ(inject::Hits(Site::kUffdMove), 12u);
  EXPECT_EQ(inject::Fired(Site::kUffdMove), 2u);
}

TEST(FaultInjectionPlan, DisarmedSitesNeverFireAndDefaultsAreTheSitesOwnErrno) {
  EXPECT_EQ(inject::Check(Site::kDeviceAlloc), 0);
  ScopedPlan plan(Site::kDmaDescriptor, Plan{});
  EXPECT_EQ(inject::Check(Site::kDmaDescriptor), EIO);
  inject::Disarm(Site::kDmaDescriptor);
  EXPECT_EQ(inject::Check(Site::kDmaDescriptor), 0);
}

TEST(FaultInjectionPlan, SpecParsingArmsAndRejectsWithTheReason) {
  ASSERT_TRUE(inject::ArmFromSpec("uffd_register:skip=1:count=1:errno=ENOSPC").ok());
  EXPECT_EQ(inject::Check(Site::kUffdRegister), 0);
  EXPECT_EQ(inject::Check(Site::kUffdRegister), ENOSPC);
  EXPECT_EQ(inject::Check(Site::kUffdRegister), 0);
  inject::Disarm(Site::kUffdRegister);

  Status bad_site = inject::ArmFromSpec("uffd_copi");
  EXPECT_EQ(bad_site.errno_value(), EINVAL);
  EXPECT_NE(bad_site.message().find("uffd_copi"), std::string::npos) << bad_site.ToString();
  Status bad_key = inject::ArmFromSpec("uffd_copy:every=0");
  EXPECT_EQ(bad_key.errno_value(), EINVAL);
  EXPECT_NE(bad_key.message().find("every=0"), std::string::npos) << bad_key.ToString();
  EXPECT_EQ(inject::ArmFromSpec("uffd_copy:errno=ENOTANERRNO").errno_value(), EINVAL);
  EXPECT_EQ(inject::Check(Site::kUffdCopy), 0) << "a rejected spec must arm nothing";
}

// A device with a buffer of known content; each test injects into one path.
class InjectedFailureTest : public ::testing::Test {
 protected:
  static constexpr size_t kPages = 64;

  void SetUp() override {
    svm::DeviceOptions o;
    o.memory_bytes = size_t(16) << 20;
    o.compute_units = 2;
    o.prefetch_threshold = 0;
    auto dev = Device::Open(o);
    if (dev.status().errno_value() == ENOTSUP) GTEST_SKIP() << dev.status().ToString();
    ASSERT_TRUE(dev.ok()) << dev.status().ToString();
    dev_ = std::move(*dev);
    buf_ = Mapping(kPages * PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
    for (size_t i = 0; i < words(); ++i) word(i) = Pattern(i, 1);
  }
  void TearDown() override { inject::DisarmAll(); }

  static uint64_t Pattern(size_t i, uint64_t round) { return (i * 0x9E3779B97F4A7C15ull) ^ round; }
  size_t words() const { return buf_.size() / sizeof(uint64_t); }
  uint64_t& word(size_t i) const { return reinterpret_cast<uint64_t*>(buf_.data())[i]; }
  Residency Where() const {
    auto r = dev_->QueryResidency(buf_.data(), buf_.size());
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? *r : Residency::kUnpopulated;
  }
  // Every word read by the CPU (faulting device pages back) equals Pattern(i, round).
  void ExpectCpuSees(uint64_t round) const {
    size_t bad = 0;
    for (size_t i = 0; i < words(); ++i) bad += word(i) != Pattern(i, round);
    EXPECT_EQ(bad, 0u) << "words differing from round " << round;
  }
  // Every word read by the device equals Pattern(i, round).
  void ExpectDeviceSees(uint64_t round) const {
    std::atomic<size_t> bad{0};
    const uint64_t* p = reinterpret_cast<const uint64_t*>(buf_.data());
    Status st = dev_->Launch(words(), [&](KernelContext& k, size_t i) {
      if (k.Load(&p[i]) != Pattern(i, round)) bad++;
    });
    ASSERT_TRUE(st.ok()) << st.ToString();
    EXPECT_EQ(bad.load(), 0u) << "device reads differing from round " << round;
  }
  // The buffer is private anonymous memory with room on the device: the prefetch must move all of
  // it (it once did not, when the buffer was taken for a malloc arena heap: docs/reliability.md).
  void ToDevice() {
    ASSERT_TRUE(dev_->Prefetch(buf_.data(), buf_.size(), Location::kDevice).ok());
    ASSERT_EQ(Where(), Residency::kDevice);
  }

  std::unique_ptr<Device> dev_;
  Mapping buf_;
};

TEST_F(InjectedFailureTest, DeviceAllocationFailureLeavesThePagesInSystemMemory) {
  {
    // A prefetch is a hint: what cannot migrate is mapped remotely (docs/svm.md).
    ScopedPlan plan(Site::kDeviceAlloc, Plan{});
    Status st = dev_->Prefetch(buf_.data(), buf_.size(), Location::kDevice);
    EXPECT_TRUE(st.ok() || st.errno_value() == ENOMEM) << st.ToString();
    EXPECT_GT(inject::Fired(Site::kDeviceAlloc), 0u);
    EXPECT_EQ(Where(), Residency::kSystem);
  }
  ExpectCpuSees(1);
  ToDevice();  // the site disarmed: the same migration works
  ExpectDeviceSees(1);
}

TEST_F(InjectedFailureTest, DmaFailureRollsBackBothDirections) {
  {
    ScopedPlan plan(Site::kDmaDescriptor, Plan{});
    Status st = dev_->Prefetch(buf_.data(), buf_.size(), Location::kDevice);
    EXPECT_TRUE(st.ok() || st.errno_value() == EIO) << st.ToString();  // mapped remotely
    EXPECT_GT(inject::Fired(Site::kDmaDescriptor), 0u);
    EXPECT_EQ(Where(), Residency::kSystem);
  }
  ExpectCpuSees(1);
  ToDevice();
  {
    ScopedPlan plan(Site::kDmaDescriptor, Plan{});
    Status st = dev_->Prefetch(buf_.data(), buf_.size(), Location::kSystem);
    EXPECT_EQ(st.errno_value(), EIO) << st.ToString();
    EXPECT_EQ(Where(), Residency::kDevice)
        << "a failed copy back must leave the pages on the device";
  }
  ExpectDeviceSees(1);
  ExpectCpuSees(1);  // CPU fault-back, no injection
}

TEST_F(InjectedFailureTest, StagingAllocationFailureKeepsThePagesOnTheDevice) {
  ToDevice();
  {
    ScopedPlan plan(Site::kSystemAlloc, Plan{});
    Status st = dev_->Prefetch(buf_.data(), buf_.size(), Location::kSystem);
    EXPECT_EQ(st.errno_value(), ENOMEM) << st.ToString();
    EXPECT_GT(inject::Fired(Site::kSystemAlloc), 0u);
    EXPECT_EQ(Where(), Residency::kDevice);
  }
  ExpectDeviceSees(1);
  ExpectCpuSees(1);
}

// A UFFDIO_COPY that fails half-way: the pages it put in place are committed (their device
// entries gone), the rest stay on the device. Both views must agree afterwards, also after the
// CPU writes the pages that came back (a kept entry would show the device the old data).
TEST_F(InjectedFailureTest, PartialCopyBackCommitsExactlyThePagesInPlace) {
  ToDevice();
  {
    ScopedPlan plan(Site::kUffdCopy, Plan{.count = 1});
    Status st = dev_->Prefetch(buf_.data(), buf_.size(), Location::kSystem);
    EXPECT_EQ(st.errno_value(), EAGAIN) << st.ToString();
    EXPECT_EQ(inject::Fired(Site::kUffdCopy), 1u);
  }
  EXPECT_EQ(Where(), Residency::kMixed) << "half of the run landed, half stayed";
  ExpectDeviceSees(1);
  // The CPU rewrites everything (faulting back what is still on the device); the device must see
  // the new data on every page.
  for (size_t i = 0; i < words(); ++i) word(i) = Pattern(i, 2);
  ExpectDeviceSees(2);
  ExpectCpuSees(2);
}

// The CPU fault-back path retries transient failures: the faulting thread sees its data, never a
// SIGBUS, as long as a retry succeeds.
TEST_F(InjectedFailureTest, CpuFaultBackRetriesTransientCopyFailures) {
  ToDevice();
  {
    // The last page: each failed attempt lands only the first half of what is left of its
    // fault window, so the faulting page comes back on the fourth attempt.
    ScopedPlan plan(Site::kUffdCopy, Plan{.count = 3});
    EXPECT_EQ(word(words() - 1), Pattern(words() - 1, 1));
    EXPECT_EQ(inject::Fired(Site::kUffdCopy), 3u);
  }
  ExpectCpuSees(1);
  ExpectDeviceSees(1);
}

// fork's prepare handler moves every device page back so that the child gets the data. While the
// mm is changing (an event the monitor has not read yet: a concurrent munmap, a migration's zap)
// the kernel refuses UFFDIO_COPY with EAGAIN; the eviction must retry until the copies land, not
// give up after a few tries and let the child read zeros (seen in the stress run, under load).
TEST_F(InjectedFailureTest, ForkRetriesEvictionsTheKernelRefusesWhileTheMmChanges) {
  if (const char* why = ForkWithMonitorUnavailableReason()) GTEST_SKIP() << why;
  ToDevice();
  pid_t child = -1;
  {
    // Each refused copy lands half of what is left of its run: more refusals than the handler
    // once tried leave pages on the device.
    ScopedPlan plan(Site::kUffdCopy, Plan{.count = 12});
    child = fork();
    if (child == 0) {
      size_t bad = 0;
      for (size_t i = 0; i < words(); ++i) bad += word(i) != Pattern(i, 1);
      _exit(bad == 0 ? 0 : 1);
    }
    EXPECT_EQ(inject::Fired(Site::kUffdCopy), 12u);
  }
  ASSERT_GT(child, 0);
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "the child read lost pages";
  EXPECT_EQ(Where(), Residency::kSystem);
  ExpectCpuSees(1);
}

TEST_F(InjectedFailureTest, MonitorReadErrorsDelayButLoseNoFault) {
  ToDevice();
  {
    ScopedPlan plan(Site::kMonitorRead, Plan{.count = 3});
    ExpectCpuSees(1);
    EXPECT_EQ(inject::Fired(Site::kMonitorRead), 3u);
  }
  EXPECT_NE(Where(), Residency::kDevice);
}

TEST_F(InjectedFailureTest, RegistrationFailureFailsTheMigrationCleanly) {
  {
    ScopedPlan plan(Site::kUffdRegister, Plan{});
    Status st = dev_->Prefetch(buf_.data(), buf_.size(), Location::kDevice);
    EXPECT_FALSE(st.ok());
    EXPECT_GT(inject::Fired(Site::kUffdRegister), 0u);
    EXPECT_NE(Where(), Residency::kDevice);
  }
  ExpectCpuSees(1);
  ToDevice();
  ExpectDeviceSees(1);
  ExpectCpuSees(1);
}

}  // namespace
}  // namespace hmmkit::test
