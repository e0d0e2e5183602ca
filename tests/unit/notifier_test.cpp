// NotifierTree and the interval-notifier sequence protocol (notifier.hpp).
//
// The tests never sleep to order threads. Where a test must know that another thread is blocked
// inside ReadBegin or Remove, it asks Linux (/proc/self/task/<tid>/stat reports 'S' for a thread
// asleep in a futex wait) and then checks, through flags read by the blocked thread itself when it
// returns, that it returned only after the event it waited for.
#include <fcntl.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <iostream>
#include <latch>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "hmmkit/base/mutex.hpp"
#include "hmmkit/mirror/notifier.hpp"

namespace hmmkit {
namespace {

constexpr uintptr_t kMax = std::numeric_limits<uintptr_t>::max();
constexpr uintptr_t kPage = 0x1000;

NotifierRange MakeRange(uintptr_t start, uintptr_t end,
                        InvalidateEvent event = InvalidateEvent::kUnmap) {
  NotifierRange r;
  r.start = start;
  r.end = end;
  r.event = event;
  return r;
}

// Ops that run a function; for tests that need a custom callback.
class FnOps final : public IntervalNotifierOps {
 public:
  using Fn = std::function<void(IntervalNotifier&, const NotifierRange&, uint64_t)>;
  explicit FnOps(Fn fn) : fn_(std::move(fn)) {}
  void Invalidate(IntervalNotifier& sub, const NotifierRange& range, uint64_t cur_seq) override {
    fn_(sub, range, cur_seq);
  }

 private:
  Fn fn_;
};

// Ops that record which subscriptions were called, in call order. Single-threaded use.
class RecordingOps final : public IntervalNotifierOps {
 public:
  void Invalidate(IntervalNotifier& sub, const NotifierRange&, uint64_t) override {
    called.push_back(&sub);
  }
  std::vector<const IntervalNotifier*> called;
};

// The driver side of the protocol: SetSeq under the driver lock that also guards ReadRetry.
class DriverOps final : public IntervalNotifierOps {
 public:
  explicit DriverOps(Mutex& driver_mu) : driver_mu_(driver_mu) {}
  void Invalidate(IntervalNotifier& sub, const NotifierRange&, uint64_t cur_seq) override {
    MutexLock lock(driver_mu_);
    sub.SetSeq(cur_seq);
    last_seq.store(cur_seq);
    calls.fetch_add(1);
  }
  std::atomic<uint64_t> last_seq{0};
  std::atomic<int> calls{0};

 private:
  Mutex& driver_mu_;
};

// The scheduler state letter of thread `tid` of this process ('R', 'S', ...), or '?' when it is
// gone (it may exit while we read: plain read(2), which then fails with ESRCH).
char ThreadState(pid_t tid) {
  const std::string path = "/proc/self/task/" + std::to_string(tid) + "/stat";
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return '?';
  char buf[512];
  const ssize_t n = read(fd, buf, sizeof(buf) - 1);
  close(fd);
  if (n <= 0) return '?';
  const std::string_view stat(buf, size_t(n));
  const size_t paren = stat.rfind(')');  // the command name may contain spaces and parentheses
  if (paren == std::string_view::npos || paren + 2 >= stat.size()) return '?';
  return stat[paren + 2];
}

// Runs `fn` on its own thread. WaitUntilBlocked tells "asleep inside fn" from "fn returned"
// without sleeping: it spins (yielding) until the kernel reports the thread asleep or fn is done.
class BackgroundCall {
 public:
  explicit BackgroundCall(std::function<void()> fn)
      : thread_([this, f = std::move(fn)] {
          tid_.store(gettid());
          f();
          done_.store(true);
        }) {}
  ~BackgroundCall() { Join(); }
  BackgroundCall(const BackgroundCall&) = delete;
  BackgroundCall& operator=(const BackgroundCall&) = delete;

  // True when the thread is asleep and fn has not returned; false when fn returned first.
  bool WaitUntilBlocked() {
    for (;;) {
      if (done_.load()) return false;
      const pid_t tid = tid_.load();
      if (tid != 0 && ThreadState(tid) == 'S') return !done_.load();
      std::this_thread::yield();
    }
  }
  bool done() const { return done_.load(); }
  void Join() {
    if (thread_.joinable()) thread_.join();
  }

