// SvmManager: windows, ranges, the fault policy and the get-pages loop (svm_manager.hpp).
#include "hmmkit/driver/svm_manager.hpp"

#include <fmt/format.h>
#include <link.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <optional>

#include "hmmkit/base/log.hpp"
#include "hmmkit/base/sanitizer.hpp"
#include "hmmkit/base/trace.hpp"
#include "hmmkit/driver/device_migration.hpp"
#include "hmmkit/mirror/mm_monitor.hpp"
#include "hmmkit/mirror/range_fault.hpp"

namespace hmmkit::driver {

const char* ToString(Residency r) {
  switch (r) {
    case Residency::kUnpopulated:
      return "unpopulated";
    case Residency::kSystem:
      return "system";
    case Residency::kDevice:
      return "device";
    case Residency::kMixed:
      return "mixed";
  }
  return "?";
}

Placement DefaultSvmPolicy::OnDeviceFault(const SvmFault& f) const {
  if (f.attrs.preferred == PreferredLocation::kDevice) return Placement::kMigrate;
  if (f.attrs.preferred == PreferredLocation::kSystem || f.attrs.accessed_by)
    return Placement::kRemote;
  if (f.attrs.read_mostly && !f.write) return Placement::kRemote;
  if (f.thrashing) return Placement::kRemote;
  return f.migrate_on_fault ? Placement::kMigrate : Placement::kRemote;
}

bool DefaultSvmPolicy::PromoteHotRange(const SvmFault& f) const {
  return f.migratable && !f.thrashing && f.attrs.preferred != PreferredLocation::kSystem &&
         !f.attrs.accessed_by && !f.attrs.read_mostly;
}

Result<std::unique_ptr<SvmManager>> SvmManager::Create(std::shared_ptr<AddressSpace> as,
                                                       DeviceMemory& memory, dma::DmaEngine& dma,
                                                       SvmDeviceOps& ops, const Options& options) {
  const size_t page = size_t(::sysconf(_SC_PAGESIZE));
  auto invalid = [](const std::string& why) {
    return Status::FromErrno(EINVAL, "SvmManager options: " + why);
  };
  if (!as) return invalid("no address space");
  const auto& c = options.chunk_sizes;
  if (c.empty()) return invalid("chunk_sizes is empty");
  for (size_t i = 0; i < c.size(); ++i) {
    if (!std::has_single_bit(c[i]) || c[i] < page)
      return invalid(fmt::format("chunk size {} is not a power of two >= {}", c[i], page));
    if (i > 0 && c[i] >= c[i - 1]) return invalid("chunk_sizes must be strictly descending");
  }
  if (c.back() != page) return invalid("the smallest chunk size must be the page size");
  if (!std::has_single_bit(options.window) || options.window < c.front())
    return invalid("window must be a power of two >= the largest chunk size");
  if (options.thrash_migrations == 0) return invalid("thrash_migrations must be >= 1");
  if (!(options.prefetch_threshold >= 0 && options.prefetch_threshold <= 1))
    return invalid("prefetch_threshold must be in [0, 1]");
  if (!std::has_single_bit(options.prefetch_region) || options.prefetch_region < page ||
      options.prefetch_region > options.window)
    return invalid("prefetch_region must be a power of two between the page size and the window");
  return std::unique_ptr<SvmManager>(new SvmManager(std::move(as), memory, dma, ops, options));
}

SvmManager::SvmManager(std::shared_ptr<AddressSpace> as, DeviceMemory& memory, dma::DmaEngine& dma,
                       SvmDeviceOps& ops, const Options& options)
    : as_(std::move(as)),
      memory_(memory),
      dma_(dma),
      ops_(ops),
      options_(options),
      policy_(options.policy ? options.policy : std::make_shared<DefaultSvmPolicy>()),
      page_(size_t(::sysconf(_SC_PAGESIZE))) {}

namespace {

// The page-rounded end of the memory image (file part and .bss) of the loaded ELF segment that
// holds byte `last`, or 0 when no object loaded by the dynamic loader holds it.
uintptr_t LoadedImageEnd(uintptr_t last, size_t page) {
  struct Query {
    uintptr_t last, page, end;
  } query{last, page, 0};
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* data) {
        auto* q = static_cast<Query*>(data);
        for (int i = 0; i < info->dlpi_phnum; ++i) {
          const ElfW(Phdr)& ph = info->dlpi_phdr[i];
          if (ph.p_type != PT_LOAD) continue;
          const uintptr_t seg = info->dlpi_addr + ph.p_vaddr;
          const uintptr_t end = (seg + ph.p_memsz + q->page - 1) & ~(q->page - 1);
          if (seg <= q->last && q->last < end) {
            q->end = end;
            return 1;
          }
        }
        return 0;
      },
      &query);
  return query.end;
}

