// Migration metrics on the driver framework (driver::MigrateToDevice, mirror's migrate_to_ram and
// migrate_device_range) with a private DeviceMemory and the CPU DMA engine (2 workers):
//   migrate.to_device_2m   a THP-backed buffer migrated to the device vs memcpy of the same bytes
//                          with the engine's 2 threads
//   migrate.to_device_4k   the same with 4 KiB pages (MADV_NOHUGEPAGE: physically scattered)
//   fault_back.p50         a CPU touch of one device-private page until the thread resumes vs a
//                          bare userfaultfd MISSING -> UFFDIO_COPY round trip (own uffd, own
//                          handler thread)
//   fault_back.sequential  a CPU sequential read (memcpy out) of a buffer that is on the device,
//                          served by fault-around, vs memcpy of the same bytes from system memory
//   evict.full_device      every page of a full device moved back by page id
//                          (MigrateAllToRam) vs memcpy of the same bytes with 2 threads
// Every round checks the data that moved.
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <memory>
#include <thread>

#include "bench_suite.hpp"
#include "bench_util.hpp"
#include "hmmkit/dma/cpu_engine.hpp"
#include "hmmkit/driver/device_memory.hpp"
#include "hmmkit/driver/device_migration.hpp"
#include "hmmkit/mirror/address_space.hpp"
#include "hmmkit/mirror/migrate.hpp"
#include "hmmkit/mirror/mm_monitor.hpp"

namespace hmmkit::bench {
namespace {

constexpr size_t kPage = 4096;
constexpr size_t kHuge = size_t(2) << 20;
constexpr unsigned kEngineThreads = 2;

struct Rig {
  std::shared_ptr<AddressSpace> as;
  std::shared_ptr<driver::DeviceMemory> memory;
  std::unique_ptr<dma::CpuDmaEngine> dma;