 private:
  std::atomic<pid_t> tid_{0};
  std::atomic<bool> done_{false};
  std::thread thread_;  // last: starts after the flags exist
};

// ---- 1. The tree against a brute-force model
// ------------------------------------------------------

struct ModelSub {
  bool inserted = false;
  uintptr_t start = 0;
  uintptr_t end = 0;
  uint64_t order = 0;  // insertion order: the tree's tie-break between equal starts
};

// A random non-empty interval [start, start + length) that does not overflow. Mixes small
// intervals in a dense window, many equal starts, huge intervals, and intervals at the top of
// the address space.
std::pair<uintptr_t, size_t> RandomInterval(std::mt19937_64& rng) {
  const uint64_t kind = rng() % 8;
  uintptr_t start = 0;
  size_t length = 0;
  switch (kind) {
    case 0:  // equal starts on a coarse grid
      start = (rng() % 64) << 16;
      length = 1 + rng() % (1 << 18);
      break;
    case 1:  // huge
      start = rng() % (1 << 24);
      length = 1 + rng() % (kMax - start);
      break;
    case 2:  // at the top of the address space, sometimes ending exactly at kMax
      start = kMax - 1 - rng() % (1 << 20);
      length = (rng() % 2 == 0) ? kMax - start : 1 + rng() % (kMax - start);
      break;
    default:  // small, dense
      start = rng() % (1 << 24);
      length = 1 + rng() % (1 << 16);
      break;
  }
  return {start, length};
}

// A random non-empty query range, sometimes the whole address space, often touching an inserted
// subscription exactly at its start or end (the half-open boundaries).
NotifierRange RandomQuery(std::mt19937_64& rng, const std::vector<ModelSub>& model) {
  const ModelSub& near = model[rng() % model.size()];
  switch (rng() % 8) {
    case 6:  // ends exactly where `near` starts (does not overlap it), or one byte later
      if (near.inserted && near.start > 0) {
        const uintptr_t e = near.start + rng() % 2;
        return MakeRange(e - 1 - rng() % std::min<uintptr_t>(e, 1 << 16), e);
      }
      return MakeRange(0, kMax);
    case 7:  // starts exactly where `near` ends (does not overlap it), or one byte earlier
      if (near.inserted && near.end < kMax) {
        const uintptr_t b = near.end - rng() % 2;
        return MakeRange(b, b + 1 + rng() % std::min<uintptr_t>(kMax - b, 1 << 16));
      }
      return MakeRange(0, kMax);
    case 0:
      return MakeRange(0, kMax);
    case 1: {
      const uintptr_t s = kMax - 1 - rng() % (1 << 21);
      return MakeRange(s, s + 1 + rng() % (kMax - s));
    }
    default: {
      const uintptr_t s = rng() % (1 << 24);
      return MakeRange(s, s + 1 + rng() % (1 << 18));
    }
  }
}

TEST(NotifierTreeTest, InvalidateCallsExactlyTheOverlappingSubsInAddressOrder) {
  for (const uint64_t seed : {1u, 2u, 3u}) {
    SCOPED_TRACE("seed " + std::to_string(seed));
    // Given: a pool of subscriptions randomly inserted and removed, mirrored in a plain model.
    constexpr size_t kPool = 2000;
    constexpr int kOps = 20000;
    NotifierTree tree;
    RecordingOps ops;
    std::unique_ptr<IntervalNotifier[]> pool(new IntervalNotifier[kPool]);
    std::vector<ModelSub> model(kPool);
    uint64_t next_order = 0;
    size_t inserted = 0;
    std::mt19937_64 rng(seed);
    auto index_of = [&](const IntervalNotifier* sub) { return size_t(sub - pool.get()); };

    for (int op = 0; op < kOps; ++op) {
      const size_t i = rng() % kPool;
      if (model[i].inserted) {
        tree.Remove(pool[i]);
        ASSERT_FALSE(pool[i].inserted());
        model[i].inserted = false;
        --inserted;
      } else {
        const auto [start, length] = RandomInterval(rng);
        ASSERT_TRUE(tree.Insert(pool[i], start, length, ops).ok());
        model[i] = ModelSub{true, start, start + length, next_order++};
        ++inserted;
      }
      if (op % 10 != 0) continue;

      // When: an invalidation over a random range is raised.
      const NotifierRange q = RandomQuery(rng, model);
      ops.called.clear();
      const size_t n = tree.Invalidate(q);

      // Then: the subscriptions called are exactly the overlapping ones, in (start, insertion)
      // order, and the count returned matches.
      std::vector<size_t> expected;
      for (size_t k = 0; k < kPool; ++k) {
        if (model[k].inserted && model[k].start < q.end && model[k].end > q.start) {
          expected.push_back(k);
        }
      }
      std::sort(expected.begin(), expected.end(), [&](size_t a, size_t b) {
        return std::pair(model[a].start, model[a].order) <
               std::pair(model[b].start, model[b].order);
      });
      std::vector<size_t> got;
      for (const IntervalNotifier* sub : ops.called) got.push_back(index_of(sub));
      ASSERT_EQ(got, expected) << "query [" << q.start << ", " << q.end << ") at op " << op;
      ASSERT_EQ(n, expected.size());
      ASSERT_EQ(tree.size(), inserted);
      ASSERT_EQ(tree.seq() % 2, 0u) << "idle tree must have an even sequence";
    }
  }
}

// ---- 2. An invalidation during a fault forces a retry
// --------------------------------------------

TEST(NotifierProtocolTest, OverlappingInvalidationDuringAFaultForcesRetry) {
  // Given: a subscription over [0x100000, 0x108000) and a driver lock pairing SetSeq/ReadRetry.
  NotifierTree tree;
  Mutex driver_mu;
  DriverOps ops(driver_mu);
  IntervalNotifier sub;
  ASSERT_TRUE(tree.Insert(sub, 0x100000, 0x8000, ops).ok());
  const uint64_t seq = sub.ReadBegin();

  // When: invalidations touch only the neighbours of the range (half-open ends).
  EXPECT_EQ(tree.Invalidate(MakeRange(0x108000, 0x110000)), 0u);
  EXPECT_EQ(tree.Invalidate(MakeRange(0xf0000, 0x100000)), 0u);
  // Then: the fault may commit.
  {
    MutexLock lock(driver_mu);
    EXPECT_FALSE(sub.ReadRetry(seq));
  }

  // When: an invalidation overlaps the last page, while the "fault" is in progress.
  EXPECT_EQ(tree.Invalidate(MakeRange(0x107000, 0x109000, InvalidateEvent::kClear)), 1u);
  // Then: the callback got an odd sequence and the fault must retry.
  EXPECT_EQ(ops.last_seq.load() % 2, 1u);
  {
    MutexLock lock(driver_mu);
    EXPECT_TRUE(sub.ReadRetry(seq));
  }

  // When: the driver retries.
  const uint64_t again = sub.ReadBegin();
  // Then: the new sequence passes, and the tree is idle with its sequence advanced once per
  // invalidation (2 -> odd -> even, three times).
  {
    MutexLock lock(driver_mu);
    EXPECT_FALSE(sub.ReadRetry(again));
  }
  EXPECT_NE(again, seq);
  EXPECT_EQ(tree.seq(), 2u + 2 * 3);
  EXPECT_EQ(tree.invalidations(), 3u);
  EXPECT_EQ(ops.calls.load(), 1);
}

TEST(NotifierProtocolTest, CallbackReceivesTheRangeUnclippedAndTheRunningSequence) {
  // Given: a subscription over [0x2000, 0x3000).
  NotifierTree tree;
  NotifierRange seen;
  uint64_t seen_seq = 0;
  uint64_t tree_seq_inside = 0;
  FnOps ops([&](IntervalNotifier&, const NotifierRange& r, uint64_t cur_seq) {
    seen = r;
    seen_seq = cur_seq;
    tree_seq_inside = tree.seq();
  });
  IntervalNotifier sub;
  ASSERT_TRUE(tree.Insert(sub, 0x2000, 0x1000, ops).ok());
  int owner_token = 0;
  NotifierRange r = MakeRange(0x1000, 0x8000, InvalidateEvent::kMigrate);
  r.owner = &owner_token;

  // When: a migration range larger than the subscription is invalidated.
  ASSERT_EQ(tree.Invalidate(r), 1u);

  // Then: the callback saw the whole range, its event and owner, and cur_seq is the tree's
  // (odd) sequence while the invalidation ran.
  EXPECT_EQ(seen.start, 0x1000u);
  EXPECT_EQ(seen.end, 0x8000u);
  EXPECT_EQ(seen.event, InvalidateEvent::kMigrate);
  EXPECT_EQ(seen.owner, &owner_token);
  EXPECT_EQ(seen_seq % 2, 1u);
  EXPECT_EQ(seen_seq, tree_seq_inside);
  EXPECT_EQ(tree.seq(), seen_seq + 1);
}

// ---- 3. ReadBegin waits for an in-flight invalidation that hit the subscription
// --------------------

TEST(NotifierProtocolTest, ReadBeginWaitsUntilAnInvalidationThatHitTheSubEnds) {
  // Given: a subscription, and a two-phase invalidation that has called it and not ended.
  NotifierTree tree;
  Mutex driver_mu;
  DriverOps ops(driver_mu);
  IntervalNotifier sub;
  IntervalNotifier bystander;  // not covered by the invalidation
  ASSERT_TRUE(tree.Insert(sub, 0x10000, 0x4000, ops).ok());
  ASSERT_TRUE(tree.Insert(bystander, 0x80000, 0x1000, ops).ok());
  auto scope = std::make_unique<NotifierTree::Scope>(tree, MakeRange(0x11000, 0x12000));
  ASSERT_EQ(scope->called(), 1u);
  ASSERT_EQ(tree.seq() % 2, 1u);

  // When: a bystander calls ReadBegin.
  // Then: it does not wait: the invalidation never called it.
  {
    BackgroundCall other([&] { (void)bystander.ReadBegin(); });
    EXPECT_FALSE(other.WaitUntilBlocked()) << "ReadBegin of an untouched sub blocked";
  }

  // When: another thread calls ReadBegin on the invalidated sub.
  std::atomic<bool> scope_ended{false};
  uint64_t seq = 0;
  bool ended_at_return = false;
  uint64_t tree_seq_at_return = 0;
  BackgroundCall reader([&] {
    seq = sub.ReadBegin();
    ended_at_return = scope_ended.load();
    tree_seq_at_return = tree.seq();
  });
  // Then: it blocks while the scope lives.
  EXPECT_TRUE(reader.WaitUntilBlocked());
  EXPECT_FALSE(reader.done());

  // When: the invalidation ends.
  scope_ended.store(true);
  scope.reset();
  reader.Join();

  // Then: ReadBegin returned after the end, the tree was idle then, and the sequence it returned
  // passes ReadRetry.
  EXPECT_TRUE(ended_at_return);
  EXPECT_EQ(tree_seq_at_return % 2, 0u);
  MutexLock lock(driver_mu);
  EXPECT_FALSE(sub.ReadRetry(seq));
}

// ---- 4. A subscription inserted during an invalidation starts invalidated
// ------------------------

TEST(NotifierProtocolTest, SubInsertedDuringAnInvalidationWaitsForItsEnd) {
  // Given: a running two-phase invalidation (over a range nobody subscribed to).
  NotifierTree tree;
  Mutex driver_mu;
  DriverOps ops(driver_mu);
  auto scope = std::make_unique<NotifierTree::Scope>(tree, MakeRange(0, 0x100000));
  ASSERT_EQ(scope->called(), 0u);

  // When: a subscription is inserted (even outside that range).
  IntervalNotifier sub;
  ASSERT_TRUE(tree.Insert(sub, 0x200000, 0x1000, ops).ok());

  // Then: its sequence is the running one, and its ReadBegin waits until the invalidation ends.
  EXPECT_FALSE(sub.ReadRetry(tree.seq()));
  EXPECT_EQ(tree.seq() % 2, 1u);
  std::atomic<bool> scope_ended{false};
  uint64_t seq = 0;
  bool ended_at_return = false;
  BackgroundCall reader([&] {
    seq = sub.ReadBegin();
    ended_at_return = scope_ended.load();
  });
  EXPECT_TRUE(reader.WaitUntilBlocked());
  scope_ended.store(true);
  scope.reset();
  reader.Join();
  EXPECT_TRUE(ended_at_return);
  MutexLock lock(driver_mu);
  EXPECT_FALSE(sub.ReadRetry(seq));
}

TEST(NotifierProtocolTest, InsertFromInsideACallbackStartsInvalidated) {
  // Given: a subscription whose callback inserts a second one.
  NotifierTree tree;
  Mutex driver_mu;
  DriverOps late_ops(driver_mu);
  IntervalNotifier late;
  bool late_invalidated_inside = false;
  FnOps ops([&](IntervalNotifier&, const NotifierRange&, uint64_t cur_seq) {
    ASSERT_TRUE(tree.Insert(late, 0x900000, 0x1000, late_ops).ok());
    late_invalidated_inside = !late.ReadRetry(cur_seq);  // its sequence is the running one
  });
  IntervalNotifier first;
  ASSERT_TRUE(tree.Insert(first, 0x1000, 0x1000, ops).ok());

  // When: an invalidation calls the first one.
  EXPECT_EQ(tree.Invalidate(MakeRange(0, 0x2000)), 1u);

  // Then: the insert did not deadlock, started invalidated, and once the invalidation is over a
  // fresh ReadBegin returns at once with a sequence that passes.
  EXPECT_TRUE(late_invalidated_inside);
  EXPECT_TRUE(late.inserted());
  EXPECT_EQ(tree.size(), 2u);
  const uint64_t seq = late.ReadBegin();
  MutexLock lock(driver_mu);
  EXPECT_FALSE(late.ReadRetry(seq));
}

// ---- 5. Concurrency stress with a checked invariant
// -----------------------------------------------

// A toy driver over kPages CPU pages. Each page has a CPU generation that changes only inside an
// invalidation (between the callbacks and the end of the Scope), the way page tables change
// between invalidate_range_start and _end. Readers run the full retry protocol and copy
// generations into a device page table; a commit of a generation that is no longer the CPU's is
// stale data and is counted.
class StressDriver {
 public:
  static constexpr size_t kPages = 64;
  static constexpr uintptr_t kBase = 0x40000000;
  static constexpr uint64_t kUnmapped = ~uint64_t(0);

