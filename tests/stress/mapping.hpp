// One mapping of the stress workload and its shadow: what its bytes must be.
//
// The shadow model of each change (what the kernel promises):
//   munmap + mmap again:  private and shared anonymous memory -> zeros (a new object); memfd and
//                         file mappings -> the backing content (the shadow is unchanged).
//   mremap (move):        the content moves with the mapping (the shadow is unchanged).
//   MADV_DONTNEED:        private anonymous -> zeros; shared (shmem, memfd, file) -> kept.
//   mprotect:             content unchanged; while read-only, no write may land.
// Owned by the workload; not thread-safe (CPU threads touch disjoint slices of the shadow).
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace stress {

enum class Kind { kPrivateAnon, kThpAnon, kSharedAnon, kMemfd, kFile, kCount };
const char* KindName(Kind k);

constexpr size_t kPage = 4096;
constexpr size_t kHuge = size_t(2) << 20;
constexpr size_t kElemsPerPage = kPage / sizeof(uint64_t);

struct Mapping {
  Kind kind = Kind::kPrivateAnon;
  uint64_t* base = nullptr;
  size_t bytes = 0;
  int fd = -1;  // memfd or temp file (unlinked at once); -1 for anonymous memory
  bool read_only = false;
  std::vector<uint64_t> shadow;

  size_t elems() const { return bytes / sizeof(uint64_t); }
  size_t pages() const { return bytes / kPage; }
  bool private_anon() const { return kind == Kind::kPrivateAnon || kind == Kind::kThpAnon; }
};

// Each returns 0 or an errno, with *why naming the call that failed. None of these errors is a
// hmmkit bug: they are the environment (out of memory, an address taken by another thread).
int Create(Kind kind, size_t bytes, const std::string& tmpdir, Mapping* m, std::string* why);
void Destroy(Mapping& m);
// munmap of pages [page, page + n) and mmap at the same address (MAP_FIXED_NOREPLACE).
int UnmapAndRemap(Mapping& m, size_t page, size_t n, std::string* why);
// mremap of the whole mapping to a new address.
int Move(Mapping& m, std::string* why);
int DontNeed(Mapping& m, size_t page, size_t n, std::string* why);
int Protect(Mapping& m, bool read_only, std::string* why);

}  // namespace stress