  void Settle() const { as->monitor()->Sync(); }
};

Result<std::unique_ptr<Rig>> MakeRig(size_t capacity) {
  auto rig = std::make_unique<Rig>();
  auto as = AddressSpace::Create();
  if (!as.ok()) return as.status();
  rig->as = *as;
  if (!rig->as->monitor()) return Status::FromErrno(ENOTSUP, "migration needs userfaultfd");
  driver::DeviceMemory::Options mo;
  mo.capacity = capacity;
  mo.name = "bench-migrate";
  mo.owner = rig.get();
  AddressSpace* space = rig->as.get();
  mo.evict = [space](driver::DeviceMemory& mem, std::span<const uint64_t> ids) {
    return MigrateDevicePages(*space, mem, ids);
  };
  auto mem = driver::DeviceMemory::Create(mo);
  if (!mem.ok()) return mem.status();
  rig->memory = *mem;
  dma::CpuDmaEngine::Options eo;
  eo.threads = kEngineThreads;
  auto engine = dma::CpuDmaEngine::Create(eo);
  if (!engine.ok()) return engine.status();
  rig->dma = std::move(*engine);
  return rig;
}

// Migrates [start, end) VMA by VMA (hmmkit's registrations may have split it); returns pages moved.
Result<size_t> ToDevice(Rig& rig, uintptr_t start, uintptr_t end) {
  auto vmas = rig.as->FindVmas(start, end);
  if (!vmas.ok()) return vmas.status();
  size_t moved = 0;
  for (const Vma& v : *vmas) {
    auto r = driver::MigrateToDevice(*rig.as, *rig.memory, *rig.dma, std::max(v.start, start),
                                     std::min(v.end, end));
    if (!r.ok()) return r.status();
    moved += r->migrated;
  }
  return moved;
}

void Fill(char* p, size_t len, unsigned seed) {
  for (size_t off = 0; off < len; off += 64) {
    uint64_t v = (uint64_t(off) * 0x9E3779B97F4A7C15ull) ^ seed;
    std::memcpy(p + off, &v, sizeof v);
  }
}

Status CheckFill(const char* p, size_t len, unsigned seed, const char* what) {
  for (size_t off = 0; off < len; off += 64) {
    uint64_t v = (uint64_t(off) * 0x9E3779B97F4A7C15ull) ^ seed, got;
    std::memcpy(&got, p + off, sizeof got);
    if (got != v)
      return BenchError(std::string(what) + ": wrong data at offset " + std::to_string(off));
  }
  return Status::Ok();
}

Result<Metric> ToDeviceThroughput(BenchContext& ctx, Rig& rig, size_t len, bool huge, int rounds) {
  std::vector<double> t_copy, t_mig;
  std::vector<char> dst(len);
  std::memset(dst.data(), 0, len);
  for (int r = 0; r < rounds; ++r) {
    ctx.step(std::string(huge ? "2 MiB" : "4 KiB") + " round " + std::to_string(r + 1));
    Mapping buf(len, kHuge);  // fresh each round: the way back leaves 4 KiB pages
    if (!buf.ok()) return Status::FromErrno(ENOMEM, "mmap");
    madvise(buf.data(), len, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    Fill(buf.data(), len, unsigned(r));
    auto t0 = Clock::now();
    ParallelMemcpy(dst.data(), buf.data(), len, kEngineThreads);
    t_copy.push_back(SecondsSince(t0));
    t0 = Clock::now();
    auto moved = ToDevice(rig, buf.addr(), buf.end());
    t_mig.push_back(SecondsSince(t0));
    if (!moved.ok()) return moved.status();
    if (*moved != len / kPage)
      return BenchError(std::to_string(*moved) + " of " + std::to_string(len / kPage) +
                        " pages migrated");
    HMMKIT_RETURN_IF_ERROR(CheckFill(buf.data(), len, unsigned(r), "after migration"));
    HMMKIT_RETURN_IF_ERROR(CheckFill(dst.data(), len, unsigned(r), "memcpy baseline"));
  }
  rig.Settle();  // the unmaps free the device pages
  Metric m = RateMetric(
      huge ? "migrate.to_device_2m" : "migrate.to_device_4k",
      huge ? "migrate to device, 2 MiB chunks (THP)" : "migrate to device, 4 KiB pages", "GB/s",
      double(len) / Median(t_mig) / 1e9, "memcpy, " + std::to_string(kEngineThreads) + " threads",
      double(len) / Median(t_copy) / 1e9, huge ? 0.7 : 0.3);
  m.detail = std::to_string(len >> 20) + " MiB per round, CPU DMA engine with " +
             std::to_string(kEngineThreads) + " workers, median of " + std::to_string(rounds);
  return m;
}

// Bare userfaultfd round trips: touch a missing page, a handler thread copies one in. Pages are
// touched one at a time by Touch(); the destructor touches a sentinel page, the handler's signal
// to exit once it has served it.
class BareUffd {
 public:
  explicit BareUffd(size_t n) : n_(n), area_((n + 1) * kPage, kPage) {}
  Status Start() {
    uffd_ = int(syscall(SYS_userfaultfd, O_CLOEXEC | UFFD_USER_MODE_ONLY));
    if (uffd_ < 0) return Status::FromErrno(errno, "userfaultfd");
    uffdio_api api{};
    api.api = UFFD_API;
    uffdio_register reg{};
    reg.range.start = area_.addr();
    reg.range.len = area_.size();
    reg.mode = UFFDIO_REGISTER_MODE_MISSING;
    if (!area_.ok() || ioctl(uffd_, UFFDIO_API, &api) != 0 ||
        ioctl(uffd_, UFFDIO_REGISTER, &reg) != 0)
      return Status::FromErrno(errno, "bare userfaultfd setup");
    // A blocking read: the fastest bare handler.
    handler_ = std::thread([this] {
      alignas(4096) static char source[kPage] = {1};
      const uintptr_t sentinel = area_.addr() + n_ * kPage;
      for (bool done = false; !done;) {
        uffd_msg msg;
        if (read(uffd_, &msg, sizeof msg) != sizeof msg || msg.event != UFFD_EVENT_PAGEFAULT)
          continue;
        uffdio_copy c{};
        c.dst = msg.arg.pagefault.address & ~(kPage - 1);
        c.src = uintptr_t(source);
        c.len = kPage;
        ioctl(uffd_, UFFDIO_COPY, &c);
        done = c.dst == sentinel;
      }
    });
    return Status::Ok();
  }
  // Microseconds until the touch of page i returned.
  double Touch(size_t i) {
    const auto t0 = Clock::now();
    volatile char c = area_.data()[i * kPage];
    (void)c;
    return SecondsSince(t0) * 1e6;
  }
  ~BareUffd() {
    if (handler_.joinable()) {
      volatile char last = area_.data()[n_ * kPage];
      (void)last;
      handler_.join();
    }
    if (uffd_ >= 0) close(uffd_);
  }

 private:
  size_t n_;
  Mapping area_;
  int uffd_ = -1;
  std::thread handler_;
};

Result<std::vector<Metric>> FaultBackMetrics(BenchContext& ctx) {
  const size_t n = ctx.quick ? 300 : 3000;
  const size_t seq_len = (ctx.quick ? 64u : 256u) << 20;
  auto rig_or = MakeRig(seq_len);
  if (!rig_or.ok()) return rig_or.status();
  Rig& rig = **rig_or;
  std::vector<Metric> out;

  // One migrated page per 64 KiB slot: the fault window (16 pages) brings back just that page.
  {
    ctx.step("single-page fault-backs");
    const size_t slot = 16 * kPage;
    Mapping area(n * slot, slot);
    if (!area.ok()) return Status::FromErrno(ENOMEM, "mmap");
    madvise(area.data(), area.size(), MADV_NOHUGEPAGE);
    BareUffd bare(n);
    HMMKIT_RETURN_IF_ERROR(bare.Start());
    // Batches of hmmkit fault-backs and bare round trips alternate: both see the same machine
    // (an idle VM wakes its vCPUs slower than a busy one).
    std::vector<double> us, bare_us;
    constexpr size_t kBatch = 25;
    for (size_t i = 0; i < n; ++i) {
      char* p = area.data() + i * slot;
      p[0] = char(i);
      auto moved = ToDevice(rig, uintptr_t(p), uintptr_t(p) + kPage);
      if (!moved.ok()) return moved.status();
      if (*moved != 1) return BenchError("a page did not migrate");
      rig.Settle();  // the migration's own events are handled: the fault alone is timed
      const auto t0 = Clock::now();
      volatile char c = p[0];
      us.push_back(SecondsSince(t0) * 1e6);
      if (c != char(i)) return BenchError("fault-back returned wrong data");
      if ((i + 1) % kBatch == 0 || i + 1 == n)
        for (size_t j = bare_us.size(); j <= i; ++j) bare_us.push_back(bare.Touch(j));
    }
    Metric m = CostMetric("fault_back.p50", "CPU fault-back of one device-private page, p50", "us",
                          Percentile(us, 0.5), "bare uffd MISSING->UFFDIO_COPY p50",
                          Percentile(bare_us, 0.5), 0.67);
    m.detail = "p99 " + Fixed(Percentile(us, 0.99), 1) + " us vs bare " +
               Fixed(Percentile(bare_us, 0.99), 1) + " us; " + std::to_string(n) + " faults";
    out.push_back(std::move(m));
  }
  rig.Settle();

  // Sequential read of a migrated buffer.
  {
    const int rounds = ctx.quick ? 2 : 3;
    std::vector<char> dst(seq_len);
    Mapping ref(seq_len, kHuge);
    if (!ref.ok()) return Status::FromErrno(ENOMEM, "mmap");
    Fill(ref.data(), seq_len, 7);
    std::vector<double> t_copy, t_read;
    for (int r = 0; r < rounds; ++r) {
      ctx.step("sequential read round " + std::to_string(r + 1));
      Mapping buf(seq_len, kHuge);
      if (!buf.ok()) return Status::FromErrno(ENOMEM, "mmap");
      Fill(buf.data(), seq_len, 7);
      auto moved = ToDevice(rig, buf.addr(), buf.end());
      if (!moved.ok()) return moved.status();
      if (*moved != seq_len / kPage) return BenchError("the buffer did not migrate whole");
      auto t0 = Clock::now();
      std::memcpy(dst.data(), ref.data(), seq_len);
      t_copy.push_back(SecondsSince(t0));
      t0 = Clock::now();
      std::memcpy(dst.data(), buf.data(), seq_len);
      t_read.push_back(SecondsSince(t0));
      HMMKIT_RETURN_IF_ERROR(CheckFill(dst.data(), seq_len, 7, "sequential read"));
      rig.Settle();
    }
    Metric m = RateMetric("fault_back.sequential_read",
                          "CPU sequential read of a migrated buffer (fault-around)", "GB/s",
                          double(seq_len) / Median(t_read) / 1e9, "memcpy from system memory",
                          double(seq_len) / Median(t_copy) / 1e9, 0.5);
    const double limit = PageAllocationGbs(seq_len);
    m.detail = std::to_string(seq_len >> 20) + " MiB, one thread, fault window " +
               std::to_string(rig.as->options().fault_window) + " growing to " +
               std::to_string(rig.as->options().fault_window_max) + " pages, median of " +
               std::to_string(rounds) + "; kernel 4 KiB page allocation " + Fixed(limit) +
               " GB/s, so " + Fixed(m.value / limit) + " of that ceiling";
    out.push_back(std::move(m));
  }
  return out;
}

Result<std::vector<Metric>> MigrateMetrics(BenchContext& ctx) {
  const size_t len = (ctx.quick ? 32u : 128u) << 20;
  auto rig_or = MakeRig(len);
  if (!rig_or.ok()) return rig_or.status();
  std::vector<Metric> out;
  for (bool huge : {true, false}) {
    auto m = ToDeviceThroughput(ctx, **rig_or, len, huge, ctx.quick ? 3 : 7);
    if (!m.ok()) return m.status();
    out.push_back(std::move(*m));
  }
  return out;
}

Result<std::vector<Metric>> EvictMetrics(BenchContext& ctx) {
  const size_t len = (ctx.quick ? 64u : 256u) << 20;
  const int rounds = ctx.quick ? 2 : 5;
  auto rig_or = MakeRig(len);
  if (!rig_or.ok()) return rig_or.status();
  Rig& rig = **rig_or;
  std::vector<char> dst(len);
  std::vector<double> t_copy, t_evict;
  Mapping buf(len, kHuge);
  if (!buf.ok()) return Status::FromErrno(ENOMEM, "mmap");
  for (int r = 0; r < rounds; ++r) {
    ctx.step("round " + std::to_string(r + 1));
    Fill(buf.data(), len, unsigned(r));
    auto moved = ToDevice(rig, buf.addr(), buf.end());
    if (!moved.ok()) return moved.status();
    if (rig.memory->stats().pages_free != 0) return BenchError("the device is not full");
    auto t0 = Clock::now();
    // The same bytes, device memory to system memory.
    ParallelMemcpy(dst.data(), rig.memory->base(), len, kEngineThreads);
    t_copy.push_back(SecondsSince(t0));
    t0 = Clock::now();
    HMMKIT_RETURN_IF_ERROR(MigrateAllToRam(*rig.as, *rig.memory));
    t_evict.push_back(SecondsSince(t0));
    if (rig.memory->stats().pages_in_use != 0) return BenchError("eviction left pages in use");
    HMMKIT_RETURN_IF_ERROR(CheckFill(buf.data(), len, unsigned(r), "after eviction"));
  }
  Metric m = RateMetric("evict.full_device", "eviction of a full device (by page id)", "GB/s",
                        double(len) / Median(t_evict) / 1e9,
                        "memcpy, " + std::to_string(kEngineThreads) + " threads",
                        double(len) / Median(t_copy) / 1e9, 0.6);
  const double limit = PageAllocationGbs(len);
  m.detail = std::to_string(len >> 20) + " MiB device, MigrateAllToRam, median of " +
             std::to_string(rounds) + "; kernel 4 KiB page allocation " + Fixed(limit) +
             " GB/s, so " + Fixed(m.value / limit) + " of that ceiling";
  return std::vector<Metric>{std::move(m)};
}

}  // namespace

extern const BenchSpec kMigrateBench = {
    "migrate", "migration to device (2 MiB chunks, 4 KiB pages) vs memcpy", MigrateMetrics};
extern const BenchSpec kFaultBackBench = {
    "fault_back", "CPU fault-back latency and sequential read of a migrated buffer",
    FaultBackMetrics};
extern const BenchSpec kEvictBench = {"evict", "eviction of a full device vs memcpy", EvictMetrics};

}  // namespace hmmkit::bench
