// One open dmirror handle: the device MMU mirror of the process and the test_hmm commands.
//
// The device reaches memory only through its MMU: system pages through the process's own virtual
// address (process_vm_readv/writev, so an address unmapped behind the device's back is a device
// fault, not a crash), its own device pages in its arena, exclusive pages where hmmkit keeps them.
#include <fmt/format.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "dmirror_device.hpp"
#include "hmmkit/base/log.hpp"
#include "hmmkit/driver/device_migration.hpp"
#include "hmmkit/mirror/migrate.hpp"
#include "hmmkit/mirror/mm_monitor.hpp"
#include "hmmkit/mirror/range_fault.hpp"

namespace hmmkit::dmirror {

namespace {

constexpr uint64_t kPage = emu::kPageSize;
constexpr uint64_t kVaLimit = uint64_t{1} << 47;  // user half of a 48-bit address space
constexpr int kMaxFaultRounds = 64;

Status Errno(int err, const std::string& msg) {
  return Status::FromErrno(err, "dmirror: " + msg);
}

// Device -> bounce for one page.
bool CopyOut(EmuDevice& dev, const emu::Translation& t, uint64_t va, char* dst) {
  switch (t.pte.target_kind) {
    case emu::Target::kSystem: {
      iovec local{dst, kPage}, remote{reinterpret_cast<void*>(t.CpuAddress(va)), kPage};
      return ::process_vm_readv(::getpid(), &local, 1, &remote, 1, 0) == ssize_t(kPage);
    }
    case emu::Target::kLocal:
      dev.memory->Touch(t.LocalPage(va));
      std::memcpy(dst, dev.memory->PageData(t.LocalPage(va)), kPage);
      return true;
    case emu::Target::kExclusive:
      std::memcpy(dst, reinterpret_cast<const void*>(t.CpuAddress(va)), kPage);
      return true;
  }
  return false;
}

// Bounce -> device for one page.
bool CopyIn(EmuDevice& dev, const emu::Translation& t, uint64_t va, const char* src) {
  switch (t.pte.target_kind) {
    case emu::Target::kSystem: {
      iovec local{const_cast<char*>(src), kPage},
          remote{reinterpret_cast<void*>(t.CpuAddress(va)), kPage};
      return ::process_vm_writev(::getpid(), &local, 1, &remote, 1, 0) == ssize_t(kPage);
    }
    case emu::Target::kLocal:
      dev.memory->Touch(t.LocalPage(va));
      std::memcpy(dev.memory->PageData(t.LocalPage(va)), src, kPage);
      return true;
    case emu::Target::kExclusive:
      std::memcpy(reinterpret_cast<void*>(t.CpuAddress(va)), src, kPage);
      return true;
  }
  return false;
}

// The device page table entry for one range_fault entry of page `va`.
emu::Pte PteOf(uint64_t entry, uint64_t va) {
  emu::Pte p;
  const bool w = (entry & hmm_pfn::kWrite) != 0;
  if (hmm_pfn::Kind(entry) == PageKind::kDevicePrivate) {
    p.target_kind = emu::Target::kLocal;
    p.target = hmm_pfn::Payload(entry);
    p.perms = emu::Perm::kRead | (w ? emu::Perm::kWrite | emu::Perm::kAtomic : emu::Perm::kNone);
  } else {
    // System, zero and device-coherent pages: the CPU address reaches them.
    p.target_kind = emu::Target::kSystem;
    p.target = va;
    p.perms = emu::Perm::kRead | (w ? emu::Perm::kWrite : emu::Perm::kNone);
  }
  return p;
}

bool Continues(const emu::Pte& run, uint64_t run_pages, const emu::Pte& next) {
  if (run.target_kind != next.target_kind || run.perms != next.perms) return false;
  const uint64_t step = run.target_kind == emu::Target::kLocal ? run_pages : run_pages * kPage;
  return next.target == run.target + step;
}

}  // namespace

Mirror::Mirror(Context& ctx, EmuDevice& dev)
    : ctx_(ctx), dev_(dev), mmu_(emu::DeviceMmu::Options{1, 64}) {}

Mirror::~Mirror() {
  ctx_.as().notifiers().Remove(sub_);
}

Status Mirror::Init() {
  return ctx_.as().notifiers().Insert(sub_, kPage, kVaLimit - kPage, *this);
}

void Mirror::Invalidate(IntervalNotifier& sub, const NotifierRange& range, uint64_t cur_seq) {
  // make_device_exclusive on our behalf: we map the pages ourselves afterwards.
  if (range.event == InvalidateEvent::kExclusive && range.owner == &dev_) return;
  MutexLock lock(lock_);
  sub.SetSeq(cur_seq);
  const uint64_t s = std::max<uint64_t>(range.start, kPage) & ~(kPage - 1);
  const uint64_t e = std::min<uint64_t>(range.end, kVaLimit);
  if (s < e) {
    Status st = mmu_.Unmap(s, ((e + kPage - 1) & ~(kPage - 1)) - s);
    if (!st.ok()) Log().error("dmirror{}: unmap {:#x}-{:#x}: {}", dev_.index, s, e, st.ToString());
  }
}

// ---- fault path
// ----------------------------------------------------------------------------------

Status Mirror::FaultIn(uintptr_t start, uintptr_t end, bool write) {
  const size_t n = (end - start) / kPage;
  std::vector<uint64_t> pfns(n);
  Range r;
  r.notifier = &sub_;
  r.start = start;
  r.end = end;
  r.hmm_pfns = pfns;
  r.default_flags = hmm_pfn::kReqFault | (write ? hmm_pfn::kReqWrite : 0);
  r.dev_private_owner = &dev_;
  return RetryLoop(ctx_.as(), r, lock_, [&](const Range& rr) -> Status {
    return mmu_.Update(rr.start, rr.end, [&](emu::DevicePageTable& pt) -> Status {
      for (size_t i = 0; i < n;) {
        if (!(rr.hmm_pfns[i] & hmm_pfn::kValid)) {
          ++i;
          continue;
        }
        const emu::Pte first = PteOf(rr.hmm_pfns[i], rr.start + i * kPage);
        size_t j = i + 1;
        while (j < n && (rr.hmm_pfns[j] & hmm_pfn::kValid) &&
               Continues(first, j - i, PteOf(rr.hmm_pfns[j], rr.start + j * kPage)))
          ++j;
        HMMKIT_RETURN_IF_ERROR(pt.Map(rr.start + i * kPage, (j - i) * kPage, first));
        i = j;
      }
      return Status::Ok();
    });
  });
}

Status Mirror::Read(uintptr_t start, uintptr_t end, char* bounce, uint64_t* faults, bool fault) {
  uintptr_t cur = start;
  for (int round = 0;; ++round) {
    {
      auto access = mmu_.BeginAccess(0);
      while (cur < end) {
        auto t = access.Translate(cur, emu::Access::kRead);
        if (!t.ok() || !CopyOut(dev_, *t, cur, bounce + (cur - start))) break;
        cur += kPage;
        if (access.ShouldYield()) access.Yield();
      }
    }
    if (cur >= end) return Status::Ok();
    if (!fault) return Errno(ENOENT, fmt::format("page {:#x} is not on the device", cur));
    if (round == kMaxFaultRounds)
      return Errno(EBUSY, fmt::format("page {:#x} keeps being invalidated", cur));
    HMMKIT_RETURN_IF_ERROR(FaultIn(cur, end, /*write=*/false));
    if (faults) ++*faults;
  }
}

Status Mirror::Write(uintptr_t start, uintptr_t end, const char* bounce, uint64_t* faults) {
  HMMKIT_RETURN_IF_ERROR(DropUnwritable(start, end));
  uintptr_t cur = start;
  for (int round = 0;; ++round) {
    {
      auto access = mmu_.BeginAccess(0);
      while (cur < end) {
        auto t = access.Translate(cur, emu::Access::kWrite);
        if (!t.ok() || !CopyIn(dev_, *t, cur, bounce + (cur - start))) break;
        cur += kPage;
        if (access.ShouldYield()) access.Yield();
      }
    }
    if (cur >= end) return Status::Ok();
    if (round == kMaxFaultRounds)
      return Errno(EBUSY, fmt::format("page {:#x} keeps being invalidated", cur));
    HMMKIT_RETURN_IF_ERROR(FaultIn(cur, end, /*write=*/true));
    if (faults) ++*faults;
  }
}

Status Mirror::DropUnwritable(uintptr_t start, uintptr_t end) {
  auto vmas = ctx_.as().FindVmas(start, end);
  if (!vmas.ok()) return vmas.status();
  MutexLock lock(lock_);
  for (const Vma& v : *vmas) {
    if (v.write) continue;
    const uint64_t s = std::max<uint64_t>(v.start, start), e = std::min<uint64_t>(v.end, end);
    HMMKIT_RETURN_IF_ERROR(mmu_.Unmap(s, e - s));
  }
  return Status::Ok();
}

// ---- migration
// -----------------------------------------------------------------------------------

Status Mirror::MapOwnDevicePages(uintptr_t start, uintptr_t end) {
  const size_t n = (end - start) / kPage;
  std::vector<DevicePageInfo> info(n);
  // The subscription spans the whole address space: an unrelated invalidation elsewhere also
  // moves the sequence, so retry a few times before giving up (the caller then sees ENOENT).
  for (int attempt = 0; attempt < kMaxFaultRounds; ++attempt) {
    const uint64_t seq = sub_.ReadBegin();
    ctx_.as().LookupDevicePages(start, end, info);
    MutexLock lock(lock_);
    if (sub_.ReadRetry(seq)) continue;
    return MapDevicePagesLocked(start, info);
  }
  return Errno(EBUSY, "device mappings kept being invalidated");
}

Status Mirror::MapDevicePagesLocked(uintptr_t start, std::span<const DevicePageInfo> info) {
  const size_t n = info.size();
  const uintptr_t end = start + n * kPage;
  return mmu_.Update(start, end, [&](emu::DevicePageTable& pt) -> Status {
    for (size_t i = 0; i < n; ++i) {
      const DevicePageInfo& d = info[i];
      if (d.exclusive || d.owner != &dev_ || d.kind == PageKind::kSystem) continue;
      emu::Pte p;
      p.target_kind = emu::Target::kLocal;
      p.target = d.id;
      p.perms = emu::Perm::kRead |
                (d.writable ? emu::Perm::kWrite | emu::Perm::kAtomic : emu::Perm::kNone);
      HMMKIT_RETURN_IF_ERROR(pt.Map(start + i * kPage, kPage, p));
    }
    return Status::Ok();
  });
}

Status Mirror::MigrateVmaToDevice(uintptr_t start, uintptr_t end, uint64_t* migrated) {
  auto r = driver::MigrateToDevice(ctx_.as(), *dev_.memory, ctx_.dma(), start, end);
  if (!r.ok()) return r.status();
  *migrated += r->migrated;
  return Status::Ok();
}

Status Mirror::MigrateToDevice(uintptr_t start, uintptr_t end, uint64_t* migrated) {
  auto vmas = ctx_.as().FindVmas(start, end);
  if (!vmas.ok()) return vmas.status();
  uintptr_t cur = start;
  for (const Vma& v : *vmas) {
    if (v.start > cur) return Errno(EINVAL, fmt::format("no VMA at {:#x}", cur));
    if (!v.read) return Errno(EINVAL, fmt::format("VMA at {:#x} is not readable", v.start));
    cur = std::min<uintptr_t>(v.end, end);
  }
  if (cur < end) return Errno(EINVAL, fmt::format("no VMA at {:#x}", cur));
  for (const Vma& v : *vmas)
    HMMKIT_RETURN_IF_ERROR(MigrateVmaToDevice(std::max<uintptr_t>(v.start, start),
                                              std::min<uintptr_t>(v.end, end), migrated));
  return MapOwnDevicePages(start, end);
}

Status Mirror::MigrateToSystem(uintptr_t start, uintptr_t end, uint64_t* migrated) {
  auto vmas = ctx_.as().FindVmas(start, end);
  if (!vmas.ok()) return vmas.status();
  for (const Vma& v : *vmas) {
    // FAIL_ALLOC on the way back fails the huge system allocation; hmmkit's staging pages are
    // always 4 KiB, which is the fallback the kernel takes: nothing else changes.
    if (dev_.fail_system_alloc.exchange(false))
      Log().debug("dmirror{}: FAIL_ALLOC on migrate back: 4 KiB system pages", dev_.index);
    auto r = driver::MigrateToSystem(ctx_.as(), *dev_.memory, ctx_.dma(),
                                     std::max<uintptr_t>(v.start, start),
                                     std::min<uintptr_t>(v.end, end));
    if (!r.ok()) return r.status();
    *migrated += r->migrated;
  }
  return Status::Ok();
}

// ---- snapshot and exclusive access
// ---------------------------------------------------------------

Status Mirror::Snapshot(uintptr_t start, uintptr_t end, uint8_t* out) {
  const size_t n = (end - start) / kPage;
  std::vector<uint64_t> pfns(n);
  std::vector<DevicePageInfo> info(n);
  Range r;
  r.notifier = &sub_;
  r.start = start;
  r.end = end;
  r.hmm_pfns = pfns;
  r.dev_private_owner = &dev_;
  Status st;
  for (int attempt = 0; attempt < kMaxFaultRounds; ++attempt) {
    r.notifier_seq = sub_.ReadBegin();
    st = RangeFault(ctx_.as(), r);
    if (st.errno_value() != EBUSY) break;
  }
  HMMKIT_RETURN_IF_ERROR(st);
  ctx_.as().LookupDevicePages(start, end, info);
  for (size_t i = 0; i < n; ++i) {
    const uint64_t e = pfns[i];
    if (e & hmm_pfn::kError) {
      out[i] = HMM_DMIRROR_PROT_ERROR;
      continue;
    }
    if (!(e & hmm_pfn::kValid)) {
      out[i] = HMM_DMIRROR_PROT_NONE;
      continue;
    }
    uint8_t v = HMM_DMIRROR_PROT_NONE;
    switch (hmm_pfn::Kind(e)) {
      case PageKind::kZero:
        v = HMM_DMIRROR_PROT_ZERO;
        break;
      case PageKind::kDevicePrivate:
        v = HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL;  // range_fault reports our own pages only
        break;
      case PageKind::kDeviceCoherent:
        v = info[i].owner == &dev_ ? HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL
                                   : HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE;
        break;
      case PageKind::kSystem:
        break;
    }
    v |= (e & hmm_pfn::kWrite) ? HMM_DMIRROR_PROT_WRITE : HMM_DMIRROR_PROT_READ;
    if (hmm_pfn::MapOrder(e) == 9) v |= HMM_DMIRROR_PROT_PMD;
    if (hmm_pfn::MapOrder(e) == 18) v |= HMM_DMIRROR_PROT_PUD;
    out[i] = v;
  }
  return Status::Ok();
}

Status Mirror::Exclusive(uintptr_t start, uintptr_t end, char* bounce) {
  auto vmas = ctx_.as().FindVmas(start, end);
  if (!vmas.ok()) return vmas.status();
  uintptr_t cur = start;
  for (const Vma& v : *vmas) {
    if (v.start > cur) return Errno(EINVAL, fmt::format("no VMA at {:#x}", cur));
    cur = std::min<uintptr_t>(v.end, end);
  }
  if (cur < end) return Errno(EINVAL, fmt::format("no VMA at {:#x}", cur));
  for (const Vma& v : *vmas) {
    const uintptr_t s = std::max<uintptr_t>(v.start, start), e = std::min<uintptr_t>(v.end, end);
    const size_t n = (e - s) / kPage;
    std::vector<void*> data(n);
    const uint64_t seq = sub_.ReadBegin();
    HMMKIT_RETURN_IF_ERROR(MakeDeviceExclusive(ctx_.as(), s, e, &dev_, data));
    MutexLock lock(lock_);
    if (sub_.ReadRetry(seq)) continue;  // the CPU took some back already: the read faults
    Status mapped = mmu_.Update(s, e, [&](emu::DevicePageTable& pt) -> Status {
      for (size_t i = 0; i < n; ++i) {
        emu::Pte p;
        p.target_kind = emu::Target::kExclusive;
        p.target = reinterpret_cast<uint64_t>(data[i]);
        p.perms = emu::Perm::kAll;
        HMMKIT_RETURN_IF_ERROR(pt.Map(s + i * kPage, kPage, p));
      }
      return Status::Ok();
    });
    HMMKIT_RETURN_IF_ERROR(mapped);
  }
  return Read(start, end, bounce, nullptr, /*fault=*/true);
}

Status Mirror::CheckExclusive(uintptr_t start, uintptr_t end) {
  bool exclusive = false;
  mmu_.ForEach(start, end, [&](uint64_t, uint64_t, const emu::Pte& pte) {
    exclusive |= pte.target_kind == emu::Target::kExclusive;
  });
  if (exclusive) return Errno(EPERM, "pages are still device-exclusive");
  return Status::Ok();
}

// ---- dispatch
// ------------------------------------------------------------------------------------

Status Mirror::Command(unsigned long request, hmm_dmirror_cmd& cmd) {
  if (cmd.addr & (kPage - 1)) return Errno(EINVAL, "addr is not page-aligned");
  // Compared without forming addr + len first: that sum can wrap past 2^64 and pass.
  if (cmd.npages == 0 || cmd.addr >= kVaLimit || cmd.npages > (kVaLimit - cmd.addr) / kPage)
    return Errno(EINVAL, "npages is 0 or the range overflows");
  const uintptr_t start = cmd.addr, end = cmd.addr + cmd.npages * kPage;
  cmd.cpages = 0;
  cmd.faults = 0;
  char* bounce = reinterpret_cast<char*>(cmd.ptr);
  const bool needs_ptr = request == HMM_DMIRROR_READ || request == HMM_DMIRROR_WRITE ||
                         request == HMM_DMIRROR_MIGRATE_TO_DEV || request == HMM_DMIRROR_SNAPSHOT ||
                         request == HMM_DMIRROR_EXCLUSIVE;
  if (needs_ptr && bounce == nullptr) return Errno(EFAULT, "ptr is NULL");
  // The kernel has invalidated the device's mappings before munmap returns; here the monitor
  // dispatches the event a little later. Until it has, this mirror could still read or write the
  // old pages (found by fuzz_dmirror: a READ after munmap returned the freed pages' data). Before
  // cmd_mu_: the invalidation callback takes this mirror's locks.
  if (MmMonitor* monitor = ctx_.as().monitor(); monitor && monitor->pending_changes() != 0)
    monitor->Sync();

  MutexLock lock(cmd_mu_);
  switch (request) {
    case HMM_DMIRROR_READ: {
      uint64_t faults = 0;
      HMMKIT_RETURN_IF_ERROR(Read(start, end, bounce, &faults, /*fault=*/true));
      cmd.faults = faults;
      cmd.cpages = cmd.npages;
      return Status::Ok();
    }
    case HMM_DMIRROR_WRITE: {
      uint64_t faults = 0;
      HMMKIT_RETURN_IF_ERROR(Write(start, end, bounce, &faults));
      cmd.faults = faults;
      cmd.cpages = cmd.npages;
      return Status::Ok();
    }
    case HMM_DMIRROR_MIGRATE_TO_DEV: {
      uint64_t migrated = 0;
      HMMKIT_RETURN_IF_ERROR(MigrateToDevice(start, end, &migrated));
      // Every page must now be this device's: read back without faulting.
      Status st = Read(start, end, bounce, nullptr, /*fault=*/false);
      if (!st.ok())
        return Errno(
            ENOENT, fmt::format("{} of {} pages migrated: {}", migrated, cmd.npages, st.message()));
      cmd.cpages = cmd.npages;
      return Status::Ok();
    }
    case HMM_DMIRROR_MIGRATE_TO_SYS: {
      uint64_t migrated = 0;
      HMMKIT_RETURN_IF_ERROR(MigrateToSystem(start, end, &migrated));
      cmd.cpages = migrated;
      return Status::Ok();
    }
    case HMM_DMIRROR_SNAPSHOT:
      HMMKIT_RETURN_IF_ERROR(Snapshot(start, end, reinterpret_cast<uint8_t*>(bounce)));
      cmd.cpages = cmd.npages;
      return Status::Ok();
    case HMM_DMIRROR_EXCLUSIVE:
      HMMKIT_RETURN_IF_ERROR(Exclusive(start, end, bounce));
      cmd.cpages = cmd.npages;
      return Status::Ok();
    case HMM_DMIRROR_CHECK_EXCLUSIVE:
      return CheckExclusive(start, end);
    case HMM_DMIRROR_RELEASE:
      return MigrateAllToRam(ctx_.as(), *dev_.memory);
    case HMM_DMIRROR_FLAGS:
      if (cmd.npages & HMM_DMIRROR_FLAG_FAIL_ALLOC) {
        dev_.memory->FailNextAlloc();
        dev_.fail_system_alloc = true;
      }
      return Status::Ok();
    default:
      return Errno(EINVAL, fmt::format("unknown request {:#x}", request));
  }
}

}  // namespace hmmkit::dmirror