// vma cut at `from` (MigratableFrom) on addr's side, so that no range straddles the end of a .bss
// image: the image's pages stay in system memory, the application's pages after it migrate.
Vma ClipAt(Vma v, uintptr_t addr, uintptr_t from) {
  if (from > v.start && from < v.end) (addr >= from ? v.start : v.end) = from;
  return v;
}

}  // namespace

uintptr_t SvmManager::MigratableFrom(const Vma& vma, std::optional<bool> after_file) const {
  // The brk heap and the main stack hold hmmkit's own allocations and frames too: a thread that
  // touches a page of its own migration waits on itself. So does the anonymous tail of an ELF
  // object's .bss (an unnamed VMA right after a file mapping), where hmmkit's statics live.
  // Mapped remotely (see docs/svm.md).
  constexpr uintptr_t kNever = ~uintptr_t(0);
  if (!vma.migratable() || !vma.accessible() || vma.name == "[heap]" || vma.name == "[stack]")
    return kNever;
  if (vma.name.empty() && vma.start > 0) {
    bool after = false;
    if (after_file) {
      after = *after_file;
    } else {
      auto prev = as_->FindVma(vma.start - 1);
      after = prev.ok() && *prev && (*prev)->kind == VmaKind::kFile && (*prev)->end == vma.start;
    }
    if (!after) return vma.start;
    // An application mapping placed right after a .bss merges with it: only the object's image
    // is off limits (it was the whole VMA: a buffer there silently stayed in system memory, seen
    // in the TSan lane's fuzz replay). Unknown objects keep the whole VMA in system memory.
    const uintptr_t image_end = LoadedImageEnd(vma.start - 1, page_);
    return image_end == 0 ? kNever : std::max(vma.start, image_end);
  }
  return vma.start;
}

void SvmManager::MarkDeadLocked(SvmRange& r) {
  if (!r.unmapped) dead_ranges_++;
  r.unmapped = true;
}

SvmManager::~SvmManager() {
  std::map<uintptr_t, std::unique_ptr<Window>> windows;
  {
    MutexLock lock(mu_);
    windows.swap(windows_);
    ranges_.clear();
  }
  // Outside mu_: Remove waits for a running Invalidate, which takes mu_.
  for (auto& [start, w] : windows) as_->notifiers().Remove(w->notifier);
}

Result<Vma> SvmManager::VmaFor(uintptr_t addr, std::optional<bool>* after_file) const {
  if (addr >= options_.device_va_end)
    return Status::FromErrno(EFAULT, fmt::format("{:#x} is beyond the device's address range "
                                                 "({:#x})",
                                                 addr, options_.device_va_end));
  // The mapping as the application made it: hmmkit's own userfaultfd registrations split VMAs
  // (page-exact routing of migrated pages), so join the compatible neighbours, as far as any
  // range or prefetch region around addr can reach. Only neighbours the monitor watches: those are
  // the pieces of memory the device already used. A compatible neighbour the kernel kept apart
  // because it is not registered is someone else's memory (the dynamic loader's, a library's),
  // which must never be migrated.
  // One walk of the VMAs around addr answers both (one PROCMAP_QUERY per VMA on the fault path).
  const uintptr_t span = std::max(options_.chunk_sizes.front(), options_.prefetch_region);
  const uintptr_t lo = addr & ~(span - 1), hi = lo + span;
  auto around = as_->FindVmas(lo, hi);
  if (!around.ok()) return around.status();
  const std::vector<Vma>& vs = *around;
  auto at = std::find_if(vs.begin(), vs.end(), [&](const Vma& v) { return v.contains(addr); });
  if (at == vs.end()) return Status::FromErrno(EFAULT, fmt::format("{:#x} is not mapped", addr));
  Vma joined = *at;
  MmMonitor* mon = as_->monitor();
  auto compatible = [&](const Vma& v) {
    return v.kind == joined.kind && v.shared == joined.shared && v.read == joined.read &&
           v.write == joined.write && v.exec == joined.exec && v.name == joined.name &&
           v.inode == joined.inode && mon &&
           mon->IsWatched(std::max(v.start, lo), std::min(v.end, hi));
  };
  auto first = at;
  for (auto it = at; it != vs.begin();) {
    --it;
    if (it->end != joined.start || !compatible(*it)) break;
    joined.start = it->start;
    first = it;
  }
  // What lies right before the joined VMA, when the walk saw it (MigratableFrom's .bss rule).
  if (after_file) {
    if (first != vs.begin() && std::prev(first)->end == joined.start)
      *after_file = std::prev(first)->kind == VmaKind::kFile;
    else if (joined.start > lo)
      *after_file = false;  // a gap before it inside the walked span
  }
  for (auto it = std::next(at); it != vs.end(); ++it) {
    if (it->start != joined.end || !compatible(*it)) break;
    joined.end = it->end;
  }
  return joined;
}

