// MigrateVma setup/pages/finalize over the real address space. See migrate.hpp for the contract
// and docs/migration.md for how each kernel step maps to userfaultfd and madvise.
#include "hmmkit/mirror/migrate.hpp"

#include <fmt/format.h>
#include <sys/mman.h>

#include <unistd.h>
#include <algorithm>
#include <chrono>
#include <cstring>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "device_entries.hpp"
#include "fork_guard.hpp"
#include "hmmkit/base/fault_injection.hpp"
#include "hmmkit/base/internal_memory.hpp"
#include "hmmkit/base/log.hpp"
#include "hmmkit/base/trace.hpp"
#include "hmmkit/mirror/mm_monitor.hpp"
#include "hmmkit/mirror/notifier.hpp"

namespace hmmkit {

namespace detail {

// Everything a migration holds between Setup and Finalize. Its subscription records CPU-side
// changes (unmap, clear) that race with the migration: those pages are not committed.
struct MigrateState final : IntervalNotifierOps {
  AddressSpace* as = nullptr;
  DeviceEntries* entries = nullptr;
  MmMonitor* monitor = nullptr;
  size_t page = 4096;
  Vma vma;
  bool to_device = true;
  std::shared_lock<std::shared_mutex> fork_lock;
  IntervalNotifier sub;
  std::unique_ptr<NotifierTree::Scope> scope;
  std::vector<uint8_t> write_protected;  // per page: Setup write-protected it
  std::vector<uint8_t> committed;        // per page: Pages committed it
  void* staging = nullptr;
  size_t staging_len = 0;
  uint64_t trace_begin = 0;  // NowNs() at Setup when tracing; 0: not traced
  trace::Cause cause = trace::Cause::kExplicit;

  Mutex mu;
  std::vector<std::pair<uintptr_t, uintptr_t>> gone GUARDED_BY(mu);

  void Invalidate(IntervalNotifier&, const NotifierRange& r, uint64_t) override {
    // Migrations and exclusivity changes are serialized with this one; only the application's
    // own changes (unmap, clear, protection) make a collected page stale.
    if (r.event == InvalidateEvent::kMigrate || r.event == InvalidateEvent::kExclusive ||
        r.event == InvalidateEvent::kProtectionPage)
      return;
    MutexLock lock(mu);
    gone.emplace_back(r.start, r.end);
  }
  bool Gone(uintptr_t va) {
    MutexLock lock(mu);
    return std::any_of(gone.begin(), gone.end(),
                       [&](const auto& g) { return g.first <= va && va < g.second; });
  }
  // Gone, or changed by an event the monitor has read and not yet dispatched to us. `any_pending`
  // is ChangePending over the whole migration, looked up once (the per-page look takes the
  // monitor's queue lock).
  bool Changed(uintptr_t va, bool any_pending) {
    return Gone(va) || (any_pending && monitor->ChangePending(va, va + page));
  }
};

}  // namespace detail

namespace {

using detail::DeviceEntry;
using detail::MigrateState;

Status Invalid(const std::string& why) {
  return Status::FromErrno(EINVAL, "migrate_vma: " + why);
}

// Calls fn(first, count) for each run of consecutive indices where pred(i) holds.
template <class Pred, class Fn>
void ForEachRun(size_t n, Pred pred, Fn fn) {
  for (size_t i = 0; i < n;) {
    if (!pred(i)) {
      ++i;
      continue;
    }
    size_t j = i + 1;
    while (j < n && pred(j)) ++j;
    fn(i, j - i);
    i = j;
  }
}

// Runs `fn` when the scope ends (an early error return included).
template <class Fn>
class OnExit {
 public:
  explicit OnExit(Fn fn) : fn_(std::move(fn)) {}
  ~OnExit() { fn_(); }
  OnExit(const OnExit&) = delete;
  OnExit& operator=(const OnExit&) = delete;

