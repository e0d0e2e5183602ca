// Per-page snapshot: PAGEMAP_SCAN, else /proc/self/pagemap. See page_reader.hpp.
#include "page_reader.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include <fmt/format.h>

#include "hmmkit/mirror/uapi.hpp"
#include "vma_reader.hpp"

namespace hmmkit {

namespace {

constexpr size_t kScanRegions = 1024;          // page_region entries per PAGEMAP_SCAN call
constexpr size_t kPagemapChunk = 64 * 1024;    // pagemap entries per pread (512 KiB)
constexpr uint64_t kKpfZeroPage = 1ULL << 24;  // /proc/kpageflags KPF_ZERO_PAGE

// Per-thread buffers, allocated on a thread's first snapshot and reused.
struct PageScratch {
  std::unique_ptr<page_region[]> regions;
  std::vector<uint64_t> entries;
  std::vector<PageState> states;  // per-page detour of SnapshotRunsInVma

  page_region* Regions() {
    if (!regions) regions.reset(new page_region[kScanRegions]);
    return regions.get();
  }
  uint64_t* Entries(size_t n) {
    if (entries.size() < n) entries.resize(n);
    return entries.data();
  }
  PageState* States(size_t n) {
    if (states.size() < n) states.resize(n);
    return states.data();
  }
};
PageScratch& Scratch() {
  thread_local PageScratch s;
  return s;
}

uint8_t Log2(size_t v) {
  return v ? uint8_t(__builtin_ctzl(v)) : 0;
}

// Map order of a PMD leaf in base pages: a page table holds page_size / 8 entries.
uint8_t PmdOrder(size_t page_size) {
  return uint8_t(Log2(page_size) - 3);
}

// True for a private anonymous page that a write could use without a copy-on-write fault, if this
// process is its only mapper: present, not page cache or shmem, not the zero page.
bool PrivateAnonPresent(PageState s) {
  return s.present() && !s.has(PageState::kFile) && !s.has(PageState::kZero);
}

std::string Range(uintptr_t start, uintptr_t end) {
  return fmt::format("{:#x}-{:#x}", start, end);
}

Status CheckInVma(const Vma& vma, uintptr_t start, uintptr_t end) {
  if (start < vma.start || end > vma.end) {
    return Status::FromErrno(EINVAL, fmt::format("snapshot {}: not inside the VMA {}",
                                                 Range(start, end), Range(vma.start, vma.end)));
  }
  return Status::Ok();
}

// [vsyscall] lies above the user address range the scan accepts; special mappings are never
// mirrored, their pages read as 0.
bool IgnoredSpecialError(const Vma& vma, const Status& st) {
  return !st.ok() && vma.kind == VmaKind::kSpecial &&
         (st.errno_value() == EFAULT || st.errno_value() == EINVAL);
}

bool SameState(PageState a, PageState b) {
  return a.flags == b.flags && a.order == b.order;
}

// Appends count pages of state s, extending the last run when it holds the same state.
void AppendRun(std::vector<PageRun>& runs, size_t count, PageState s) {
  constexpr size_t kMaxRun = std::numeric_limits<uint32_t>::max();
  if (!runs.empty() && SameState(runs.back().state, s)) {
    const size_t take = std::min(count, kMaxRun - runs.back().pages);
    runs.back().pages += uint32_t(take);
    count -= take;
  }
  while (count > 0) {
    const size_t take = std::min(count, kMaxRun);
    runs.push_back(PageRun{uint32_t(take), s});
    count -= take;
  }
}

void AppendStates(std::vector<PageRun>& runs, const PageState* states, size_t n) {
  for (size_t i = 0; i < n;) {
    size_t j = i + 1;
    while (j < n && SameState(states[j], states[i])) ++j;
    AppendRun(runs, j - i, states[i]);
    i = j;
  }
}

// The PFN of the huge zero page, learned once per process by read-faulting an aligned
// MADV_HUGEPAGE block; 0 when unknown (no THP, use_zero_page off, PFNs hidden).
uint64_t HugeZeroPfn(const KernelFeatures& f) {
  static const uint64_t pfn = [&f]() -> uint64_t {
    if (!f.pagemap_pfns || (f.thp != ThpMode::kAlways && f.thp != ThpMode::kMadvise)) return 0;
    char flag = 0;
    int zfd = ::open("/sys/kernel/mm/transparent_hugepage/use_zero_page", O_RDONLY | O_CLOEXEC);
    if (zfd < 0) return 0;
    ssize_t n = ::read(zfd, &flag, 1);
    ::close(zfd);
    if (n != 1 || flag != '1') return 0;  // a read fault would allocate a real THP
    const size_t block = f.page_size << PmdOrder(f.page_size);
    void* raw =
        mmap(nullptr, 2 * block, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw == MAP_FAILED) return 0;
    uintptr_t addr = (reinterpret_cast<uintptr_t>(raw) + block - 1) & ~(uintptr_t(block) - 1);
    uint64_t result = 0;
    if (madvise(reinterpret_cast<void*>(addr), block, MADV_HUGEPAGE) == 0) {
      (void)*reinterpret_cast<volatile const char*>(addr);
      int fd = ::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
      uint64_t e[2] = {0, 0};
      if (fd >= 0 && ::pread(fd, e, sizeof e, off_t(addr / f.page_size * 8)) == ssize_t(sizeof e)) {
        uint64_t p0 = e[0] & pagemap_bits::kPfnMask;
        uint64_t p1 = e[1] & pagemap_bits::kPfnMask;
        bool aligned = (p0 & ((uint64_t(1) << PmdOrder(f.page_size)) - 1)) == 0;
        if ((e[0] & pagemap_bits::kPresent) && aligned && p1 == p0 + 1 && p0 != f.zero_pfn) {
          result = p0;
        }
      }
      if (fd >= 0) ::close(fd);
    }
    munmap(raw, 2 * block);
    return result;
  }();
  return pfn;
}

}  // namespace

Status PageReader::CheckRange(const char* what, uintptr_t start, uintptr_t end,
                              size_t out_size) const {
  const size_t page = base();
  if ((start | end) & (page - 1)) {
    return Status::FromErrno(EINVAL,
                             fmt::format("{} {}: not page-aligned", what, Range(start, end)));
  }
  if (end <= start) {
    return Status::FromErrno(EINVAL, fmt::format("{} {}: empty range", what, Range(start, end)));
  }
  if (out_size < (end - start) / page) {
    return Status::FromErrno(
        EINVAL, fmt::format("{} {}: output holds {} pages, range has {}", what, Range(start, end),
                            out_size, (end - start) / page));
  }
  return Status::Ok();
}

Status PageReader::Snapshot(uintptr_t start, uintptr_t end, std::span<PageState> out) const {
  HMMKIT_RETURN_IF_ERROR(CheckRange("snapshot", start, end, out.size()));
  const size_t page = base();
  std::fill_n(out.data(), (end - start) / page, PageState{});
  Status status;
  HMMKIT_RETURN_IF_ERROR(VmaReader(as_).ForEach(start, end, [&](const Vma& vma) {
    uintptr_t s = std::max(start, vma.start);
    uintptr_t e = std::min(end, vma.end);
    status = ScanVma(vma, s, e, out.data() + (s - start) / page);
    return status.ok();
  }));
  return status;
}

Status PageReader::SnapshotInVma(const Vma& vma, uintptr_t start, uintptr_t end,
                                 std::span<PageState> out) const {
  HMMKIT_RETURN_IF_ERROR(CheckRange("snapshot", start, end, out.size()));
  HMMKIT_RETURN_IF_ERROR(CheckInVma(vma, start, end));
  std::fill_n(out.data(), (end - start) / base(), PageState{});
  return ScanVma(vma, start, end, out.data());
}

Status PageReader::SnapshotRunsInVma(const Vma& vma, uintptr_t start, uintptr_t end,
                                     std::vector<PageRun>& runs) const {
  runs.clear();
  HMMKIT_RETURN_IF_ERROR(CheckRange("snapshot", start, end, std::numeric_limits<size_t>::max()));
  HMMKIT_RETURN_IF_ERROR(CheckInVma(vma, start, end));
  return ScanVmaRuns(vma, start, end, runs);
}

template <class Fn>
Status PageReader::ForEachScanRegion(const Vma& vma, uintptr_t start, uintptr_t end,
                                     Fn&& fn) const {
  const size_t page = base();
  const uint8_t huge_order =
      vma.kind == VmaKind::kHugetlb ? Log2(vma.page_size / page) : PmdOrder(page);
  page_region* regions = Scratch().Regions();
  pm_scan_arg arg{};
  arg.size = sizeof arg;
  arg.start = start;
  arg.end = end;
  arg.vec = reinterpret_cast<uintptr_t>(regions);
  arg.vec_len = kScanRegions;
  // PAGE_IS_FILE costs the kernel a page lookup per present page (measured: 2.6x the time of a
  // scan without it). A VMA's kind often decides it: every page of a MAP_SHARED mapping is a
  // page-cache or shmem page, no page of a private anonymous VMA is. Only private file, shmem and
  // hugetlb mappings mix both (copy-on-write), and only for them is the kernel asked.
  const bool file_known = vma.shared || vma.kind == VmaKind::kAnon;
  const uint8_t known_file_flag = vma.shared ? PageState::kFile : 0;
  arg.return_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO | PAGE_IS_HUGE |
                    (file_known ? 0 : PAGE_IS_FILE);
  for (;;) {
    int n;
    do {
      n = as_.sys().Ioctl(as_.pagemap_fd_, PAGEMAP_SCAN, &arg);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
      int err = errno;
      return Status::FromErrno(
          err, fmt::format("PAGEMAP_SCAN {}: {}", Range(arg.start, end), strerror(err)));
    }
    for (int i = 0; i < n; ++i) {
      const page_region& r = regions[i];
      uint64_t c = r.categories;
      PageState s;
      if (c & PAGE_IS_PRESENT) {
        s.flags |= PageState::kPresent;
        if (c & PAGE_IS_PFNZERO) s.flags |= PageState::kZero;
        if (c & PAGE_IS_HUGE) {
          s.flags |= PageState::kHuge;
          s.order = huge_order;
        }
      }
      if (c & PAGE_IS_SWAPPED) s.flags |= PageState::kSwapped;
      if (c & PAGE_IS_FILE) s.flags |= PageState::kFile;
      if (c & (PAGE_IS_PRESENT | PAGE_IS_SWAPPED)) s.flags |= known_file_flag;
      uintptr_t rs = std::max<uintptr_t>(r.start, start);
      uintptr_t re = std::min<uintptr_t>(r.end, end);
      if (rs < re) fn(rs, re, s);
    }
    if (arg.walk_end >= end) break;
    if (arg.walk_end <= arg.start) {
      return Status::FromErrno(EIO, fmt::format("PAGEMAP_SCAN {}: no progress at {:#x}",
                                                Range(start, end), arg.walk_end));
    }
    arg.start = arg.walk_end;  // the region buffer filled: go on where the walk stopped
  }
  return Status::Ok();
}

Status PageReader::ScanVma(const Vma& vma, uintptr_t start, uintptr_t end, PageState* out) const {
  Status st = as_.features().pagemap_scan ? ScanWithPagemapScan(vma, start, end, out)
                                          : ScanWithPagemapRead(vma, start, end, out);
  if (IgnoredSpecialError(vma, st)) {
    std::fill_n(out, (end - start) / base(), PageState{});
    return Status::Ok();
  }
  return st;
}

Status PageReader::ScanVmaRuns(const Vma& vma, uintptr_t start, uintptr_t end,
                               std::vector<PageRun>& runs) const {
  const size_t n = (end - start) / base();
  Status st;
  if (as_.features().pagemap_scan) {
    st = ScanRunsWithPagemapScan(vma, start, end, runs);
  } else {
    // pread decides per page anyway (THP blocks, bit 56): read per page, then merge.
    PageState* states = Scratch().States(n);
    std::fill_n(states, n, PageState{});
    st = ScanWithPagemapRead(vma, start, end, states);
    if (st.ok()) AppendStates(runs, states, n);
  }
  if (IgnoredSpecialError(vma, st)) {
    runs.clear();
    AppendRun(runs, n, PageState{});
    return Status::Ok();
  }
  return st;
}

Status PageReader::ScanWithPagemapScan(const Vma& vma, uintptr_t start, uintptr_t end,
                                       PageState* out) const {
  const size_t page = base();
  HMMKIT_RETURN_IF_ERROR(
      ForEachScanRegion(vma, start, end, [&](uintptr_t rs, uintptr_t re, PageState s) {
        std::fill(out + (rs - start) / page, out + (re - start) / page, s);
      }));
  return MarkExclusive(start, end, out);
}

Status PageReader::ScanRunsWithPagemapScan(const Vma& vma, uintptr_t start, uintptr_t end,
                                           std::vector<PageRun>& runs) const {
  const size_t page = base();
  uintptr_t cur = start;  // pages no region reports read as 0, as in the per-page path
  HMMKIT_RETURN_IF_ERROR(
      ForEachScanRegion(vma, start, end, [&](uintptr_t rs, uintptr_t re, PageState s) {
        rs = std::max(rs, cur);  // regions come in order and never overlap; stay safe if not
        if (rs >= re) return;
        if (rs > cur) AppendRun(runs, (rs - cur) / page, PageState{});
        AppendRun(runs, (re - rs) / page, s);
        cur = re;
      }));
  if (cur < end) AppendRun(runs, (end - cur) / page, PageState{});
  return MarkExclusiveRuns(start, end, runs);
}

Status PageReader::MarkExclusive(uintptr_t start, uintptr_t end, PageState* out) const {
  const size_t page = base();
  const size_t n = (end - start) / page;
  size_t first = n, last = 0;
  for (size_t i = 0; i < n; ++i) {
    if (PrivateAnonPresent(out[i])) {
      if (first == n) first = i;
      last = i;
    }
  }
  if (first == n) return Status::Ok();
  if (as_.options().exclusive == ExclusiveCheck::kAuto && AddressSpace::fork_generation() == 0) {
    // Before any fork, a private anonymous page has one mapper: this process.
    for (size_t i = first; i <= last; ++i)
      if (PrivateAnonPresent(out[i])) out[i].flags |= PageState::kExclusive;
    return Status::Ok();
  }
  // Read bit 56 over the span that holds such pages.
  for (size_t i = first; i <= last;) {
    size_t count = std::min(kPagemapChunk, last + 1 - i);
    uint64_t* entries = Scratch().Entries(count);
    HMMKIT_RETURN_IF_ERROR(ReadPagemap(start + i * page, count, entries));
    for (size_t j = 0; j < count; ++j) {
      uint64_t e = entries[j];
      if (out[i + j].present() && (e & pagemap_bits::kPresent) && (e & pagemap_bits::kExclusive)) {
        out[i + j].flags |= PageState::kExclusive;
      }
    }
    i += count;
  }
  return Status::Ok();
}

Status PageReader::MarkExclusiveRuns(uintptr_t start, uintptr_t end,
                                     std::vector<PageRun>& runs) const {
  if (std::none_of(runs.begin(), runs.end(),
                   [](const PageRun& r) { return PrivateAnonPresent(r.state); }))
    return Status::Ok();
  if (as_.options().exclusive == ExclusiveCheck::kAuto && AddressSpace::fork_generation() == 0) {
    // Before any fork, a private anonymous page has one mapper: this process.
    for (PageRun& r : runs)
      if (PrivateAnonPresent(r.state)) r.state.flags |= PageState::kExclusive;
    return Status::Ok();
  }
  // Bit 56 differs per page: expand, read it, merge again.
  const size_t n = (end - start) / base();
  PageState* states = Scratch().States(n);
  PageState* p = states;
  for (const PageRun& r : runs) p = std::fill_n(p, r.pages, r.state);
  HMMKIT_RETURN_IF_ERROR(MarkExclusive(start, end, states));
  runs.clear();
  AppendStates(runs, states, n);
  return Status::Ok();
}

Status PageReader::ReadPagemap(uintptr_t addr, size_t count, uint64_t* entries) const {
  const size_t page = base();
  size_t done = 0;  // bytes
  const size_t want = count * sizeof(uint64_t);
  auto* buf = reinterpret_cast<char*>(entries);
  while (done < want) {
    off_t off = off_t(addr / page * sizeof(uint64_t) + done);
    ssize_t n;
    do {
      n = as_.sys().Pread(as_.pagemap_fd_, buf + done, want - done, off);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
      int err = errno;
      return Status::FromErrno(err, fmt::format("pread /proc/self/pagemap {}: {}",
                                                Range(addr, addr + count * page), strerror(err)));
    }
    if (n == 0) {  // past the user address range
      memset(buf + done, 0, want - done);
      break;
    }
    done += size_t(n);
  }
  return Status::Ok();
}

Status PageReader::CheckHugeBlock(const uint64_t* entries, size_t count, bool* huge,
                                  bool* zero) const {
  *huge = *zero = false;
  const uint64_t pfn0 = entries[0] & pagemap_bits::kPfnMask;
  if (pfn0 == 0 || (pfn0 & (count - 1)) != 0) return Status::Ok();
  for (size_t j = 0; j < count; ++j) {
    uint64_t e = entries[j];
    if (!(e & pagemap_bits::kPresent) || (e & pagemap_bits::kPfnMask) != pfn0 + j)
      return Status::Ok();
  }
  if (as_.kpageflags_fd_ < 0) {
    *huge = *zero = pfn0 == HugeZeroPfn(as_.features());
    return Status::Ok();
  }
  uint64_t flags = 0;
  ssize_t n;
  do {
    n = as_.sys().Pread(as_.kpageflags_fd_, &flags, sizeof flags, off_t(pfn0 * sizeof flags));
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    int err = errno;
    return Status::FromErrno(
        err, fmt::format("pread /proc/kpageflags pfn {:#x}: {}", pfn0, strerror(err)));
  }
  if (n != ssize_t(sizeof flags)) return Status::Ok();
  *huge = (flags & (kpageflags_bits::kThp | kpageflags_bits::kHuge)) != 0;
  *zero = *huge && (flags & kKpfZeroPage) != 0;
  return Status::Ok();
}

Status PageReader::ScanWithPagemapRead(const Vma& vma, uintptr_t start, uintptr_t end,
                                       PageState* out) const {
  const KernelFeatures& f = as_.features();
  const size_t page = base();
  const bool hugetlb = vma.kind == VmaKind::kHugetlb;
  const uint8_t hugetlb_order = hugetlb ? Log2(vma.page_size / page) : 0;
  const uint64_t zero_pfn = f.pagemap_pfns ? f.zero_pfn : 0;
  // THP detection needs PFNs, and kpageflags or the learned huge zero page PFN.
  const bool detect_thp =
      !hugetlb && f.pagemap_pfns && (as_.kpageflags_fd_ >= 0 || HugeZeroPfn(f) != 0);
  const uint8_t pmd_order = PmdOrder(page);
  const size_t block = page << pmd_order;
  const size_t block_pages = size_t(1) << pmd_order;

  // Widen to whole aligned blocks inside the VMA so that a partly covered THP is recognised.
  uintptr_t scan_start = start, scan_end = end;
  if (detect_thp) {
    scan_start = std::max(vma.start, start & ~(uintptr_t(block) - 1));
    uintptr_t up = (end + block - 1) & ~(uintptr_t(block) - 1);
    scan_end = up < end ? vma.end : std::min(vma.end, up);  // up < end: overflow
  }

  for (uintptr_t cur = scan_start; cur < scan_end;) {
    uintptr_t chunk_end =
        scan_end - cur > kPagemapChunk * page ? cur + kPagemapChunk * page : scan_end;
    if (detect_thp && chunk_end < scan_end) {
      uintptr_t aligned = chunk_end & ~(uintptr_t(block) - 1);  // keep blocks inside one chunk
      if (aligned > cur) chunk_end = aligned;
    }
    const size_t count = (chunk_end - cur) / page;
    uint64_t* entries = Scratch().Entries(count);
    HMMKIT_RETURN_IF_ERROR(ReadPagemap(cur, count, entries));

    uintptr_t lo = std::max(cur, start), hi = std::min(chunk_end, end);
    for (uintptr_t a = lo; a < hi; a += page) {
      uint64_t e = entries[(a - cur) / page];
      PageState s;
      if (e & pagemap_bits::kPresent) {
        s.flags |= PageState::kPresent;
        if (e & pagemap_bits::kExclusive) s.flags |= PageState::kExclusive;
        if (zero_pfn != 0 && (e & pagemap_bits::kPfnMask) == zero_pfn) {
          s.flags = PageState::kPresent | PageState::kZero;
        }
        if (hugetlb) {
          s.flags |= PageState::kHuge;
          s.order = hugetlb_order;
        }
      } else if (e & pagemap_bits::kSwapped) {
        s.flags |= PageState::kSwapped;
      }
      if ((e & pagemap_bits::kFileOrShared) &&
          (e & (pagemap_bits::kPresent | pagemap_bits::kSwapped)))
        s.flags |= PageState::kFile;
      out[(a - start) / page] = s;
    }

    if (detect_thp) {
      uintptr_t b = (cur + block - 1) & ~(uintptr_t(block) - 1);
      for (; b + block <= chunk_end && b + block > b; b += block) {
        if (b + block <= start || b >= end) continue;  // widened part only
        bool huge = false, zero = false;
        HMMKIT_RETURN_IF_ERROR(
            CheckHugeBlock(entries + (b - cur) / page, block_pages, &huge, &zero));
        if (!huge) continue;
        uintptr_t bs = std::max<uintptr_t>(b, start), be = std::min<uintptr_t>(b + block, end);
        for (uintptr_t a = bs; a < be; a += page) {
          PageState& s = out[(a - start) / page];
          s.flags |= PageState::kHuge;
          s.order = pmd_order;
          // pagemap marks the huge zero page "file" (it is not anonymous); PAGEMAP_SCAN does not.
          if (zero) s.flags = PageState::kPresent | PageState::kZero | PageState::kHuge;
        }
      }
    }
    cur = chunk_end;
  }
  return Status::Ok();
}

}  // namespace hmmkit