  struct Sub {
    size_t first = 0;  // pages [first, last)
    size_t last = 0;
    std::unique_ptr<FnOps> ops;  // before notifier: outlives it
    IntervalNotifier notifier;
    std::vector<uint64_t> device;  // per page of the sub: mapped generation; guarded by mu
  };

  explicit StressDriver(NotifierTree& tree) : tree_(tree) {
    // Overlapping windows, two with equal starts, one covering everything.
    const std::vector<std::pair<size_t, size_t>> layout = {{0, 16},  {8, 24},  {16, 32}, {24, 40},
                                                           {32, 48}, {40, 56}, {48, 64}, {0, 64},
                                                           {20, 21}, {20, 30}};
    for (const auto& [first, last] : layout) {
      auto s = std::make_unique<Sub>();
      s->first = first;
      s->last = last;
      s->device.assign(last - first, kUnmapped);
      Sub* raw = s.get();
      s->ops = std::make_unique<FnOps>(
          [this, raw](IntervalNotifier& n, const NotifierRange& r, uint64_t cur_seq) {
            Invalidate(*raw, n, r, cur_seq);
          });
      subs_.push_back(std::move(s));
    }
    for (auto& s : subs_) {
      EXPECT_TRUE(
          tree_.Insert(s->notifier, Addr(s->first), (s->last - s->first) * kPage, *s->ops).ok());
    }
  }

