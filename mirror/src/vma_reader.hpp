// VmaReader: the VMA queries behind AddressSpace::FindVma/FindVmas, and the classification of a
// mapping into a VmaKind. Internal to hmmkit::mirror.
//
// Two mechanisms, chosen by AddressSpace::features():
//   - PROCMAP_QUERY (6.11+): one ioctl on the AddressSpace's /proc/self/maps descriptor per VMA
//     (COVERING_OR_NEXT_VMA to iterate). Reports the hugetlb page size directly.
//   - /proc/self/maps: opened afresh per query (a seq_file must be read from offset 0 to see the
//     current VMAs), read with read(2) in 64 KiB chunks and parsed incrementally; parsing stops at
//     the first line past the queried range.
//
// Classification (what VmaKind a mapping is) is by device number first, names second:
//   - no file (inode 0, device 0:0): kAnon, except the kernel's special mappings ([vdso], [vvar],
//     [vvar_vclock], [vsyscall], [uprobes] and any other bracketed name that is not [heap],
//     [stack], [stack:N] or [anon:...]) which are kSpecial;
//   - the device of the kernel's internal shm mount (MAP_SHARED|MAP_ANONYMOUS, memfd, SysV shm) and
//     of tmpfs mounts: kShmem; the devices of the internal hugetlbfs mounts (one per huge page
//     size) and of hugetlbfs mounts: kHugetlb with that page size. The internal devices are learned
//     once per process with fstat of a memfd (and of one MFD_HUGETLB memfd per size in
//     /sys/kernel/mm/hugepages); the others come from /proc/self/mountinfo, cached, and re-read
//     when a device is missing and the mount table changed since the last read (poll(2) on
//     mountinfo);
//   - ramfs is kFile: userfaultfd cannot register it;
//   - char and block device mappings (a "/dev/..." path whose stat matches the VMA's device and
//     inode) and anon_inode files (io_uring, perf, ...) are kSpecial; a private mapping of
//     /dev/zero is anonymous memory (kAnon);
//   - names decide only where the device is unknown: "/anon_hugepage (deleted)" is hugetlb,
//     "/dev/zero (deleted)", "/memfd:", "/SYSV" and "[anon_shmem:" are shmem;
//   - every other named file is kFile.
// Known limits: a device number reused by a different filesystem after an unmount is seen only once
// the mount table changes again; a child that calls unshare(CLONE_NEWNS) keeps its parent's view.
//
// Ownership: a stack object borrowing its AddressSpace for one call. The caches it uses are
// process-wide and thread-safe. Allocates only for the VMA names it returns (FindVma/FindVmas) and
// on first use (buffers, caches).
#pragma once

#include <cstdint>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "hmmkit/base/status.hpp"
#include "hmmkit/mirror/address_space.hpp"
#include "hmmkit/mirror/vma.hpp"

namespace hmmkit {

class VmaReader {
 public:
  explicit VmaReader(const AddressSpace& as) : as_(as) {}

  // The VMA containing addr, or nullopt. Errors: those of the query (the errno of the ioctl or of
  // reading /proc/self/maps).
  Result<std::optional<Vma>> Find(uintptr_t addr) const;
  // The VMAs intersecting [start, end), in address order, not clipped.
  Result<std::vector<Vma>> FindRange(uintptr_t start, uintptr_t end) const;

  // Calls fn(const Vma&) -> bool for each VMA intersecting [start, end), in address order, until it
  // returns false. The Vma is a per-thread scratch object, valid only during the call; fn must not
  // call back into VmaReader. Does not allocate once the thread's scratch buffers exist.
  template <class Fn>
  Status ForEach(uintptr_t start, uintptr_t end, Fn&& fn) const {
    using F = std::remove_reference_t<Fn>;
    return ForEachImpl(start, end, &fn,
                       [](void* ctx, const Vma& vma) { return (*static_cast<F*>(ctx))(vma); });
  }

 private:
  using Callback = bool (*)(void* ctx, const Vma& vma);
  Status ForEachImpl(uintptr_t start, uintptr_t end, void* ctx, Callback cb) const;
  Status ForEachProcmap(uintptr_t start, uintptr_t end, void* ctx, Callback cb) const;
  Status ForEachMaps(uintptr_t start, uintptr_t end, void* ctx, Callback cb) const;
  // One PROCMAP_QUERY. *found is false on ENOENT (no such VMA).
  Status QueryProcmap(uintptr_t addr, bool covering_or_next, Vma& out, bool* found) const;
  bool use_procmap() const;

  const AddressSpace& as_;
};

}  // namespace hmmkit