 private:
  Fn fn_;
};

// The same kind of mapping as far as a migration can tell (its own registration splits and merges
// VMAs, so bounds may differ).
bool SameMapping(const Vma& a, const Vma& b) {
  return a.read == b.read && a.write == b.write && a.exec == b.exec && a.shared == b.shared &&
         a.kind == b.kind;
}

int ProtOf(const Vma& vma) {
  return (vma.read ? PROT_READ : 0) | (vma.write ? PROT_WRITE : 0) | (vma.exec ? PROT_EXEC : 0);
}

// Zaps [va, va + len) of a private mapping without reporting it as the application's clear.
Status ZapOwn(AddressSpace& as, MmMonitor& monitor, uintptr_t va, size_t len) {
  const uint64_t token = monitor.ExpectRemove(va, va + len, MmMonitor::OwnChange::kZap);
  int rc = as.sys().Madvise(reinterpret_cast<void*>(va), len, MADV_DONTNEED);
  int err = errno;
  monitor.EndExpect(token);
  if (rc != 0) return Status::FromErrno(err, fmt::format("MADV_DONTNEED {:#x}+{:#x}", va, len));
  return Status::Ok();
}

// Maps device pages [id, id + n) of a coherent pagemap at va (replacing the anon pages).
Status MapCoherent(MmMonitor& monitor, const Vma& vma, DevicePagemap& pm, uintptr_t va,
                   uint64_t first_id, size_t n, size_t page) {
  const uint64_t token = monitor.ExpectRemove(va, va + n * page, MmMonitor::OwnChange::kReplace);
  void* p =
      ::mmap(reinterpret_cast<void*>(va), n * page, ProtOf(vma),
             MAP_SHARED | MAP_FIXED | MAP_POPULATE, pm.ArenaFd(), off_t(pm.ArenaOffset(first_id)));
  int err = errno;
  monitor.EndExpect(token);
  if (p == MAP_FAILED)
    return Status::FromErrno(err, fmt::format("mapping coherent device pages at {:#x}", va));
  monitor.ForgetRange(va, va + n * page);
  // The new VMA is not registered: watch it so its unmaps and clears are seen.
  return monitor.EnsureWatched(va, va + n * page);
}

// Puts the staging pages [src, src + len) at va with their data (coherent pages going back).
// A copy back to RAM of pages [i, i + k) put the first `done` of them in place (all, or the part
// a failed UFFDIO_COPY got through): those commit, and their device entries go in Finalize; the
// rest stay on the device, unselected. Committing only what was copied keeps the two views apart:
// a page in place with its entry kept would let the device read data the CPU has since changed.
void CommitCopied(MigrateVma& m, MigrateState& st, size_t i, size_t k, size_t done) {
  for (size_t j = i; j < i + done; ++j) st.committed[j] = 1;
  for (size_t j = i + done; j < i + k; ++j) m.src[j] &= ~migrate_pfn::kMigrate;
}

Status MoveStagingOver(MmMonitor& monitor, const Vma& vma, uintptr_t va, void* src, size_t len,
                       detail::DeviceEntries& entries) {
  if (::mprotect(src, len, ProtOf(vma)) != 0)
    return Status::FromErrno(errno, "mprotect of staging pages");
  const uint64_t token = monitor.ExpectRemove(va, va + len, MmMonitor::OwnChange::kReplace);
  void* p = ::mremap(src, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, reinterpret_cast<void*>(va));
  int err = errno;
  monitor.EndExpect(token);
  if (p == MAP_FAILED)
    return Status::FromErrno(err, fmt::format("moving system pages back to {:#x}", va));
  monitor.ForgetRange(va, va + len);
  HMMKIT_RETURN_IF_ERROR(monitor.EnsureWatched(va, va + len));
  return entries.EnsureRouted(va, va + len);
}

// One "migrate" event per run of committed pages (and an "evict" for each when the cause is an
// eviction); runs that came back are reported to the thread's MovedCollector (CPU fault-back).
void TraceCommitted(const MigrateVma& m, const MigrateState& st) {
  const DevicePagemap* pm = st.to_device ? m.dst_pagemap : m.src_pagemap;
  const uint16_t track =
      trace::TrackFor(pm != nullptr ? pm->owner() : nullptr, trace::TrackKind::kDevice);
  const uint64_t now = trace::NowNs();
  ForEachRun(
      m.npages, [&](size_t i) { return st.committed[i] != 0; },
      [&](size_t i, size_t k) {
        trace::Event e;
        e.ts_ns = st.trace_begin;
        e.dur_ns = now - st.trace_begin;
        e.track = track;
        e.name = trace::Name::kMigrate;
        e.a[0] = m.start + i * st.page;
        e.a[1] = e.a[0] + k * st.page;
        e.a[2] = k;
        e.small = trace::MigrateSmall(st.to_device, st.cause);
        trace::Record(e);
        if (!st.to_device) trace::MovedCollector::Note(e.a[0], e.a[1], k);
        if (st.cause == trace::Cause::kEvict && !st.to_device) {
          e.name = trace::Name::kEvict;
          e.small = 0;
          trace::Record(e);
        }
      });
}

}  // namespace

Status MigrateVmaSetup(AddressSpace& as, MigrateVma& m) {
  const size_t page = as.features().page_size;
  if (m.state) return Invalid("already set up");
  if (m.start >= m.end || ((m.start | m.end) & (page - 1))) return Invalid("bad range");
  const size_t n = (m.end - m.start) / page;
  if (m.src.size() < n || m.dst.size() < n) return Invalid("src/dst shorter than the range");
  const uint32_t select = m.flags & (kSelectSystem | kSelectDevicePrivate | kSelectDeviceCoherent);
  if (select == 0) return Invalid("no MigrateSelect flag");
  if ((select & kSelectSystem) && (select & ~kSelectSystem))
    return Invalid("select either system or device pages, not both");
  const bool to_device = select == kSelectSystem;
  if (to_device && !m.dst_pagemap) return Invalid("kSelectSystem needs dst_pagemap");
  if (!to_device && !m.src_pagemap) return Invalid("device selection needs src_pagemap");
  if (!to_device && m.src_pagemap->owner() != m.pgmap_owner)
    return Invalid("src_pagemap's owner is not pgmap_owner");
  MmMonitor* monitor = as.monitor();
  if (!monitor)
    return Status::FromErrno(ENOTSUP,
                             "migrate_vma needs the userfaultfd monitor (see `hmmctl info`)");
  // Device entries of a range unmapped just before must be gone before we look (an munmap
  // returns before the monitor has dispatched its event). Before subscribing: those changes
  // precede the lookup below, which sees their result, and must not be recorded as racing us.
  if (monitor->pending_changes() != 0) monitor->Sync();
  auto st = std::make_shared<MigrateState>();
  // Subscribed before the VMA is looked up: an unmap after the lookup is dispatched after this,
  // so it is recorded and its pages do not commit. Subscribed after the lookup, an unmap in
  // between went unseen, its pages were collected as holes and committed to a range with no VMA
  // (a leaked device page, found by an access-counter promotion racing an munmap).
  HMMKIT_RETURN_IF_ERROR(as.notifiers().Insert(st->sub, m.start, m.end - m.start, *st));
  bool keep_sub = false;
  const OnExit drop_sub([&] {
    if (!keep_sub) as.notifiers().Remove(st->sub);
  });
  // A change read between the Sync and the subscription may be in dispatch now: recorded too
  // late for us, its entry drop could land on the entries we commit, after our last look. Let it
  // finish (a migration to a device never runs on the fault thread, which must not wait here).
  if (to_device && monitor->ChangePending(m.start, m.end)) monitor->Sync();
  auto vma = as.FindVma(m.start);
  if (!vma.ok()) return vma.status();
  if (!*vma) return Invalid(fmt::format("no VMA at {:#x}", m.start));
  if ((*vma)->end < m.end) return Invalid("the range spans more than one VMA");

  std::fill_n(m.src.begin(), n, 0);
  std::fill_n(m.dst.begin(), n, 0);
  m.npages = n;
  m.cpages = 0;

  if (trace::Enabled()) {
    st->trace_begin = trace::NowNs();
    st->cause = trace::CurrentCause();
  }
  st->as = &as;
  st->entries = &as.device_entries();
  st->monitor = monitor;
  st->page = page;
  st->vma = **vma;
  st->to_device = to_device;
  st->write_protected.assign(n, 0);
  st->committed.assign(n, 0);
  st->fork_lock = std::shared_lock<std::shared_mutex>(ForkMigrationLock());

  const bool system_ok = to_device && st->vma.migratable() && st->vma.accessible();
  const std::pair<uintptr_t, uintptr_t> own_stack = CurrentThreadStack();
  const std::pair<uintptr_t, uintptr_t> own_tcb = CurrentThreadControlBlock(/*with_tls=*/false);
  if (system_ok) {
    // Missing-page faults in the range must reach hmmkit before anything is zapped. Not on
    // hmmkit's own stacks (skipped below): a thread growing its stack there would fault to the
    // monitor, which may be that very thread.
    for (auto [s, e] : InternalMemory::Outside(m.start, m.end, own_stack, own_tcb)) {
      Status routed = st->entries->EnsureRouted(s, e);
      if (!routed.ok()) return routed;
    }
    // From here a change of the range raises an event that our subscription records. One made
    // between the lookup above and the registration raised none (the old VMA was not registered
    // yet): a mapping put in its place (another thread's mmap MAP_FIXED, or an allocation taking
    // the address an munmap freed) would be migrated as if it were the one looked up, and a
    // PROT_NONE one would get device pages. Look again.
    // The registration itself splits the VMA (only the pages outside hmmkit's memory are routed):
    // the range must still be covered, without holes, by VMAs of the kind looked up.
    auto again = as.FindVmas(m.start, m.end);
    if (!again.ok()) return again.status();
    uintptr_t covered = m.start;
    for (const Vma& v : *again)
      if (v.start <= covered && SameMapping(v, st->vma)) covered = std::max(covered, v.end);
    if (covered < m.end)
      return Status::FromErrno(
          EAGAIN, fmt::format("migrate_vma: the mapping at {:#x} changed during setup", m.start));
  }
  HMMKIT_RETURN_IF_ERROR(st->entries->BeginMigration(m.start, m.end));
  keep_sub = true;  // Finalize removes it from here on
  st->scope = std::make_unique<NotifierTree::Scope>(
      as.notifiers(), NotifierRange{m.start, m.end, InvalidateEvent::kMigrate, m.pgmap_owner});

  std::vector<PageState> states(n);
  std::vector<DevicePageInfo> dev(n);
  // Only system pages need the page-table walk: device pages are known from their entries (a
  // CPU fault-back of one page skips a PAGEMAP_SCAN).
  Status snap = system_ok ? as.SnapshotInVma(st->vma, m.start, m.end, states) : Status::Ok();
  as.LookupDevicePages(m.start, m.end, dev);
  if (!snap.ok()) {
    m.state = st;
    MigrateVmaFinalize(m);
    return snap;
  }

  const std::vector<std::pair<uintptr_t, uintptr_t>> internal =
      system_ok ? InternalMemory::Overlapping(m.start, m.end, own_stack, own_tcb)
                : std::vector<std::pair<uintptr_t, uintptr_t>>{};
  std::vector<uint8_t> present(n, 0);
  for (size_t i = 0; i < n; ++i) {
    const uintptr_t va = m.start + i * page;
    const DevicePageInfo& d = dev[i];
    if (d.exclusive) continue;  // restored by a CPU touch first
    if (d.kind != PageKind::kSystem) {
      const bool wanted = (d.kind == PageKind::kDevicePrivate && (select & kSelectDevicePrivate)) ||
                          (d.kind == PageKind::kDeviceCoherent && (select & kSelectDeviceCoherent));
      if (wanted && d.owner == m.pgmap_owner) {
        DeviceEntry e;
        if (st->entries->Find(va, &e) && e.pagemap == m.src_pagemap) {
          m.src[i] = migrate_pfn::FromDevice(d.id) | migrate_pfn::kMigrate |
                     (d.writable ? migrate_pfn::kWrite : 0);
          present[i] = d.kind == PageKind::kDeviceCoherent;  // CPU-mapped: write-protect it
        }
      }
      continue;
    }
    if (!system_ok || st->entries->Pinned(va)) continue;
    // hmmkit's own memory (thread stacks, buffers) and the stack of the thread migrating stay:
    // a thread must never fault on them while it services faults or migrations.
    if (std::any_of(internal.begin(), internal.end(),
                    [&](const auto& r) { return r.first < va + page && r.second > va; }))
      continue;
    const PageState& ps = states[i];
    if (ps.has(PageState::kSwapped)) continue;  // the kernel skips swap entries too
    const uint64_t w = st->vma.write ? migrate_pfn::kWrite : 0;
    if (ps.present() && !ps.has(PageState::kZero)) {
      m.src[i] = migrate_pfn::FromSystem(reinterpret_cast<void*>(va)) | migrate_pfn::kMigrate | w;
    } else {
      m.src[i] = migrate_pfn::kMigrate | w;  // a hole or the zero page: nothing to copy
    }
    present[i] = ps.present();
  }

  // Writers must not change a page between the copy and the commit: write-protect every present
  // collected page (the zero page too: a write would replace it). Pages that cannot be protected
  // are not migrated.
  ForEachRun(
      n, [&](size_t i) { return present[i] && (m.src[i] & migrate_pfn::kMigrate); },
      [&](size_t i, size_t k) {
        Status wp = monitor->WriteProtect(m.start + i * page, k * page, true);
        for (size_t j = i; j < i + k; ++j) {
          if (wp.ok()) {
            st->write_protected[j] = 1;
          } else {
            m.src[j] = 0;
          }
        }
        if (!wp.ok())
          Log().debug("migrate_vma: {:#x}+{} pages not write-protectable ({}): skipped",
                      m.start + i * page, k, wp.ToString());
      });
  // The zero page may have been replaced between the snapshot and the write-protect: a write to
  // it is an ordinary copy-on-write, which no userfaultfd mode reports. Collected as "nothing to
  // copy", such a page would reach the device as zeros and the CPU's write would be zapped (found
  // by the stress oracle: CPU threads first-touching pages next to a device fault's migration).
  // Write-protected now, the page cannot change again: look once more and copy what is there.
  size_t first_zero = n, last_zero = 0;
  for (size_t i = 0; i < n; ++i) {
    if (st->write_protected[i] && states[i].has(PageState::kZero)) {
      first_zero = std::min(first_zero, i);
      last_zero = i;
    }
  }
  if (first_zero < n) {
    std::vector<PageState> again(last_zero + 1 - first_zero);
    Status snap_again = as.SnapshotInVma(st->vma, m.start + first_zero * page,
                                         m.start + (last_zero + 1) * page, again);
    for (size_t i = first_zero; i <= last_zero; ++i) {
      if (!st->write_protected[i] || !states[i].has(PageState::kZero)) continue;
      const PageState& now = again[i - first_zero];
      if (!snap_again.ok() || !now.present()) {
        m.src[i] = 0;  // cannot tell what is there: it stays (Finalize lifts the protection)
      } else if (!now.has(PageState::kZero)) {
        const uintptr_t va = m.start + i * page;
        m.src[i] = migrate_pfn::FromSystem(reinterpret_cast<void*>(va)) | migrate_pfn::kMigrate |
                   (m.src[i] & migrate_pfn::kWrite);
      }
    }
  }
  for (size_t i = 0; i < n; ++i) m.cpages += (m.src[i] & migrate_pfn::kMigrate) ? 1 : 0;
  m.state = st;
  return Status::Ok();
}

Status MigrateVmaAllocSystemPages(MigrateVma& m) {
  if (!m.state || m.state->to_device) return Invalid("AllocSystemPages: not a migration to RAM");
  MigrateState& st = *m.state;
  if (st.staging) return Status::Ok();
  st.staging_len = m.npages * st.page;
  if (const int injected = inject::Check(inject::Site::kSystemAlloc))
    return Status::FromErrno(injected, "migrate_vma: staging pages (injected failure)");
  void* p = MapInternal(st.staging_len);  // never itself the target of another migration
  if (!p) return Status::FromErrno(errno, "migrate_vma: staging pages");
  st.staging = p;
  for (size_t i = 0; i < m.npages; ++i)
    if (m.src[i] & migrate_pfn::kMigrate)
      m.dst[i] = migrate_pfn::FromSystem(static_cast<char*>(p) + i * st.page);
  return Status::Ok();
}

Status MigrateVmaPages(MigrateVma& m) {
  if (!m.state) return Invalid("Pages without Setup");
  MigrateState& st = *m.state;
  AddressSpace& as = *st.as;
  MmMonitor& monitor = *st.monitor;
  const size_t page = st.page, n = m.npages;
  const auto now = std::chrono::steady_clock::now();

  // Which pages commit: collected, given a destination, and not changed by the application since.
  std::vector<uint8_t> go(n, 0);
  const bool pending = monitor.ChangePending(m.start, m.end);
  for (size_t i = 0; i < n; ++i) {
    if (!(m.src[i] & migrate_pfn::kMigrate)) continue;
    if (!(m.dst[i] & migrate_pfn::kValid) || st.Changed(m.start + i * page, pending)) {
      m.src[i] &= ~migrate_pfn::kMigrate;
      continue;
    }
    go[i] = 1;
  }

  Status result = Status::Ok();
  if (st.to_device) {
    DevicePagemap& pm = *m.dst_pagemap;
    // A 2 MiB-aligned block committed whole onto one aligned run of device pages (a device
    // folio) is reported with map order 9, as the kernel maps a device THP.
    const size_t huge = (size_t(2) << 20) / page;
    std::vector<uint8_t> order(n, 0);
    for (size_t i = 0; huge > 0 && i + huge <= n; ++i) {  // huge is 0 for pages over 2 MiB
      if (((m.start + i * page) & ((huge * page) - 1)) != 0) continue;
      const uint64_t head = migrate_pfn::DeviceId(m.dst[i]);
      bool whole = head % huge == 0;
      for (size_t k = 0; whole && k < huge; ++k)
        whole = go[i + k] && migrate_pfn::DeviceId(m.dst[i + k]) == head + k;
      if (whole) std::fill_n(order.begin() + long(i), huge, 9);
    }
    std::vector<std::pair<uintptr_t, DeviceEntry>> add;
    add.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      if (!go[i]) continue;
      DeviceEntry e;
      e.pagemap = &pm;
      e.id = migrate_pfn::DeviceId(m.dst[i]);
      e.order = order[i];
      e.writable = (m.src[i] & migrate_pfn::kWrite) != 0;
      e.migrated_at = now;
      add.emplace_back(m.start + i * page, e);  // the dst reference moves to the entry
      st.committed[i] = 1;
    }
    st.entries->InsertMany(add);
    // Looked at again after the insert, right before the zap:
    //  - an unmap or clear dispatched between the check above and the insert dropped its entries
    //    (DropRange) before ours went in; the monitor records the change here (Invalidate) before
    //    it drops, so Gone finds every such page;
    //  - one read but not dispatched yet is pending: its range may already hold a new mapping
    //    (the address is free once munmap removed the VMA, and the kernel reuses it: seen with the
    //    monitor's own message slab), which the zap would destroy.
    // Such a page's entry, if still there, is taken back; one the dispatch dropped meanwhile was
    // released by it. Either way the page is released once and neither commits nor is zapped.
    // What is left is the window between this look and the zap, a few microseconds: the kernel
    // closes it with the mmap lock, which user space cannot take (interposition can; see
    // docs/migration.md).
    const bool pending_now = monitor.ChangePending(m.start, m.end);
    for (size_t i = 0; i < n; ++i) {
      if (!go[i] || !st.Changed(m.start + i * page, pending_now)) continue;
      DeviceEntry e;
      if (st.entries->TakeIfPage(m.start + i * page, &pm, migrate_pfn::DeviceId(m.dst[i]), &e))
        pm.PutPage(e.id);
      go[i] = 0;
      st.committed[i] = 0;
      m.src[i] &= ~migrate_pfn::kMigrate;
      m.dst[i] = 0;  // released above (or by the dispatch): not again in Finalize
    }
    if (pm.kind() == PageKind::kDevicePrivate) {
      ForEachRun(
          n, [&](size_t i) { return go[i] != 0; },
          [&](size_t i, size_t k) {
            Status z = ZapOwn(as, monitor, m.start + i * page, k * page);
            if (!z.ok() && result.ok()) result = z;
          });
    } else {
      // Coherent: map runs of consecutive device pages over the CPU pages.
      ForEachRun(
          n, [&](size_t i) { return go[i] != 0; },
          [&](size_t i, size_t k) {
            size_t j = i;
            while (j < i + k) {
              size_t e = j + 1;
              while (e < i + k &&
                     migrate_pfn::DeviceId(m.dst[e]) == migrate_pfn::DeviceId(m.dst[j]) + (e - j))
                ++e;
              Status mc = MapCoherent(monitor, st.vma, pm, m.start + j * page,
                                      migrate_pfn::DeviceId(m.dst[j]), e - j, page);
              if (!mc.ok() && result.ok()) result = mc;
              j = e;
            }
          });
    }
    return result;
  }