// ---- ranges ------------------------------------------------------------------------------------

SvmManager::SvmRange* SvmManager::FindLocked(uintptr_t addr) {
  auto next = ranges_.upper_bound(addr);
  if (next == ranges_.begin()) return nullptr;
  auto prev = std::prev(next);
  return addr < prev->second.end ? &prev->second : nullptr;
}

Result<SvmManager::Window*> SvmManager::WindowForLocked(uintptr_t addr) {
  const uintptr_t ws = addr & ~(uintptr_t(options_.window) - 1);
  auto wit = windows_.find(ws);
  if (wit != windows_.end()) return wit->second.get();
  auto w = std::make_unique<Window>();
  w->start = ws;
  w->end = ws + options_.window;
  HMMKIT_RETURN_IF_ERROR(as_->notifiers().Insert(w->notifier, ws, options_.window, *this));
  stats_.windows_created++;
  return windows_.emplace(ws, std::move(w)).first->second.get();
}

Result<SvmManager::SvmRange*> SvmManager::FindOrCreateLocked(uintptr_t addr, const Vma& vma) {
  if (SvmRange* r = FindLocked(addr)) return r;
  auto next = ranges_.upper_bound(addr);
  const uintptr_t ws = addr & ~(uintptr_t(options_.window) - 1), we = ws + options_.window;
  // Neighbouring ranges bound the new one: it never overlaps another. Nor does it cross a change
  // of advice: one range, one policy.
  const uintptr_t lo = next == ranges_.begin() ? 0 : std::prev(next)->second.end;
  const uintptr_t hi = next == ranges_.end() ? UINTPTR_MAX : next->second.start;
  const SvmAttributeMap::Run run = attributes_.RunAt(addr, vma.start, vma.end);
  for (size_t chunk : options_.chunk_sizes) {
    const uintptr_t s = addr & ~(uintptr_t(chunk) - 1), e = s + chunk;
    if (s < vma.start || e > vma.end || s < ws || e > we || e > options_.device_va_end) continue;
    if (s < lo || e > hi || s < run.start || e > run.end) continue;
    auto w = WindowForLocked(addr);
    if (!w.ok()) return w.status();
    SvmRange& r = ranges_[s];
    r.start = s;
    r.end = e;
    r.window = *w;
    r.window->ranges++;
    stats_.ranges_created++;
    return &r;
  }
  // The page-sized chunk always fits unless the page is outside the VMA or the device VA.
  return Status::FromErrno(EFAULT, fmt::format("no range fits around {:#x}", addr));
}

// ---- fault path --------------------------------------------------------------------------------

SvmFault SvmManager::DescribeFault(SvmRange& r, uintptr_t addr, bool write, bool migratable) {
  SvmFault f;
  f.addr = addr;
  f.write = write;
  f.range_start = r.start;
  f.range_end = r.end;
  f.migratable = migratable;
  f.attrs = attributes_.At(addr);
  f.migrate_on_fault = options_.migrate_on_fault;
  const auto now = std::chrono::steady_clock::now();
  f.thrashing = now < r.pinned_until;
  if (!f.thrashing) {
    std::erase_if(r.migrations, [&](auto t) { return now - t > options_.thrash_window; });
    if (r.migrations.size() >= options_.thrash_migrations) {
      // The pages keep going back and forth: leave them in system memory for a while.
      r.pinned_until = now + options_.thrash_pin;
      r.migrations.clear();
      stats_.thrashing_events++;
      f.thrashing = true;
      if (trace::Enabled()) {
        trace::Event e;
        e.ts_ns = trace::NowNs();
        e.instant = true;
        e.name = trace::Name::kThrash;
        e.track = trace::TrackFor(memory_.owner(), trace::TrackKind::kDevice);
        e.a[0] = r.start;
        e.a[1] = r.end;
        e.a[2] = uint64_t(options_.thrash_pin.count());
        trace::Record(e);
      }
      Log().debug("svm: range {:#x}-{:#x} thrashes; pinned to system memory for {} ms", r.start,
                  r.end, options_.thrash_pin.count());
    }
  }
  return f;
}

