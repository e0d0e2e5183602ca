// libhmmkit_interpose: see hmmkit_interpose.h. No dependency on the rest of hmmkit: the monitor
// finds these functions with dlsym at run time.
#include "hmmkit_interpose.h"

#include <sched.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdarg>
#include <cstddef>

namespace {

constexpr int kSlots = 8;

struct Slot {
  std::atomic<hmmkit_interpose_hook> hook{nullptr};
  std::atomic<void*> ctx{nullptr};
  std::atomic<int> in_flight{0};
};

Slot g_slots[kSlots];
std::atomic<int> g_registered{0};
thread_local bool t_in_hook = false;

// Calls every registered hook. The in_flight increment and the hook load are sequentially
// consistent, as are unregister's hook store and in_flight load: either the caller sees the hook
// cleared, or unregister sees the caller in flight and waits for it.
void Notify(const void* addr, size_t len, int kind) {
  if (g_registered.load(std::memory_order_acquire) == 0 || t_in_hook || len == 0) return;
  const uintptr_t start = reinterpret_cast<uintptr_t>(addr);
  const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  const uintptr_t end = start + ((len + page - 1) & ~(page - 1));
  if (end < start) return;  // overflow: the system call fails with EINVAL anyway
  t_in_hook = true;
  for (Slot& s : g_slots) {
    s.in_flight.fetch_add(1, std::memory_order_seq_cst);
    hmmkit_interpose_hook hook = s.hook.load(std::memory_order_seq_cst);
    if (hook) hook(s.ctx.load(std::memory_order_relaxed), start, end, kind);
    s.in_flight.fetch_sub(1, std::memory_order_release);
  }
  t_in_hook = false;
}

}  // namespace

extern "C" {

int hmmkit_interpose_register(hmmkit_interpose_hook hook, void* ctx) {
  for (int i = 0; i < kSlots; ++i) {
    hmmkit_interpose_hook expected = nullptr;
    g_slots[i].ctx.store(ctx, std::memory_order_relaxed);
    if (g_slots[i].hook.compare_exchange_strong(expected, hook, std::memory_order_seq_cst)) {
      g_registered.fetch_add(1, std::memory_order_release);
      return i;
    }
  }
  return -1;
}

void hmmkit_interpose_unregister(int slot) {
  if (slot < 0 || slot >= kSlots) return;
  Slot& s = g_slots[slot];
  if (s.hook.exchange(nullptr, std::memory_order_seq_cst) == nullptr) return;
  g_registered.fetch_sub(1, std::memory_order_release);
  while (s.in_flight.load(std::memory_order_seq_cst) != 0) sched_yield();
}

int munmap(void* addr, size_t len) noexcept {
  Notify(addr, len, HMMKIT_INTERPOSE_UNMAP);
  return int(syscall(SYS_munmap, addr, len));
}

void* mmap(void* addr, size_t len, int prot, int flags, int fd, off_t offset) noexcept {
  if ((flags & MAP_FIXED) && !(flags & MAP_FIXED_NOREPLACE))
    Notify(addr, len, HMMKIT_INTERPOSE_UNMAP);
  return reinterpret_cast<void*>(syscall(SYS_mmap, addr, len, prot, flags, fd, offset));
}

void* mmap64(void* addr, size_t len, int prot, int flags, int fd, off_t offset) noexcept {
  return mmap(addr, len, prot, flags, fd, offset);
}

void* mremap(void* old_addr, size_t old_size, size_t new_size, int flags, ...) noexcept {
  void* new_addr = nullptr;
  if (flags & MREMAP_FIXED) {
    va_list ap;
    va_start(ap, flags);
    new_addr = va_arg(ap, void*);
    va_end(ap);
    Notify(new_addr, new_size, HMMKIT_INTERPOSE_UNMAP);
  }
  Notify(old_addr, old_size, HMMKIT_INTERPOSE_UNMAP);
  return reinterpret_cast<void*>(
      syscall(SYS_mremap, old_addr, old_size, new_size, flags, new_addr));
}

int madvise(void* addr, size_t len, int advice) noexcept {
  switch (advice) {
    case MADV_DONTNEED:
    case MADV_FREE:
    case MADV_REMOVE:
    case 21:  // MADV_PAGEOUT
    case 24:  // MADV_DONTNEED_LOCKED
      Notify(addr, len, HMMKIT_INTERPOSE_CLEAR);
      break;
    default:
      break;
  }
  return int(syscall(SYS_madvise, addr, len, advice));
}

int mprotect(void* addr, size_t len, int prot) noexcept {
  Notify(addr, len, HMMKIT_INTERPOSE_PROTECT);
  return int(syscall(SYS_mprotect, addr, len, prot));
}

}  // extern "C"