  // Back to system memory.
  const bool coherent = m.src_pagemap->kind() == PageKind::kDeviceCoherent;
  ForEachRun(
      n,
      [&](size_t i) {
        // No staging at all when the pages come straight from host-visible device memory.
        return go[i] != 0 && st.staging != nullptr &&
               static_cast<char*>(migrate_pfn::SystemAddress(m.dst[i])) ==
                   static_cast<char*>(st.staging) + i * page;
      },
      [&](size_t i, size_t k) {
        const uintptr_t va = m.start + i * page;
        size_t copied = 0;
        Status c = coherent
                       ? MoveStagingOver(monitor, st.vma, va, migrate_pfn::SystemAddress(m.dst[i]),
                                         k * page, *st.entries)
                       : monitor.Copy(va, migrate_pfn::SystemAddress(m.dst[i]), k * page,
                                      /*write_protect=*/false, /*wake=*/false, &copied);
        CommitCopied(m, st, i, k, c.ok() ? k : copied / page);
        if (!c.ok() && result.ok()) result = c;
      });
  // Destinations the driver chose itself (not hmmkit's staging, e.g. host-visible device pages):
  // one copy per run of destinations that are contiguous too.
  for (size_t i = 0; i < n;) {
    if (!go[i] || st.committed[i] || !(m.src[i] & migrate_pfn::kMigrate)) {
      ++i;
      continue;
    }
    const char* from = static_cast<const char*>(migrate_pfn::SystemAddress(m.dst[i]));
    size_t k = 1;
    while (i + k < n && go[i + k] && !st.committed[i + k] &&
           (m.src[i + k] & migrate_pfn::kMigrate) &&
           migrate_pfn::SystemAddress(m.dst[i + k]) == from + k * page)
      ++k;
    const uintptr_t va = m.start + i * page;
    size_t copied = 0;
    Status c = coherent ? Status::FromErrno(EINVAL, "coherent pages need staging destinations")
                        : monitor.Copy(va, const_cast<char*>(from), k * page,
                                       /*write_protect=*/false, /*wake=*/false, &copied);
    CommitCopied(m, st, i, k, c.ok() ? k : copied / page);
    // Named by address: an EEXIST here means a CPU page is present where a device entry still is.
    if (!c.ok() && result.ok())
      result = Status::FromErrno(
          c.errno_value(), fmt::format("{} copying {} pages back to {:#x}", c.message(), k, va));
    i += k;
  }
  return result;
}