namespace {

// Under a sanitizer, malloc is the sanitizer's allocator, whose heap is a fixed region of the
// address space (x86-64): every small allocation, hmmkit's included, lives there.
bool InSanitizerHeap(uintptr_t addr) {
  if constexpr (kAddressSanitizer) {
    constexpr uintptr_t kBeg = 0x600000000000ULL, kEnd = kBeg + 0x40000000000ULL;
    return addr >= kBeg && addr < kEnd;
  } else if constexpr (kThreadSanitizer) {
    constexpr uintptr_t kBeg = 0x7b0000000000ULL, kEnd = 0x7c0000000000ULL;
    return addr >= kBeg && addr < kEnd;
  }
  return false;
}

}  // namespace

bool SvmManager::InMallocArenaHeap(uintptr_t addr) const {
  if (InSanitizerHeap(addr)) return true;
  // glibc gives each thread arena heaps of 64 MiB (2 * the largest mmap threshold), aligned to
  // their size: a read-write part from the aligned start, the rest reserved PROT_NONE up to the
  // next boundary. Every thread's small allocations live there, hmmkit's included (the emulated
  // MMU's page-table nodes, the manager's own tables), so such a heap is treated like the brk heap.
  constexpr uintptr_t kHeap = uintptr_t(64) << 20;
  const uintptr_t b = addr & ~(kHeap - 1);
  auto top = as_->FindVma(b + kHeap - 1);
  if (!top.ok() || !*top) return false;
  const Vma& reserved = **top;
  if (reserved.accessible() || reserved.kind != VmaKind::kAnon || reserved.end != b + kHeap ||
      reserved.start <= b)
    return false;
  // The read-write part is one mprotect'ed run from b up to the reservation: no hole, only
  // accessible anonymous memory (hmmkit's registrations may split it). Without this, any
  // PROT_NONE reservation that happens to end on a 64 MiB boundary (a sanitizer's, a thread
  // stack's neighbour) made unrelated anonymous memory below it look like a heap, and a prefetch
  // of an application buffer there silently mapped it remotely (seen in the TSan lane).
  auto rw = as_->FindVmas(b, reserved.start);
  if (!rw.ok() || rw->empty()) return false;
  uintptr_t covered = b;
  for (const Vma& v : *rw) {
    if (v.start > covered || v.kind != VmaKind::kAnon || !v.accessible()) return false;
    covered = v.end;
  }
  return covered >= reserved.start;
}

Result<size_t> SvmManager::MigrateSpan(uintptr_t start, uintptr_t end) {
  // MigrateToDevice works inside one VMA; hmmkit's own registrations may have split the mapping.
  auto vmas = as_->FindVmas(start, end);
  if (!vmas.ok()) return vmas.status();
  size_t migrated = 0;
  Status first = Status::Ok();
  for (const Vma& v : *vmas) {
    if (!v.migratable() || !v.accessible()) continue;
    if (InMallocArenaHeap(std::max(v.start, start))) continue;
    auto moved =
        MigrateToDevice(*as_, memory_, dma_, std::max(v.start, start), std::min(v.end, end));
    if (moved.ok()) {
      migrated += moved->migrated;
    } else if (first.ok()) {
      first = moved.status();
    }
  }
  if (!first.ok() && migrated == 0) return first;
  return migrated;
}

SvmManager::Moved SvmManager::MigrateRange(SvmRange& r) {
  const auto now = std::chrono::steady_clock::now();
  auto moved = MigrateSpan(r.start, r.end);
  MutexLock lock(mu_);
  if (!moved.ok()) {
    // Device memory full even after eviction, or a page could not be copied: what did not move is
    // mapped remotely.
    Log().debug("svm: migrating {:#x}-{:#x} to the device: {}", r.start, r.end,
                moved.status().ToString());
    return Moved::kFailed;
  }
  if (*moved == 0) return Moved::kNothing;
  r.migrations.push_back(now);
  stats_.migrations_to_device++;
  stats_.pages_to_device += *moved;
  return Moved::kSome;
}