  static uintptr_t Addr(size_t page) { return kBase + page * kPage; }
  size_t sub_count() const { return subs_.size(); }

  // One fault of sub i with the full retry protocol. Returns the number of retries.
  uint64_t Fault(size_t i) {
    Sub& s = *subs_[i];
    std::vector<uint64_t> snapshot(s.last - s.first);
    for (uint64_t retries = 0;; ++retries) {
      const uint64_t seq = s.notifier.ReadBegin();
      for (size_t p = s.first; p < s.last; ++p) {  // "range_fault": no driver lock held
        snapshot[p - s.first] = cpu_gen_[p].load();
        if (p % 8 == 0) std::this_thread::yield();
      }
      MutexLock lock(mu_);
      if (s.notifier.ReadRetry(seq)) continue;
      for (size_t p = s.first; p < s.last; ++p) {
        if (snapshot[p - s.first] != cpu_gen_[p].load()) stale_commits_.fetch_add(1);
        s.device[p - s.first] = snapshot[p - s.first];
      }
      commits_.fetch_add(1);
      return retries;
    }
  }

  // One CPU-side change of pages [first, last): start, check the device let go, change, end.
  void Change(size_t first, size_t last) {
    NotifierTree::Scope scope(tree_, MakeRange(Addr(first), Addr(last)));
    {
      MutexLock lock(mu_);
      for (auto& s : subs_) {
        for (size_t p = std::max(first, s->first); p < std::min(last, s->last); ++p) {
          if (s->device[p - s->first] != kUnmapped) still_mapped_.fetch_add(1);
        }
      }
    }
    for (size_t p = first; p < last; ++p) cpu_gen_[p].fetch_add(1);
  }

