/// @file
/// Annotated mutex and lock guards. Every hmmkit lock is a hmmkit::Mutex so that Clang checks the
/// lock discipline, and debug builds can assert "held by this thread" where the compiler cannot see
/// (callbacks, virtual calls): see AssertHeld().
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "hmmkit/base/thread_annotations.hpp"

namespace hmmkit {

/// A non-recursive mutex with an owner record for run-time "held" assertions. Not copyable.
class CAPABILITY("mutex") Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void lock() ACQUIRE() {
    mu_.lock();
    owner_.store(std::this_thread::get_id(), std::memory_order_relaxed);
  }
  void unlock() RELEASE() {
    owner_.store(std::thread::id(), std::memory_order_relaxed);
    mu_.unlock();
  }
  bool try_lock() TRY_ACQUIRE(true) {
    if (!mu_.try_lock()) return false;
    owner_.store(std::this_thread::get_id(), std::memory_order_relaxed);
    return true;
  }
  /// True when the calling thread holds the mutex. Exact for the caller's own thread.
  bool HeldByMe() const {
    return owner_.load(std::memory_order_relaxed) == std::this_thread::get_id();
  }
  /// Tells the analysis (and, in debug builds, checks) that the caller holds the mutex.
  void AssertHeld() const ASSERT_CAPABILITY(this);

  std::mutex& native() { return mu_; }

 private:
  friend class CondVar;
  void set_owner() { owner_.store(std::this_thread::get_id(), std::memory_order_relaxed); }
  void clear_owner() { owner_.store(std::thread::id(), std::memory_order_relaxed); }

  std::mutex mu_;
  std::atomic<std::thread::id> owner_{};
};

inline void Mutex::AssertHeld() const {
#ifndef NDEBUG
  if (!HeldByMe()) __builtin_trap();
#endif
}

/// Scoped lock of a Mutex.
class SCOPED_CAPABILITY MutexLock {
 public:
  explicit MutexLock(Mutex& mu) ACQUIRE(mu) : mu_(mu) { mu_.lock(); }
  ~MutexLock() RELEASE() { mu_.unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex& mu_;
};

/// Condition variable that waits on a held hmmkit::Mutex.
class CondVar {
 public:
  template <class Pred>
  void Wait(Mutex& mu, Pred pred) REQUIRES(mu) {
    std::unique_lock<std::mutex> lk(mu.native(), std::adopt_lock);
    mu.clear_owner();
    cv_.wait(lk, [&]() NO_THREAD_SAFETY_ANALYSIS {  // mu is held here; the analysis cannot see it
      mu.set_owner();                               // the predicate runs with the lock held
      bool done = pred();
      if (!done) mu.clear_owner();
      return done;
    });
    lk.release();
  }
  /// Returns false on timeout (predicate still false).
  template <class Pred, class Clock, class Dur>
  bool WaitUntil(Mutex& mu, std::chrono::time_point<Clock, Dur> deadline, Pred pred) REQUIRES(mu) {
    std::unique_lock<std::mutex> lk(mu.native(), std::adopt_lock);
    mu.clear_owner();
    bool ok = cv_.wait_until(lk, deadline, [&]() NO_THREAD_SAFETY_ANALYSIS {
      mu.set_owner();
      bool done = pred();
      if (!done) mu.clear_owner();
      return done;
    });
    mu.set_owner();
    lk.release();
    return ok;
  }
  void NotifyAll() { cv_.notify_all(); }
  void NotifyOne() { cv_.notify_one(); }

 private:
  std::condition_variable cv_;
};

}  // namespace hmmkit