void SvmManager::MaybeGrow(uintptr_t addr, const Vma& vma) {
  if (options_.prefetch_threshold <= 0) return;
  const uintptr_t region = options_.prefetch_region;
  const uintptr_t ws = addr & ~(uintptr_t(options_.window) - 1), we = ws + options_.window;
  uintptr_t gs = addr & ~(region - 1), ge = gs + region;
  gs = std::max({gs, vma.start, ws});
  ge = std::min({ge, vma.end, we, options_.device_va_end});
  if (gs >= ge) return;
  {
    MutexLock lock(mu_);
    if (attributes_.Advised(gs, ge)) return;  // advice decides there, not density
  }
  const size_t n = (ge - gs) / page_;
  std::vector<DevicePageInfo> dev(n);
  as_->LookupDevicePages(gs, ge, dev);
  const size_t ours = size_t(std::count_if(dev.begin(), dev.end(), [&](const DevicePageInfo& d) {
    return d.kind != PageKind::kSystem && d.owner == memory_.owner();
  }));
  if (ours == n || double(ours) < options_.prefetch_threshold * double(n)) return;
  const trace::CauseScope cause(trace::Cause::kPrefetch);
  auto moved = MigrateSpan(gs, ge);
  if (!moved.ok() || *moved == 0) return;
  {
    MutexLock lock(mu_);
    stats_.prefetch_grows++;
    stats_.pages_prefetched += *moved;
    stats_.migrations_to_device++;
    stats_.pages_to_device += *moved;
  }
  Log().debug("svm: fault at {:#x}: {}/{} pages of {:#x}-{:#x} were on the device; prefetched {}",
              addr, ours, n, gs, ge, *moved);
  // Map what moved, so that the device stops faulting in the region.
  for (uintptr_t a = gs; a < ge;) {
    SvmRange* r;
    {
      MutexLock lock(mu_);
      auto found = FindOrCreateLocked(a, vma);
      if (!found.ok()) return;
      r = *found;
    }
    GetPagesAndMap(*r, /*write=*/false, /*fault=*/false).IgnoreError();  // the fault maps later
    a = r->end;
  }
}

Status SvmManager::GetPagesAndMap(SvmRange& r, bool write, bool fault) {
  std::vector<uint64_t> pfns((r.end - r.start) / page_);
  Range range;
  range.notifier = &r.window->notifier;
  range.start = r.start;
  range.end = r.end;
  range.hmm_pfns = pfns;
  range.default_flags = fault ? hmm_pfn::kReqFault | (write ? hmm_pfn::kReqWrite : 0) : 0;
  range.dev_private_owner = memory_.owner();
  RetryOptions retry;
  retry.timeout = options_.get_pages_timeout;
  return RetryLoop(
      *as_, range, mu_,
      [&](const Range& valid) NO_THREAD_SAFETY_ANALYSIS {
        // mu_ is held (RetryLoop took it) and ReadRetry said the entries are still valid.
        if (fault) return ops_.MapPages(valid.start, valid.hmm_pfns);
        // Present pages only: map each run of valid entries.
        const auto& e = valid.hmm_pfns;
        for (size_t i = 0; i < e.size();) {
          if (!(e[i] & hmm_pfn::kValid) || (e[i] & hmm_pfn::kError)) {
            ++i;
            continue;
          }
          size_t j = i;
          while (j < e.size() && (e[j] & hmm_pfn::kValid) && !(e[j] & hmm_pfn::kError)) ++j;
          HMMKIT_RETURN_IF_ERROR(ops_.MapPages(valid.start + i * page_, e.subspan(i, j - i)));
          i = j;
        }
        return Status::Ok();
      },
      retry);
}

