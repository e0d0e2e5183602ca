// RangeFault: hmm_range_fault over the real address space. Small pure helpers decide per page what
// the entry is and whether it needs a fault; FaultRuns does the faulting in batches.
#include "hmmkit/mirror/range_fault.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <vector>

#include "hmmkit/base/log.hpp"
#include "hmmkit/mirror/mm_monitor.hpp"

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

// Per-thread scratch buffers: no allocation per call once warm.
struct Scratch {
  std::vector<PageState> states;
  std::vector<DevicePageInfo> devices;
  std::vector<Need> needs;
};
Scratch& ThreadScratch() {
  thread_local Scratch s;
  return s;
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
  Scratch& scratch = ThreadScratch();
  scratch.states.resize(n);
  scratch.needs.resize(n);

  // REQ_WRITE on a read-only VMA can never be satisfied.
  if (!vma.write) {
    for (size_t i = 0; i < n; ++i) {
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
    HMMKIT_RETURN_IF_ERROR(as.SnapshotInVma(vma, s, e, scratch.states));
    bool devices = false;
    if (as.has_device_pages()) {
      scratch.devices.resize(n);
      devices = as.LookupDevicePages(s, e, scratch.devices) != 0;
    }
    bool any_need = false;
    for (size_t i = 0; i < n; ++i) {
      const uint64_t req = RequestOf(r, first + i);
      Decision d =
          devices && (scratch.devices[i].kind != PageKind::kSystem || scratch.devices[i].exclusive)
              ? DecideDevice(vma, scratch.states[i], scratch.devices[i], req, r.dev_private_owner)
              : DecideSystem(vma, scratch.states[i], req);
      r.hmm_pfns[first + i] = d.entry;
      scratch.needs[i] = d.need;
      any_need |= d.need != Need::kNone;
    }
    if (!any_need) return Status::Ok();

    // Fault contiguous runs of the same need with one call each.
    for (size_t i = 0; i < n;) {
      if (scratch.needs[i] == Need::kNone) {
        ++i;
        continue;
      }
      const Need need = scratch.needs[i];
      size_t j = i + 1;
      while (j < n && scratch.needs[j] == need) ++j;
      const uintptr_t rs = s + i * page, re = s + j * page;
      if (need == Need::kMigrateBack) {
        HMMKIT_RETURN_IF_ERROR(as.MigrateDevicePagesToRam(rs, re));
      } else {
        HMMKIT_RETURN_IF_ERROR(as.Populate(rs, re, need == Need::kWrite));
      }
      i = j;
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
