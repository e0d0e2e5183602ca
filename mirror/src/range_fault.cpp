// RangeFault: hmm_range_fault over the real address space. Small pure helpers decide what the entry
// is and whether it needs a fault, once per run of equal pages where every page asks the same
// (per page where requests or device pages differ); FaultVmaPiece faults in batches.
#include "hmmkit/mirror/range_fault.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "hmmkit/base/log.hpp"
#include "hmmkit/mirror/mm_monitor.hpp"
#include "page_reader.hpp"

namespace hmmkit {

const char* ToString(PageKind kind) {
  switch (kind) {
    case PageKind::kSystem:
      return "system";
    case PageKind::kZero:
      return "zero";
    case PageKind::kDevicePrivate:
      return "device-private";
    case PageKind::kDeviceCoherent:
      return "device-coherent";
  }
  return "?";
}

namespace {

// A page needs one of these to satisfy its request.
enum class Need : uint8_t { kNone, kRead, kWrite, kMigrateBack };

// Whether the CPU may write a present system page through this VMA without a fault: the VMA is
// writable and the page is not the zero page, and is either shared or exclusively mapped anon
// (a COW-shared page after fork, or a page-cache page in a private mapping, is not).
bool CpuWritable(const Vma& vma, const PageState& st) {
  if (!st.present() || st.has(PageState::kZero) || !vma.write) return false;
  if (vma.shared) return true;
  return !st.has(PageState::kFile) && st.has(PageState::kExclusive);
}

struct Decision {
  uint64_t entry = 0;
  Need need = Need::kNone;
};

Decision DecideSystem(const Vma& vma, const PageState& st, uint64_t req) {
  const bool want_fault = (req & hmm_pfn::kReqFault) != 0;
  const bool want_write = want_fault && (req & hmm_pfn::kReqWrite) != 0;
  const bool writable = CpuWritable(vma, st);
  if (want_fault && !st.present()) return {0, want_write ? Need::kWrite : Need::kRead};
  if (want_write && !writable) return {0, Need::kWrite};
  if (!st.present()) return {0, Need::kNone};
  uint64_t flags = hmm_pfn::kValid | (writable ? hmm_pfn::kWrite : 0);
  PageKind kind = st.has(PageState::kZero) ? PageKind::kZero : PageKind::kSystem;
  return {hmm_pfn::Make(flags, st.has(PageState::kHuge) ? st.order : 0, kind, 0), Need::kNone};
}

Decision DecideDevice(const Vma& vma, const PageState& st, const DevicePageInfo& dev, uint64_t req,
                      const void* owner) {
  const bool want_fault = (req & hmm_pfn::kReqFault) != 0;
  // A device-exclusive page is out of everyone's reach; a fault request revokes exclusivity
  // (kernel: the fault path restores the page).
  if (dev.exclusive) return {0, want_fault ? Need::kMigrateBack : Need::kNone};
  if (dev.kind == PageKind::kDevicePrivate) {
    if (dev.owner == owner) {
      uint64_t flags = hmm_pfn::kValid | (dev.writable ? hmm_pfn::kWrite : 0);
      return {hmm_pfn::Make(flags, dev.order, PageKind::kDevicePrivate, dev.id), Need::kNone};
    }
    // Another device's private page reads as not present; a fault brings it back to RAM.
    return {0, want_fault ? Need::kMigrateBack : Need::kNone};
  }
  // Device-coherent memory is mapped for the CPU; the CPU page tables decide the permissions.
  Decision d = DecideSystem(vma, st, req);
  if (d.need == Need::kNone && (d.entry & hmm_pfn::kValid)) {
    uint64_t flags = d.entry & (hmm_pfn::kValid | hmm_pfn::kWrite);
    d.entry = hmm_pfn::Make(flags, dev.order, PageKind::kDeviceCoherent, dev.id);
  }
  return d;
}

uint64_t RequestOf(const Range& r, size_t i) {
  return ((r.hmm_pfns[i] & r.pfn_flags_mask) | r.default_flags) & hmm_pfn::kReqMask;
}

// Pages [first, end) of a VMA piece that need the same fault.
struct FaultRun {
  size_t first;
  size_t end;
  Need need;
};

// Per-thread scratch buffers: no allocation per call once warm.
struct Scratch {
  std::vector<PageRun> runs;
  std::vector<DevicePageInfo> devices;
  std::vector<FaultRun> faults;
};
Scratch& ThreadScratch() {
  thread_local Scratch s;
  return s;
}

// out[0, n) = v. GCC -O2 stores one word per cycle here (0.6 ns per entry, 5% of the kernel's walk
// of a page); copying the first 4 KiB of entries forward with memcpy runs at about 0.15 ns.
void FillEntries(uint64_t* out, size_t n, uint64_t v) {
  constexpr size_t kBlock = 512;
  const size_t head = std::min<size_t>(n, 64);
  for (size_t i = 0; i < head; ++i) out[i] = v;
  for (size_t done = head; done < n;) {
    const size_t c = std::min({done, n - done, kBlock});
    std::memcpy(out + done, out, c * sizeof *out);
    done += c;
  }
}

// Records that pages [i, j) need `need`, extending the previous run when adjacent and equal: one
// fault call per contiguous run of the same need.
void AddNeed(std::vector<FaultRun>& faults, size_t i, size_t j, Need need) {
  if (need == Need::kNone) return;
  if (!faults.empty() && faults.back().end == i && faults.back().need == need) {
    faults.back().end = j;
  } else {
    faults.push_back(FaultRun{i, j, need});
  }
}

Status NoVmaError(uintptr_t addr, const char* why) {
  return Status::FromErrno(
      EFAULT, fmt::format("range_fault: page {:#x} must be faulted but {}", addr, why));
}

// Handles [s, e) outside any usable VMA: kError entries, or EFAULT if a fault was asked for.
Status FillUnusable(Range& r, uintptr_t s, uintptr_t e, size_t page, const char* why) {
  for (uintptr_t a = s; a < e; a += page) {
    size_t i = (a - r.start) / page;
    if (RequestOf(r, i) & hmm_pfn::kReqFault) return NoVmaError(a, why);
  }
  for (uintptr_t a = s; a < e; a += page) r.hmm_pfns[(a - r.start) / page] = hmm_pfn::kError;
  return Status::Ok();
}

// One VMA piece [s, e): snapshot, decide, fault the runs that need it, repeat until settled.
Status FaultVmaPiece(AddressSpace& as, Range& r, const Vma& vma, uintptr_t s, uintptr_t e) {
  const size_t page = as.features().page_size;
  const size_t n = (e - s) / page;
  const size_t first = (s - r.start) / page;
  uint64_t* out = r.hmm_pfns.data() + first;
  Scratch& scratch = ThreadScratch();
  // Without pfn_flags_mask every page asks the same: one decision per run of equal pages.
  const bool per_page_req = r.pfn_flags_mask != 0;
  const uint64_t common_req = r.default_flags & hmm_pfn::kReqMask;

  // REQ_WRITE on a read-only VMA can never be satisfied.
  if (!vma.write) {
    for (size_t i = 0; i < (per_page_req ? n : 1); ++i) {
      uint64_t req = RequestOf(r, first + i);
      if ((req & hmm_pfn::kReqFault) && (req & hmm_pfn::kReqWrite))
        return Status::FromErrno(
            EPERM,
            fmt::format("range_fault: write requested at {:#x} in a read-only mapping {:#x}-{:#x}",
                        s + i * page, vma.start, vma.end));
    }
  }

  constexpr int kMaxRounds = 8;
  for (int round = 0; round < kMaxRounds; ++round) {
    HMMKIT_RETURN_IF_ERROR(PageReader(as).SnapshotRunsInVma(vma, s, e, scratch.runs));
    bool devices = false;
    if (as.has_device_pages()) {
      scratch.devices.resize(n);
      devices = as.LookupDevicePages(s, e, scratch.devices) != 0;
    }
    scratch.faults.clear();
    size_t i = 0;
    for (const PageRun& run : scratch.runs) {
      const size_t j = i + run.pages;
      if (!devices && !per_page_req) {
        const Decision d = DecideSystem(vma, run.state, common_req);
        FillEntries(out + i, j - i, d.entry);
        AddNeed(scratch.faults, i, j, d.need);
        i = j;
        continue;
      }
      for (; i < j; ++i) {
        const uint64_t req = RequestOf(r, first + i);
        const DevicePageInfo* dev = devices ? &scratch.devices[i] : nullptr;
        const Decision d = dev && (dev->kind != PageKind::kSystem || dev->exclusive)
                               ? DecideDevice(vma, run.state, *dev, req, r.dev_private_owner)
                               : DecideSystem(vma, run.state, req);
        out[i] = d.entry;
        AddNeed(scratch.faults, i, i + 1, d.need);
      }
    }
    if (i != n)
      return Status::FromErrno(
          EIO,
          fmt::format("range_fault: snapshot of {:#x}-{:#x} covers {} of {} pages", s, e, i, n));
    if (scratch.faults.empty()) return Status::Ok();

    for (const FaultRun& f : scratch.faults) {
      const uintptr_t rs = s + f.first * page, re = s + f.end * page;
      if (f.need == Need::kMigrateBack) {
        HMMKIT_RETURN_IF_ERROR(as.MigrateDevicePagesToRam(rs, re));
      } else {
        HMMKIT_RETURN_IF_ERROR(as.Populate(rs, re, f.need == Need::kWrite));
      }
    }
    // A change that raced with the faults also moved the sequence: let the caller retry.
    if (r.notifier->CheckRetry(r.notifier_seq))
      return Status::FromErrno(EBUSY, "range_fault: invalidated while faulting");
  }
  return Status::FromErrno(EBUSY,
                           fmt::format("range_fault: pages in {:#x}-{:#x} did not settle", s, e));
}

}  // namespace

Status RangeFault(AddressSpace& as, Range& r) {
  const size_t page = as.features().page_size;
  if (r.notifier == nullptr) return Status::FromErrno(EINVAL, "range_fault: no notifier");
  if ((r.start | r.end) & (page - 1) || r.end <= r.start)
    return Status::FromErrno(EINVAL,
                             fmt::format("range_fault: bad range {:#x}-{:#x}", r.start, r.end));
  if (r.hmm_pfns.size() < (r.end - r.start) / page)
    return Status::FromErrno(EINVAL, "range_fault: hmm_pfns shorter than the range");
  if (r.notifier->CheckRetry(r.notifier_seq))
    return Status::FromErrno(EBUSY, "range_fault: notifier sequence moved");

  // Watch first, then read: a change after the snapshot must raise an invalidation. Changes
  // already made but not yet dispatched would leave stale device entries: let them land.
  if (MmMonitor* m = as.monitor()) {
    if (m->pending_changes() != 0) m->Sync();
    HMMKIT_RETURN_IF_ERROR(m->EnsureWatched(r.start, r.end));
  }

  auto vmas = as.FindVmas(r.start, r.end);
  if (!vmas.ok()) return vmas.status();
  uintptr_t cur = r.start;
  for (const Vma& vma : *vmas) {
    const uintptr_t s = std::max(vma.start, r.start), e = std::min(vma.end, r.end);
    if (s > cur) HMMKIT_RETURN_IF_ERROR(FillUnusable(r, cur, s, page, "no VMA maps it"));
    if (!vma.accessible()) {
      HMMKIT_RETURN_IF_ERROR(FillUnusable(r, s, e, page, "its VMA is PROT_NONE"));
    } else if (vma.kind == VmaKind::kSpecial) {
      HMMKIT_RETURN_IF_ERROR(FillUnusable(r, s, e, page, "its VMA is a special mapping"));
    } else {
      HMMKIT_RETURN_IF_ERROR(FaultVmaPiece(as, r, vma, s, e));
    }
    cur = e;
  }
  if (cur < r.end) HMMKIT_RETURN_IF_ERROR(FillUnusable(r, cur, r.end, page, "no VMA maps it"));

  if (r.notifier->CheckRetry(r.notifier_seq))
    return Status::FromErrno(EBUSY, "range_fault: notifier sequence moved");
  return Status::Ok();
}

namespace detail {

RequestSaver::RequestSaver(const Range& range) {
  if (range.pfn_flags_mask != 0) {
    saved_.resize(range.hmm_pfns.size());
    for (size_t i = 0; i < saved_.size(); ++i) saved_[i] = range.hmm_pfns[i] & hmm_pfn::kReqMask;
  }
}

void RequestSaver::Restore(Range& range) const {
  for (size_t i = 0; i < saved_.size(); ++i) range.hmm_pfns[i] = saved_[i];
}

Status RetryTimedOut(const Range& range, std::chrono::milliseconds timeout, unsigned attempts) {
  return Status::FromErrno(
      ETIMEDOUT,
      fmt::format("range_fault retry loop over {:#x}-{:#x}: still invalidated after {} ms "
                  "and {} attempts",
                  range.start, range.end, timeout.count(), attempts));
}

}  // namespace detail

}  // namespace hmmkit