Status SvmManager::HandleFault(uintptr_t addr, bool write) {
  MutexLock op(op_mu_);
  CollectGarbageLocked();
  {
    MutexLock lock(mu_);
    stats_.device_faults++;
  }
  std::optional<bool> after_file;
  auto vma = VmaFor(addr, &after_file);
  if (!vma.ok()) return vma.status();
  // PROT_NONE first, and EFAULT as hmm_range_fault gives it (EPERM is for writes to read-only).
  if (!vma->read && !vma->write)
    return Status::FromErrno(EFAULT, fmt::format("device access to PROT_NONE {:#x}", addr));
  if (write && !vma->write)
    return Status::FromErrno(EPERM, fmt::format("device write to read-only {:#x}", addr));
  // Before mu_: these query the kernel, and Invalidate waits for mu_. A range lies inside one
  // aligned chunk, so it is in the same 64 MiB arena block as addr.
  const uintptr_t migratable_from = MigratableFrom(*vma, after_file);
  const bool migratable = migratable_from != ~uintptr_t(0) && !InMallocArenaHeap(addr);
  const Vma span = ClipAt(*vma, addr, migratable_from);
  SvmRange* r;
  SvmFault f;
  {
    MutexLock lock(mu_);
    auto found = FindOrCreateLocked(addr & ~(uintptr_t(page_) - 1), span);
    if (!found.ok()) return found.status();
    r = *found;
    f = DescribeFault(*r, addr, write, migratable && r->start >= migratable_from);
  }
  // The range may cross into a later VMA only if it was made for an earlier mapping that was
  // replaced; the VMA at addr decides the policy either way.
  const bool migrate = f.migratable && policy_->OnDeviceFault(f) == Placement::kMigrate;
  Moved moved = Moved::kNothing;
  if (migrate) {
    const trace::CauseScope cause(trace::Cause::kFault);
    moved = MigrateRange(*r);
  }
  const bool migrated = moved == Moved::kSome;
  std::optional<trace::Span> remote;  // "map_remote": the mapping of what stayed in system memory
  if (!migrate || moved == Moved::kFailed) {  // what did not move is reached remotely
    MutexLock lock(mu_);
    stats_.remote_maps++;
    if (trace::Enabled()) {
      remote.emplace(trace::Name::kMapRemote,
                     trace::TrackFor(memory_.owner(), trace::TrackKind::kDevice));
      remote->ev.a[0] = r->start;
      remote->ev.a[1] = r->end;
      remote->ev.a[2] = (r->end - r->start) / page_;
    }
  }
  Status st = GetPagesAndMap(*r, write);
  remote.reset();
  if (st.errno_value() == EFAULT) {
    // Part of the range was unmapped after it was made (its event may have been dispatched only
    // now): drop the range and fault once more with one made for the mapping as it is.
    bool gone;
    {
      MutexLock lock(mu_);
      gone = r->unmapped;
    }
    if (gone && CollectGarbageLocked() > 0) {
      auto again = VmaFor(addr);
      if (!again.ok()) return again.status();
      {
        MutexLock lock(mu_);
        auto found = FindOrCreateLocked(addr & ~(uintptr_t(page_) - 1), *again);
        if (!found.ok()) return found.status();
        r = *found;
      }
      st = GetPagesAndMap(*r, write);
    }
  }
  if (st.ok() && migrated) MaybeGrow(addr, span);
  return st;
}

Status SvmManager::HandleAccessCounter(uintptr_t addr) {
  MutexLock op(op_mu_);
  CollectGarbageLocked();
  {
    MutexLock lock(mu_);
    stats_.counter_notifications++;
  }
  std::optional<bool> after_file;
  auto vma = VmaFor(addr, &after_file);
  if (!vma.ok()) return vma.status();
  const uintptr_t migratable_from = MigratableFrom(*vma, after_file);
  const bool migratable = migratable_from != ~uintptr_t(0) && !InMallocArenaHeap(addr);
  SvmRange* r;
  SvmFault f;
  {
    MutexLock lock(mu_);
    r = FindLocked(addr);
    if (!r) return Status::Ok();  // no longer mapped by the device
    f = DescribeFault(*r, addr, /*write=*/false, migratable && r->start >= migratable_from);
  }
  if (!f.migratable || !policy_->PromoteHotRange(f)) return Status::Ok();
  const trace::CauseScope cause(trace::Cause::kPromotion);
  if (MigrateRange(*r) != Moved::kSome) return Status::Ok();  // already there, or no room
  {
    MutexLock lock(mu_);
    stats_.promotions++;
  }
  return GetPagesAndMap(*r, /*write=*/false, /*fault=*/false);
}

