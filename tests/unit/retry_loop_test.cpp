// RetryLoop: the read_begin / range_fault / lock / read_retry loop, including the retry when an
// invalidation races between the fault and the lock, and the timeout.
#include <sys/mman.h>

#include <functional>
#include <mutex>

#include <gtest/gtest.h>

#include "hmmkit/mirror/range_fault.hpp"
#include "recording_ops.hpp"
#include "test_support.hpp"

namespace hmmkit::test {
namespace {

using namespace hmm_pfn;

// A driver lock that raises an invalidation of the range the first `races` times it is taken,
// like a munmap landing between range_fault and the lock.
class RacingLock {
 public:
  RacingLock(NotifierTree& tree, uintptr_t s, uintptr_t e, int races)
      : tree_(tree), s_(s), e_(e), races_(races) {}
  void lock() {
    ++locks;
    if (races_ != 0) {
      if (races_ > 0) --races_;
      if (on_race) on_race();
      tree_.Invalidate(NotifierRange{s_, e_, InvalidateEvent::kClear, nullptr});
    }
    mu_.lock();
  }
  void unlock() { mu_.unlock(); }
  int locks = 0;
  std::function<void()> on_race;  // the racing change itself (e.g. an mprotect)

 private:
  NotifierTree& tree_;
  uintptr_t s_, e_;
  int races_;  // -1: always
  std::mutex mu_;
};

class RetryLoopTest : public ::testing::Test {
 protected:
  void SetUp() override {
    as_ = MakeAddressSpace();
    ASSERT_NE(as_, nullptr);
    m_ = Mapping(4 * PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
    ASSERT_TRUE(as_->notifiers().Insert(sub_, m_.addr(), m_.size(), ops_).ok());
    pfns_.assign(4, 0);
    range_.notifier = &sub_;
    range_.start = m_.addr();
    range_.end = m_.end();
    range_.hmm_pfns = pfns_;
    range_.default_flags = kReqFault | kReqWrite;
  }
  void TearDown() override { as_->notifiers().Remove(sub_); }

  std::shared_ptr<AddressSpace> as_;
  Mapping m_;
  RecordingOps ops_;
  IntervalNotifier sub_;
  std::vector<uint64_t> pfns_;
  Range range_;
};

TEST_F(RetryLoopTest, CommitsOnceWithValidEntriesUnderTheLock) {
  std::mutex lock;
  int commits = 0;
  Status st = RetryLoop(*as_, range_, lock, [&](const Range& r) {
    ++commits;
    EXPECT_FALSE(lock.try_lock()) << "commit must run with the driver lock held";
    for (uint64_t e : r.hmm_pfns) EXPECT_TRUE((e & kValid) && (e & kWrite));
    return Status::Ok();
  });
  EXPECT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(commits, 1);
}

TEST_F(RetryLoopTest, AnInvalidationBetweenFaultAndLockForcesARetry) {
  RacingLock lock(as_->notifiers(), m_.addr(), m_.end(), /*races=*/2);
  int commits = 0;
  Status st = RetryLoop(*as_, range_, lock, [&](const Range&) {
    ++commits;
    return Status::Ok();
  });
  EXPECT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(commits, 1);
  EXPECT_EQ(lock.locks, 3) << "two raced attempts, then one that commits";
}

TEST_F(RetryLoopTest, EndlessInvalidationsTimeOut) {
  RacingLock lock(as_->notifiers(), m_.addr(), m_.end(), /*races=*/-1);
  RetryOptions opt;
  opt.timeout = std::chrono::milliseconds(20);
  Status st = RetryLoop(
      *as_, range_, lock, [&](const Range&) { return Status::Ok(); }, opt);
  EXPECT_EQ(st.errno_value(), ETIMEDOUT) << st.ToString();
  EXPECT_GT(lock.locks, 1);
}

TEST_F(RetryLoopTest, HardErrorsReturnWithoutCommitting) {
  ASSERT_EQ(mprotect(m_.data(), m_.size(), PROT_READ), 0);
  std::mutex lock;
  bool committed = false;
  Status st = RetryLoop(*as_, range_, lock, [&](const Range&) {
    committed = true;
    return Status::Ok();
  });
  EXPECT_EQ(st.errno_value(), EPERM);
  EXPECT_FALSE(committed);
}

TEST_F(RetryLoopTest, PerPageRequestsAreRestoredBeforeEachRetry) {
  // Given page 2 written (its first output is VALID|WRITE) but requested with nothing, and a race
  // that makes page 2 read-only: if the retry read that output back as REQ_FAULT|REQ_WRITE, it
  // would fail with EPERM; with the requests restored it succeeds.
  m_.page(2)[0] = 1;
  range_.default_flags = 0;
  range_.pfn_flags_mask = kReqMask;
  pfns_ = {kReqFault | kReqWrite, kReqFault, 0, 0};
  range_.hmm_pfns = pfns_;
  RacingLock lock(as_->notifiers(), m_.addr(), m_.end(), /*races=*/1);
  lock.on_race = [&] { ASSERT_EQ(mprotect(m_.page(2), PageSize(), PROT_READ), 0); };

  Status st = RetryLoop(*as_, range_, lock, [&](const Range&) { return Status::Ok(); });

  EXPECT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(lock.locks, 2);
  EXPECT_TRUE(pfns_[0] & kWrite);
  EXPECT_TRUE(pfns_[1] & kValid);
  EXPECT_TRUE(pfns_[2] & kValid);
  EXPECT_FALSE(pfns_[2] & kWrite);
  EXPECT_EQ(pfns_[3], 0u);
}

}  // namespace
}  // namespace hmmkit::test
