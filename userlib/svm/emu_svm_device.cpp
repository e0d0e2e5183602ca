// The emulated SVM device behind hmmkit::svm::Device ("emu"): compute-unit threads whose every
// access goes through the device MMU, a fault queue serviced in batches by the SvmManager, device
// memory with eviction, and the CPU DMA engine.
//
// Threads and locks:
//   compute units  one thread per unit during a Launch. A unit takes its MMU AccessGuard at its
//                  first access of a grain (a run of indices) and keeps it, with a micro-TLB of the
//                  pages it used under it, until the grain ends: a hit costs no lock and no walk.
//                  It releases the guard before it raises a fault and waits, yields it (dropping
//                  the micro-TLB) at any access that finds a mapping change waiting, and releases
//                  it when the kernel calls back into the Device (stats() & co. may wait for a
//                  change). So a unit waits only inside k's accesses, and a change waits at most
//                  until every unit's next access or the end of its grain.
//                  The rule for kernels this brings: between accesses, kernel code must not block
//                  on anything that could wait for a device mapping change (a CPU thread touching
//                  memory on the device, a lock such a thread holds, another work item's progress
//                  made outside k). Waiting through k (spinning on k.AtomicAdd) is fine.
//   fault service  one thread: pops fault batches and calls SvmManager::HandleFault (which takes
//                  its locks, migrates, then maps through MapPages -> DeviceMmu::Update).
//   invalidations  SvmManager::Invalidate -> UnmapPages -> DeviceMmu::Unmap, on whatever thread
//                  raised them; Unmap waits for the compute units' guards, which never wait on it.
//   access counters compute units count remote (system-memory) accesses per 64 KiB region under
//                  counter_mu_; a region that reaches the threshold is queued for the counter
//                  thread, which calls SvmManager::HandleAccessCounter (it may migrate the range).
// Order: launch_mu_ -> SvmManager locks -> MMU lock; MMU guard -> counter_mu_ (a leaf).
//
// Atomics: on device memory, in place; on system memory, at the CPU address while the guard keeps
// the translation alive (a coherent interconnect's view). A program that unmaps memory while a
// kernel runs atomics on it gets what the CPU would: a fault (SIGSEGV), not a device error.
#include <fmt/format.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <deque>
#include <optional>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <vector>

#include "hmmkit/base/internal_memory.hpp"
#include "hmmkit/base/log.hpp"
#include "hmmkit/base/mutex.hpp"
#include "hmmkit/base/sanitizer.hpp"
#include "hmmkit/base/trace.hpp"
#include "hmmkit/dma/cpu_engine.hpp"
#include "hmmkit/driver/device_memory.hpp"
#include "hmmkit/driver/svm_manager.hpp"
#include "hmmkit/drm/discovery.hpp"
#include "hmmkit/drm/gem_arena.hpp"
#include "hmmkit/emu/fault_queue.hpp"
#include "hmmkit/emu/mmu.hpp"
#include "hmmkit/mirror/migrate.hpp"
#include "hmmkit/mirror/mm_monitor.hpp"
#include "hmmkit/mirror/range_fault.hpp"
#include "hmmkit/svm.hpp"
#include "stats_publisher.hpp"