Status SvmManager::Advise(uintptr_t start, uintptr_t end, const SvmAdvice& advice) {
  if (start >= end || (start | end) & (page_ - 1))
    return Status::FromErrno(EINVAL, fmt::format("Advise: [{:#x}, {:#x}) is empty or not "
                                                 "page-aligned",
                                                 start, end));
  MutexLock op(op_mu_);
  auto vmas = as_->FindVmas(start, end);
  if (!vmas.ok()) return vmas.status();
  uintptr_t covered = start;
  for (const Vma& v : *vmas) {
    if (v.start > covered) break;
    covered = std::max(covered, v.end);
  }
  if (covered < end)
    return Status::FromErrno(EFAULT, fmt::format("Advise: {:#x} is not mapped", covered));
  // The advice must be forgotten when its memory is unmapped: make sure the unmap is seen.
  if (MmMonitor* mon = as_->monitor()) HMMKIT_RETURN_IF_ERROR(mon->EnsureWatched(start, end));
  {
    MutexLock lock(mu_);
    attributes_.Update(start, end, [&](SvmAttributes& a) {
      if (advice.preferred) a.preferred = *advice.preferred;
      if (advice.read_mostly) a.read_mostly = *advice.read_mostly;
      if (advice.accessed_by) a.accessed_by = *advice.accessed_by;
    });
    // Windows over the advice, so that its unmap is seen (and the advice forgotten).
    for (uintptr_t w = start & ~(uintptr_t(options_.window) - 1); w < end; w += options_.window)
      HMMKIT_RETURN_IF_ERROR(WindowForLocked(w).status());
    // A range lies inside one advice run: those that straddle an edge of the change go.
    for (auto& [s, r] : ranges_)
      if (r.start < end && r.end > start && (r.start < start || r.end > end)) MarkDeadLocked(r);
    idle_windows_possible_ = true;  // advice may have been unset
  }
  CollectGarbageLocked();
  if (advice.accessed_by.value_or(false)) {
    // The device maps what is present now, wherever it is.
    for (uintptr_t a = start; a < end;) {
      auto vma = VmaFor(a);
      if (!vma.ok()) return vma.status();
      SvmRange* r;
      {
        MutexLock lock(mu_);
        auto found = FindOrCreateLocked(a, *vma);
        if (!found.ok()) return found.status();
        r = *found;
      }
      HMMKIT_RETURN_IF_ERROR(GetPagesAndMap(*r, /*write=*/false, /*fault=*/false));
      a = r->end;
    }
  }
  return Status::Ok();
}

SvmAttributes SvmManager::AttributesAt(uintptr_t addr) const {
  MutexLock lock(mu_);
  return attributes_.At(addr);
}

Status SvmManager::PrefetchToDevice(uintptr_t start, uintptr_t end) {
  MutexLock op(op_mu_);
  const trace::CauseScope cause(trace::Cause::kPrefetch);
  CollectGarbageLocked();
  for (uintptr_t addr = start & ~(uintptr_t(page_) - 1); addr < end;) {
    auto vma = VmaFor(addr);
    if (!vma.ok()) return vma.status();
    const uintptr_t from = MigratableFrom(*vma);
    SvmRange* r;
    {
      MutexLock lock(mu_);
      auto found = FindOrCreateLocked(addr, ClipAt(*vma, addr, from));
      if (!found.ok()) return found.status();
      r = *found;
    }
    if (r->start >= from) {
      MigrateRange(*r);
      HMMKIT_RETURN_IF_ERROR(GetPagesAndMap(*r, vma->write));
    }
    addr = r->end;
  }
  return Status::Ok();
}

// ---- eviction, residency, garbage collection ---------------------------------------------------

Status SvmManager::EvictLocked(uintptr_t start, uintptr_t end) {
  auto vmas = as_->FindVmas(start, end);
  if (!vmas.ok()) return vmas.status();
  Status first = Status::Ok();
  for (const Vma& v : *vmas) {
    if (!v.migratable()) continue;  // device pages only ever live in private anonymous VMAs
    auto moved =
        MigrateToSystem(*as_, memory_, dma_, std::max(v.start, start), std::min(v.end, end));
    if (!moved.ok()) {
      if (first.ok()) first = moved.status();
      continue;
    }
    if (moved->migrated == 0) continue;
    MutexLock lock(mu_);
    stats_.migrations_to_system++;
    stats_.pages_to_system += moved->migrated;
  }
  return first;
}

Status SvmManager::Evict(uintptr_t start, uintptr_t end) {
  MutexLock op(op_mu_);
  return EvictLocked(start, end);
}

Result<Residency> SvmManager::Scan(uintptr_t start, uintptr_t end) {
  start &= ~(uintptr_t(page_) - 1);
  end = (end + page_ - 1) & ~(uintptr_t(page_) - 1);
  if (start >= end) return Status::FromErrno(EINVAL, "Scan: empty range");
  const size_t n = (end - start) / page_;
  std::vector<PageState> states(n);
  std::vector<DevicePageInfo> dev(n);
  HMMKIT_RETURN_IF_ERROR(as_->Snapshot(start, end, states));
  as_->LookupDevicePages(start, end, dev);
  bool sys = false, ours = false, other = false;
  for (size_t i = 0; i < n; ++i) {
    if (dev[i].kind != PageKind::kSystem || dev[i].exclusive) {
      (dev[i].owner == memory_.owner() ? ours : other) = true;
    } else if (states[i].present()) {
      sys = true;
    }
  }
  if (other || (sys && ours)) return Residency::kMixed;
  if (ours) {
    // Every page must be ours for kDevice; holes next to device pages make it mixed.
    for (size_t i = 0; i < n; ++i)
      if (dev[i].kind == PageKind::kSystem) return Residency::kMixed;
    return Residency::kDevice;
  }
  return sys ? Residency::kSystem : Residency::kUnpopulated;
}