void MigrateVmaFinalize(MigrateVma& m) {
  if (!m.state) return;
  std::shared_ptr<MigrateState> keep = std::move(m.state);
  MigrateState& st = *keep;
  MmMonitor& monitor = *st.monitor;
  const size_t page = st.page, n = m.npages;
  // Before the wake-ups below: after them the device (and its pagemap) may go away.
  if (st.trace_begin != 0) TraceCommitted(m, st);

  if (st.to_device) {
    // Unused destination pages go back to the device.
    for (size_t i = 0; i < n; ++i)
      if ((m.dst[i] & migrate_pfn::kValid) && !st.committed[i])
        m.dst_pagemap->PutPage(migrate_pfn::DeviceId(m.dst[i]));
    // Pages that stayed are writable again (this wakes writers blocked on them).
    ForEachRun(
        n, [&](size_t i) { return st.write_protected[i] && !st.committed[i]; },
        [&](size_t i, size_t k) {
          monitor.WriteProtect(m.start + i * page, k * page, false).IgnoreError();
        });
  } else {
    std::vector<uintptr_t> vas;
    for (size_t i = 0; i < n; ++i)
      if (st.committed[i]) vas.push_back(m.start + i * page);
    std::vector<DeviceEntry> taken;
    taken.reserve(vas.size());
    st.entries->TakeMany(vas, taken);
    for (const DeviceEntry& e : taken) e.pagemap->PutPage(e.id);
    ForEachRun(
        n, [&](size_t i) { return st.write_protected[i] && !st.committed[i]; },
        [&](size_t i, size_t k) {
          monitor.WriteProtect(m.start + i * page, k * page, false).IgnoreError();
        });
    if (st.staging) UnmapInternal(st.staging, st.staging_len);  // moved pages are no longer in it
    // The device entries are gone: threads faulting on the copied pages may run now.
    ForEachRun(
        n, [&](size_t i) { return st.committed[i] != 0; },
        [&](size_t i, size_t k) { monitor.Wake(m.start + i * page, k * page).IgnoreError(); });
  }
  // Writers that faulted on a zapped page retry now (their fault handler waits for us).
  st.entries->EndMigration(m.start, m.end);
  st.scope.reset();
  st.as->notifiers().Remove(st.sub);
  if (st.fork_lock.owns_lock()) st.fork_lock.unlock();
}

