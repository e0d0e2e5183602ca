// The registry of hmmkit's own memory (internal_memory.hpp): a fixed table, so that registering
// never allocates.
#include "hmmkit/base/internal_memory.hpp"

#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <mutex>

namespace hmmkit {

namespace {

constexpr uintptr_t kPage = 4096;
constexpr size_t kSlots = 1024;  // thread stacks and slabs of one process

struct Registry {
  std::mutex mu;
  std::array<std::pair<uintptr_t, uintptr_t>, kSlots> ranges{};  // {0, 0}: free
  size_t used = 0;                                               // slots [0, used) may be in use
};

Registry& TheRegistry() {
  static auto* r = new Registry();  // never destroyed: threads may unregister during exit
  return *r;
}

}  // namespace

bool InternalMemory::Add(uintptr_t start, uintptr_t end) {
  if (start >= end) return false;
  Registry& r = TheRegistry();
  std::lock_guard lock(r.mu);
  for (size_t i = 0; i < kSlots; ++i) {
    if (r.ranges[i].first == 0 && r.ranges[i].second == 0) {
      r.ranges[i] = {start, end};
      r.used = std::max(r.used, i + 1);
      return true;
    }
  }
  return false;
}

void InternalMemory::Remove(uintptr_t start, uintptr_t end) {
  Registry& r = TheRegistry();
  std::lock_guard lock(r.mu);
  for (size_t i = 0; i < r.used; ++i) {
    if (r.ranges[i] == std::make_pair(start, end)) {
      r.ranges[i] = {0, 0};
      return;
    }
  }
}

bool InternalMemory::Overlaps(uintptr_t start, uintptr_t end) {
  Registry& r = TheRegistry();
  std::lock_guard lock(r.mu);
  for (size_t i = 0; i < r.used; ++i)
    if (r.ranges[i].first < end && r.ranges[i].second > start) return true;
  return false;
}

std::vector<std::pair<uintptr_t, uintptr_t>> InternalMemory::Overlapping(
    uintptr_t start, uintptr_t end, std::pair<uintptr_t, uintptr_t> also,
    std::pair<uintptr_t, uintptr_t> also2) {
  std::vector<std::pair<uintptr_t, uintptr_t>> out;
  {
    Registry& r = TheRegistry();
    std::lock_guard lock(r.mu);
    for (size_t i = 0; i < r.used; ++i)
      if (r.ranges[i].first < end && r.ranges[i].second > start) out.push_back(r.ranges[i]);
  }
  if (also.first < end && also.second > start) out.push_back(also);
  if (also2.first < end && also2.second > start) out.push_back(also2);
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<std::pair<uintptr_t, uintptr_t>> InternalMemory::Outside(
    uintptr_t start, uintptr_t end, std::pair<uintptr_t, uintptr_t> also,
    std::pair<uintptr_t, uintptr_t> also2) {
  std::vector<std::pair<uintptr_t, uintptr_t>> out;
  uintptr_t cursor = start;
  for (const auto& [s, e] : Overlapping(start, end, also, also2)) {
    if (s > cursor) out.emplace_back(cursor, std::min(s, end));
    cursor = std::max(cursor, e);
    if (cursor >= end) break;
  }
  if (cursor < end) out.emplace_back(cursor, end);
  return out;
}

void* MapInternal(size_t len) {
  void* p = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  const auto s = reinterpret_cast<uintptr_t>(p);
  if (!InternalMemory::Add(s, s + len)) {
    ::munmap(p, len);
    errno = ENOSPC;
    return nullptr;
  }
  return p;
}

void UnmapInternal(void* p, size_t len) {
  if (!p) return;
  const auto s = reinterpret_cast<uintptr_t>(p);
  InternalMemory::Remove(s, s + len);
  ::munmap(p, len);
}

std::pair<uintptr_t, uintptr_t> CurrentThreadStack() {
  thread_local std::pair<uintptr_t, uintptr_t> cached{0, 0};
  thread_local bool known = false;
  if (!known) {
    known = true;
    pthread_attr_t attr;
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
      void* addr = nullptr;
      size_t size = 0;
      if (pthread_attr_getstack(&attr, &addr, &size) == 0 && addr)
        cached = {reinterpret_cast<uintptr_t>(addr), reinterpret_cast<uintptr_t>(addr) + size};
      pthread_attr_destroy(&attr);
    }
  }
  return cached;
}

constexpr uintptr_t kTcbBytes = 2304;  // glibc x86-64: sizeof(struct pthread) (TLS_TCB_SIZE)

// The static TLS block below the thread pointer: glibc's static TLS size (which counts the TCB)
// minus the TCB. 0 when the loader does not tell.
uintptr_t StaticTlsBytes() {
  static const uintptr_t bytes = [] {
    using GetTlsStaticInfo = void (*)(size_t*, size_t*);
    auto fn = reinterpret_cast<GetTlsStaticInfo>(dlsym(RTLD_DEFAULT, "_dl_get_tls_static_info"));
    if (!fn) return uintptr_t(0);
    size_t size = 0, align = 0;
    fn(&size, &align);
    return size > kTcbBytes ? uintptr_t(size - kTcbBytes) : uintptr_t(0);
  }();
  return bytes;
}

std::pair<uintptr_t, uintptr_t> CurrentThreadControlBlock(bool with_tls) {
  // glibc on x86-64: the thread pointer is the struct pthread (about 2.3 KiB); static TLS lies
  // right below it. Only those pages: neighbouring memory belongs to others.
  // Without the whole TLS, still down to errno: libc writes it inside almost every call (free()
  // restoring it after an munmap), and a migration that took its page deadlocked the thread
  // migrating (found with an injected device-allocation failure; the main thread's TLS had merged
  // with the buffer's VMA).
  const auto self = reinterpret_cast<uintptr_t>(pthread_self());
  const auto errno_at = reinterpret_cast<uintptr_t>(&errno);
  const uintptr_t to_errno = errno_at < self ? self - errno_at : 1;
  const uintptr_t kBelow = with_tls ? std::max(StaticTlsBytes(), to_errno) : to_errno;
  const uintptr_t kAbove = kTcbBytes;
  const uintptr_t start = self > kBelow ? (self - kBelow) & ~(kPage - 1) : 0;
  return {start, (self + kAbove + kPage - 1) & ~(kPage - 1)};
}

void RegisterLoaderMemory() {
  static std::once_flag once;
  std::call_once(once, [] {
    for (const link_map* l = _r_debug.r_map; l; l = l->l_next) {
      const auto p = reinterpret_cast<uintptr_t>(l);
      // The struct link_map is about 1.2 KiB: its page(s), not the neighbours.
      InternalMemory::Add(p & ~(kPage - 1), (p + 1280 + kPage - 1) & ~(kPage - 1));
    }
    // Every loaded object's .bss (the zero-filled end of a writable PT_LOAD): the statics of
    // hmmkit, libc, libstdc++ and the sanitizer runtimes live there, often in the same page as an
    // application's globals.
    dl_iterate_phdr(
        [](dl_phdr_info* info, size_t, void*) {
          for (int i = 0; i < info->dlpi_phnum; ++i) {
            const auto& ph = info->dlpi_phdr[i];
            if (ph.p_type != PT_LOAD || ph.p_memsz <= ph.p_filesz) continue;
            const uintptr_t s = (info->dlpi_addr + ph.p_vaddr + ph.p_filesz) & ~(kPage - 1);
            const uintptr_t e =
                (info->dlpi_addr + ph.p_vaddr + ph.p_memsz + kPage - 1) & ~(kPage - 1);
            InternalMemory::Add(s, e);
          }
          return 0;
        },
        nullptr);
  });
}

InternalThreadScope::InternalThreadScope(const char* name)
    : stack_(CurrentThreadStack()), tcb_(CurrentThreadControlBlock(/*with_tls=*/true)) {
  ::pthread_setname_np(::pthread_self(), name);  // fails (ERANGE) only on a name over 15 chars
  registered_ = InternalMemory::Add(stack_.first, stack_.second);
  tcb_registered_ = InternalMemory::Add(tcb_.first, tcb_.second);
}

InternalThreadScope::~InternalThreadScope() {
  if (tcb_registered_) InternalMemory::Remove(tcb_.first, tcb_.second);
  if (registered_) InternalMemory::Remove(stack_.first, stack_.second);
}

}  // namespace hmmkit