  uint64_t stale_commits() const { return stale_commits_.load(); }
  uint64_t still_mapped() const { return still_mapped_.load(); }
  uint64_t commits() const { return commits_.load(); }

 private:
  void Invalidate(Sub& s, IntervalNotifier& n, const NotifierRange& r, uint64_t cur_seq) {
    MutexLock lock(mu_);
    n.SetSeq(cur_seq);
    for (size_t p = s.first; p < s.last; ++p) {
      if (Addr(p) < r.end && Addr(p) + kPage > r.start) s.device[p - s.first] = kUnmapped;
    }
  }

  NotifierTree& tree_;
  Mutex mu_;  // the driver lock
  std::vector<std::unique_ptr<Sub>> subs_;
  std::array<std::atomic<uint64_t>, kPages> cpu_gen_{};
  std::atomic<uint64_t> stale_commits_{0};
  std::atomic<uint64_t> still_mapped_{0};
  std::atomic<uint64_t> commits_{0};
};

TEST(NotifierStressTest, RetryProtocolNeverCommitsStaleDataUnderConcurrentInvalidations) {
  // Given: a toy driver with overlapping subscriptions; 4 fault threads, 2 invalidating threads
  // (two-phase changes plus plain invalidations), and 1 thread inserting and removing
  // short-lived subscriptions.
  constexpr int kReaders = 4;
  constexpr int kInvalidators = 2;
  constexpr uint64_t kCommitsPerReader = 1500;
  constexpr uint64_t kMinRetries = 100;
  constexpr uint64_t kMaxAttempts = 2000000;  // bound: the test fails rather than spins forever
  NotifierTree tree;
  StressDriver driver(tree);
  std::atomic<uint64_t> retries{0};
  std::atomic<uint64_t> attempts{0};
  std::atomic<int> readers_left{kReaders};
  std::atomic<uint64_t> churn_violations{0};
  std::atomic<uint64_t> churn_calls{0};

  // When: they all run until every reader committed its quota and enough retries happened.
  std::vector<std::thread> threads;
  for (int t = 0; t < kReaders; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(100 + t);
      uint64_t mine = 0;
      while ((mine < kCommitsPerReader || retries.load() < kMinRetries) &&
             attempts.load() < kMaxAttempts) {
        const uint64_t r = driver.Fault(rng() % driver.sub_count());
        retries.fetch_add(r);
        attempts.fetch_add(r + 1);
        ++mine;
      }
      readers_left.fetch_sub(1);
    });
  }
  for (int t = 0; t < kInvalidators; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(200 + t);
      for (uint64_t n = 0; readers_left.load() > 0; ++n) {
        // Pacing, not timing: let the readers commit between two of our invalidations. Back to
        // back invalidations would keep the sequence odd and starve every ReadBegin (as in the
        // kernel).
        const uint64_t commits_before = driver.commits();
        while (driver.commits() < commits_before + 2 && readers_left.load() > 0) {
          std::this_thread::yield();
        }
        const size_t first = rng() % StressDriver::kPages;
        const size_t last = first + 1 + rng() % (StressDriver::kPages - first);
        if (n % 4 == 3) {
          // A change with no data effect (write-protect): invalidates, bumps nothing.
          tree.Invalidate(MakeRange(StressDriver::Addr(first), StressDriver::Addr(last),
                                    InvalidateEvent::kProtectionPage));
        } else {
          driver.Change(first, last);
        }
      }
    });
  }
  threads.emplace_back([&] {
    std::mt19937_64 rng(300);
    while (readers_left.load() > 0) {
      std::atomic<int> running{0};
      FnOps ops([&](IntervalNotifier&, const NotifierRange&, uint64_t) {
        running.fetch_add(1);
        churn_calls.fetch_add(1);
        std::this_thread::yield();
        running.fetch_sub(1);
      });
      auto sub = std::make_unique<IntervalNotifier>();
      const size_t first = rng() % StressDriver::kPages;
      EXPECT_TRUE(tree.Insert(*sub, StressDriver::Addr(first), kPage * (1 + rng() % 8), ops).ok());
      std::this_thread::yield();
      tree.Remove(*sub);
      // Remove returned: the callback is not running and will not run again.
      if (running.load() != 0) churn_violations.fetch_add(1);
      sub.reset();  // freed while other threads keep walking the tree (ASan checks no use)
    }
  });
  for (auto& th : threads) th.join();

  // Then: no stale commit, no device mapping survived an invalidation's callbacks, no callback
  // ran after Remove; and the run really raced: many commits and many retries.
  EXPECT_EQ(driver.stale_commits(), 0u);
  EXPECT_EQ(driver.still_mapped(), 0u);
  EXPECT_EQ(churn_violations.load(), 0u);
  EXPECT_LT(attempts.load(), kMaxAttempts);
  EXPECT_GE(driver.commits(), kReaders * kCommitsPerReader);
  EXPECT_GE(retries.load(), kMinRetries);
  EXPECT_EQ(tree.size(), driver.sub_count());
  EXPECT_EQ(tree.seq() % 2, 0u);
  std::cout << "commits " << driver.commits() << ", retries " << retries.load() << ", churn calls "
            << churn_calls.load() << "\n";
}

