// pthread_atfork handlers that keep device pages from being lost across fork (fork_guard.hpp).
#include "fork_guard.hpp"

#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <vector>

#include "device_entries.hpp"
#include "hmmkit/base/log.hpp"
#include "hmmkit/base/mutex.hpp"
#include "hmmkit/mirror/address_space.hpp"

namespace hmmkit {

namespace {

// Leaked on purpose: atfork handlers may run during exit, after static destructors.
struct Registry {
  Mutex mu;
  std::vector<AddressSpace*> spaces GUARDED_BY(mu);
};
Registry& Reg() {
  static Registry* r = new Registry;
  return *r;
}

std::shared_mutex* g_fork_lock = new std::shared_mutex;
bool g_fork_locked = false;  // only touched by the forking thread between prepare and parent/child

void Prepare() NO_THREAD_SAFETY_ANALYSIS {
  Registry& r = Reg();
  r.mu.lock();  // released in Parent/Child: keeps every AddressSpace alive across the fork
  const pid_t self = ::getpid();
  // Four rounds: pages another thread migrates meanwhile are moved back in the next. A refusal
  // while the mm is changing (EAGAIN) is retried inside the eviction (MigrateDevicePages).
  for (int attempt = 0; attempt < 4; ++attempt) {
    for (AddressSpace* as : r.spaces) {
      if (as->creator_pid() != self || !as->has_device_pages()) continue;
      Status st = as->device_entries().EvictAll();
      if (!st.ok()) Log().error("fork: device pages not evicted: {}", st.ToString());
    }
    g_fork_lock->lock();
    const bool clean = std::none_of(r.spaces.begin(), r.spaces.end(), [&](AddressSpace* as) {
      return as->creator_pid() == self && as->has_device_pages();
    });
    if (clean || attempt == 3) {
      if (!clean)
        Log().error("fork: device pages keep arriving; the child reads zeros where they are");
      g_fork_locked = true;
      return;
    }
    g_fork_lock->unlock();
  }
}

void Release() NO_THREAD_SAFETY_ANALYSIS {
  if (g_fork_locked) {
    g_fork_locked = false;
    g_fork_lock->unlock();
  }
  Reg().mu.unlock();
}

void Parent() NO_THREAD_SAFETY_ANALYSIS {
  // Every private page is copy-on-write shared with the child now: no mirror keeps write access.
  const pid_t self = ::getpid();
  std::vector<AddressSpace*> spaces = Reg().spaces;
  Release();
  for (AddressSpace* as : spaces) {
    if (as->creator_pid() != self) continue;
    as->notifiers().Invalidate(
        NotifierRange{0, UINTPTR_MAX, InvalidateEvent::kProtectionPage, nullptr});
  }
}

void Child() NO_THREAD_SAFETY_ANALYSIS {
  // The migration lock cannot be unlocked here: glibc's rwlock remembers its writer by TID, the
  // child's thread has a new one, and the unlock was taken for a read unlock, leaving the lock
  // write-held and every migration in the child waiting forever. No other thread exists in the
  // child, so a fresh lock is exact (the old one is leaked, a few bytes per fork).
  if (g_fork_locked) {
    g_fork_locked = false;
    // Unlocked all the same, though glibc gets it wrong: the old lock is never used again, and
    // ThreadSanitizer must see it released (else it reports a lock-order inversion with Reg().mu).
    g_fork_lock->unlock();
    static auto* retired = new std::vector<std::shared_mutex*>;  // reachable: not a leak report
    retired->push_back(g_fork_lock);
    g_fork_lock = new std::shared_mutex;
  }
  Reg().mu.unlock();
}

[[maybe_unused]] const bool g_registered = [] {
  pthread_atfork(Prepare, Parent, Child);
  return true;
}();

}  // namespace

std::shared_mutex& ForkMigrationLock() {
  return *g_fork_lock;
}

void ForkGuardAdd(AddressSpace& as) {
  MutexLock lock(Reg().mu);
  Reg().spaces.push_back(&as);
}

void ForkGuardRemove(AddressSpace& as) {
  MutexLock lock(Reg().mu);
  auto& v = Reg().spaces;
  v.erase(std::remove(v.begin(), v.end(), &as), v.end());
}

}  // namespace hmmkit
