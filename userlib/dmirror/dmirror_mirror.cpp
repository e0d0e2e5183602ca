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
#include "hmmkit/mirror/migrate.hpp"
#include "hmmkit/mirror/range_fault.hpp"

namespace hmmkit::dmirror {

namespace {

constexpr uint64_t kPage = emu::kPageSize;
constexpr uint64_t kVaLimit = uint64_t{1} << 47;  // user half of a 48-bit address space
constexpr int kMaxFaultRounds = 64;

Status Errno(int err, std::string msg) {
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
  const size_t n = (end - start) / kPage;
  std::vector<uint64_t> src(n), dst(n);
  MigrateVma m;
  m.start = start;
  m.end = end;
  m.src = src;
  m.dst = dst;
  m.pgmap_owner = &dev_;
  m.flags = kSelectSystem | kSelectCompound;
  m.dst_pagemap = dev_.memory.get();
  HMMKIT_RETURN_IF_ERROR(MigrateVmaSetup(ctx_.as(), m));
  driver::DeviceMemory& mem = *dev_.memory;
  auto wanted = [&](size_t i) { return (m.src[i] & migrate_pfn::kMigrate) != 0; };

  // Device pages: a whole 2 MiB device folio for each aligned, fully collected 2 MiB block (one
  // reference per subpage: each becomes one CPU entry), 4 KiB pages for the rest or when the huge
  // allocation fails.
  Status alloc_error = Status::Ok();
  const size_t per_chunk = mem.pages_per_chunk();
  for (size_t i = 0; i < n;) {
    const uintptr_t va = start + i * kPage;
    const bool block = (va % (per_chunk * kPage)) == 0 && i + per_chunk <= n &&
                       std::all_of(m.src.begin() + i, m.src.begin() + i + per_chunk,
                                   [](uint64_t s) { return (s & migrate_pfn::kMigrate) != 0; });
    if (block) {
      auto head = mem.AllocChunk();
      if (head.ok()) {
        for (size_t k = 0; k < per_chunk; ++k) {
          if (k) mem.GetPage(*head);
          m.dst[i + k] = migrate_pfn::FromDevice(*head + k);
        }
        i += per_chunk;
        continue;
      }
    }
    size_t j = i;
    while (j < n && wanted(j) && (j == i || (start + j * kPage) % (per_chunk * kPage) != 0)) ++j;
    if (j == i) {
      ++i;
      continue;
    }
    auto ids = mem.AllocPages(j - i);
    if (!ids.ok()) {
      alloc_error = ids.status();
      break;
    }
    for (size_t k = i; k < j; ++k) m.dst[k] = migrate_pfn::FromDevice((*ids)[k - i]);
    i = j;
  }

  // Copy with the DMA engine: system -> device, or zero-fill for holes and the zero page.
  std::vector<dma::Descriptor> batch;
  std::vector<size_t> index;
  for (size_t i = 0; i < n; ++i) {
    if (!wanted(i) || !(m.dst[i] & migrate_pfn::kValid)) continue;
    dma::Endpoint to{mem.PageData(migrate_pfn::DeviceId(m.dst[i])), dma::Memory::kDevice};
    batch.push_back(
        (m.src[i] & migrate_pfn::kValid)
            ? dma::Descriptor::Copy(
                  to,
                  dma::ConstEndpoint(migrate_pfn::SystemAddress(m.src[i]), dma::Memory::kSystem),
                  kPage)
            : dma::Descriptor::Fill(to, 0, kPage));
    index.push_back(i);
  }
  Status copied = Status::Ok();
  if (!batch.empty()) {
    auto fence = ctx_.dma().Submit(batch);
    if (!fence.ok()) {
      copied = fence.status();
    } else {
      fence->Wait().IgnoreError();  // per-descriptor results below
      auto results = fence->results();
      for (size_t k = 0; k < index.size(); ++k)
        if (!results[k].ok()) {
          if (copied.ok()) copied = results[k];
          mem.PutPage(migrate_pfn::DeviceId(m.dst[index[k]]));  // not handed to Finalize
          m.dst[index[k]] = 0;
        }
    }
  }
  Status st = MigrateVmaPages(m);
  MigrateVmaFinalize(m);
  for (size_t i = 0; i < n; ++i)
    if (wanted(i) && (m.dst[i] & migrate_pfn::kValid)) ++*migrated;
  if (!alloc_error.ok()) return alloc_error;
  if (!copied.ok()) return copied;
  return st;
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
  driver::DeviceMemory& mem = *dev_.memory;
  for (const Vma& v : *vmas) {
    const uintptr_t s = std::max<uintptr_t>(v.start, start), e = std::min<uintptr_t>(v.end, end);
    const size_t n = (e - s) / kPage;
    std::vector<uint64_t> src(n), dst(n);
    MigrateVma m;
    m.start = s;
    m.end = e;
    m.src = src;
    m.dst = dst;
    m.pgmap_owner = &dev_;
    m.flags = dev_.kind == PageKind::kDevicePrivate ? kSelectDevicePrivate : kSelectDeviceCoherent;
    m.src_pagemap = &mem;
    HMMKIT_RETURN_IF_ERROR(MigrateVmaSetup(ctx_.as(), m));
    Status st = Status::Ok();
    // FAIL_ALLOC on the way back fails the huge system allocation; hmmkit's staging pages are
    // always 4 KiB, which is the fallback the kernel takes: nothing else changes.
    if (m.cpages > 0 && dev_.fail_system_alloc.exchange(false))
      Log().debug("dmirror{}: FAIL_ALLOC on migrate back: 4 KiB system pages", dev_.index);
    if (m.cpages > 0) st = MigrateVmaAllocSystemPages(m);
    if (st.ok() && m.cpages > 0) {
      std::vector<dma::Descriptor> batch;
      for (size_t i = 0; i < n; ++i) {
        if (!(m.src[i] & migrate_pfn::kMigrate)) continue;
        batch.push_back(dma::Descriptor::Copy(
            dma::Endpoint{migrate_pfn::SystemAddress(m.dst[i]), dma::Memory::kSystem},
            dma::ConstEndpoint(mem.PageData(migrate_pfn::DeviceId(m.src[i])), dma::Memory::kDevice),
            kPage));
      }
      auto fence = ctx_.dma().Submit(batch);
      st = fence.ok() ? fence->Wait() : fence.status();
      if (!st.ok()) std::fill(m.dst.begin(), m.dst.end(), 0);
    }
    if (st.ok()) st = MigrateVmaPages(m);
    MigrateVmaFinalize(m);
    for (size_t i = 0; i < n; ++i)
      if ((m.src[i] & migrate_pfn::kMigrate) && (m.dst[i] & migrate_pfn::kValid)) ++*migrated;
    HMMKIT_RETURN_IF_ERROR(st);
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
  if (cmd.npages == 0 || cmd.npages > kVaLimit / kPage || cmd.addr + cmd.npages * kPage > kVaLimit)
    return Errno(EINVAL, "npages is 0 or the range overflows");
  const uintptr_t start = cmd.addr, end = cmd.addr + cmd.npages * kPage;
  cmd.cpages = 0;
  cmd.faults = 0;
  char* bounce = reinterpret_cast<char*>(cmd.ptr);
  const bool needs_ptr = request == HMM_DMIRROR_READ || request == HMM_DMIRROR_WRITE ||
                         request == HMM_DMIRROR_MIGRATE_TO_DEV || request == HMM_DMIRROR_SNAPSHOT ||
                         request == HMM_DMIRROR_EXCLUSIVE;
  if (needs_ptr && bounce == nullptr) return Errno(EFAULT, "ptr is NULL");

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
