/// @file
/// A snapshot of one VMA of the calling process, as PROCMAP_QUERY or /proc/self/maps report it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace hmmkit {

enum class VmaKind : uint8_t {
  kAnon,     ///< private anonymous (heap, stack, malloc, MAP_ANONYMOUS|MAP_PRIVATE)
  kShmem,    ///< shmem/tmpfs: MAP_SHARED|MAP_ANONYMOUS, memfd, files on tmpfs, SysV shm
  kFile,     ///< a file on a regular filesystem (or a private mapping of one)
  kHugetlb,  ///< hugetlbfs, MAP_HUGETLB, memfd MFD_HUGETLB
  kSpecial,  ///< [vdso], [vvar], [vsyscall], device mappings: never mirrored
};
const char* ToString(VmaKind kind);

struct Vma {
  uintptr_t start = 0;
  uintptr_t end = 0;  ///< exclusive
  bool read = false;
  bool write = false;
  bool exec = false;
  bool shared = false;  ///< MAP_SHARED
  VmaKind kind = VmaKind::kAnon;
  size_t page_size = 4096;  ///< the hugetlb page size for kHugetlb
  uint64_t offset = 0;
  uint64_t inode = 0;
  uint32_t dev_major = 0;
  uint32_t dev_minor = 0;
  std::string name;  ///< path or [heap]/[stack]/...; empty for anonymous

  bool contains(uintptr_t addr) const { return addr >= start && addr < end; }
  /// PROT_NONE: hmm_range_fault treats it like no VMA.
  bool accessible() const { return read || write || exec; }
  /// userfaultfd can register it: anon, shmem and hugetlb, never regular files or special mappings.
  bool registrable() const {
    return kind == VmaKind::kAnon || kind == VmaKind::kShmem || kind == VmaKind::kHugetlb;
  }
  /// migrate_vma may move its pages: private anonymous memory only, as in the kernel.
  bool migratable() const { return kind == VmaKind::kAnon && !shared; }
};

}  // namespace hmmkit
