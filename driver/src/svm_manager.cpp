// SvmManager: windows, ranges, the fault policy and the get-pages loop (svm_manager.hpp).
#include "hmmkit/driver/svm_manager.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <bit>

#include "hmmkit/base/log.hpp"
#include "hmmkit/driver/device_migration.hpp"
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
  return std::unique_ptr<SvmManager>(new SvmManager(std::move(as), memory, dma, ops, options));
}

SvmManager::SvmManager(std::shared_ptr<AddressSpace> as, DeviceMemory& memory, dma::DmaEngine& dma,
                       SvmDeviceOps& ops, const Options& options)
    : as_(std::move(as)),
      memory_(memory),
      dma_(dma),
      ops_(ops),
      options_(options),
      page_(size_t(::sysconf(_SC_PAGESIZE))) {}

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

Result<Vma> SvmManager::VmaFor(uintptr_t addr) const {
  if (addr >= options_.device_va_end)
    return Status::FromErrno(EFAULT, fmt::format("{:#x} is beyond the device's address range "
                                                 "({:#x})",
                                                 addr, options_.device_va_end));
  auto vma = as_->FindVma(addr);
  if (!vma.ok()) return vma.status();
  if (!*vma) return Status::FromErrno(EFAULT, fmt::format("{:#x} is not mapped", addr));
  return **vma;
}

// ---- ranges ------------------------------------------------------------------------------------

Result<SvmManager::SvmRange*> SvmManager::FindOrCreateLocked(uintptr_t addr, const Vma& vma) {
  auto next = ranges_.upper_bound(addr);
  if (next != ranges_.begin()) {
    auto prev = std::prev(next);
    if (prev->second.start <= addr && addr < prev->second.end) return &prev->second;
  }
  const uintptr_t ws = addr & ~(uintptr_t(options_.window) - 1), we = ws + options_.window;
  // Neighbouring ranges bound the new one: it never overlaps another.
  const uintptr_t lo = next == ranges_.begin() ? 0 : std::prev(next)->second.end;
  const uintptr_t hi = next == ranges_.end() ? UINTPTR_MAX : next->second.start;
  for (size_t chunk : options_.chunk_sizes) {
    const uintptr_t s = addr & ~(uintptr_t(chunk) - 1), e = s + chunk;
    if (s < vma.start || e > vma.end || s < ws || e > we || e > options_.device_va_end) continue;
    if (s < lo || e > hi) continue;
    auto wit = windows_.find(ws);
    if (wit == windows_.end()) {
      auto w = std::make_unique<Window>();
      w->start = ws;
      w->end = we;
      HMMKIT_RETURN_IF_ERROR(as_->notifiers().Insert(w->notifier, ws, options_.window, *this));
      wit = windows_.emplace(ws, std::move(w)).first;
      stats_.windows_created++;
    }
    SvmRange& r = ranges_[s];
    r.start = s;
    r.end = e;
    r.window = wit->second.get();
    r.window->ranges++;
    stats_.ranges_created++;
    return &r;
  }
  // The page-sized chunk always fits unless the page is outside the VMA or the device VA.
  return Status::FromErrno(EFAULT, fmt::format("no range fits around {:#x}", addr));
}

// ---- fault path --------------------------------------------------------------------------------

bool SvmManager::MaybeMigrate(SvmRange& r, const Vma& vma, bool forced) {
  const auto now = std::chrono::steady_clock::now();
  {
    MutexLock lock(mu_);
    if (!vma.migratable() || !vma.accessible()) return false;  // shared, file, hugetlb: remote
    // The brk heap and the main stack hold hmmkit's own allocations and frames too: a thread that
    // touches a page of its own migration waits on itself. Mapped remotely (see docs/svm.md).
    if (vma.name == "[heap]" || vma.name == "[stack]") return false;
    if (!forced) {
      if (!options_.migrate_on_fault || now < r.pinned_until) return false;
      std::erase_if(r.migrations, [&](auto t) { return now - t > options_.thrash_window; });
      if (r.migrations.size() >= options_.thrash_migrations) {
        // The pages keep going back and forth: leave them in system memory for a while.
        r.pinned_until = now + options_.thrash_pin;
        r.migrations.clear();
        stats_.thrashing_events++;
        Log().debug("svm: range {:#x}-{:#x} thrashes; mapped remotely for {} ms", r.start, r.end,
                    options_.thrash_pin.count());
        return false;
      }
    }
  }
  auto moved = MigrateToDevice(*as_, memory_, dma_, r.start, r.end);
  MutexLock lock(mu_);
  if (!moved.ok()) {
    // Device memory full even after eviction, or a page could not be copied: what did not move is
    // mapped remotely below.
    Log().debug("svm: migrating {:#x}-{:#x} to the device: {}", r.start, r.end,
                moved.status().ToString());
    return false;
  }
  if (moved->migrated == 0) return false;
  r.migrations.push_back(now);
  stats_.migrations_to_device++;
  stats_.pages_to_device += moved->migrated;
  return true;
}

