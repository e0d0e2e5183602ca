// DeviceMmu: the page table and the per-unit TLBs behind one writer-preferring rwlock.
//
// Why a reader/writer lock and not sequence numbers: the contract is about accesses in flight, not
// only about translations. A compute unit may have translated before the change and still be
// writing through the old translation; only "the change waits until the guard is gone" rules that
// out, and the guard is exactly the shared side of the lock. Translations themselves need no
// further check: the TLB a unit reads under its guard was shot down by the last change, which
// finished before the guard was taken.
//
// Misuse checks (always on; each is one relaxed atomic or thread-local access):
//   ComputeUnit::busy   one guard per compute unit at a time (the TLB is single-threaded);
//   t_guard_held        one guard per thread, and no mapping change from a thread that holds one
//                       (the shared side is not recursive with writer preference).
#include "hmmkit/emu/mmu.hpp"

#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace hmmkit::emu {

struct DeviceMmu::ComputeUnit {
  explicit ComputeUnit(size_t tlb_entries) : tlb(tlb_entries) {}
  // Own cache line: the unit's thread writes here on every translation.
  alignas(64) Tlb tlb;
  uint64_t translations = 0;
  uint64_t not_mapped = 0;
  uint64_t permission_denied = 0;
  std::atomic<bool> busy{false};
};

namespace {

thread_local bool t_guard_held = false;

[[noreturn]] void Die(const char* what, unsigned cu) {
  std::fprintf(stderr, "hmmkit: DeviceMmu misuse: %s (compute unit %u)\n", what, cu);
  std::abort();
}

std::string AddrText(const char* what, uint64_t va, Access access) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "device %s at 0x%" PRIx64 ": %s", ToString(access), va, what);
  return buf;
}

Status CheckInvalidateRange(uint64_t start, uint64_t end) {
  if (start >= end || ((start | end) & (kPageSize - 1)) != 0 || end > kVaLimit) {
    return Status::FromErrno(EINVAL, "MMU invalidation range empty, unaligned or beyond 2^48");
  }
  return Status::Ok();
}

}  // namespace

// ---- AccessGuard ----------------------------------------------------------------------------

DeviceMmu::AccessGuard::AccessGuard(DeviceMmu& mmu, unsigned cu) : mmu_(&mmu), cu_(cu) {}

// The lock was taken in BeginAccess; the analysis cannot follow a lock across a returned object.
DeviceMmu::AccessGuard::~AccessGuard() NO_THREAD_SAFETY_ANALYSIS {
  if (mmu_ == nullptr) return;  // moved from: the lock went with the move
  mmu_->mu_.unlock_shared();
  mmu_->cus_[cu_]->busy.store(false, std::memory_order_release);
  t_guard_held = false;
}

Result<Translation> DeviceMmu::AccessGuard::Translate(uint64_t va, Access access) {
  mmu_->mu_.AssertReaderHeld();  // held since BeginAccess
  return mmu_->TranslateLocked(*mmu_->cus_[cu_], va, access);
}

void DeviceMmu::AccessGuard::Yield() NO_THREAD_SAFETY_ANALYSIS {
  mmu_->mu_.unlock_shared();
  mmu_->mu_.lock_shared();  // blocks while a writer waits: it goes first
}

// ---- DeviceMmu ------------------------------------------------------------------------------

DeviceMmu::DeviceMmu(const Options& options) {
  const unsigned n = options.compute_units == 0 ? 1 : options.compute_units;
  cus_.reserve(n);
  for (unsigned i = 0; i < n; ++i) {
    cus_.push_back(std::make_unique<ComputeUnit>(options.tlb_entries));
  }
}

DeviceMmu::~DeviceMmu() = default;

DeviceMmu::AccessGuard DeviceMmu::BeginAccess(unsigned cu) NO_THREAD_SAFETY_ANALYSIS {
  if (cu >= cus_.size()) Die("compute unit index out of range", cu);
  if (t_guard_held) Die("this thread already holds an AccessGuard", cu);
  if (cus_[cu]->busy.exchange(true, std::memory_order_acquire)) {
    Die("compute unit already in use by another guard", cu);
  }
  t_guard_held = true;
  mu_.lock_shared();
  return AccessGuard(*this, cu);
}

