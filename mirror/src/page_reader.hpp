// PageReader: the per-page snapshot behind AddressSpace::Snapshot/SnapshotInVma. Internal to
// hmmkit::mirror.
//
// Mechanisms, chosen by AddressSpace::features():
//   - PAGEMAP_SCAN (6.7+): one ioctl per VMA range (more only when the region buffer fills), every
//     page reported (category masks 0, adjacent pages with equal categories merged into one
//     region), return mask PRESENT|SWAPPED|FILE|PFNZERO|HUGE. FILE is asked for only where the
//     VMA does not decide it (private file, shmem and hugetlb mappings): it costs the kernel a page
//     lookup per page. kFile therefore follows the Vma passed to SnapshotInVma; a stale Vma gives
//     stale flags, which the notifier sequence check of the caller's retry loop discards.
//   - /proc/self/pagemap: pread(2) of 8 bytes per page, in chunks of 64 Ki entries.
// kExclusive of present private anonymous pages follows AddressSpace::Options::exclusive: under
// kAuto, before any fork, such a page is exclusive without a read (one process maps it); otherwise
// pagemap bit 56 is read (one more pread per range, over the span holding such pages). The
// pagemap fallback reads bit 56 for every page anyway.
//
// What the pagemap fallback cannot tell (PAGEMAP_SCAN can):
//   - without PFNs (no CAP_SYS_ADMIN): the zero page and the huge zero page read as present,
//     private, non-exclusive pages (so never writable, which is safe), and no THP is seen;
//   - with PFNs but without /proc/kpageflags: THP is not seen; the huge zero page is recognised by
//     the PFN learned once per process (read-faulting one aligned MADV_HUGEPAGE block);
//   - with both: a THP is recognised as 512 present entries with contiguous PFNs from a 512-aligned
//     PFN whose kpageflags say THP (or hugetlb); a PTE-mapped THP that is still whole reads as
//     PMD-mapped (order 9). Checked over whole aligned blocks inside the VMA, also where the range
//     covers only part of one (the read is widened to the block).
// KSM pages are anonymous but shared between processes: under kAuto before any fork they would read
// as exclusive. Use ExclusiveCheck::kAlways in processes that enable KSM (MADV_MERGEABLE,
// PR_SET_MEMORY_MERGE).
//
// SnapshotRunsInVma gives the same states as runs of equal pages: with PAGEMAP_SCAN and no bit-56
// read it never expands them per page, which is what keeps RangeFault's snapshot near the cost of
// the kernel walk. Other cases read per page as above and merge the result into runs.
//
// Ownership: a stack object borrowing its AddressSpace for one call. Buffers are per thread and
// reused: a snapshot does not allocate once the calling thread has made one.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "hmmkit/base/status.hpp"
#include "hmmkit/mirror/address_space.hpp"
#include "hmmkit/mirror/page_state.hpp"
#include "hmmkit/mirror/vma.hpp"

namespace hmmkit {

// `pages` consecutive pages with the same state. 32 bits keep a run at 8 bytes; a longer stretch is
// split into several runs.
struct PageRun {
  uint32_t pages = 0;
  PageState state;
};

class PageReader {
 public:
  explicit PageReader(const AddressSpace& as) : as_(as) {}

  // See AddressSpace::Snapshot / SnapshotInVma. SnapshotInVma also fails with EINVAL when
  // [start, end) is not inside vma.
  Status Snapshot(uintptr_t start, uintptr_t end, std::span<PageState> out) const;
  Status SnapshotInVma(const Vma& vma, uintptr_t start, uintptr_t end,
                       std::span<PageState> out) const;
  // Same as SnapshotInVma, as runs in address order that cover [start, end) exactly. `runs` is
  // cleared first and keeps its capacity: a warm caller's buffer is not reallocated.
  Status SnapshotRunsInVma(const Vma& vma, uintptr_t start, uintptr_t end,
                           std::vector<PageRun>& runs) const;

 private:
  Status CheckRange(const char* what, uintptr_t start, uintptr_t end, size_t out_size) const;
  // Fills out[0 .. (end - start) / page) for a range inside vma; out is zeroed by the caller.
  Status ScanVma(const Vma& vma, uintptr_t start, uintptr_t end, PageState* out) const;
  Status ScanWithPagemapScan(const Vma& vma, uintptr_t start, uintptr_t end, PageState* out) const;
  // Runs of [start, end) inside vma, ScanVma's result merged (runs is empty on entry).
  Status ScanVmaRuns(const Vma& vma, uintptr_t start, uintptr_t end,
                     std::vector<PageRun>& runs) const;
  Status ScanRunsWithPagemapScan(const Vma& vma, uintptr_t start, uintptr_t end,
                                 std::vector<PageRun>& runs) const;
  // Calls fn(region_start, region_end, state) for each PAGEMAP_SCAN region clipped to [start, end),
  // in address order, before any kExclusive is known.
  template <class Fn>
  Status ForEachScanRegion(const Vma& vma, uintptr_t start, uintptr_t end, Fn&& fn) const;
  Status ScanWithPagemapRead(const Vma& vma, uintptr_t start, uintptr_t end, PageState* out) const;
  // Sets kExclusive on present private anonymous pages (see the header comment).
  Status MarkExclusive(uintptr_t start, uintptr_t end, PageState* out) const;
  Status MarkExclusiveRuns(uintptr_t start, uintptr_t end, std::vector<PageRun>& runs) const;
  // Reads the pagemap entries of count pages from addr; entries past the end of the user address
  // space read as 0.
  Status ReadPagemap(uintptr_t addr, size_t count, uint64_t* entries) const;
  // Whether the block of pages whose entries are given is mapped by one huge page, and whether it
  // is the huge zero page.
  Status CheckHugeBlock(const uint64_t* entries, size_t count, bool* huge, bool* zero) const;

  size_t base() const { return as_.features().page_size; }

  const AddressSpace& as_;
};

}  // namespace hmmkit