namespace hmmkit::svm {

namespace {

constexpr uint64_t kPage = emu::kPageSize;

// One AddressSpace per process, shared by its devices (two userfaultfds cannot both register a
// range).
Result<std::shared_ptr<AddressSpace>> ProcessAddressSpace() {
  static Mutex mu;
  static std::weak_ptr<AddressSpace> shared GUARDED_BY(mu);
  MutexLock lock(mu);
  if (auto as = shared.lock()) return as;
  auto as = AddressSpace::Create();
  if (!as.ok()) return as.status();
  if (!(*as)->monitor())
    return Status::FromErrno(ENOTSUP,
                             "the emulated SVM device needs userfaultfd (see `hmmctl info`)");
  shared = *as;
  return *as;
}

emu::Pte PteOf(uint64_t entry, uint64_t va) {
  emu::Pte p;
  const bool w = (entry & hmm_pfn::kWrite) != 0;
  if (hmm_pfn::Kind(entry) == PageKind::kDevicePrivate) {
    p.target_kind = emu::Target::kLocal;
    p.target = hmm_pfn::Payload(entry);
  } else {
    p.target_kind = emu::Target::kSystem;  // reached at its CPU address (remote map)
    p.target = va;
  }
  p.perms = emu::Perm::kRead | (w ? emu::Perm::kWrite | emu::Perm::kAtomic : emu::Perm::kNone);
  return p;
}

template <class U>
U AtomicOn(void* where, KernelContext::AtomicOp op, U a, U b) {
  U* p = static_cast<U*>(where);
  switch (op) {
    case KernelContext::AtomicOp::kAdd:
      return __atomic_fetch_add(p, a, __ATOMIC_SEQ_CST);
    case KernelContext::AtomicOp::kExchange:
      return __atomic_exchange_n(p, a, __ATOMIC_SEQ_CST);
    case KernelContext::AtomicOp::kCompareExchange:
      __atomic_compare_exchange_n(p, &a, b, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
      return a;  // the old value, whether or not it matched
  }
  return 0;
}

uint64_t AtomicOn(void* where, size_t size, KernelContext::AtomicOp op, uint64_t a, uint64_t b) {
  return size == 4 ? AtomicOn<uint32_t>(where, op, uint32_t(a), uint32_t(b))
                   : AtomicOn<uint64_t>(where, op, a, b);
}

constexpr uintptr_t kCounterRegion = uintptr_t(64) << 10;

class EmuSvmDevice;
class EmuKernelContext;

// The context of the compute unit running on this thread, if any: Device calls made from a kernel
// release its guard first (they may wait for a mapping change, which waits for the guard).
thread_local EmuKernelContext* t_unit = nullptr;

// A compute unit's view during a launch. It keeps its MMU guard from its first access until the
// end of the grain (or a fault, or a yield), and a micro-TLB of the 4 KiB pages it used under that
// guard: a hit is a tag compare and a pointer add. Every line is dropped whenever the guard is
// released or yielded, so no translation outlives the guard that produced it (mmu.hpp).
class EmuKernelContext final : public KernelContext {
 public:
  EmuKernelContext(EmuSvmDevice& dev, unsigned cu) : KernelContext(cu), dev_(dev) { Drop(); }

  // The fast path: a local (device-memory) page with the permission, cached under the guard held
  // now, and no mapping change waiting. Everything else (misaligned included: its key has low
  // bits, which no tag has) takes AccessSlow.
  void Access(uintptr_t va, size_t size, uint64_t* value, bool write) override {
    const uintptr_t key = va & (~(kPage - 1) | (size - 1));
    const uintptr_t* tags = fast_[write ? 1 : 0];
    static_assert(kLines == 4);
    const int i = tags[0] == key   ? 0
                  : tags[1] == key ? 1
                  : tags[2] == key ? 2
                  : tags[3] == key ? 3
                                   : -1;
    if (i < 0 || guard_->ShouldYield()) return AccessSlow(va, size, value, write);
    char* p = lines_[i].host + (va - key);
    if (size == 4) {
      write ? std::memcpy(p, value, 4) : std::memcpy(value, p, 4);
      return;
    }
    Copy(p, size, value, write);
  }
  uint64_t Atomic(uintptr_t va, size_t size, AtomicOp op, uint64_t a, uint64_t b) override;

  // Drops the micro-TLB and the guard. The unit's own thread calls it at the end of every grain
  // and before it exits (a guard is released by the thread that took it).
  void Release() {
    Drop();
    guard_.reset();
  }
  bool failed() const { return failed_; }
  const Status& error() const { return error_; }
  static void ReleaseCallersGuard() {
    if (t_unit != nullptr) t_unit->Release();
  }

 private:
  struct Line {
    uintptr_t page;
    char* host;     // the page's bytes: in the device-memory arena, or its CPU address
    uint8_t perms;  // emu::Perm bits of the leaf
    bool remote;    // system memory: checked copies, access counters
  };
  // Matches no key: keys have page bits (>= 12) and misalignment bits (< 3) only.
  static constexpr uintptr_t kNoPage = 0x800;
  static constexpr unsigned kLines = 4;  // vector_add streams 3 arrays

  static void Copy(char* p, size_t size, uint64_t* value, bool write) {
    // Constant sizes: inline moves instead of a memcpy call.
    switch (size) {
      case 1:
        write ? std::memcpy(p, value, 1) : std::memcpy(value, p, 1);
        break;
      case 2:
        write ? std::memcpy(p, value, 2) : std::memcpy(value, p, 2);
        break;
      case 4:
        write ? std::memcpy(p, value, 4) : std::memcpy(value, p, 4);
        break;
      default:
        write ? std::memcpy(p, value, 8) : std::memcpy(value, p, 8);
        break;
    }
  }
  void Drop() {
    for (unsigned i = 0; i < kLines; ++i) {
      lines_[i].page = kNoPage;
      fast_[0][i] = fast_[1][i] = kNoPage;
    }
  }
  // Before every slow access (the fast path checks on its own): a waiting mapping change must
  // not wait for the end of our grain.
  void MaybeYield() {
    if (guard_ && guard_->ShouldYield()) {
      Drop();
      guard_->Yield();
    }
  }
  int Find(uintptr_t va, emu::Access access) const {
    const uintptr_t page = va & ~(kPage - 1);
    const uint8_t need = uint8_t(emu::RequiredPerms(access));
    for (unsigned i = 0; i < kLines; ++i)
      if (lines_[i].page == page && (lines_[i].perms & need) == need) return int(i);
    return -1;
  }
  [[gnu::noinline]] void AccessSlow(uintptr_t va, size_t size, uint64_t* value, bool write);
  int Fill(uintptr_t va, emu::Access access);
  void Fail(Status st) {
    Drop();  // the fast path must not run after a failure
    error_ = std::move(st);
    failed_ = true;
  }

  EmuSvmDevice& dev_;
  std::optional<emu::DeviceMmu::AccessGuard> guard_;
  std::array<Line, kLines> lines_;
  // Per access (read, write): each line's page when the fast path may serve it, else kNoPage.
  uintptr_t fast_[2][kLines];
  unsigned next_line_ = 0;  // round-robin replacement
  bool failed_ = false;
  Status error_ = Status::Ok();
};

class EmuSvmDevice final : public Device, public driver::SvmDeviceOps {
 public:
  friend class EmuKernelContext;

  static std::pair<uintptr_t, uintptr_t> Pages(const void* p, size_t len) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    return {a & ~(kPage - 1), (a + len + kPage - 1) & ~(kPage - 1)};
  }
  // Pages() of a non-empty range that neither wraps past 2^64 nor rounds up past it: EINVAL
  // otherwise (a wrapped range had end < start and was a silent no-op).
  static Result<std::pair<uintptr_t, uintptr_t>> CheckedPages(const void* p, size_t len,
                                                              const char* what) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (len == 0) return Status::FromErrno(EINVAL, fmt::format("{}: empty range", what));
    if (a > UINTPTR_MAX - (kPage - 1) || len > UINTPTR_MAX - (kPage - 1) - a)
      return Status::FromErrno(EINVAL, fmt::format("{}: {:#x} + {} overflows", what, a, len));
    return Pages(p, len);
  }
  // EFAULT naming the first address of [s, e) that no VMA covers.
  Status CheckMapped(uintptr_t s, uintptr_t e, const char* what) {
    auto vmas = as_->FindVmas(s, e);
    if (!vmas.ok()) return vmas.status();
    uintptr_t covered = s;
    for (const Vma& v : *vmas)
      if (v.start <= covered) covered = std::max(covered, v.end);
    if (covered < e)
      return Status::FromErrno(EFAULT, fmt::format("{}: {:#x} is not mapped", what, covered));
    return Status::Ok();
  }

