// Bad input to the mirror layer (AddressSpace, RangeFault, MigrateVma, MakeDeviceExclusive,
// notifiers): ranges that wrap past the top of the address space, and migrations of memory that
// has no readable VMA. Each call must fail with its documented errno and change nothing: the bytes,
// the pages' residency and the notifier tree stay as they were. (Unaligned, empty and reversed
// ranges are covered per API in tests/unit; docs/reliability.md points at them.)
#include <sys/mman.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include <gtest/gtest.h>

#include "hmmkit/mirror/address_space.hpp"
#include "hmmkit/mirror/migrate.hpp"
#include "hmmkit/mirror/range_fault.hpp"
#include "recording_ops.hpp"
#include "test_pagemap.hpp"
#include "test_support.hpp"

namespace hmmkit::test {
namespace {

int owner;

class MirrorBadInputTest : public ::testing::Test {
 protected:
  void SetUp() override {
    as_ = MakeAddressSpace();
    if (as_ == nullptr) return;
    if (as_->monitor() == nullptr) GTEST_SKIP() << "no userfaultfd monitor";
  }
  // A written 4-page private buffer: the bytes every test checks afterwards.
  static Mapping Written() {
    Mapping m(4 * PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
    for (size_t i = 0; i < m.size(); ++i) m.data()[i] = char(i * 7 + 1);
    return m;
  }
  static bool Intact(const Mapping& m) {
    for (size_t i = 0; i < m.size(); ++i)
      if (m.data()[i] != char(i * 7 + 1)) return false;
    return true;
  }
  std::shared_ptr<AddressSpace> as_;
};

// The largest page-aligned address: start + len computed by a caller wraps to a small end.
constexpr uintptr_t kTopPage = ~uintptr_t(0) & ~uintptr_t(0xfff);

TEST_F(MirrorBadInputTest, WrappingRangesAreEinvalAndChangeNothing) {
  ASSERT_NE(as_, nullptr);
  // Given a written buffer, and an end that a caller's start + length wrapped past 2^64
  Mapping m = Written();
  const uintptr_t len = (~uintptr_t(0) - m.addr()) + 1 + 4 * PageSize();
  const uintptr_t wrapped_end = m.addr() + len;  // four pages above 0
  ASSERT_LT(wrapped_end, m.addr());
  std::vector<PageState> states(4);
  // When each entry point gets [start, wrapped_end)
  // Then each refuses with EINVAL
  EXPECT_EQ(as_->Snapshot(m.addr(), wrapped_end, states).errno_value(), EINVAL);
  EXPECT_EQ(as_->Populate(m.addr(), wrapped_end, true).errno_value(), EINVAL);

  RecordingOps ops;
  IntervalNotifier sub;
  EXPECT_EQ(as_->notifiers().Insert(sub, m.addr(), kTopPage, ops).errno_value(), EINVAL);
  EXPECT_FALSE(sub.inserted());
  ASSERT_TRUE(as_->notifiers().Insert(sub, m.addr(), m.size(), ops).ok());
  std::vector<uint64_t> pfns(4, hmm_pfn::kReqFault | hmm_pfn::kReqWrite);
  Range r;
  r.notifier = &sub;
  r.notifier_seq = sub.ReadBegin();
  r.start = m.addr();
  r.end = wrapped_end;
  r.hmm_pfns = pfns;
  EXPECT_EQ(RangeFault(*as_, r).errno_value(), EINVAL);

  TestPagemap pm(8, PageKind::kDevicePrivate, &owner, as_.get());
  std::vector<uint64_t> src(4), dst(4);
  MigrateVma v;
  v.start = m.addr();
  v.end = wrapped_end;
  v.src = src;
  v.dst = dst;
  v.flags = kSelectSystem;
  v.dst_pagemap = &pm;
  v.pgmap_owner = &owner;
  EXPECT_EQ(MigrateVmaSetup(*as_, v).errno_value(), EINVAL);

  std::vector<void*> data(4);
  EXPECT_EQ(MakeDeviceExclusive(*as_, m.addr(), wrapped_end, &owner, data).errno_value(), EINVAL);

  // And nothing changed: the bytes, no device page, no invalidation of the subscription
  EXPECT_TRUE(Intact(m));
  EXPECT_EQ(pm.in_use(), 0u);
  EXPECT_EQ(as_->device_page_count(), 0u);
  EXPECT_EQ(as_->notifiers().size(), 1u);
  EXPECT_FALSE(r.notifier->ReadRetry(r.notifier_seq));
  as_->notifiers().Remove(sub);
}

// MigrateVmaSetup of a range whose pages the CPU cannot read: the kernel collects nothing from a
// PROT_NONE VMA; hmmkit must not move (or read) such pages either.
TEST_F(MirrorBadInputTest, MigrateOfProtNoneOrUnmappedMovesNothing) {
  ASSERT_NE(as_, nullptr);
  // Given a written buffer made PROT_NONE
  Mapping m = Written();
  ASSERT_EQ(mprotect(m.data(), m.size(), PROT_NONE), 0);
  TestPagemap pm(8, PageKind::kDevicePrivate, &owner, as_.get());
  std::vector<uint64_t> src(4), dst(4);
  MigrateVma v;
  v.start = m.addr();
  v.end = m.end();
  v.src = src;
  v.dst = dst;
  v.flags = kSelectSystem;
  v.dst_pagemap = &pm;
  v.pgmap_owner = &owner;
  // When a migration to the device is set up over it
  Status st = MigrateVmaSetup(*as_, v);
  // Then it is refused (EINVAL, as for no VMA) or collects no page
  if (st.ok()) {
    EXPECT_EQ(v.cpages, 0u) << "a PROT_NONE page was collected for migration";
    MigrateVmaFinalize(v);
  } else {
    EXPECT_EQ(st.errno_value(), EINVAL) << st.ToString();
  }
  // And the bytes are where they were
  ASSERT_EQ(mprotect(m.data(), m.size(), PROT_READ), 0);
  EXPECT_TRUE(Intact(m));
  EXPECT_EQ(as_->device_page_count(), 0u);

  // Given an address without a mapping, when a migration is set up there, then EINVAL
  auto* hole = static_cast<char*>(UnmappedAddress());
  ASSERT_NE(hole, nullptr);
  v = MigrateVma{};
  v.start = reinterpret_cast<uintptr_t>(hole);
  v.end = v.start + PageSize();
  v.src = std::span<uint64_t>(src).first(1);
  v.dst = std::span<uint64_t>(dst).first(1);
  v.flags = kSelectSystem;
  v.dst_pagemap = &pm;
  v.pgmap_owner = &owner;
  EXPECT_EQ(MigrateVmaSetup(*as_, v).errno_value(), EINVAL);
  EXPECT_EQ(pm.in_use(), 0u);
}

// make_device_exclusive of read-only memory: it needs a write fault, so EPERM, and the page keeps
// its bytes and stays CPU-accessible.
TEST_F(MirrorBadInputTest, ExclusiveOfReadOnlyIsEpermAndTheCpuKeepsThePage) {
  ASSERT_NE(as_, nullptr);
  Mapping m = Written();
  ASSERT_EQ(mprotect(m.data(), m.size(), PROT_READ), 0);
  std::vector<void*> data(4);
  EXPECT_EQ(MakeDeviceExclusive(*as_, m.addr(), m.end(), &owner, data).errno_value(), EPERM);
  EXPECT_TRUE(Intact(m));
  EXPECT_EQ(as_->device_page_count(), 0u);
}

}  // namespace
}  // namespace hmmkit::test