// ---- migrate back, eviction ------------------------------------------------------------------

// Moves the pages of `pm` in [start, end) (one VMA) back to system memory: setup, staging pages,
// the pagemap's CopyToRam, commit, finalize.
static Status MigrateRangeToRam(AddressSpace& as, DevicePagemap& pm, uintptr_t start,
                                uintptr_t end) {
  const size_t n = (end - start) / as.features().page_size;
  std::vector<uint64_t> src(n), dst(n);
  MigrateVma m;
  m.start = start;
  m.end = end;
  m.src = src;
  m.dst = dst;
  m.pgmap_owner = pm.owner();
  m.flags = pm.kind() == PageKind::kDevicePrivate ? kSelectDevicePrivate : kSelectDeviceCoherent;
  m.src_pagemap = &pm;
  HMMKIT_RETURN_IF_ERROR(MigrateVmaSetup(as, m));
  if (pm.kind() == PageKind::kDevicePrivate && pm.HostReadable()) {
    // Host-visible device memory: the "system page" each entry copies from is the device page's
    // own CPU mapping; MigrateVmaPages copies runs of them with UFFDIO_COPY.
    for (size_t i = 0; i < n; ++i)
      if (m.src[i] & migrate_pfn::kMigrate)
        m.dst[i] = migrate_pfn::FromSystem(pm.PageData(migrate_pfn::DeviceId(m.src[i])));
    Status st = MigrateVmaPages(m);
    size_t pages = 0;  // committed: still selected after the commit
    for (size_t i = 0; i < n; ++i) pages += (m.src[i] & migrate_pfn::kMigrate) ? 1 : 0;
    // Before Finalize: it wakes the faulting threads, after which the device (and pm) may be
    // destroyed by the program.
    if (pages > 0) pm.CopiedToRam(pages);
    MigrateVmaFinalize(m);
    return st;
  }
  Status st = MigrateVmaAllocSystemPages(m);
  if (st.ok() && m.cpages > 0) {
    std::vector<uint64_t> ids;
    std::vector<void*> to;
    for (size_t i = 0; i < n; ++i) {
      if (!(m.src[i] & migrate_pfn::kMigrate)) continue;
      ids.push_back(migrate_pfn::DeviceId(m.src[i]));
      to.push_back(migrate_pfn::SystemAddress(m.dst[i]));
    }
    st = pm.CopyToRam(ids, to);
    if (!st.ok()) std::fill(m.dst.begin(), m.dst.end(), 0);  // nothing commits
  }
  if (st.ok()) st = MigrateVmaPages(m);
  MigrateVmaFinalize(m);
  return st;
}