  static Result<std::unique_ptr<Device>> Create(const DeviceOptions& o) {
    if (o.compute_units == 0 || o.compute_units > 256)
      return Status::FromErrno(EINVAL, "compute_units must be 1..256");
    if (!(o.prefetch_threshold >= 0 && o.prefetch_threshold <= 1))
      return Status::FromErrno(EINVAL, "prefetch_threshold must be in [0, 1]");
    auto as = ProcessAddressSpace();
    if (!as.ok()) return as.status();
    auto dev = std::unique_ptr<EmuSvmDevice>(new EmuSvmDevice(*as, o));
    HMMKIT_RETURN_IF_ERROR(dev->Init(o));
    return std::unique_ptr<Device>(std::move(dev));
  }

  ~EmuSvmDevice() override {
    detail::StatsPublisher::Get().Remove(stats_handle_);  // first: stats() still works
    faults_.Shutdown();
    if (service_.joinable()) service_.join();
    {
      MutexLock lock(counter_mu_);
      counter_stop_ = true;
    }
    counter_cv_.NotifyAll();
    if (counter_thread_.joinable()) counter_thread_.join();
    if (svm_) {
      // Everything on the device goes home before the memory goes away.
      for (auto [s, e] : svm_->Ranges()) svm_->Evict(s, e).IgnoreError();
      svm_.reset();
    }
    if (memory_) MigrateAllToRam(*as_, *memory_).IgnoreError();
    trace::ForgetTrackKey(this);
  }