// ---- 6. Removal from callbacks and from other threads
// ---------------------------------------------

TEST(NotifierRemoveTest, SubMayRemoveAndDeleteItselfInsideItsCallback) {
  // Given: a heap-allocated subscription whose callback removes and deletes it, and a later one.
  NotifierTree tree;
  std::vector<int> order;
  bool removed_inside = false;
  FnOps doomed_ops([&](IntervalNotifier& sub, const NotifierRange&, uint64_t) {
    order.push_back(1);
    tree.Remove(sub);  // returns at once: the running callback is the caller
    removed_inside = !sub.inserted();
    delete &sub;  // the walk must never touch it again (ASan build checks this)
  });
  FnOps after_ops([&](IntervalNotifier&, const NotifierRange&, uint64_t) { order.push_back(2); });
  auto* doomed = new IntervalNotifier;
  IntervalNotifier after;
  ASSERT_TRUE(tree.Insert(*doomed, 0x1000, 0x2000, doomed_ops).ok());
  ASSERT_TRUE(tree.Insert(after, 0x2000, 0x2000, after_ops).ok());

  // When: an invalidation covers both.
  const size_t n = tree.Invalidate(MakeRange(0, 0x10000));

  // Then: both were called in order, the first is gone, the walk went on to the second.
  EXPECT_EQ(n, 2u);
  EXPECT_EQ(order, (std::vector<int>{1, 2}));
  EXPECT_TRUE(removed_inside);
  EXPECT_EQ(tree.size(), 1u);
  EXPECT_EQ(tree.seq() % 2, 0u);

  // When/then: the next invalidation calls only the survivor.
  EXPECT_EQ(tree.Invalidate(MakeRange(0, 0x10000)), 1u);
  EXPECT_EQ(order, (std::vector<int>{1, 2, 2}));
}