Status SvmManager::GetPagesAndMap(SvmRange& r, bool write) {
  std::vector<uint64_t> pfns((r.end - r.start) / page_);
  Range range;
  range.notifier = &r.window->notifier;
  range.start = r.start;
  range.end = r.end;
  range.hmm_pfns = pfns;
  range.default_flags = hmm_pfn::kReqFault | (write ? hmm_pfn::kReqWrite : 0);
  range.dev_private_owner = memory_.owner();
  RetryOptions retry;
  retry.timeout = options_.get_pages_timeout;
  return RetryLoop(
      *as_, range, mu_,
      [&](const Range& valid) NO_THREAD_SAFETY_ANALYSIS {
        // mu_ is held (RetryLoop took it) and ReadRetry said the entries are still valid.
        return ops_.MapPages(valid.start, valid.hmm_pfns);
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
  auto vma = VmaFor(addr);
  if (!vma.ok()) return vma.status();
  if (write && !vma->write)
    return Status::FromErrno(EPERM, fmt::format("device write to read-only {:#x}", addr));
  if (!vma->read && !vma->write)
    return Status::FromErrno(EPERM, fmt::format("device access to PROT_NONE {:#x}", addr));
  SvmRange* r;
  {
    MutexLock lock(mu_);
    auto found = FindOrCreateLocked(addr & ~(uintptr_t(page_) - 1), *vma);
    if (!found.ok()) return found.status();
    r = *found;
  }
  // The range may cross into a later VMA only if it was made for an earlier mapping that was
  // replaced; the VMA at addr decides the policy either way.
  if (!MaybeMigrate(*r, *vma, /*forced=*/false)) {
    MutexLock lock(mu_);
    stats_.remote_maps++;
  }
  Status st = GetPagesAndMap(*r, write);
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
  return st;
}

Status SvmManager::PrefetchToDevice(uintptr_t start, uintptr_t end) {
  MutexLock op(op_mu_);
  CollectGarbageLocked();
  for (uintptr_t addr = start & ~(uintptr_t(page_) - 1); addr < end;) {
    auto vma = VmaFor(addr);
    if (!vma.ok()) return vma.status();
    SvmRange* r;
    {
      MutexLock lock(mu_);
      auto found = FindOrCreateLocked(addr, *vma);
      if (!found.ok()) return found.status();
      r = *found;
    }
    if (vma->migratable() && vma->accessible()) {
      MaybeMigrate(*r, *vma, /*forced=*/true);
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
    for (auto& [s, r] : ranges_)
      if (r.unmapped) dead.emplace_back(r.start, r.end);
  }
  if (dead.empty()) return 0;
  // What is still mapped of a dead range goes back to system memory: a range is never split, so
  // its surviving part is handled again, as a new range, on its next fault.
  for (auto [s, e] : dead) EvictLocked(s, e).IgnoreError();
  std::vector<std::unique_ptr<Window>> empty_windows;
  {
    MutexLock lock(mu_);
    for (auto [s, e] : dead) {
      auto it = ranges_.find(s);
      if (it == ranges_.end()) continue;
      ops_.UnmapPages(s, e);
      Window* w = it->second.window;
      ranges_.erase(it);
      stats_.ranges_removed++;
      stats_.garbage_collected++;
      if (--w->ranges == 0) {
        auto wit = windows_.find(w->start);
        empty_windows.push_back(std::move(wit->second));
        windows_.erase(wit);
      }
    }
  }
  // Outside mu_: Remove waits for a running Invalidate of that window, which takes mu_.
  for (auto& w : empty_windows) as_->notifiers().Remove(w->notifier);
  return dead.size();
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
  // Ranges touched by an unmap are removed by CollectGarbage (never split here: this may be the
  // monitor's event thread, which must not migrate).
  auto it = ranges_.upper_bound(s);
  if (it != ranges_.begin()) --it;
  for (; it != ranges_.end() && it->second.start < e; ++it)
    if (it->second.end > s) it->second.unmapped = true;
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
