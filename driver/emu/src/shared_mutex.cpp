#include "hmmkit/emu/shared_mutex.hpp"

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace hmmkit::emu {

namespace {

// A failing rwlock call is a bug (EDEADLK: the caller already holds it; EINVAL: destroyed lock).
void CheckRw(int rc, const char* what) {
  if (rc == 0) return;
  std::fprintf(stderr, "hmmkit: %s failed: %s\n", what, std::strerror(rc));
  std::abort();
}

}  // namespace

SharedMutex::SharedMutex() {
  pthread_rwlockattr_t attr;
  CheckRw(pthread_rwlockattr_init(&attr), "pthread_rwlockattr_init");
  // Writers first: readers that arrive while a writer waits block (see the header).
  CheckRw(pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP),
          "pthread_rwlockattr_setkind_np");
  CheckRw(pthread_rwlock_init(&rw_, &attr), "pthread_rwlock_init");
  pthread_rwlockattr_destroy(&attr);
}

SharedMutex::~SharedMutex() {
  pthread_rwlock_destroy(&rw_);
}

void SharedMutex::lock() {
  writers_waiting_.fetch_add(1, std::memory_order_relaxed);
  CheckRw(pthread_rwlock_wrlock(&rw_), "pthread_rwlock_wrlock");
  writers_waiting_.fetch_sub(1, std::memory_order_relaxed);
}

void SharedMutex::unlock() {
  CheckRw(pthread_rwlock_unlock(&rw_), "pthread_rwlock_unlock");
}

void SharedMutex::lock_shared() {
  CheckRw(pthread_rwlock_rdlock(&rw_), "pthread_rwlock_rdlock");
}

void SharedMutex::unlock_shared() {
  CheckRw(pthread_rwlock_unlock(&rw_), "pthread_rwlock_unlock");
}

}  // namespace hmmkit::emu