Status MigrateToRamWindow(AddressSpace& as, DevicePagemap& pm, uintptr_t addr) {
  const size_t page = as.features().page_size;
  const uintptr_t pg = addr & ~(page - 1);
  DeviceEntry e;
  if (as.options().migrate_timeslice.count() > 0 && as.device_entries().Find(pg, &e)) {
    const auto until = e.migrated_at + as.options().migrate_timeslice;
    if (std::chrono::steady_clock::now() < until) std::this_thread::sleep_until(until);
  }
  auto vma = as.FindVma(pg);
  if (!vma.ok()) return vma.status();
  // The stream detector's state: CPU faults of an address space are served by its monitor's one
  // fault thread, so per-thread state sees that address space's fault sequence.
  struct Stream {
    const AddressSpace* as = nullptr;
    uintptr_t start = 0, end = 0;  // the previous window
    size_t pages = 0;              // its size
  };
  thread_local Stream stream;
  uintptr_t start = pg, end = pg + page;
  if (*vma) {
    const AddressSpace::Options& o = as.options();
    const bool ours = stream.as == &as && o.fault_window_max > o.fault_window;
    const size_t grown = std::min(stream.pages * 2, o.fault_window_max);
    // Sequential either way (large memcpys run backwards when the destination is above the
    // source): a larger window ahead of the stream; what is behind it came back already.
    if (ours && pg == stream.end) {
      end = std::min<uintptr_t>((*vma)->end, pg + grown * page);
      stream.pages = grown;
    } else if (ours && pg + page == stream.start) {
      start = std::max<uintptr_t>((*vma)->start, pg + page - std::min(grown * page, pg + page));
      stream.pages = grown;
    } else {
      const uintptr_t w = o.fault_window * page;
      start = std::max((*vma)->start, pg & ~(w - 1));
      end = std::min((*vma)->end, (pg & ~(w - 1)) + w);
      stream.pages = o.fault_window;
    }
    stream.as = &as;
    stream.start = start;
    stream.end = end;
  }
  return MigrateRangeToRam(as, pm, start, end);
}

