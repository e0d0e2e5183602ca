// Finds libhmmkit_interpose at run time and routes its hooks to an MmMonitor.
#include "interpose_client.hpp"

#include <dlfcn.h>

#include <utility>
#include <vector>

#include "hmmkit/base/mutex.hpp"
#include "hmmkit/mirror/mm_monitor.hpp"
#include "hmmkit_interpose.h"

namespace hmmkit {

namespace {

using RegisterFn = int (*)(hmmkit_interpose_hook, void*);
using UnregisterFn = void (*)(int);

void Trampoline(void* ctx, uintptr_t start, uintptr_t end, int kind) {
  static_cast<MmMonitor*>(ctx)->NotifyBeforeChange(start, end, kind);
}

Mutex g_mu;  // leaf lock; attach/detach are rare
std::vector<std::pair<MmMonitor*, int>> g_slots GUARDED_BY(g_mu);

constexpr const char* kHowToLoad =
    "libhmmkit_interpose is not loaded: link hmmkit::interpose into the executable or start it "
    "with LD_PRELOAD=libhmmkit_interpose.so";

}  // namespace

Status InterposeAttach(MmMonitor& monitor) {
  auto reg = reinterpret_cast<RegisterFn>(dlsym(RTLD_DEFAULT, "hmmkit_interpose_register"));
  if (!reg) return Status::FromErrno(ENOTSUP, kHowToLoad);
  // The process must resolve munmap to the interposer's own definition, not to libc's (a library
  // dlopen'ed after libc is loaded but interposes nothing). dlsym on the library's own handle
  // finds its definition first.
  void* own = nullptr;
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(reg), &info) && info.dli_fname) {
    if (void* h = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD)) {
      own = dlsym(h, "munmap");
      dlclose(h);
    }
  }
  if (own == nullptr || dlsym(RTLD_DEFAULT, "munmap") != own)
    return Status::FromErrno(ENOTSUP,
                             "libhmmkit_interpose is loaded but munmap resolves elsewhere: load it "
                             "before libc (link order or LD_PRELOAD), not with dlopen");
  int slot = reg(Trampoline, &monitor);
  if (slot < 0) return Status::FromErrno(EBUSY, "all interposition slots are taken");
  MutexLock lock(g_mu);
  g_slots.emplace_back(&monitor, slot);
  return Status::Ok();
}

void InterposeDetach(MmMonitor& monitor) {
  auto unreg = reinterpret_cast<UnregisterFn>(dlsym(RTLD_DEFAULT, "hmmkit_interpose_unregister"));
  MutexLock lock(g_mu);
  for (auto it = g_slots.begin(); it != g_slots.end();) {
    if (it->first == &monitor) {
      if (unreg) unreg(it->second);
      it = g_slots.erase(it);
    } else {
      ++it;
    }
  }
}

}  // namespace hmmkit