TEST(NotifierRemoveTest, SubRemovedByAnEarlierCallbackIsNotCalled) {
  // Given: A < B < C in address order; A's callback removes C, which the walk has not reached.
  NotifierTree tree;
  std::vector<char> order;
  IntervalNotifier a, b, c;
  FnOps a_ops([&](IntervalNotifier&, const NotifierRange&, uint64_t) {
    order.push_back('a');
    tree.Remove(c);
  });
  FnOps b_ops([&](IntervalNotifier&, const NotifierRange&, uint64_t) { order.push_back('b'); });
  FnOps c_ops([&](IntervalNotifier&, const NotifierRange&, uint64_t) { order.push_back('c'); });
  ASSERT_TRUE(tree.Insert(a, 0x1000, 0x1000, a_ops).ok());
  ASSERT_TRUE(tree.Insert(b, 0x3000, 0x1000, b_ops).ok());
  ASSERT_TRUE(tree.Insert(c, 0x5000, 0x1000, c_ops).ok());

  // When: an invalidation covers all three.
  const size_t n = tree.Invalidate(MakeRange(0, 0x10000));

  // Then: C was never called and is no longer inserted.
  EXPECT_EQ(n, 2u);
  EXPECT_EQ(order, (std::vector<char>{'a', 'b'}));
  EXPECT_FALSE(c.inserted());
  EXPECT_EQ(tree.size(), 2u);
}

TEST(NotifierRemoveTest, RemoveFromAnotherThreadWaitsForTheRunningCallback) {
  // Given: a callback that blocks until released, running on an invalidating thread.
  NotifierTree tree;
  std::latch entered(1);
  std::latch release(1);
  std::atomic<bool> callback_done{false};
  FnOps ops([&](IntervalNotifier&, const NotifierRange&, uint64_t) {
    entered.count_down();
    release.wait();
    callback_done.store(true);
  });
  IntervalNotifier sub;
  ASSERT_TRUE(tree.Insert(sub, 0x1000, 0x1000, ops).ok());
  size_t called = 0;
  std::thread invalidator([&] { called = tree.Invalidate(MakeRange(0x1000, 0x2000)); });
  entered.wait();

  // When: another thread removes the subscription.
  bool done_at_return = false;
  BackgroundCall remover([&] {
    tree.Remove(sub);
    done_at_return = callback_done.load();
  });

  // Then: Remove blocks while the callback runs, and returns only after it returned.
  EXPECT_TRUE(remover.WaitUntilBlocked());
  EXPECT_FALSE(remover.done());
  EXPECT_EQ(tree.size(), 0u) << "unlinked at once, even while waiting";
  release.count_down();
  remover.Join();
  invalidator.join();
  EXPECT_TRUE(done_at_return);
  EXPECT_FALSE(sub.inserted());
  EXPECT_EQ(called, 1u);
}

// ---- 7. Insert errors and lifetimes
// ---------------------------------------------------------------

TEST(NotifierTreeTest, InsertRejectsEmptyOverflowingAndDuplicateSubscriptions) {
  // Given: a tree and one subscription inserted over [0x1000, 0x2000).
  NotifierTree tree;
  NotifierTree other;
  RecordingOps ops;
  IntervalNotifier sub;
  ASSERT_TRUE(tree.Insert(sub, 0x1000, 0x1000, ops).ok());

  // When/then: a second insert, into the same or another tree, is EINVAL and changes nothing.
  Status again = tree.Insert(sub, 0x5000, 0x1000, ops);
  EXPECT_EQ(again.errno_value(), EINVAL);
  EXPECT_EQ(other.Insert(sub, 0x5000, 0x1000, ops).errno_value(), EINVAL);
  EXPECT_EQ(sub.start(), 0x1000u);
  EXPECT_EQ(sub.end(), 0x2000u);
  EXPECT_EQ(tree.size(), 1u);
  EXPECT_EQ(other.size(), 0u);

  // When/then: an empty range is EINVAL.
  IntervalNotifier fresh;
  EXPECT_EQ(tree.Insert(fresh, 0x1000, 0, ops).errno_value(), EINVAL);
  EXPECT_FALSE(fresh.inserted());

  // When/then: a range past the top of the address space is EINVAL; one ending exactly at the
  // largest address is fine.
  EXPECT_EQ(tree.Insert(fresh, kMax - 0xfff, 0x1000, ops).errno_value(), EINVAL);
  EXPECT_EQ(tree.Insert(fresh, 1, kMax, ops).errno_value(), EINVAL);
  EXPECT_FALSE(fresh.inserted());
  ASSERT_TRUE(tree.Insert(fresh, kMax - 0xfff, 0xfff, ops).ok());
  EXPECT_EQ(fresh.end(), kMax);
  EXPECT_EQ(tree.Invalidate(MakeRange(kMax - 1, kMax)), 1u);
  EXPECT_EQ(tree.size(), 2u);
}

