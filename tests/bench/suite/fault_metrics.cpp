// Device-fault metrics, measured on the driver framework (SvmManager) with the emulated device's
// MMU as the device page table:
//   device_fault.service  256 device faults on resident system pages, each served by
//                         SvmManager::HandleFault (range lookup or creation, policy, range_fault,
//                         MapPages) vs 256 bare single-page PAGEMAP_SCANs plus the same page-table
//                         writes (DeviceMmu::Map)
//   invalidation.munmap   munmap of a mirrored 2 MiB range until the device entry is gone (the
//                         UNMAP event, SvmManager::Invalidate, DeviceMmu::Unmap) vs a bare munmap
//                         of the same size; p99, reported without a target
#include <fcntl.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <atomic>
#include <memory>
#include <thread>

#include "bench_suite.hpp"
#include "bench_util.hpp"
#include "hmmkit/dma/cpu_engine.hpp"
#include "hmmkit/driver/device_memory.hpp"
#include "hmmkit/driver/svm_manager.hpp"
#include "hmmkit/emu/mmu.hpp"
#include "hmmkit/mirror/address_space.hpp"
#include "hmmkit/mirror/mm_monitor.hpp"
#include "hmmkit/mirror/range_fault.hpp"
#include "hmmkit/mirror/uapi.hpp"

namespace hmmkit::bench {
namespace {

constexpr size_t kPage = 4096;

emu::Pte SystemPte(uintptr_t va, bool write) {
  emu::Pte p;
  p.target_kind = emu::Target::kSystem;
  p.target = va;
  p.perms = emu::Perm::kRead | (write ? emu::Perm::kWrite | emu::Perm::kAtomic : emu::Perm::kNone);
  return p;
}

// The driver side: device translations in an emulated MMU, as the emulated SVM device does.
class MmuOps final : public driver::SvmDeviceOps {
 public:
  explicit MmuOps(emu::DeviceMmu& mmu) : mmu_(mmu) {}
  Status MapPages(uintptr_t start, std::span<const uint64_t> pfns) override {
    return mmu_.Update(start, start + pfns.size() * kPage, [&](emu::DevicePageTable& pt) {
      for (size_t i = 0; i < pfns.size(); ++i) {
        const uintptr_t va = start + i * kPage;
        if (hmm_pfn::Kind(pfns[i]) == PageKind::kDevicePrivate)
          return Status::FromErrno(EINVAL, "bench device maps system memory only");
        HMMKIT_RETURN_IF_ERROR(pt.Map(va, kPage, SystemPte(va, (pfns[i] & hmm_pfn::kWrite) != 0)));
      }
      return Status::Ok();
    });
  }
  void UnmapPages(uintptr_t start, uintptr_t end) override {
    mmu_.Unmap(start, end - start).IgnoreError();
    unmapped_.fetch_add(1, std::memory_order_release);
  }
  uint64_t unmapped() const { return unmapped_.load(std::memory_order_acquire); }