void DeviceMmu::CheckNoGuardHeld(const char* op) const {
  if (t_guard_held) {
    std::fprintf(stderr, "hmmkit: DeviceMmu::%s called while holding an AccessGuard\n", op);
    std::abort();
  }
}

Result<Translation> DeviceMmu::TranslateLocked(ComputeUnit& cu, uint64_t va, Access access) {
  ++cu.translations;
  std::optional<Translation> t = cu.tlb.Lookup(va);
  if (!t) {
    t = table_.Lookup(va);
    if (!t) {
      ++cu.not_mapped;
      return Status::FromErrno(EFAULT, AddrText("not mapped", va, access));
    }
    cu.tlb.Insert(*t);
  }
  if (!HasPerms(t->pte.perms, RequiredPerms(access))) {
    ++cu.permission_denied;
    return Status::FromErrno(EPERM, AddrText("permission missing", va, access));
  }
  return *t;
}

void DeviceMmu::ShootdownLocked(uint64_t start, uint64_t end) {
  for (auto& cu : cus_) cu->tlb.InvalidateRange(start, end);
  ++shootdowns_;
  generation_.fetch_add(1, std::memory_order_release);
}

Status DeviceMmu::Map(uint64_t va, uint64_t size, const Pte& first) {
  CheckNoGuardHeld("Map");
  WriterLock lock(mu_);
  HMMKIT_RETURN_IF_ERROR(table_.Map(va, size, first));
  ShootdownLocked(va, va + size);
  return Status::Ok();
}

Status DeviceMmu::Unmap(uint64_t va, uint64_t size) {
  CheckNoGuardHeld("Unmap");
  WriterLock lock(mu_);
  HMMKIT_RETURN_IF_ERROR(table_.Unmap(va, size));
  ShootdownLocked(va, va + size);
  return Status::Ok();
}

Status DeviceMmu::Protect(uint64_t va, uint64_t size, Perm keep_mask) {
  CheckNoGuardHeld("Protect");
  WriterLock lock(mu_);
  HMMKIT_RETURN_IF_ERROR(table_.Protect(va, size, keep_mask));
  ShootdownLocked(va, va + size);
  return Status::Ok();
}

Status DeviceMmu::Update(uint64_t start, uint64_t end,
                         const std::function<Status(DevicePageTable&)>& fn) {
  CheckNoGuardHeld("Update");
  HMMKIT_RETURN_IF_ERROR(CheckInvalidateRange(start, end));
  WriterLock lock(mu_);
  Status st = fn(table_);
  ShootdownLocked(start, end);
  return st;
}

Status DeviceMmu::Invalidate(uint64_t start, uint64_t end) {
  CheckNoGuardHeld("Invalidate");
  HMMKIT_RETURN_IF_ERROR(CheckInvalidateRange(start, end));
  WriterLock lock(mu_);
  ShootdownLocked(start, end);
  return Status::Ok();
}

void DeviceMmu::InvalidateAll() {
  CheckNoGuardHeld("InvalidateAll");
  WriterLock lock(mu_);
  for (auto& cu : cus_) cu->tlb.InvalidateAll();
  ++shootdowns_;
  generation_.fetch_add(1, std::memory_order_release);
}

std::optional<Translation> DeviceMmu::Lookup(uint64_t va) const {
  CheckNoGuardHeld("Lookup");
  ReaderLock lock(mu_);
  return table_.Lookup(va);
}

void DeviceMmu::ForEach(uint64_t start, uint64_t end, const DevicePageTable::LeafFn& fn) const {
  CheckNoGuardHeld("ForEach");
  ReaderLock lock(mu_);
  table_.ForEach(start, end, fn);
}

DeviceMmu::Stats DeviceMmu::stats() const {
  CheckNoGuardHeld("stats");
  WriterLock lock(mu_);
  Stats s;
  for (const auto& cu : cus_) {
    const Tlb::Stats& t = cu->tlb.stats();
    s.translations += cu->translations;
    s.tlb_hits += t.hits;
    s.tlb_misses += t.misses;
    s.walks += t.misses;
    s.not_mapped += cu->not_mapped;
    s.permission_denied += cu->permission_denied;
    s.tlb_entries_invalidated += t.entries_invalidated;
  }
  s.changes = generation_.load(std::memory_order_relaxed);
  s.shootdowns = shootdowns_;
  s.table = table_.stats();
  return s;
}

}  // namespace hmmkit::emu