// The entry at `va` (page `id` of `pm`) has no VMA under it. Normally the unmap's event is still
// on its way and drops the entry; so is an mremap's, which moves it (the kernel queues those
// events after the mapping changed: SyncUnread waits for them too). An entry still there
// afterwards outlived its mapping (an application munmap inside one of hmmkit's own announced
// replacements, the residual window of docs/migration.md): the kernel frees a device page with
// the unmap that removes it, so the entry is dropped (after the unmap's invalidation) and its
// reference put, or eviction and teardown would wait on it forever. When the monitor cannot tell
// (messages kept arriving), the entry is kept: a lost page is worse than a failed eviction.
// Returns whether the entry is gone from `va`.
static bool DropIfOrphan(AddressSpace& as, DevicePagemap& pm, uintptr_t va, uint64_t id) {
  MmMonitor* monitor = as.monitor();
  if (monitor && !monitor->SyncUnread(std::chrono::milliseconds(100))) return false;
  auto vma = as.FindVma(va);
  if (!vma.ok() || *vma) return false;
  // On the event thread Sync cannot wait for the events queued behind the one being dispatched:
  // a change still queued over `va` (an mremap that moves the entry) is left to its dispatch.
  if (monitor && monitor->ChangePending(va, va + as.features().page_size)) return false;
  // What the missed unmap event would have done, in its order: devices drop their translations
  // first, so that none still reaches the page once it is freed and handed out again.
  as.notifiers().Invalidate(
      NotifierRange{va, va + as.features().page_size, InvalidateEvent::kUnmap, nullptr});
  DeviceEntry e;
  if (as.device_entries().TakeIfPage(va, &pm, id, &e)) {
    Log().warn("migrate_device_range: device page {} at {:#x} outlived its mapping: dropped", id,
               va);
    pm.PutPage(e.id);
  }
  return true;
}