  Status Launch(size_t n, const Kernel& kernel) override {
    MutexLock lock(launch_mu_);
    const unsigned units = unsigned(std::min<size_t>(mmu_.compute_units(), std::max<size_t>(n, 1)));
    std::vector<std::unique_ptr<EmuKernelContext>> ctx;
    for (unsigned cu = 0; cu < units; ++cu)
      ctx.push_back(std::make_unique<EmuKernelContext>(*this, cu));
    std::atomic<size_t> next{0};
    // Indices a unit takes at a time: each grain re-takes the guard and refills the micro-TLB, so
    // large launches use large grains (still 16 or more per unit, for balance).
    // (units >= 1: Create checks compute_units; spelled out for the static analyzer.)
    const size_t per_round = std::max<size_t>(size_t(units) * 16, 1);
    const size_t grain = std::clamp<size_t>(n / per_round, 256, 16384);
    std::vector<std::thread> threads;
    auto start_unit = [&](unsigned cu) {
      threads.emplace_back([&, cu] {
        // A migration never takes a compute unit's stack.
        InternalThreadScope internal("hmmkit-cu");
        EmuKernelContext& k = *ctx[cu];
        t_unit = &k;
        for (;;) {
          const size_t first = next.fetch_add(grain);
          if (first >= n) break;
          const size_t last = std::min(n, first + grain);
          for (size_t i = first; i < last && !k.failed(); ++i) kernel(k, i);
          k.Release();  // bounded hold: a grain at most
          if (k.failed()) break;
        }
        k.Release();
        t_unit = nullptr;
      });
    };
    // A thread that cannot start (EAGAIN at the process's thread or map limit) fails the launch:
    // the units already running are told to stop and joined, never left joinable (terminate).
    Status started = Status::Ok();
    for (unsigned cu = 0; cu < units && started.ok(); ++cu) {
      try {
        start_unit(cu);
      } catch (const std::system_error& ex) {
        next.store(n);
        started = Status::FromErrno(
            ex.code().value() ? ex.code().value() : EAGAIN,
            fmt::format("Launch: compute unit {} did not start: {}", cu, ex.what()));
      }
    }
    for (auto& t : threads) t.join();
    HMMKIT_RETURN_IF_ERROR(started);
    for (auto& k : ctx)
      if (!k->error().ok()) return k->error();
    return Status::Ok();
  }

  Status Prefetch(const void* p, size_t len, Location to) override {
    EmuKernelContext::ReleaseCallersGuard();
    if (len == 0) return Status::Ok();
    auto pages = CheckedPages(p, len, "Prefetch");
    if (!pages.ok()) return pages.status();
    auto [s, e] = *pages;
    HMMKIT_RETURN_IF_ERROR(CheckMapped(s, e, "Prefetch"));
    const trace::CauseScope cause(trace::Cause::kPrefetch);
    return to == Location::kDevice ? svm_->PrefetchToDevice(s, e) : svm_->Evict(s, e);
  }

  Status Advise(const void* p, size_t len, Advice advice, Location where) override {
    EmuKernelContext::ReleaseCallersGuard();
    auto pages = CheckedPages(p, len, "Advise");
    if (!pages.ok()) return pages.status();
    driver::SvmAdvice a;
    switch (advice) {
      case Advice::kSetPreferredLocation:
        a.preferred = where == Location::kDevice ? driver::PreferredLocation::kDevice
                                                 : driver::PreferredLocation::kSystem;
        break;
      case Advice::kUnsetPreferredLocation:
        a.preferred = driver::PreferredLocation::kNone;
        break;
      case Advice::kSetReadMostly:
      case Advice::kUnsetReadMostly:
        a.read_mostly = advice == Advice::kSetReadMostly;
        break;
      case Advice::kSetAccessedBy:
      case Advice::kUnsetAccessedBy:
        a.accessed_by = advice == Advice::kSetAccessedBy;
        break;
      default:
        return Status::FromErrno(EINVAL, fmt::format("Advise: unknown advice {}", int(advice)));
    }
    return svm_->Advise(pages->first, pages->second, a);
  }