 private:
  emu::DeviceMmu& mmu_;
  std::atomic<uint64_t> unmapped_{0};
};

struct Rig {
  std::shared_ptr<AddressSpace> as;
  std::shared_ptr<driver::DeviceMemory> memory;
  std::unique_ptr<dma::CpuDmaEngine> dma;
  std::unique_ptr<emu::DeviceMmu> mmu;
  std::unique_ptr<MmuOps> ops;
  std::unique_ptr<driver::SvmManager> svm;
};

Result<std::unique_ptr<Rig>> MakeRig(std::vector<size_t> chunks) {
  auto rig = std::make_unique<Rig>();
  auto as = AddressSpace::Create();
  if (!as.ok()) return as.status();
  rig->as = *as;
  if (!rig->as->monitor()) return Status::FromErrno(ENOTSUP, "needs userfaultfd");
  driver::DeviceMemory::Options mo;
  mo.capacity = size_t(2) << 20;
  mo.name = "bench-fault";
  auto mem = driver::DeviceMemory::Create(mo);
  if (!mem.ok()) return mem.status();
  rig->memory = *mem;
  auto engine = dma::CpuDmaEngine::Create({});
  if (!engine.ok()) return engine.status();
  rig->dma = std::move(*engine);
  rig->mmu = std::make_unique<emu::DeviceMmu>(emu::DeviceMmu::Options{4, 64});
  rig->ops = std::make_unique<MmuOps>(*rig->mmu);
  driver::SvmManager::Options so;
  so.chunk_sizes = std::move(chunks);
  so.migrate_on_fault = false;  // resident system pages are mapped where they are
  so.prefetch_threshold = 0;
  auto svm = driver::SvmManager::Create(rig->as, *rig->memory, *rig->dma, *rig->ops, so);
  if (!svm.ok()) return svm.status();
  rig->svm = std::move(*svm);
  return rig;
}

Result<std::vector<Metric>> FaultServiceMetrics(BenchContext& ctx) {
  constexpr size_t kFaults = 256;
  const int rounds = ctx.quick ? 15 : 101;
  // One range per faulting page: a fault's service maps the page it is for, like the baseline.
  auto rig_or = MakeRig({kPage});
  if (!rig_or.ok()) return rig_or.status();
  Rig& rig = **rig_or;
  int pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (pm < 0) return Status::FromErrno(errno, "open /proc/self/pagemap");
  const bool scan = rig.as->features().pagemap_scan;

  std::vector<double> t_bare, t_svm;
  Status failure;
  for (int r = 0; r < rounds && failure.ok(); ++r) {
    if (r % 8 == 0) ctx.step("round " + std::to_string(r + 1));
    Mapping buf(kFaults * kPage, kPage);
    if (!buf.ok()) return Status::FromErrno(ENOMEM, "mmap");
    std::memset(buf.data(), 1, buf.size());  // resident

    // Baseline: what serving a fault costs at the least: ask the kernel about the page, write
    // the device PTE.
    auto t0 = Clock::now();
    for (size_t i = 0; i < kFaults; ++i) {
      const uintptr_t va = buf.addr() + i * kPage;
      if (scan) {
        page_region reg{};
        pm_scan_arg arg{};
        arg.size = sizeof arg;
        arg.start = va;
        arg.end = va + kPage;
        arg.vec = reinterpret_cast<uintptr_t>(&reg);
        arg.vec_len = 1;
        arg.return_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO | PAGE_IS_HUGE;
        if (ioctl(pm, PAGEMAP_SCAN, &arg) != 1 || !(reg.categories & PAGE_IS_PRESENT)) {
          failure = BenchError("bare PAGEMAP_SCAN: page not present");
          break;
        }
      } else {
        uint64_t e = 0;
        if (pread(pm, &e, 8, off_t(va / kPage * 8)) != 8 || !(e >> 63)) {
          failure = BenchError("bare pagemap pread: page not present");
          break;
        }
      }
      failure = rig.mmu->Map(va, kPage, SystemPte(va, true));
      if (!failure.ok()) break;
    }
    t_bare.push_back(SecondsSince(t0));
    if (!failure.ok()) break;
    failure = rig.mmu->Unmap(buf.addr(), buf.size());
    if (!failure.ok()) break;

    t0 = Clock::now();
    for (size_t i = 0; i < kFaults && failure.ok(); ++i)
      failure = rig.svm->HandleFault(buf.addr() + i * kPage, /*write=*/true);
    t_svm.push_back(SecondsSince(t0));
    if (!failure.ok()) break;
    for (size_t i = 0; i < kFaults; ++i) {
      auto t = rig.mmu->Lookup(buf.addr() + i * kPage);
      if (!t || t->pte.target_kind != emu::Target::kSystem) {
        failure = BenchError("HandleFault left page " + std::to_string(i) + " unmapped (" +
                             std::to_string(rig.ops->unmapped()) + " device unmaps, " +
                             std::to_string(rig.svm->stats().invalidations) + " invalidations)");
        break;
      }
    }
    // Untimed: the UNMAP event of `buf` lands and its ranges are collected before the next
    // round maps new memory (perhaps at the same address).
    void* const addr = buf.data();
    buf.Release();
    munmap(addr, kFaults * kPage);
    rig.as->monitor()->Sync();
    rig.svm->CollectGarbage();
  }
  close(pm);
  if (!failure.ok()) return failure;
  Metric m = RateMetric("device_fault.service", "device fault service, batches of 256 faults",
                        "faults/s", double(kFaults) / Median(t_svm),
                        scan ? "256 bare PAGEMAP_SCAN + PTE writes" : "256 pagemap pread + PTE",
                        double(kFaults) / Median(t_bare), 0.5);
  m.detail = "SvmManager::HandleFault, 4 KiB ranges, remote map of resident pages; median of " +
             std::to_string(rounds) + " batches";
  return std::vector<Metric>{std::move(m)};
}

Result<std::vector<Metric>> InvalidationMetrics(BenchContext& ctx) {
  const size_t len = size_t(2) << 20;
  const int rounds = ctx.quick ? 100 : 1000;
  auto rig_or = MakeRig({len, kPage});
  if (!rig_or.ok()) return rig_or.status();
  Rig& rig = **rig_or;
  std::vector<double> us_bare, us_svm;
  for (int r = 0; r < rounds; ++r) {
    if (r % 25 == 0) ctx.step("round " + std::to_string(r + 1));
    {
      Mapping bare(len, len);
      if (!bare.ok()) return Status::FromErrno(ENOMEM, "mmap");
      std::memset(bare.data(), 1, len);
      const auto t0 = Clock::now();
      munmap(bare.data(), len);
      us_bare.push_back(SecondsSince(t0) * 1e6);
      bare.Release();
    }
    Mapping buf(len, len);
    if (!buf.ok()) return Status::FromErrno(ENOMEM, "mmap");
    std::memset(buf.data(), 1, len);
    HMMKIT_RETURN_IF_ERROR(rig.svm->HandleFault(buf.addr(), true));
    if (!rig.mmu->Lookup(buf.addr())) return BenchError("HandleFault mapped nothing");
    const uint64_t before = rig.ops->unmapped();
    const auto t0 = Clock::now();
    munmap(buf.data(), len);
    // The device entry goes on the monitor's event thread; wait for it.
    while (rig.ops->unmapped() == before) std::this_thread::yield();
    us_svm.push_back(SecondsSince(t0) * 1e6);
    if (rig.mmu->Lookup(buf.addr())) return BenchError("the device entry survived the munmap");
    buf.Release();
    rig.svm->CollectGarbage();
  }
  Metric m = CostMetric("invalidation.munmap_p99", "munmap of a mirrored 2 MiB range, p99", "us",
                        Percentile(us_svm, 0.99), "bare munmap of 2 MiB, p99",
                        Percentile(us_bare, 0.99), std::nullopt);
  m.detail = "until the device entry is gone; p50 " + Fixed(Percentile(us_svm, 0.5), 1) +
             " us vs bare " + Fixed(Percentile(us_bare, 0.5), 1) + " us; " +
             std::to_string(rounds) + " rounds";
  return std::vector<Metric>{std::move(m)};
}

}  // namespace

extern const BenchSpec kDeviceFaultBench = {
    "device_fault", "256 device faults served by SvmManager vs bare PAGEMAP_SCAN + PTE writes",
    FaultServiceMetrics};
extern const BenchSpec kInvalidationBench = {
    "invalidation", "munmap of a mirrored 2 MiB range until the device entry is gone (p99)",
    InvalidationMetrics};

}  // namespace hmmkit::bench