size_t SvmManager::CollectGarbage() {
  MutexLock op(op_mu_);
  return CollectGarbageLocked();
}

size_t SvmManager::CollectGarbageLocked() {
  std::vector<std::pair<uintptr_t, uintptr_t>> dead;
  {
    MutexLock lock(mu_);
    if (dead_ranges_ > 0)  // every fault comes here: no walk of all ranges when none is dead
      for (auto& [s, r] : ranges_)
        if (r.unmapped) dead.emplace_back(r.start, r.end);
  }
  if (dead.empty()) {
    RemoveIdleWindows();
    return 0;
  }
  // What is still mapped of a dead range goes back to system memory: a range is never split, so
  // its surviving part is handled again, as a new range, on its next fault.
  {
    const trace::CauseScope cause(trace::Cause::kEvict);
    for (auto [s, e] : dead) EvictLocked(s, e).IgnoreError();
  }
  std::vector<std::unique_ptr<Window>> empty_windows;
  {
    MutexLock lock(mu_);
    for (auto [s, e] : dead) {
      auto it = ranges_.find(s);
      if (it == ranges_.end()) continue;
      ops_.UnmapPages(s, e);
      Window* w = it->second.window;
      if (it->second.unmapped) dead_ranges_--;
      ranges_.erase(it);
      stats_.ranges_removed++;
      stats_.garbage_collected++;
      if (--w->ranges == 0 && !attributes_.Advised(w->start, w->end)) {
        auto wit = windows_.find(w->start);
        empty_windows.push_back(std::move(wit->second));
        windows_.erase(wit);
      }
    }
  }
  // Outside mu_: Remove waits for a running Invalidate of that window, which takes mu_.
  for (auto& w : empty_windows) as_->notifiers().Remove(w->notifier);
  RemoveIdleWindows();
  return dead.size();
}

void SvmManager::RemoveIdleWindows() {
  std::vector<std::unique_ptr<Window>> idle;
  {
    MutexLock lock(mu_);
    if (!idle_windows_possible_) return;
    idle_windows_possible_ = false;
    for (auto it = windows_.begin(); it != windows_.end();) {
      if (it->second->ranges == 0 && !attributes_.Advised(it->second->start, it->second->end)) {
        idle.push_back(std::move(it->second));
        it = windows_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto& w : idle) as_->notifiers().Remove(w->notifier);
}

// ---- invalidation ------------------------------------------------------------------------------

void SvmManager::Invalidate(IntervalNotifier& sub, const NotifierRange& range, uint64_t cur_seq) {
  MutexLock lock(mu_);
  sub.SetSeq(cur_seq);
  stats_.invalidations++;
  const uintptr_t s = std::max(range.start, sub.start());
  const uintptr_t e = std::min(range.end, sub.end());
  if (s >= e) return;
  ops_.UnmapPages(s, e);
  if (range.event != InvalidateEvent::kUnmap && range.event != InvalidateEvent::kRelease) return;
  // The advice of unmapped memory is forgotten; its window may now be idle.
  if (attributes_.Advised(s, e)) {
    attributes_.Clear(s, e);
    idle_windows_possible_ = true;
  }
  // Ranges touched by an unmap are removed by CollectGarbage (never split here: this may be the
  // monitor's event thread, which must not migrate).
  auto it = ranges_.upper_bound(s);
  if (it != ranges_.begin()) --it;
  for (; it != ranges_.end() && it->second.start < e; ++it)
    if (it->second.end > s) MarkDeadLocked(it->second);
}

// ---- introspection -----------------------------------------------------------------------------

std::vector<std::pair<uintptr_t, uintptr_t>> SvmManager::Ranges() const {
  MutexLock lock(mu_);
  std::vector<std::pair<uintptr_t, uintptr_t>> out;
  for (const auto& [s, r] : ranges_) out.emplace_back(r.start, r.end);
  return out;
}

size_t SvmManager::window_count() const {
  MutexLock lock(mu_);
  return windows_.size();
}

SvmManager::Stats SvmManager::stats() const {
  MutexLock lock(mu_);
  return stats_;
}

}  // namespace hmmkit::driver