TEST(NotifierTreeTest, DestroyingAnInsertedNotifierRemovesIt) {
  // Given: two subscriptions, one of them scoped.
  NotifierTree tree;
  RecordingOps ops;
  IntervalNotifier kept;
  ASSERT_TRUE(tree.Insert(kept, 0x1000, 0x1000, ops).ok());
  {
    IntervalNotifier scoped;
    ASSERT_TRUE(tree.Insert(scoped, 0x1000, 0x1000, ops).ok());
    EXPECT_EQ(tree.size(), 2u);
  }
  // When: the scoped one was destroyed.
  // Then: the tree forgot it: the size dropped and an invalidation calls only the other one.
  EXPECT_EQ(tree.size(), 1u);
  EXPECT_EQ(tree.Invalidate(MakeRange(0, 0x10000)), 1u);
  EXPECT_EQ(ops.called, (std::vector<const IntervalNotifier*>{&kept}));

  // And: removing a notifier that is not inserted is a no-op, twice.
  IntervalNotifier never;
  tree.Remove(never);
  tree.Remove(kept);
  tree.Remove(kept);
  EXPECT_EQ(tree.size(), 0u);
}

TEST(NotifierTreeTest, DestroyingTheTreeDetachesRemainingSubsWithoutCallingThem) {
  // Given: a subscription that outlives its tree.
  RecordingOps ops;
  IntervalNotifier sub;
  {
    NotifierTree tree;
    ASSERT_TRUE(tree.Insert(sub, 0x1000, 0x1000, ops).ok());
  }
  // Then: it is detached, was never called, and can be inserted again elsewhere.
  EXPECT_FALSE(sub.inserted());
  EXPECT_TRUE(ops.called.empty());
  NotifierTree next;
  EXPECT_TRUE(next.Insert(sub, 0x1000, 0x1000, ops).ok());
  EXPECT_EQ(next.size(), 1u);
}

TEST(NotifierTreeTest, InvalidateEventNames) {
  EXPECT_STREQ(ToString(InvalidateEvent::kUnmap), "unmap");
  EXPECT_STREQ(ToString(InvalidateEvent::kClear), "clear");
  EXPECT_STREQ(ToString(InvalidateEvent::kProtectionVma), "protection_vma");
  EXPECT_STREQ(ToString(InvalidateEvent::kProtectionPage), "protection_page");
  EXPECT_STREQ(ToString(InvalidateEvent::kMigrate), "migrate");
  EXPECT_STREQ(ToString(InvalidateEvent::kExclusive), "exclusive");
  EXPECT_STREQ(ToString(InvalidateEvent::kRelease), "release");
}

// ---- 8. Scale ----------------------------------------------------------------------------------

TEST(NotifierTreeTest, HundredThousandSubscriptions) {
  // Given: 100,000 subscriptions of 3 pages each, one page apart (each overlaps its neighbours),
  // inserted in random order.
  constexpr size_t kSubs = 100000;
  constexpr uintptr_t kBase = 0x7f0000000000;
  constexpr size_t kLen = 3 * kPage;
  NotifierTree tree;
  RecordingOps ops;
  std::unique_ptr<IntervalNotifier[]> subs(new IntervalNotifier[kSubs]);
  std::vector<size_t> order(kSubs);
  std::iota(order.begin(), order.end(), size_t{0});
  std::mt19937_64 rng(42);
  std::shuffle(order.begin(), order.end(), rng);
  for (size_t i : order) ASSERT_TRUE(tree.Insert(subs[i], kBase + i * kPage, kLen, ops).ok());
  ASSERT_EQ(tree.size(), kSubs);

  // When: a small range in the middle is invalidated.
  const NotifierRange small =
      MakeRange(kBase + 50000 * kPage + 0x800, kBase + 50001 * kPage + 0x800);
  const size_t n = tree.Invalidate(small);

  // Then: only the overlapping subscriptions were called, in address order.
  std::vector<const IntervalNotifier*> expected;
  for (size_t i = 0; i < kSubs; ++i) {
    if (subs[i].start() < small.end && subs[i].end() > small.start) expected.push_back(&subs[i]);
  }
  EXPECT_EQ(expected.size(), 4u);  // 49998 .. 50001
  EXPECT_EQ(n, expected.size());
  EXPECT_EQ(ops.called, expected);

  // When/then: the whole address space is invalidated: every one, in address order.
  ops.called.clear();
  EXPECT_EQ(tree.Invalidate(MakeRange(0, kMax)), kSubs);
  ASSERT_EQ(ops.called.size(), kSubs);
  EXPECT_TRUE(std::is_sorted(ops.called.begin(), ops.called.end()));  // subs[] is in address order

  // When: all are removed, in another random order.
  std::shuffle(order.begin(), order.end(), rng);
  for (size_t i : order) tree.Remove(subs[i]);

  // Then: the tree is empty.
  EXPECT_EQ(tree.size(), 0u);
  ops.called.clear();
  EXPECT_EQ(tree.Invalidate(MakeRange(0, kMax)), 0u);
  EXPECT_TRUE(ops.called.empty());
}

}  // namespace
}  // namespace hmmkit