  Result<Residency> QueryResidency(const void* p, size_t len) override {
    EmuKernelContext::ReleaseCallersGuard();
    auto pages = CheckedPages(p, len, "QueryResidency");
    if (!pages.ok()) return pages.status();
    auto [s, e] = *pages;
    HMMKIT_RETURN_IF_ERROR(CheckMapped(s, e, "QueryResidency"));
    auto r = svm_->Scan(s, e);
    if (!r.ok()) return r.status();
    switch (*r) {
      case driver::Residency::kUnpopulated:
        return Residency::kUnpopulated;
      case driver::Residency::kSystem:
        return Residency::kSystem;
      case driver::Residency::kDevice:
        return Residency::kDevice;
      case driver::Residency::kMixed:
        return Residency::kMixed;
    }
    return Residency::kMixed;
  }

  DeviceStats stats() const override {
    EmuKernelContext::ReleaseCallersGuard();  // SvmManager::stats takes the lock MapPages holds
    DeviceStats d;
    const auto s = svm_->stats();
    const auto q = faults_.stats();
    d.device_faults = q.raised;
    d.fault_batches = q.batches;
    d.bytes_to_device = s.pages_to_device * kPage;
    // Prefetches and evictions to system memory (DMA), plus pages a CPU touch or an eviction
    // copied back.
    d.bytes_to_system = (s.pages_to_system + memory_->stats().pages_copied_to_ram) * kPage;
    d.remote_maps = s.remote_maps;
    d.thrashing_events = s.thrashing_events;
    d.evictions = memory_->stats().evictions;
    d.cpu_faults = as_->monitor()->stats().faults - cpu_faults_base_;
    d.pages_prefetched = s.pages_prefetched;
    d.counter_promotions = s.promotions;
    d.atomics = atomics_.load(std::memory_order_relaxed);
    return d;
  }
  const std::string& name() const override { return name_; }

  // ---- SvmDeviceOps: called by the SvmManager with its lock held -------------------------------
  Status MapPages(uintptr_t start, std::span<const uint64_t> pfns) override {
    return mmu_.Update(start, start + pfns.size() * kPage, [&](emu::DevicePageTable& pt) {
      for (size_t i = 0; i < pfns.size(); ++i)
        HMMKIT_RETURN_IF_ERROR(pt.Map(start + i * kPage, kPage, PteOf(pfns[i], start + i * kPage)));
      return Status::Ok();
    });
  }
  void UnmapPages(uintptr_t start, uintptr_t end) override {
    Status st = mmu_.Unmap(start, end - start);
    if (!st.ok()) Log().error("{}: device unmap {:#x}-{:#x}: {}", name_, start, end, st.ToString());
  }

 private:
  EmuSvmDevice(std::shared_ptr<AddressSpace> as, const DeviceOptions& o)
      : as_(std::move(as)),
        mmu_(emu::DeviceMmu::Options{o.compute_units, 64}),
        name_(fmt::format("emu-svm{}", next_index_++)) {}

