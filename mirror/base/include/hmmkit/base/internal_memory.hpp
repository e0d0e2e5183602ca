// Memory that hmmkit's own threads run on: their stacks. A migration must never take such a page
// to a device: the thread would fault on its own stack while it takes part in servicing faults or
// migrations, and wait on itself. (Thread stacks are ordinary anonymous mappings; the kernel
// merges them with neighbouring allocations, so a range chosen around user memory can reach one.)
//
// Every thread hmmkit creates registers its stack for its lifetime (InternalThreadScope); the
// migration code skips registered pages and the stack of the thread that runs it, as it skips
// long-term pinned pages.
//
// Thread-safety: all functions may be called from any thread; one leaf lock inside.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace hmmkit {

class InternalMemory {
 public:
  static void Add(uintptr_t start, uintptr_t end);
  static void Remove(uintptr_t start, uintptr_t end);  // one matching Add
  static bool Contains(uintptr_t va);
  // [start, end) minus every registered range and minus `also` (sorted, non-empty pieces).
  static std::vector<std::pair<uintptr_t, uintptr_t>> Outside(uintptr_t start, uintptr_t end,
                                                              std::pair<uintptr_t, uintptr_t> also);
};

// The calling thread's stack [start, end) (pthread_getattr_np), computed once per thread; {0, 0}
// when it cannot be determined.
std::pair<uintptr_t, uintptr_t> CurrentThreadStack();

// Registers the calling thread's stack as internal memory until destroyed (on the same thread).
class InternalThreadScope {
 public:
  InternalThreadScope();
  ~InternalThreadScope();
  InternalThreadScope(const InternalThreadScope&) = delete;
  InternalThreadScope& operator=(const InternalThreadScope&) = delete;

 private:
  std::pair<uintptr_t, uintptr_t> stack_;
};

}  // namespace hmmkit
