// An IntervalNotifierOps that follows the protocol (SetSeq under a driver lock) and records every
// invalidation it receives, for assertions.
#pragma once

#include <functional>
#include <vector>

#include "hmmkit/base/mutex.hpp"
#include "hmmkit/mirror/notifier.hpp"

namespace hmmkit::test {

class RecordingOps : public IntervalNotifierOps {
 public:
  void Invalidate(IntervalNotifier& sub, const NotifierRange& range, uint64_t cur_seq) override {
    std::function<void(const NotifierRange&)> before;
    {
      // Published under the lock: the kernel orders "set hook, then munmap" before the monitor
      // reads the event, but ThreadSanitizer cannot see that ordering.
      MutexLock lock(mu_);
      before = before_;
    }
    if (before) before(range);
    MutexLock lock(mu_);
    sub.SetSeq(cur_seq);
    seen_.push_back(range);
  }
  std::vector<NotifierRange> seen() const {
    MutexLock lock(mu_);
    return seen_;
  }
  void clear() {
    MutexLock lock(mu_);
    seen_.clear();
  }
  // Runs at the start of each Invalidate, without the lock (to block, probe, ...).
  void set_before(std::function<void(const NotifierRange&)> f) {
    MutexLock lock(mu_);
    before_ = std::move(f);
  }
  Mutex& driver_lock() { return mu_; }

 private:
  mutable Mutex mu_;
  std::vector<NotifierRange> seen_ GUARDED_BY(mu_);
  std::function<void(const NotifierRange&)> before_ GUARDED_BY(mu_);
};

}  // namespace hmmkit::test