  Status Init(const DeviceOptions& o) {
    auto engine = dma::CpuDmaEngine::Create({});
    if (!engine.ok()) return engine.status();
    dma_ = std::move(*engine);
    driver::DeviceMemory::Options mo;
    mo.capacity = o.memory_bytes;
    mo.owner = this;
    mo.name = name_;
    AddressSpace* space = as_.get();
    // Exhaustion evicts the coldest chunk back to system memory, by device page.
    mo.evict = [space](driver::DeviceMemory& mem, std::span<const uint64_t> ids) {
      return MigrateDevicePages(*space, mem, ids);
    };
    HMMKIT_RETURN_IF_ERROR(ChooseMemory(o, mo));
    auto mem = driver::DeviceMemory::Create(mo);
    if (!mem.ok()) return mem.status();
    memory_ = std::move(*mem);
    driver::SvmManager::Options so;
    so.migrate_on_fault = o.migrate_on_fault;
    so.prefetch_threshold = o.prefetch_threshold;
    if (kUnderSanitizer) {
      // The sanitizer runtimes keep their state in anonymous mappings that the kernel merges with
      // the application's: a 2 MiB range or prefetch region around a buffer would migrate the
      // runtime's own memory, which every instrumented access then faults on. Page-sized ranges
      // take only pages the application touched or named.
      so.chunk_sizes = {kPage};
      so.prefetch_threshold = 0;
      Log().info("{}: sanitizer build: page-sized SVM ranges, threshold prefetcher off", name_);
    }
    counter_threshold_ = o.access_counter_threshold;
    auto svm = driver::SvmManager::Create(as_, *memory_, *dma_, *this, so);
    if (!svm.ok()) return svm.status();
    svm_ = std::move(*svm);
    cpu_faults_base_ = as_->monitor()->stats().faults;
    // This device's trace track: its pgmap owner (this) names it for the migration code too.
    track_ = trace::TrackFor(this, trace::TrackKind::kDevice, name_);
    service_ = std::thread([this] {
      InternalThreadScope internal("hmmkit-devfault");
      faults_.ServiceLoop([this](auto batch) { return Service(batch); });
    });
    if (counter_threshold_ > 0)
      counter_thread_ = std::thread([this] {
        InternalThreadScope internal("hmmkit-counters");
        CounterLoop();
      });
    Log().info("{}: emulated SVM device, {} compute units, {} MiB device memory, {} on fault",
               name_, o.compute_units, o.memory_bytes >> 20,
               o.migrate_on_fault ? "migrate" : "map remotely");
    AddressSpace* space_for_stats = as_.get();
    stats_handle_ = detail::StatsPublisher::Get().Add(
        detail::PublishedDevice{name_, "emulated", [this] { return stats(); },
                                [space_for_stats] { return space_for_stats->monitor()->stats(); }});
    return Status::Ok();
  }

  // A "device_fault_batch" event for the batch: its span of addresses, distinct pages, any write.
  void TraceBatch(trace::Span& span, std::span<const emu::DeviceFault> batch) {
    std::vector<uintptr_t> pages;
    pages.reserve(batch.size());
    bool write = false;
    for (const emu::DeviceFault& f : batch) {
      pages.push_back(f.va & ~(kPage - 1));
      write = write || f.access != emu::Access::kRead;
    }
    std::sort(pages.begin(), pages.end());
    span.ev.a[0] = pages.empty() ? 0 : pages.front();
    span.ev.a[1] = pages.empty() ? 0 : pages.back() + kPage;
    span.ev.a[2] = batch.size();
    span.ev.a[3] = uint64_t(std::unique(pages.begin(), pages.end()) - pages.begin());
    span.ev.small = write ? 1 : 0;
  }

  std::vector<Status> Service(std::span<const emu::DeviceFault> batch) {
    trace::Span span(trace::Name::kDeviceFaultBatch, track_);
    if (span.active()) TraceBatch(span, batch);
    std::vector<Status> out;
    out.reserve(batch.size());
    for (const emu::DeviceFault& f : batch) {
      // A neighbour in the batch may have mapped this page already (same range).
      auto t = mmu_.Lookup(f.va);
      const bool write = f.access != emu::Access::kRead;
      if (t && (!write || (t->pte.perms & emu::Perm::kWrite) != emu::Perm::kNone)) {
        out.push_back(Status::Ok());
        continue;
      }
      out.push_back(svm_->HandleFault(f.va, write));
    }
    return out;
  }

  // A remote access by a compute unit (its guard held): counts it, and queues the region for the
  // counter thread when it reaches the threshold.
  void CountRemote(uintptr_t va) {
    if (counter_threshold_ == 0) return;
    const uintptr_t region = va & ~(kCounterRegion - 1);
    bool notify = false;
    {
      MutexLock lock(counter_mu_);
      uint32_t& c = counts_[region];
      if (++c == counter_threshold_) {
        c = 0;
        hot_.push_back(region);
        notify = true;
      }
    }
    if (notify) counter_cv_.NotifyAll();
  }

  // The counter thread: reports hot regions to the manager (the kernel: an access-counter
  // notification serviced by the driver's bottom half).
  void CounterLoop() {
    for (;;) {
      uintptr_t region;
      {
        MutexLock lock(counter_mu_);
        counter_cv_.Wait(counter_mu_,
                         [&]() REQUIRES(counter_mu_) { return counter_stop_ || !hot_.empty(); });
        if (counter_stop_) return;
        region = hot_.front();
        hot_.pop_front();
      }
      Status st = svm_->HandleAccessCounter(region);
      if (!st.ok()) Log().debug("{}: access counter at {:#x}: {}", name_, region, st.ToString());
    }
  }

