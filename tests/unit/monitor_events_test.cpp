// MmMonitor: CPU-side changes of watched ranges become invalidations on the right range, and only
// for overlapping subscriptions. Real memory, real userfaultfd.
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <future>
#include <thread>

#include <gtest/gtest.h>

#include "hmmkit/mirror/address_space.hpp"
#include "hmmkit/mirror/mm_monitor.hpp"
#include "recording_ops.hpp"
#include "test_support.hpp"

namespace hmmkit::test {
namespace {

bool Has(const std::vector<NotifierRange>& seen, InvalidateEvent ev, uintptr_t s, uintptr_t e) {
  for (const auto& r : seen)
    if (r.event == ev && r.start == s && r.end == e) return true;
  return false;
}

class MonitorEvents : public ::testing::Test {
 protected:
  void SetUp() override { Create(AddressSpace::Options{}); }
  void Create(AddressSpace::Options o) {
    as_.reset();
    as_ = MakeAddressSpace(o);
    ASSERT_NE(as_, nullptr);
    if (as_->monitor() == nullptr) GTEST_SKIP() << "no userfaultfd on this machine";
  }
  // Subscribes `ops` over the mapping and makes the monitor watch it.
  void Watch(IntervalNotifier& sub, RecordingOps& ops, const Mapping& m) {
    ASSERT_TRUE(as_->notifiers().Insert(sub, m.addr(), m.size(), ops).ok());
    ASSERT_TRUE(as_->monitor()->EnsureWatched(m.addr(), m.end()).ok());
    ASSERT_TRUE(as_->monitor()->IsWatched(m.addr(), m.end()));
  }
  std::shared_ptr<AddressSpace> as_;
};

TEST_F(MonitorEvents, SyncUnreadDispatchesWhatWasUnmappedAndReportsAQuietMonitor) {
  const size_t pg = PageSize();
  Mapping a(4 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  RecordingOps ops;
  IntervalNotifier sub;
  Watch(sub, ops, a);
  // When part of the range is unmapped and SyncUnread returns true
  ASSERT_EQ(a.UnmapPart(a.page(2), 2 * pg), 0);
  ASSERT_TRUE(as_->monitor()->SyncUnread(std::chrono::milliseconds(1000)));
  // Then the unmap was dispatched already
  EXPECT_TRUE(Has(ops.seen(), InvalidateEvent::kUnmap, a.addr() + 2 * pg, a.end()));
  as_->notifiers().Remove(sub);
}

TEST_F(MonitorEvents, MunmapRaisesUnmapOnTheUnmappedRangeOnly) {
  // Given two watched mappings, each with its own subscription.
  const size_t pg = PageSize();
  Mapping a(4 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  Mapping b(4 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  RecordingOps ops_a, ops_b;
  IntervalNotifier sub_a, sub_b;
  Watch(sub_a, ops_a, a);
  Watch(sub_b, ops_b, b);
  uint64_t seq = sub_a.ReadBegin();

  // When the middle two pages of `a` are unmapped.
  ASSERT_EQ(munmap(a.page(1), 2 * pg), 0);
  as_->monitor()->Sync();

  // Then `a` sees exactly that range as kUnmap, its sequence moved, and `b` sees nothing.
  EXPECT_TRUE(Has(ops_a.seen(), InvalidateEvent::kUnmap, a.addr() + pg, a.addr() + 3 * pg));
  EXPECT_TRUE(sub_a.ReadRetry(seq));
  EXPECT_TRUE(ops_b.seen().empty());
  EXPECT_GE(as_->monitor()->stats().events_unmap, 1u);
  munmap(a.data(), pg);
  munmap(a.page(3), pg);
  a.Release();
}

TEST_F(MonitorEvents, DontneedRaisesClear) {
  const size_t pg = PageSize();
  Mapping a(4 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  memset(a.data(), 1, a.size());
  RecordingOps ops;
  IntervalNotifier sub;
  Watch(sub, ops, a);

  ASSERT_EQ(madvise(a.page(2), pg, MADV_DONTNEED), 0);
  as_->monitor()->Sync();

  auto seen = ops.seen();
  ASSERT_EQ(seen.size(), 1u);
  EXPECT_EQ(seen[0].event, InvalidateEvent::kClear);
  EXPECT_EQ(seen[0].start, a.addr() + 2 * pg);
  EXPECT_EQ(seen[0].end, a.addr() + 3 * pg);
}

TEST_F(MonitorEvents, MremapMoveRaisesUnmapOnTheOldRangeAndKeepsWatchingTheNewOne) {
  const size_t pg = PageSize();
  Mapping a(4 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  Mapping dest(4 * pg, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS);  // a reserved target
  RecordingOps ops;
  IntervalNotifier sub;
  Watch(sub, ops, a);

  const uintptr_t old_start = a.addr(), old_end = a.end();
  void* moved = mremap(a.data(), a.size(), a.size(), MREMAP_MAYMOVE | MREMAP_FIXED, dest.data());
  ASSERT_EQ(moved, dest.data());
  a.Release();
  as_->monitor()->Sync();

  EXPECT_TRUE(Has(ops.seen(), InvalidateEvent::kUnmap, old_start, old_end));
  EXPECT_TRUE(as_->monitor()->IsWatched(dest.addr(), dest.end()));
  EXPECT_GE(as_->monitor()->stats().events_remap, 1u);
}

TEST_F(MonitorEvents, OwnRemovalAnnouncedWithExpectRemoveIsNotReportedAsClear) {
  const size_t pg = PageSize();
  Mapping a(2 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  memset(a.data(), 1, a.size());
  RecordingOps ops;
  IntervalNotifier sub;
  Watch(sub, ops, a);
  const uint64_t filtered_before = as_->monitor()->stats().events_remove_expected;

  uint64_t token = as_->monitor()->ExpectRemove(a.addr(), a.end(), MmMonitor::OwnChange::kZap);
  ASSERT_EQ(madvise(a.data(), a.size(), MADV_DONTNEED), 0);
  as_->monitor()->EndExpect(token);
  as_->monitor()->Sync();

  EXPECT_TRUE(ops.seen().empty());
  EXPECT_EQ(as_->monitor()->stats().events_remove_expected, filtered_before + 1);

  // And an unannounced removal afterwards is reported again.
  ASSERT_EQ(madvise(a.data(), pg, MADV_DONTNEED), 0);
  as_->monitor()->Sync();
  EXPECT_TRUE(Has(ops.seen(), InvalidateEvent::kClear, a.addr(), a.addr() + pg));
}

// An announced zap swallows only its REMOVE event: the application unmapping the same range while
// the zap is announced is the application's change (once swallowed, the range's device pages
// outlived the mapping).
TEST_F(MonitorEvents, UnmapDuringAnAnnouncedZapIsStillReported) {
  const size_t pg = PageSize();
  Mapping a(2 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  memset(a.data(), 1, a.size());
  RecordingOps ops;
  IntervalNotifier sub;
  Watch(sub, ops, a);
  const uintptr_t start = a.addr(), end = a.end();
  const uint64_t token = as_->monitor()->ExpectRemove(start, end, MmMonitor::OwnChange::kZap);
  a.Unmap();
  as_->monitor()->EndExpect(token);
  as_->monitor()->Sync();
  EXPECT_TRUE(Has(ops.seen(), InvalidateEvent::kUnmap, start, end));
}

TEST_F(MonitorEvents, MprotectIsNotSeenWithoutInterposition) {
  // Documented limitation: userfaultfd has no event for mprotect.
  const size_t pg = PageSize();
  Mapping a(2 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  RecordingOps ops;
  IntervalNotifier sub;
  Watch(sub, ops, a);

  ASSERT_EQ(mprotect(a.data(), pg, PROT_READ), 0);
  as_->monitor()->Sync();

  EXPECT_TRUE(ops.seen().empty());
}

TEST_F(MonitorEvents, InterpositionNotifiesMprotectMunmapAndMadviseBeforeTheChange) {
  if (const char* why = InterpositionUnavailableReason()) GTEST_SKIP() << why;
  AddressSpace::Options o;
  o.interpose = true;
  ASSERT_NO_FATAL_FAILURE(Create(o));
  const size_t pg = PageSize();
  Mapping a(4 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  Mapping outside(pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  // Record, inside the callback, what the address space looked like at that moment. Declared
  // before the subscription: the last munmap's userfaultfd event still reaches the callback from
  // the event thread, which must not find these destroyed.
  std::vector<int> prot_at_callback;
  std::vector<bool> mapped_at_callback;
  RecordingOps ops;
  IntervalNotifier sub;
  Watch(sub, ops, a);
  ops.set_before([&](const NotifierRange& r) {
    auto vma = as_->FindVma(r.start);
    mapped_at_callback.push_back(vma.ok() && vma->has_value());
    prot_at_callback.push_back(vma.ok() && vma->has_value() && (*vma)->write ? 1 : 0);
  });

  // mprotect: kProtectionVma, delivered synchronously while the page is still writable.
  ASSERT_EQ(mprotect(a.data(), pg, PROT_READ), 0);
  auto seen = ops.seen();
  ASSERT_EQ(seen.size(), 1u) << "mprotect must notify before it returns";
  EXPECT_EQ(seen[0].event, InvalidateEvent::kProtectionVma);
  EXPECT_EQ(seen[0].start, a.addr());
  EXPECT_EQ(seen[0].end, a.addr() + pg);
  EXPECT_EQ(prot_at_callback[0], 1) << "the callback ran after the change";

  // munmap: kUnmap while the range is still mapped. (Each step drains the monitor first: an
  // interposed munmap/madvise also produces a userfaultfd event, delivered later.)
  as_->monitor()->Sync();
  ops.clear();
  ASSERT_EQ(a.UnmapPart(a.page(3), pg), 0);
  seen = ops.seen();
  ASSERT_FALSE(seen.empty());
  EXPECT_EQ(seen[0].event, InvalidateEvent::kUnmap);
  EXPECT_EQ(seen[0].start, a.addr() + 3 * pg);
  EXPECT_TRUE(mapped_at_callback[1]) << "interposed munmap must notify before unmapping";

  // madvise(DONTNEED): kClear.
  as_->monitor()->Sync();
  ops.clear();
  ASSERT_EQ(madvise(a.page(1), pg, MADV_DONTNEED), 0);
  seen = ops.seen();
  ASSERT_FALSE(seen.empty());
  EXPECT_EQ(seen[0].event, InvalidateEvent::kClear);
  EXPECT_EQ(seen[0].start, a.addr() + pg);

  // A change outside every subscription calls nobody.
  as_->monitor()->Sync();
  ops.clear();
  ASSERT_EQ(mprotect(outside.data(), pg, PROT_READ), 0);
  EXPECT_TRUE(ops.seen().empty());
  EXPECT_GE(as_->monitor()->stats().interposed, 3u);
  munmap(a.data(), 3 * pg);
  a.Release();
  as_->monitor()->Sync();  // its event is dispatched while everything the callback uses lives
}

TEST_F(MonitorEvents, ForkIsCountedAndTheChildKeepsWorking) {
  if (const char* why = ForkWithMonitorUnavailableReason()) GTEST_SKIP() << why;
  const size_t pg = PageSize();
  Mapping a(2 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  a.data()[0] = 42;
  RecordingOps ops;
  IntervalNotifier sub;
  Watch(sub, ops, a);
  const uint64_t gen = AddressSpace::fork_generation();

  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // The child unmaps a range that was watched in the parent: it must not hang.
    a.data()[1] = 1;
    _exit(munmap(a.data(), pg) == 0 && a.data()[pg] == 0 ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  as_->monitor()->Sync();

  EXPECT_GT(AddressSpace::fork_generation(), gen);
  EXPECT_EQ(a.data()[0], 42);
  // The parent's only invalidation is the fork guard's kProtectionPage (its pages are now
  // copy-on-write shared); the child's munmap is not the parent's change.
  for (const NotifierRange& r : ops.seen())
    EXPECT_EQ(r.event, InvalidateEvent::kProtectionPage) << ToString(r.event);
}

TEST_F(MonitorEvents, RegistrationUsesGranulesSoVmasDoNotMultiply) {
  // Given an 8 MiB anonymous mapping.
  const size_t pg = PageSize();
  Mapping big = Mapping::AlignedAnon(8 * kMiB, 2 * kMiB);
  auto before = as_->FindVmas(big.addr(), big.end());
  ASSERT_TRUE(before.ok());
  // When 256 scattered pages inside two granules are watched one by one.
  for (size_t i = 0; i < 256; ++i) {
    uintptr_t p = big.addr() + 2 * kMiB + i * 2 * pg * 2;  // every 4th page of [2 MiB, 4 MiB)
    ASSERT_TRUE(as_->monitor()->EnsureWatched(p, p + pg).ok());
  }
  // Then the whole granules are watched, and the mapping splits into at most 3 VMAs.
  EXPECT_TRUE(as_->monitor()->IsWatched(big.addr() + 2 * kMiB, big.addr() + 4 * kMiB));
  EXPECT_FALSE(as_->monitor()->IsWatched(big.addr(), big.addr() + pg));
  auto after = as_->FindVmas(big.addr(), big.end());
  ASSERT_TRUE(after.ok());
  EXPECT_LE(after->size(), 3u);
  EXPECT_LE(as_->monitor()->stats().registrations, 3u);
}

TEST_F(MonitorEvents, AnUnmappingThreadIsReleasedWhileTheEventThreadWaitsOnItsLock) {
  // BRIEF pitfall 5: thread T holds the driver lock and munmaps; the invalidation of an earlier
  // event needs that lock. The reader must still read T's event, or T and the monitor deadlock.
  const size_t pg = PageSize();
  Mapping a(pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  Mapping b(pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  RecordingOps ops;
  IntervalNotifier sub_a, sub_b;
  Watch(sub_a, ops, a);
  Watch(sub_b, ops, b);
  std::mutex driver;
  std::promise<void> callback_waiting;
  std::atomic<bool> signalled{false};
  ops.set_before([&](const NotifierRange&) {
    if (!signalled.exchange(true)) callback_waiting.set_value();
    std::lock_guard<std::mutex> lock(driver);  // blocks while the test holds `driver`
  });

  std::unique_lock<std::mutex> held(driver);
  ASSERT_EQ(munmap(a.data(), pg), 0);  // event 1: its callback blocks on `driver`
  a.Release();
  callback_waiting.get_future().wait();
  // While the event thread is stuck, a thread holding `driver` unmaps again.
  auto unmapped = std::async(std::launch::async, [&] { return munmap(b.data(), pg); });
  const bool returned = unmapped.wait_for(std::chrono::seconds(20)) == std::future_status::ready;
  held.unlock();
  EXPECT_TRUE(returned) << "munmap blocked behind the event thread: deadlock";
  EXPECT_EQ(unmapped.get(), 0);
  b.Release();
  as_->monitor()->Sync();
  EXPECT_EQ(ops.seen().size(), 2u);
}

TEST(MonitorInterposition, EnvironmentSwitchTurnsItOn) {
  // This binary links libhmmkit_interpose; interpose_missing_test covers a binary without it.
  if (const char* why = InterpositionUnavailableReason()) GTEST_SKIP() << why;
  ScopedEnv env("HMMKIT_INTERPOSE", "1");
  auto as = AddressSpace::Create();
  ASSERT_TRUE(as.ok()) << as.status().ToString();
  EXPECT_TRUE((*as)->options().interpose);
}

}  // namespace
}  // namespace hmmkit::test

namespace hmmkit::test {
namespace {

TEST(MonitorInterposition, RefusedWhenMunmapResolvesElsewhere) {
  // Under ThreadSanitizer the runtime's own munmap comes first: asking for interposition must
  // fail loudly rather than run with hooks that never fire.
  if (InterpositionUnavailableReason() == nullptr)
    GTEST_SKIP() << "munmap resolves to libhmmkit_interpose in this build";
  AddressSpace::Options o;
  o.interpose = true;
  auto as = AddressSpace::Create(o);
  ASSERT_FALSE(as.ok());
  EXPECT_EQ(as.status().errno_value(), ENOTSUP);
  EXPECT_NE(as.status().message().find("resolves elsewhere"), std::string::npos)
      << as.status().ToString();
}

}  // namespace
}  // namespace hmmkit::test