// How long eviction retries a run the kernel refuses with EAGAIN: UFFDIO_COPY fails while the mm
// is changing (an unmap, remove or remap event the monitor's reader has not read yet, such as
// another thread's zap). The reader takes it within microseconds on an idle machine; under load it
// may wait for a CPU. Pages that landed stay landed; the next try selects only the rest.
constexpr auto kEvictAgainFor = std::chrono::seconds(5);
constexpr auto kEvictAgainPause = std::chrono::microseconds(200);

Status MigrateDevicePages(AddressSpace& as, DevicePagemap& pm, std::span<const uint64_t> ids) {
  const size_t page = as.features().page_size;
  const auto again_deadline = std::chrono::steady_clock::now() + kEvictAgainFor;
  std::vector<std::pair<uintptr_t, uint64_t>> pages;  // address, id
  pages.reserve(ids.size());
  for (uint64_t id : ids)
    if (uintptr_t va = as.device_entries().AddressOf(&pm, id)) pages.emplace_back(va, id);
  std::sort(pages.begin(), pages.end());
  Status first = Status::Ok();
  for (size_t i = 0; i < pages.size();) {
    const uintptr_t va = pages[i].first;
    auto vma = as.FindVma(va);
    if (vma.ok() && !*vma && DropIfOrphan(as, pm, va, pages[i].second)) {
      ++i;
      continue;
    }
    // A run of consecutive addresses inside one VMA.
    const uintptr_t limit = vma.ok() && *vma ? (*vma)->end : va + page;
    size_t j = i + 1;
    while (j < pages.size() && pages[j].first == pages[j - 1].first + page &&
           pages[j].first < limit)
      ++j;
    const uintptr_t end = pages[j - 1].first + page;
    Status st = MigrateRangeToRam(as, pm, va, end);
    while (st.errno_value() == EAGAIN && std::chrono::steady_clock::now() < again_deadline) {
      std::this_thread::sleep_for(kEvictAgainPause);
      st = MigrateRangeToRam(as, pm, va, end);
    }
    if (!st.ok() && first.ok()) first = st;
    i = j;
  }
  return first;
}

Status MigrateAllToRam(AddressSpace& as, DevicePagemap& pm) {
  std::vector<uint64_t> ids;
  for (auto& [va, e] : as.device_entries().Collect(0, UINTPTR_MAX))
    if (!e.exclusive && e.pagemap == &pm) ids.push_back(e.id);
  return MigrateDevicePages(as, pm, ids);
}

// ---- DevicePagemap defaults
// ----------------------------------------------------------------------

Status DevicePagemap::CopyToRam(std::span<const uint64_t> ids, std::span<void* const> dst) {
  if (ids.size() != dst.size()) return Status::FromErrno(EINVAL, "CopyToRam: size mismatch");
  const size_t page = size_t(::sysconf(_SC_PAGESIZE));
  for (size_t i = 0; i < ids.size(); ++i) std::memcpy(dst[i], PageData(ids[i]), page);
  return Status::Ok();
}

Status DevicePagemap::MigrateToRam(AddressSpace& as, uintptr_t addr) {
  return MigrateToRamWindow(as, *this, addr);
}

// ---- long-term pins
// ------------------------------------------------------------------------------

Status PinLongTerm(AddressSpace& as, uintptr_t start, uintptr_t end) {
  const size_t page = as.features().page_size;
  if (start >= end || ((start | end) & (page - 1)))
    return Status::FromErrno(EINVAL, "PinLongTerm: bad range");
  as.device_entries().Pin(start, end);  // later migrations skip these pages
  HMMKIT_RETURN_IF_ERROR(as.device_entries().RestoreExclusive(start, end));
  for (auto& [va, e] : as.device_entries().Collect(start, end)) {
    if (e.exclusive || !as.device_entries().Find(va, nullptr)) continue;
    Status st = e.pagemap->MigrateToRam(as, va);
    if (!st.ok()) {
      as.device_entries().Unpin(start, end);
      return st;
    }
  }
  Status st = as.Populate(start, end, /*write=*/false);
  if (!st.ok()) as.device_entries().Unpin(start, end);
  return st;
}

void UnpinLongTerm(AddressSpace& as, uintptr_t start, uintptr_t end) {
  as.device_entries().Unpin(start, end);
}

}  // namespace hmmkit