  // DeviceOptions::memory (or $HMMKIT_DEVICE_MEMORY): a GEM object as the arena for "drm".
  Status ChooseMemory(const DeviceOptions& o, driver::DeviceMemory::Options& mo) {
    std::string choice = o.memory;
    if (choice.empty()) {
      const char* env = std::getenv("HMMKIT_DEVICE_MEMORY");
      choice = env != nullptr ? env : "";
    }
    if (choice.empty() || choice == "memfd") return Status::Ok();
    std::string node;
    if (choice.rfind("drm:", 0) == 0 && choice.size() > 4) {
      node = choice.substr(4);
    } else if (choice != "drm") {
      return Status::FromErrno(EINVAL, fmt::format("device memory \"{}\": expected memfd, drm or "
                                                   "drm:/dev/dri/cardN",
                                                   choice));
    }
    auto dev =
        node.empty() ? drm::OpenDrmDevice("", /*want_card=*/true) : drm::DrmDevice::Open(node);
    if (!dev.ok()) return dev.status();
    drm_ = std::move(*dev);
    auto arena = drm::GemArena(drm_, o.memory_bytes);
    if (!arena.ok()) return arena.status();
    mo.external = std::move(*arena);
    return Status::Ok();
  }

  static inline std::atomic<unsigned> next_index_{0};
  std::shared_ptr<AddressSpace> as_;
  emu::DeviceMmu mmu_;
  emu::FaultQueue faults_;
  std::string name_;
  std::unique_ptr<dma::CpuDmaEngine> dma_;
  std::shared_ptr<drm::DrmDevice> drm_;  // "drm" memory: outlives memory_ (declared before it)
  std::shared_ptr<driver::DeviceMemory> memory_;
  std::unique_ptr<driver::SvmManager> svm_;
  uint64_t cpu_faults_base_ = 0;
  uint16_t track_ = 0;         // this device's trace track (set in Init)
  uint64_t stats_handle_ = 0;  // StatsPublisher handle (0: not published)
  std::atomic<uint64_t> atomics_{0};
  unsigned counter_threshold_ = 0;
  Mutex counter_mu_;
  CondVar counter_cv_;
  std::unordered_map<uintptr_t, uint32_t> counts_ GUARDED_BY(counter_mu_);
  std::deque<uintptr_t> hot_ GUARDED_BY(counter_mu_);
  bool counter_stop_ GUARDED_BY(counter_mu_) = false;
  std::thread service_;
  std::thread counter_thread_;
  Mutex launch_mu_;
};

// When a replayed access gives up: after at least kFaultRounds faults and kFaultPersistFor since
// the first. A fault that was served can be undone before the replay (a CPU touch takes the page
// back, eviction makes room for another compute unit): on a loaded machine with device memory
// smaller than the working set that happens many times in a row, so a round count alone failed
// healthy stress runs. Both bounds together still end a driver that never maps the page.
constexpr int kFaultRounds = 64;
constexpr auto kFaultPersistFor = std::chrono::seconds(2);

// Translates under the guard (taking it if needed) and installs the page in a line; on a miss,
// releases the guard, raises a fault, waits for it and replays. -1 after a failure (recorded).
int EmuKernelContext::Fill(uintptr_t va, emu::Access access) {
  std::chrono::steady_clock::time_point first_fault;
  for (int round = 0;; ++round) {
    if (!guard_) guard_.emplace(dev_.mmu_.BeginAccess(compute_unit()));
    Result<emu::Translation> t = guard_->Translate(va, access);
    if (t.ok()) {
      const uintptr_t page = va & ~(kPage - 1);
      unsigned i = next_line_;
      for (unsigned j = 0; j < kLines; ++j)
        if (lines_[j].page == page) i = j;  // a weaker line for the page: replace it
      if (i == next_line_) next_line_ = (next_line_ + 1) % kLines;
      Line& l = lines_[i];
      l.page = page;
      l.perms = uint8_t(t->pte.perms);
      l.remote = t->pte.target_kind != emu::Target::kLocal;
      l.host = l.remote ? reinterpret_cast<char*>(t->CpuAddress(page))
                        : static_cast<char*>(dev_.memory_->PageData(t->LocalPage(page)));
      const bool r = !l.remote && emu::HasPerms(t->pte.perms, emu::Perm::kRead);
      const bool w = !l.remote && emu::HasPerms(t->pte.perms, emu::Perm::kWrite);
      fast_[0][i] = r ? page : kNoPage;
      fast_[1][i] = w ? page : kNoPage;
      return int(i);
    }
    if (t.errno_value() != EFAULT && t.errno_value() != EPERM) {
      Fail(t.status());
      return -1;
    }
    Release();  // before waiting: the driver's Map waits for every guard
    const auto now = std::chrono::steady_clock::now();
    if (round == 0) first_fault = now;
    if (round >= kFaultRounds && now - first_fault >= kFaultPersistFor) {
      Fail(Status::FromErrno(
          EIO,
          fmt::format(
              "device {} access at {:#x} kept faulting ({} faults in {} ms, the last one {}: {})",
              emu::ToString(access), va, round,
              std::chrono::duration_cast<std::chrono::milliseconds>(now - first_fault).count(),
              t.errno_value() == EPERM ? "EPERM" : "EFAULT", t.status().message())));
      return -1;
    }
    Status st = dev_.faults_.RaiseAndWait({.va = va, .access = access, .cu = compute_unit()});
    if (!st.ok()) {
      Fail(std::move(st));
      return -1;
    }
  }
}

void EmuKernelContext::AccessSlow(uintptr_t va, size_t size, uint64_t* value, bool write) {
  if (failed_) return;
  if ((va & (size - 1)) != 0) {  // size is a power of two (svm.hpp)
    Fail(Status::FromErrno(EINVAL, fmt::format("misaligned {}-byte access at {:#x}", size, va)));
    return;
  }
  MaybeYield();
  const emu::Access access = write ? emu::Access::kWrite : emu::Access::kRead;
  int i = Find(va, access);
  if (i < 0 && (i = Fill(va, access)) < 0) return;
  char* p = lines_[i].host + (va & (kPage - 1));
  if (!lines_[i].remote) {
    Copy(p, size, value, write);
    return;
  }
  dev_.CountRemote(va);
  // Remote access to system memory: checked, so a page unmapped behind the device's back is a
  // device error, not a crash.
  iovec local{value, size}, remote{p, size};
  const ssize_t done = write ? ::process_vm_writev(::getpid(), &local, 1, &remote, 1, 0)
                             : ::process_vm_readv(::getpid(), &local, 1, &remote, 1, 0);
  if (done != ssize_t(size)) {
    // A write refused because the mapping became read-only (an mprotect the device heard of
    // late) is EPERM, as for any write to read-only memory; anything else is EFAULT.
    auto vma = dev_.as_->FindVma(va);
    if (write && vma.ok() && *vma && (*vma)->read && !(*vma)->write) {
      Fail(Status::FromErrno(EPERM, fmt::format("device write to read-only {:#x}", va)));
      return;
    }
    Fail(Status::FromErrno(EFAULT, fmt::format("device access at {:#x}: system page gone", va)));
  }
}

uint64_t EmuKernelContext::Atomic(uintptr_t va, size_t size, AtomicOp op, uint64_t a, uint64_t b) {
  if (failed_) return 0;
  if ((va & (size - 1)) != 0) {
    Fail(Status::FromErrno(EINVAL, fmt::format("misaligned {}-byte atomic at {:#x}", size, va)));
    return 0;
  }
  MaybeYield();  // also what lets a kernel spin on an atomic while a change waits for its page
  int i = Find(va, emu::Access::kAtomic);
  if (i < 0 && (i = Fill(va, emu::Access::kAtomic)) < 0) return 0;
  dev_.atomics_.fetch_add(1, std::memory_order_relaxed);
  if (lines_[i].remote) dev_.CountRemote(va);
  return AtomicOn(lines_[i].host + (va & (kPage - 1)), size, op, a, b);
}

}  // namespace

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

Result<std::unique_ptr<Device>> Device::Open(const DeviceOptions& options) {
  std::string backend = options.backend;
  if (backend.empty()) {
    const char* env = std::getenv("HMMKIT_DEVICE");
    backend = env && *env ? env : "emu";
  }
  if (backend == "emu") return EmuSvmDevice::Create(options);
  return Status::FromErrno(ENODEV, fmt::format("no SVM backend \"{}\" (known: emu)", backend));
}

}  // namespace hmmkit::svm
