#include "mapping.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <utility>
#include <vector>

namespace stress {

namespace {

int Fail(std::string* why, const char* what) {
  const int err = errno ? errno : EINVAL;
  *why = std::string(what) + ": " + std::strerror(err);
  return err;
}

int Prot(const Mapping& m) {
  return m.read_only ? PROT_READ : PROT_READ | PROT_WRITE;
}

int Flags(const Mapping& m) {
  switch (m.kind) {
    case Kind::kPrivateAnon:
    case Kind::kThpAnon:
      return MAP_PRIVATE | MAP_ANONYMOUS;
    case Kind::kSharedAnon:
      return MAP_SHARED | MAP_ANONYMOUS;
    default:
      return MAP_SHARED;
  }
}

// Reserves `bytes` of address space aligned to `align` (PROT_NONE); nullptr on failure.
void* Reserve(size_t bytes, size_t align) {
  void* p =
      ::mmap(nullptr, bytes + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  const uintptr_t start = reinterpret_cast<uintptr_t>(p);
  const uintptr_t aligned = (start + align - 1) & ~(uintptr_t(align) - 1);
  if (aligned > start) ::munmap(p, aligned - start);
  const uintptr_t end = start + bytes + align;
  if (end > aligned + bytes)
    ::munmap(reinterpret_cast<void*>(aligned + bytes), end - aligned - bytes);
  return reinterpret_cast<void*>(aligned);
}

}  // namespace

const char* KindName(Kind k) {
  switch (k) {
    case Kind::kPrivateAnon:
      return "private-anon";
    case Kind::kThpAnon:
      return "thp-anon";
    case Kind::kSharedAnon:
      return "shared-anon";
    case Kind::kMemfd:
      return "memfd";
    case Kind::kFile:
      return "file";
    default:
      return "?";
  }
}

int Create(Kind kind, size_t bytes, const std::string& tmpdir, Mapping* m, std::string* why) {
  m->kind = kind;
  m->bytes = bytes;
  m->read_only = false;
  m->shadow.assign(bytes / sizeof(uint64_t), 0);
  errno = 0;
  if (kind == Kind::kMemfd) {
    m->fd = ::memfd_create("hmmkit_stress", MFD_CLOEXEC);
    if (m->fd < 0) return Fail(why, "memfd_create");
  } else if (kind == Kind::kFile) {
    std::string path = tmpdir + "/hmmkit_stress.XXXXXX";
    m->fd = ::mkstemp(path.data());
    if (m->fd < 0) return Fail(why, "mkstemp");
    ::unlink(path.c_str());  // the descriptor keeps the file
  }
  if (m->fd >= 0 && ::ftruncate(m->fd, off_t(bytes)) != 0) return Fail(why, "ftruncate");
  void* p = nullptr;
  if (kind == Kind::kThpAnon) {
    p = Reserve(bytes, kHuge);
    if (!p) return Fail(why, "mmap (reserve)");
    if (::mmap(p, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) ==
        MAP_FAILED)
      return Fail(why, "mmap (thp)");
    ::madvise(p, bytes, MADV_HUGEPAGE);  // a hint: kernels without THP still run the workload
  } else {
    p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, Flags(*m), m->fd, 0);
    if (p == MAP_FAILED) return Fail(why, "mmap");
  }
  m->base = static_cast<uint64_t*>(p);
  return 0;
}

void Destroy(Mapping& m) {
  if (m.base) ::munmap(m.base, m.bytes);
  if (m.fd >= 0) ::close(m.fd);
  m.base = nullptr;
  m.fd = -1;
  m.shadow.clear();
}

int UnmapAndRemap(Mapping& m, size_t page, size_t n, std::string* why) {
  errno = 0;
  char* at = reinterpret_cast<char*>(m.base) + page * kPage;
  const size_t len = n * kPage;
  if (::munmap(at, len) != 0) return Fail(why, "munmap");
  void* p = ::mmap(at, len, Prot(m), Flags(m) | MAP_FIXED_NOREPLACE, m.fd,
                   m.fd >= 0 ? off_t(page * kPage) : 0);
  if (p == MAP_FAILED) return Fail(why, "mmap(MAP_FIXED_NOREPLACE) after munmap");
  if (p != at) {  // kernels before 4.17 treat the flag as a hint
    ::munmap(p, len);
    errno = EEXIST;
    return Fail(why, "mmap(MAP_FIXED_NOREPLACE) placed elsewhere");
  }
  if (m.kind == Kind::kThpAnon) ::madvise(at, len, MADV_HUGEPAGE);
  if (m.kind != Kind::kMemfd && m.kind != Kind::kFile)  // a new anonymous object reads as zeros
    std::fill(m.shadow.begin() + page * kElemsPerPage,
              m.shadow.begin() + (page + n) * kElemsPerPage, 0);
  return 0;
}

// The VMAs that make up [start, end): mremap moves one VMA at a time, and a mapping is several
// once hmmkit's userfaultfd registrations or a remapped hole have split it.
std::vector<std::pair<uintptr_t, uintptr_t>> Pieces(uintptr_t start, uintptr_t end) {
  std::vector<std::pair<uintptr_t, uintptr_t>> out;
  FILE* f = std::fopen("/proc/self/maps", "re");
  if (!f) return out;
  char line[512];
  while (std::fgets(line, sizeof line, f)) {
    unsigned long lo = 0, hi = 0;
    if (std::sscanf(line, "%lx-%lx", &lo, &hi) != 2) continue;
    if (hi <= start || lo >= end) continue;
    out.emplace_back(std::max<uintptr_t>(lo, start), std::min<uintptr_t>(hi, end));
  }
  std::fclose(f);
  return out;
}

int Move(Mapping& m, std::string* why) {
  errno = 0;
  void* target = Reserve(m.bytes, m.kind == Kind::kThpAnon ? kHuge : kPage);
  if (!target) return Fail(why, "mmap (reserve for mremap)");
  const uintptr_t from = reinterpret_cast<uintptr_t>(m.base);
  const uintptr_t to = reinterpret_cast<uintptr_t>(target);
  size_t moved = 0;
  for (auto [lo, hi] : Pieces(from, from + m.bytes)) {
    void* p = ::mremap(reinterpret_cast<void*>(lo), hi - lo, hi - lo, MREMAP_MAYMOVE | MREMAP_FIXED,
                       reinterpret_cast<void*>(to + (lo - from)));
    if (p == MAP_FAILED) return Fail(why, "mremap");  // the mapping is torn now: the run stops
    moved += hi - lo;
  }
  if (moved != m.bytes) {
    errno = EFAULT;
    return Fail(why, "mremap: the mapping's VMAs do not cover it");
  }
  m.base = static_cast<uint64_t*>(target);
  return 0;
}

int DontNeed(Mapping& m, size_t page, size_t n, std::string* why) {
  errno = 0;
  if (::madvise(reinterpret_cast<char*>(m.base) + page * kPage, n * kPage, MADV_DONTNEED) != 0)
    return Fail(why, "madvise(MADV_DONTNEED)");
  if (m.private_anon())
    std::fill(m.shadow.begin() + page * kElemsPerPage,
              m.shadow.begin() + (page + n) * kElemsPerPage, 0);
  return 0;
}

int Protect(Mapping& m, bool read_only, std::string* why) {
  errno = 0;
  if (::mprotect(m.base, m.bytes, read_only ? PROT_READ : PROT_READ | PROT_WRITE) != 0)
    return Fail(why, "mprotect");
  m.read_only = read_only;
  return 0;
}

}  // namespace stress
