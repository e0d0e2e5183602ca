/// @file
/// Memory that hmmkit's own threads run on and work in: their stacks, and the buffers hmmkit maps
/// for itself (message pools, staging pages, device-memory metadata). A migration must never take
/// such a page to a device: a thread that services faults or runs a migration would fault on it and
/// wait on itself. (The kernel merges anonymous mappings with their neighbours, so a range chosen
/// around user memory can reach one of them.)
///
/// Every thread hmmkit creates registers its stack for its lifetime (InternalThreadScope); hmmkit's
/// own anonymous mappings come from MapInternal or are registered with InternalMemory::Add. The
/// migration code skips registered pages and the stack of the thread that runs it, as it skips
/// long-term pinned pages.
///
/// Thread-safety: all functions may be called from any thread. The registry is a fixed table under
/// one leaf lock: registering never allocates (the monitor's reader thread must not call malloc).
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace hmmkit {

class InternalMemory {
 public:
  /// Registers [start, end). Returns false (and registers nothing) when the table is full.
  static bool Add(uintptr_t start, uintptr_t end);
  static void Remove(uintptr_t start, uintptr_t end);  ///< one matching Add
  /// Whether any byte of [start, end) is registered.
  static bool Overlaps(uintptr_t start, uintptr_t end);
  /// The registered ranges that overlap [start, end), plus `also` when it does.
  static std::vector<std::pair<uintptr_t, uintptr_t>> Overlapping(
      uintptr_t start, uintptr_t end, std::pair<uintptr_t, uintptr_t> also = {0, 0},
      std::pair<uintptr_t, uintptr_t> also2 = {0, 0});
  /// [start, end) minus every registered range and minus `also`, `also2` (sorted pieces).
  static std::vector<std::pair<uintptr_t, uintptr_t>> Outside(
      uintptr_t start, uintptr_t end, std::pair<uintptr_t, uintptr_t> also,
      std::pair<uintptr_t, uintptr_t> also2 = {0, 0});
};

/// An anonymous private read-write mapping registered as internal memory; nullptr on failure
/// (errno set). Release with UnmapInternal.
void* MapInternal(size_t len);
void UnmapInternal(void* p, size_t len);

/// Registers the dynamic loader's link maps (the pages holding each struct link_map); idempotent.
/// Called when the first address space is created: the loader reads them when a thread resolves a
/// symbol or uses dynamic TLS, and they sit in anonymous memory that can merge with the
/// application's.
void RegisterLoaderMemory();

/// The calling thread's stack [start, end) (pthread_getattr_np), computed once per thread; {0, 0}
/// when it cannot be determined.
std::pair<uintptr_t, uintptr_t> CurrentThreadStack();
/// The pages around the calling thread's control block: its struct pthread and static TLS (errno,
/// thread_locals, the stack-protector canary), which every function touches. For threads glibc
/// creates they sit above the stack pthread_getattr_np reports; for the main thread, in memory the
/// dynamic loader mapped. with_tls=false: only the pages of the struct pthread and down to errno
/// (for the main thread the TLS size glibc reports can reach past its block into a neighbouring
/// mapping).
std::pair<uintptr_t, uintptr_t> CurrentThreadControlBlock(bool with_tls);

/// Registers the calling thread's stack as internal memory until destroyed (on the same thread),
/// and names the thread (at most 15 characters, "hmmkit-..."), so that ps, /proc, debuggers and
/// hang reports tell hmmkit's threads apart. Called first thing on each thread hmmkit starts.
class InternalThreadScope {
 public:
  explicit InternalThreadScope(const char* name);
  ~InternalThreadScope();
  InternalThreadScope(const InternalThreadScope&) = delete;
  InternalThreadScope& operator=(const InternalThreadScope&) = delete;

 private:
  std::pair<uintptr_t, uintptr_t> stack_, tcb_;
  bool registered_ = false, tcb_registered_ = false;
};

}  // namespace hmmkit
