// DeviceEntries: the table of CPU addresses whose pages live on a device, and the fault handler
// that brings them back.
#include "device_entries.hpp"

#include <fmt/format.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstring>
#include <thread>

#include "hmmkit/base/internal_memory.hpp"
#include "hmmkit/base/log.hpp"
#include "hmmkit/base/trace.hpp"
#include "hmmkit/mirror/address_space.hpp"
#include "hmmkit/mirror/migrate.hpp"

namespace hmmkit::detail {

// ---- StagingPool -------------------------------------------------------------------------------

namespace {
constexpr size_t kSlab = 2u << 20;
// Tries of a CPU fault-back before the page is poisoned (see HandleFault).
constexpr int kFaultBackAttempts = 8;
constexpr auto kFaultBackAgainFor = std::chrono::seconds(5);  // EAGAIN: retried this long
}  // namespace

StagingPool::~StagingPool() {
  MutexLock lock(mu_);
  for (void* s : slabs_) UnmapInternal(s, kSlab);
}

void* StagingPool::Alloc() {
  MutexLock lock(mu_);
  if (free_.empty()) {
    void* slab = MapInternal(kSlab);  // never itself the target of a migration
    if (!slab) return nullptr;
    slabs_.push_back(slab);
    for (size_t off = kSlab; off > 0; off -= page_)
      free_.push_back(static_cast<char*>(slab) + off - page_);
  }
  void* p = free_.back();
  free_.pop_back();
  return p;
}

void StagingPool::Free(void* p) {
  if (!p) return;
  MutexLock lock(mu_);
  free_.push_back(p);
}

// ---- DeviceEntries -----------------------------------------------------------------------------

DeviceEntries::DeviceEntries(AddressSpace& as)
    : as_(as), page_(as.features().page_size), staging_(as.features().page_size) {}

DeviceEntries::~DeviceEntries() {
  // The monitor is gone by now (AddressSpace resets it first); drop what is left.
  std::vector<DeviceEntry> left;
  {
    MutexLock lock(mu_);
    for (auto& [va, e] : entries_) left.push_back(e);
    entries_.clear();
    reverse_.clear();
  }
  if (!left.empty())
    Log().warn("AddressSpace teardown: {} device pages dropped without eviction", left.size());
  for (const DeviceEntry& e : left) ReleaseEntry(e);
}

void DeviceEntries::ReleaseEntry(const DeviceEntry& e) {
  if (e.exclusive) {
    staging_.Free(e.data);
  } else if (e.pagemap) {
    e.pagemap->PutPage(e.id);
  }
}

void DeviceEntries::EraseLocked(std::map<uintptr_t, DeviceEntry>::iterator it) {
  if (!it->second.exclusive) reverse_.erase(PageKey{it->second.pagemap, it->second.id});
  entries_.erase(it);
}

size_t DeviceEntries::Lookup(uintptr_t start, uintptr_t end, std::span<DevicePageInfo> out) {
  std::fill(out.begin(), out.end(), DevicePageInfo{});
  size_t found = 0;
  MutexLock lock(mu_);
  for (auto it = entries_.lower_bound(start); it != entries_.end() && it->first < end; ++it) {
    const DeviceEntry& e = it->second;
    DevicePageInfo& info = out[(it->first - start) / page_];
    if (e.exclusive) {
      info.kind = PageKind::kSystem;
      info.exclusive = true;
      info.owner = e.exclusive_owner;
      info.data = e.data;
      info.writable = e.writable;
    } else {
      info.kind = e.pagemap->kind();
      info.owner = e.pagemap->owner();
      info.id = e.id;
      info.writable = e.writable;
      info.order = e.order;
    }
    ++found;
  }
  return found;
}

bool DeviceEntries::Find(uintptr_t va, DeviceEntry* out) {
  MutexLock lock(mu_);
  auto it = entries_.find(va);
  if (it == entries_.end()) return false;
  if (out) *out = it->second;
  return true;
}

void DeviceEntries::Insert(uintptr_t va, const DeviceEntry& e) {
  DeviceEntry old;
  bool replaced = false;
  {
    MutexLock lock(mu_);
    auto it = entries_.find(va);
    if (it != entries_.end()) {
      old = it->second;
      replaced = true;
      EraseLocked(it);
    }
    DeviceEntry& added = entries_[va] = e;
    added.generation = next_generation_++;
    if (!e.exclusive) reverse_[PageKey{e.pagemap, e.id}] = va;
  }
  if (replaced) {
    Log().error("device entries: {:#x} already had a device page; the old one is released", va);
    ReleaseEntry(old);
  }
}

void DeviceEntries::InsertMany(std::span<const std::pair<uintptr_t, DeviceEntry>> entries) {
  std::vector<DeviceEntry> replaced;
  {
    MutexLock lock(mu_);
    reverse_.reserve(reverse_.size() + entries.size());
    auto hint = entries.empty() ? entries_.end() : entries_.lower_bound(entries.front().first);
    for (const auto& [va, e] : entries) {
      while (hint != entries_.end() && hint->first < va) ++hint;
      if (hint != entries_.end() && hint->first == va) {
        replaced.push_back(hint->second);
        auto next = std::next(hint);
        EraseLocked(hint);
        hint = next;
      }
      auto it = entries_.emplace_hint(hint, va, e);
      it->second.generation = next_generation_++;
      if (!e.exclusive) reverse_[PageKey{e.pagemap, e.id}] = va;
      hint = std::next(it);
    }
  }
  for (const DeviceEntry& old : replaced) {
    Log().error("device entries: a page already had a device page; the old one is released");
    ReleaseEntry(old);
  }
}

void DeviceEntries::TakeMany(std::span<const uintptr_t> vas, std::vector<DeviceEntry>& out) {
  MutexLock lock(mu_);
  for (uintptr_t va : vas) {
    auto it = entries_.find(va);
    if (it == entries_.end()) continue;
    out.push_back(it->second);
    EraseLocked(it);
  }
}

bool DeviceEntries::Take(uintptr_t va, DeviceEntry* out) {
  MutexLock lock(mu_);
  auto it = entries_.find(va);
  if (it == entries_.end()) return false;
  *out = it->second;
  EraseLocked(it);
  return true;
}

bool DeviceEntries::TakeIfPage(uintptr_t va, const DevicePagemap* pagemap, uint64_t id,
                               DeviceEntry* out) {
  MutexLock lock(mu_);
  auto it = entries_.find(va);
  if (it == entries_.end() || it->second.exclusive || it->second.pagemap != pagemap ||
      it->second.id != id)
    return false;
  *out = it->second;
  EraseLocked(it);
  return true;
}

std::vector<std::pair<uintptr_t, DeviceEntry>> DeviceEntries::Collect(uintptr_t start,
                                                                      uintptr_t end) {
  std::vector<std::pair<uintptr_t, DeviceEntry>> out;
  MutexLock lock(mu_);
  for (auto it = entries_.lower_bound(start); it != entries_.end() && it->first < end; ++it)
    out.emplace_back(it->first, it->second);
  return out;
}

uintptr_t DeviceEntries::AddressOf(const DevicePagemap* pagemap, uint64_t id) {
  MutexLock lock(mu_);
  auto it = reverse_.find(PageKey{pagemap, id});
  return it == reverse_.end() ? 0 : it->second;
}

size_t DeviceEntries::size() const {
  MutexLock lock(mu_);
  return entries_.size();
}

void DeviceEntries::DropRange(uintptr_t start, uintptr_t end) {
  std::vector<DeviceEntry> dropped;
  {
    MutexLock lock(mu_);
    for (auto it = entries_.lower_bound(start); it != entries_.end() && it->first < end;) {
      dropped.push_back(it->second);
      auto next = std::next(it);
      EraseLocked(it);
      it = next;
    }
  }
  for (const DeviceEntry& e : dropped) ReleaseEntry(e);
}

void DeviceEntries::MoveRange(uintptr_t from, uintptr_t to, size_t len) {
  std::vector<DeviceEntry> dropped;
  {
    MutexLock lock(mu_);
    std::vector<std::pair<uintptr_t, DeviceEntry>> moving;
    for (auto it = entries_.lower_bound(from); it != entries_.end() && it->first < from + len;) {
      moving.emplace_back(it->first - from + to, it->second);
      auto next = std::next(it);
      EraseLocked(it);
      it = next;
    }
    // Whatever was mapped at the destination was unmapped by the mremap.
    for (auto it = entries_.lower_bound(to); it != entries_.end() && it->first < to + len;) {
      dropped.push_back(it->second);
      auto next = std::next(it);
      EraseLocked(it);
      it = next;
    }
    for (auto& [va, e] : moving) {
      entries_[va] = e;
      if (!e.exclusive) reverse_[PageKey{e.pagemap, e.id}] = va;
    }
  }
  for (const DeviceEntry& e : dropped) ReleaseEntry(e);
}

// ---- migrations in flight ----------------------------------------------------------------------

namespace {
thread_local int t_no_wait_depth = 0;  // MigrationNoWaitScope
}  // namespace

Status DeviceEntries::BeginMigration(uintptr_t start, uintptr_t end) {
  const std::thread::id self = std::this_thread::get_id();
  auto overlaps = [&](const InFlight& r) { return r.start < end && start < r.end; };
  MutexLock lock(mu_);
  Status refused;
  cv_.Wait(mu_, [&]() REQUIRES(mu_) {
    bool busy = false;
    for (const InFlight& r : migrating_) {
      if (!overlaps(r)) continue;
      if (r.owner == self) {
        refused = Status::FromErrno(
            EDEADLK, fmt::format("migration of {:#x}-{:#x}: this thread is migrating "
                                 "{:#x}-{:#x} itself (an eviction from inside that migration)",
                                 start, end, r.start, r.end));
        return true;
      }
      busy = true;
    }
    if (busy && t_no_wait_depth > 0) {
      refused = Status::FromErrno(
          EBUSY, fmt::format("migration of {:#x}-{:#x}: another thread is migrating pages of it",
                             start, end));
      return true;
    }
    return !busy;
  });
  if (!refused.ok()) return refused;
  migrating_.push_back(InFlight{start, end, self});
  return Status::Ok();
}

void DeviceEntries::EndMigration(uintptr_t start, uintptr_t end) {
  const std::thread::id self = std::this_thread::get_id();
  {
    MutexLock lock(mu_);
    // This thread's own record first; a driver may also finalize on another thread than Setup's.
    auto same = [&](const InFlight& r) { return r.start == start && r.end == end; };
    auto it = std::find_if(migrating_.begin(), migrating_.end(),
                           [&](const InFlight& r) { return same(r) && r.owner == self; });
    if (it == migrating_.end()) it = std::find_if(migrating_.begin(), migrating_.end(), same);
    if (it != migrating_.end()) migrating_.erase(it);
  }
  cv_.NotifyAll();
}

void DeviceEntries::WaitNoMigration(uintptr_t va) {
  MutexLock lock(mu_);
  cv_.Wait(mu_, [&]() REQUIRES(mu_) {
    return std::none_of(migrating_.begin(), migrating_.end(),
                        [&](const InFlight& r) { return r.start <= va && va < r.end; });
  });
}

// ---- pins --------------------------------------------------------------------------------------

void DeviceEntries::Pin(uintptr_t start, uintptr_t end) {
  MutexLock lock(mu_);
  pins_.emplace(start, end);
}

void DeviceEntries::Unpin(uintptr_t start, uintptr_t end) {
  MutexLock lock(mu_);
  auto it = pins_.find(std::make_pair(start, end));
  if (it != pins_.end()) pins_.erase(it);
}

bool DeviceEntries::Pinned(uintptr_t va) {
  MutexLock lock(mu_);
  for (const auto& [s, e] : pins_)
    if (s <= va && va < e) return true;
  return false;
}

// ---- fault routing -----------------------------------------------------------------------------

Status DeviceEntries::EnsureRouted(uintptr_t start, uintptr_t end) {
  MmMonitor* monitor = as_.monitor();
  if (!monitor)
    return Status::FromErrno(ENOTSUP,
                             "device memory needs the userfaultfd monitor (see `hmmctl info`)");
  auto vma = as_.FindVma(start);
  if (!vma.ok()) return vma.status();
  if (!*vma) return Status::FromErrno(EINVAL, fmt::format("no VMA at {:#x}", start));
  // Exactly the migrated pages, never a whole granule: a VMA may hold memory merged in from
  // others (a malloc arena, a sanitizer's metadata), and a first touch of such a page would become
  // a missing-page fault that only the fault thread can resolve. A thread touching it while
  // holding a lock that the fault thread takes would deadlock (seen under ASan: its stack depot
  // merged with a test buffer's VMA). The cost is a VMA split per routed range.
  return monitor->RouteFaults(std::max((*vma)->start, start), std::min((*vma)->end, end), *this);
}

Status DeviceEntries::HandleFault(MmMonitor& monitor, const CpuFault& fault) {
  const uintptr_t pg = fault.address & ~(page_ - 1);
  WaitNoMigration(pg);
  // A fault at an mremap destination can overtake the REMAP event that moves the entries. (Only
  // remaps: a fresh mapping at a reused address is not registered, so its faults never come
  // here, and waiting on other events could wait on a device blocked in this very fault.)
  if (monitor.pending_remaps() != 0) monitor.Sync();

  // Decides with migrations of the page held off (the kernel decides under the PTE lock): a
  // migration starting between the look and the resolution would copy a page we then fill or
  // make writable, and lose what the woken thread writes.
  //  - no entry: an ordinary page of a routed range (or one whose entry went away: migrated back,
  //    or dropped by an unmap or clear): resolve it as the kernel would have;
  //  - a different entry than `seen`: the page went back and to a device again meanwhile: wake
  //    the thread, it faults once more;
  //  - the same entry: returns false, the page is still on the device.
  // A fault is always resolved, never left asleep.
  auto resolve_unless_on_device = [&](const DeviceEntry* seen, DeviceEntry* out) {
    if (Status b = BeginMigration(pg, pg + page_); !b.ok()) {
      // Cannot happen on the fault thread (it holds no migration here and opens no no-wait
      // scope); the access is retried rather than left asleep.
      Log().error("CPU fault at {:#x}: {}", fault.address, b.ToString());
      monitor.Wake(pg, page_).IgnoreError();
      return true;
    }
    DeviceEntry now;
    bool on_device = Find(pg, &now);
    if (!on_device) {
      Status st = fault.wp ? monitor.WriteProtect(pg, page_, false) : monitor.ZeroPage(pg, page_);
      if (!st.ok()) monitor.Wake(pg, page_).IgnoreError();  // EEXIST: filled already
    } else if (fault.wp || (seen && now.generation != seen->generation)) {
      // wp: the writer hit the page while it was write-protected for a migration that has since
      // zapped it; it retries and takes the missing-page path.
      monitor.Wake(pg, page_).IgnoreError();
      on_device = false;
    }
    EndMigration(pg, pg + page_);
    if (out) *out = now;
    return !on_device;
  };
  // Transient failures (the mm changing under UFFDIO_COPY, no staging memory for a moment, a DMA
  // error) leave the page on the device, intact: try again, a bounded number of times. The CPU
  // access has no error to return; giving up costs the process a SIGBUS.
  Status st;
  // Traced as one "cpu_fault" covering the pages the migrations below brought back (none: the
  // fault needed no fault-back and is not traced).
  const trace::CauseScope cause(trace::Cause::kCpuFault);
  trace::MovedCollector moved;
  trace::Span span(trace::Name::kCpuFault, trace::kCpuFaultTrack);
  span.ev.small = fault.write ? 1 : 0;
  auto traced = [&] {
    if (moved.pages == 0) {
      span.Cancel();
      return;
    }
    span.ev.a[0] = moved.start;
    span.ev.a[1] = moved.end;
    span.ev.a[2] = moved.pages;
  };
  const auto again_deadline = std::chrono::steady_clock::now() + kFaultBackAgainFor;
  for (int attempt = 1;; ++attempt) {
    DeviceEntry e;
    if (resolve_unless_on_device(nullptr, &e)) {
      traced();
      return Status::Ok();
    }
    st = e.exclusive ? RestoreExclusive(pg, pg + page_) : e.pagemap->MigrateToRam(as_, pg);
    if (st.ok() && resolve_unless_on_device(&e, nullptr)) {
      traced();
      return Status::Ok();
    }
    if (st.ok()) st = Status::FromErrno(EIO, "migrate_to_ram left the page on the device");
    // EAGAIN (the mm is changing) always passes: it is retried until a deadline, not a count.
    if (st.errno_value() == EAGAIN ? std::chrono::steady_clock::now() > again_deadline
                                   : attempt >= kFaultBackAttempts)
      break;
    Log().warn("CPU fault at {:#x}: migrating back failed ({}); attempt {}", fault.address,
               st.ToString(), attempt + 1);
    std::this_thread::yield();
  }
  // The data cannot come back: the access must fail, never read zeros (kernel: VM_FAULT_SIGBUS).
  Log().error("CPU fault at {:#x}: device page not migrated back ({}); poisoning the page",
              fault.address, st.ToString());
  if (!monitor.Poison(pg, page_).ok()) monitor.Wake(pg, page_).IgnoreError();
  traced();
  return Status::Ok();
}

// ---- exclusive pages and eviction
// ----------------------------------------------------------------

Status DeviceEntries::RestoreExclusive(uintptr_t start, uintptr_t end) {
  MmMonitor* monitor = as_.monitor();
  for (auto& [va, e] : Collect(start, end)) {
    if (!e.exclusive) continue;
    HMMKIT_RETURN_IF_ERROR(BeginMigration(va, va + page_));
    DeviceEntry taken;
    if (Find(va, &taken) && taken.exclusive) {
      // The device loses its mapping first, so its last writes are in `data`.
      as_.notifiers().Invalidate(
          NotifierRange{va, va + page_, InvalidateEvent::kExclusive, nullptr});
      Status st = monitor ? monitor->Copy(va, taken.data, page_, false, /*wake=*/false)
                          : Status::FromErrno(ENOTSUP, "no monitor");
      if (!st.ok() && st.errno_value() != ENOENT) {
        EndMigration(va, va + page_);
        return Status::FromErrno(
            st.errno_value(), fmt::format("restoring exclusive page {:#x}: {}", va, st.ToString()));
      }
      if (Take(va, &taken)) ReleaseEntry(taken);
      if (monitor) monitor->Wake(va, page_).IgnoreError();
    }
    EndMigration(va, va + page_);
  }
  return Status::Ok();
}

Status DeviceEntries::EvictAll() {
  HMMKIT_RETURN_IF_ERROR(RestoreExclusive(0, UINTPTR_MAX));
  std::map<DevicePagemap*, std::vector<uint64_t>> by_pagemap;
  for (auto& [va, e] : Collect(0, UINTPTR_MAX))
    if (!e.exclusive) by_pagemap[e.pagemap].push_back(e.id);
  Status first = Status::Ok();
  for (auto& [pm, ids] : by_pagemap) {
    Status st = MigrateDevicePages(as_, *pm, ids);
    if (!st.ok() && first.ok()) first = st;
  }
  return first;
}

}  // namespace hmmkit::detail

namespace hmmkit {

MigrationNoWaitScope::MigrationNoWaitScope() {
  ++detail::t_no_wait_depth;
}
MigrationNoWaitScope::~MigrationNoWaitScope() {
  --detail::t_no_wait_depth;
}

}  // namespace hmmkit
