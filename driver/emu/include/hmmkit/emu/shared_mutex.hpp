/// @file
/// An annotated, writer-preferring reader/writer lock for the emulated device.
///
/// hmmkit::Mutex has no shared mode; the device MMU needs one (compute units translate and access
/// memory concurrently under the shared side, mapping changes take the exclusive side). This
/// wrapper is to SharedMutex what hmmkit::Mutex is to std::mutex: a CAPABILITY so that Clang checks
/// GUARDED_BY / REQUIRES / REQUIRES_SHARED contracts.
///
/// Writer preference: once a writer waits, new readers block until it has run. Without it (glibc's
/// default rwlock, and so std::shared_mutex, prefers readers) a set of compute units that keep
/// re-acquiring the shared side in a loop can starve a mapping change forever. The price is that
/// the shared side is not recursive: a thread that already holds it and takes it again deadlocks as
/// soon as a writer waits in between. Take it once per thread.
///
/// Not copyable, not movable. Owned by whoever embeds it (the DeviceMmu).
#pragma once

#include <pthread.h>

#include <atomic>
#include <cstdint>

#include "hmmkit/base/thread_annotations.hpp"

#ifndef ASSERT_SHARED_CAPABILITY
#define ASSERT_SHARED_CAPABILITY(x) HMMKIT_TSA(assert_shared_capability(x))
#endif

namespace hmmkit::emu {

class CAPABILITY("shared_mutex") SharedMutex {
 public:
  SharedMutex();
  ~SharedMutex();
  SharedMutex(const SharedMutex&) = delete;
  SharedMutex& operator=(const SharedMutex&) = delete;

  /// Exclusive side. Blocks until every reader and writer has left; new readers wait meanwhile.
  void lock() ACQUIRE();
  void unlock() RELEASE();
  /// Shared side. Blocks while a writer holds the lock or waits for it.
  void lock_shared() ACQUIRE_SHARED();
  void unlock_shared() RELEASE_SHARED();

  /// True while at least one thread waits for (or is about to take) the exclusive side. Racy by
  /// nature: a hint for readers that hold the lock across a batch of work (see AccessGuard::Yield).
  bool WriterWaiting() const { return writers_waiting_.load(std::memory_order_relaxed) != 0; }

  /// Tell the analysis that the caller holds the lock (shared or exclusive); no run-time check
  /// (pthread rwlocks do not record readers). Callers that need one keep their own record.
  void AssertReaderHeld() const ASSERT_SHARED_CAPABILITY(this) {}
  void AssertHeld() const ASSERT_CAPABILITY(this) {}

 private:
  pthread_rwlock_t rw_;
  std::atomic<uint32_t> writers_waiting_{0};
};

/// Scoped exclusive lock.
class SCOPED_CAPABILITY WriterLock {
 public:
  explicit WriterLock(SharedMutex& mu) ACQUIRE(mu) : mu_(mu) { mu_.lock(); }
  ~WriterLock() RELEASE() { mu_.unlock(); }
  WriterLock(const WriterLock&) = delete;
  WriterLock& operator=(const WriterLock&) = delete;

 private:
  SharedMutex& mu_;
};

/// Scoped shared lock.
class SCOPED_CAPABILITY ReaderLock {
 public:
  explicit ReaderLock(SharedMutex& mu) ACQUIRE_SHARED(mu) : mu_(mu) { mu_.lock_shared(); }
  ~ReaderLock() RELEASE() { mu_.unlock_shared(); }
  ReaderLock(const ReaderLock&) = delete;
  ReaderLock& operator=(const ReaderLock&) = delete;

 private:
  SharedMutex& mu_;
};

}  // namespace hmmkit::emu
