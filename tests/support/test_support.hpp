// Helpers shared by the test suites: RAII mappings and environment guards. Tests read as
// given/when/then and restore global state through these.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "hmmkit/mirror/address_space.hpp"

namespace hmmkit::test {

inline size_t PageSize() {
  return size_t(sysconf(_SC_PAGESIZE));
}
inline constexpr size_t kMiB = 1u << 20;

// The parts of a test's mapping that the test unmapped itself. The mapping's owner unmaps only the
// rest: a freed range may hold another mapping since (the monitor's own message slab, say), which
// a whole-range munmap would take away from under its owner. Not thread-safe.
class PunchedHoles {
 public:
  // munmap(p, len); on success, remembers the hole.
  int Punch(void* p, size_t len);
  // munmap [start, start + len) less the holes, then forgets them.
  void UnmapRest(void* start, size_t len);

 private:
  std::vector<std::pair<char*, size_t>> holes_;
};

// An mmap'ed region that is unmapped on destruction (unless released), less the parts unmapped
// with UnmapPart.
class Mapping {
 public:
  Mapping() = default;
  // mmap(nullptr, len, prot, flags, fd, 0); aborts the test on failure.
  Mapping(size_t len, int prot, int flags, int fd = -1, off_t offset = 0);
  // An anonymous private mapping of len bytes whose start is aligned to `align`.
  static Mapping AlignedAnon(size_t len, size_t align, int prot = PROT_READ | PROT_WRITE);
  // A shared mapping of a fresh memfd of len bytes.
  static Mapping Memfd(size_t len, int prot = PROT_READ | PROT_WRITE);
  // A shared mapping of an unlinked file in `dir` (tmpfs by default) of len bytes.
  static Mapping TmpFile(size_t len, const char* dir = "/dev/shm", int flags = MAP_SHARED);
  ~Mapping();
  Mapping(Mapping&& o) noexcept;
  Mapping& operator=(Mapping&& o) noexcept;

  char* data() const { return static_cast<char*>(addr_); }
  uintptr_t addr() const { return reinterpret_cast<uintptr_t>(addr_); }
  uintptr_t end() const { return addr() + len_; }
  size_t size() const { return len_; }
  char* page(size_t i) const { return data() + i * PageSize(); }
  // Forget the mapping (the test unmapped it itself).
  void Release() {
    addr_ = nullptr;
    len_ = 0;
    holes_ = PunchedHoles();
  }
  // munmap [p, p + len), a part of the mapping, which the destructor then leaves alone.
  int UnmapPart(void* p, size_t len) { return holes_.Punch(p, len); }
  // munmap now (less the parts already unmapped).
  void Unmap();

 private:
  void* addr_ = nullptr;
  size_t len_ = 0;
  int fd_ = -1;
  PunchedHoles holes_;
};

// Sets an environment variable for the scope, restoring the previous value.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value);
  ~ScopedEnv();

 private:
  std::string name_;
  std::string old_;
  bool had_ = false;
};

// Creates an AddressSpace or fails the test.
std::shared_ptr<AddressSpace> MakeAddressSpace(AddressSpace::Options options = {});

// Why interposition cannot work in this build, or nullptr. ThreadSanitizer's runtime defines munmap
// and friends in the executable itself, ahead of libhmmkit_interpose (hmmkit then refuses with
// ENOTSUP, as it must).
const char* InterpositionUnavailableReason();

// Why a fork() with a running monitor cannot be tested in this build, or nullptr. fork() waits in
// the kernel until the monitor reads UFFD_EVENT_FORK; ThreadSanitizer holds its runtime locks
// across fork(), and the monitor's reader needs them for its first instrumented lock.
const char* ForkWithMonitorUnavailableReason();
// Copies a page collected by MigrateVmaSetup (write-protected, so writers wait) the way a driver's
// engine does: through process_vm_readv, so that a source the application unmapped meanwhile is a
// failed copy (false) instead of SIGSEGV. The kernel orders the writers, out of ThreadSanitizer's
// sight; its copy is not instrumented either.
bool CopyWriteProtectedPage(void* dst, const void* src, size_t len);

// A page-aligned address that never has a mapping: the last page below 2^47, above TASK_SIZE on
// x86-64. (A freed page or hole is soon reused by other threads' mappings: a lone page under ASan,
// the bottom of a 64 MiB hole by a new malloc arena.) nullptr if something is mapped there.
void* UnmappedAddress();

// True when THP can be obtained with MADV_HUGEPAGE (mode always or madvise).
bool ThpAvailable();

}  // namespace hmmkit::test
