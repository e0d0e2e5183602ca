// Mirror metrics: range_fault against the bare kernel interfaces it is built on, and its cost with
// a crowded notifier tree.
//   range_fault.snapshot  RangeFault without REQ_FAULT on present 4 KiB anon pages vs a bare
//                         PAGEMAP_SCAN loop asking the same categories (pread of pagemap when the
//                         kernel lacks PAGEMAP_SCAN)
//   range_fault.write     RangeFault REQ_FAULT|REQ_WRITE on untouched anon vs bare
//                         MADV_POPULATE_WRITE
//   scale.subscriptions   a mirror cycle (MADV_DONTNEED of the range, its invalidations delivered,
//                         range_fault REQ_WRITE in 2 MiB steps) per page, with 100,000 other
//                         subscriptions tiling the range vs with none
#include <fcntl.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <atomic>
#include <deque>
#include <memory>
#include <mutex>

#include "bench_suite.hpp"
#include "bench_util.hpp"
#include "hmmkit/mirror/address_space.hpp"
#include "hmmkit/mirror/mm_monitor.hpp"
#include "hmmkit/mirror/range_fault.hpp"
#include "hmmkit/mirror/uapi.hpp"

namespace hmmkit::bench {
namespace {

struct SeqOps : IntervalNotifierOps {
  std::atomic<uint64_t> calls{0};
  void Invalidate(IntervalNotifier& sub, const NotifierRange&, uint64_t seq) override {
    calls.fetch_add(1, std::memory_order_relaxed);
    sub.SetSeq(seq);
  }
};

// RangeFault of [start, end) into pfns through the notifier protocol (RetryLoop), as a driver
// does; the commit under the driver lock is empty.
Status FaultRange(AddressSpace& as, IntervalNotifier& sub, uintptr_t start, uintptr_t end,
                  std::span<uint64_t> pfns, uint64_t flags) {
  Range r;
  r.notifier = &sub;
  r.start = start;
  r.end = end;
  r.hmm_pfns = pfns;
  r.default_flags = flags;
  std::mutex driver_lock;
  return RetryLoop(as, r, driver_lock, [](const Range&) { return Status::Ok(); });
}

Status CheckEntries(std::span<const uint64_t> pfns, uint64_t want) {
  for (size_t i = 0; i < pfns.size(); ++i)
    if ((pfns[i] & want) != want)
      return BenchError("range_fault entry " + std::to_string(i) + " lacks the expected flags");
  return Status::Ok();
}

void Settle(AddressSpace& as) {
  if (MmMonitor* m = as.monitor()) m->Sync();  // REMOVE events land before the clock starts
}

Result<std::vector<Metric>> RangeFaultMetrics(BenchContext& ctx) {
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  const size_t bytes = (ctx.quick ? 32u : 256u) << 20, npages = bytes / page;
  const int rounds = ctx.quick ? 5 : 15;
  auto as_or = AddressSpace::Create();
  if (!as_or.ok()) return as_or.status();
  AddressSpace& as = **as_or;
  const KernelFeatures& f = as.features();
  if (!f.madv_populate) return Status::FromErrno(ENOTSUP, "MADV_POPULATE_WRITE is needed");

  Mapping buf(bytes, 2u << 20);
  if (!buf.ok()) return Status::FromErrno(ENOMEM, "mmap");
  madvise(buf.data(), bytes, MADV_NOHUGEPAGE);  // 4 KiB pages: the per-page cost is the question
  SeqOps ops;
  IntervalNotifier sub;
  HMMKIT_RETURN_IF_ERROR(as.notifiers().Insert(sub, buf.addr(), bytes, ops));
  std::vector<uint64_t> pfns(npages);
  std::vector<Metric> out;

  // Faulting untouched memory; rounds alternate with the baseline.
  std::vector<double> t_pop, t_rf;
  for (int i = 0; i < rounds; ++i) {
    ctx.step("write fault round " + std::to_string(i + 1));
    madvise(buf.data(), bytes, MADV_DONTNEED);
    Settle(as);
    auto t0 = Clock::now();
    if (madvise(buf.data(), bytes, MADV_POPULATE_WRITE) != 0)
      return Status::FromErrno(errno, "MADV_POPULATE_WRITE");
    t_pop.push_back(SecondsSince(t0));
    madvise(buf.data(), bytes, MADV_DONTNEED);
    Settle(as);
    t0 = Clock::now();
    HMMKIT_RETURN_IF_ERROR(
        FaultRange(as, sub, buf.addr(), buf.end(), pfns, hmm_pfn::kReqFault | hmm_pfn::kReqWrite));
    t_rf.push_back(SecondsSince(t0));
    HMMKIT_RETURN_IF_ERROR(CheckEntries(pfns, hmm_pfn::kValid | hmm_pfn::kWrite));
  }
  Metric w = RateMetric("range_fault.write", "range_fault REQ_WRITE on untouched anon", "pages/s",
                        double(npages) / Median(t_rf), "bare MADV_POPULATE_WRITE",
                        double(npages) / Median(t_pop), 0.8);
  w.detail = std::to_string(bytes >> 20) + " MiB of 4 KiB pages, median of " +
             std::to_string(rounds) + " alternating rounds";
  out.push_back(std::move(w));

  // Snapshot of present memory.
  std::memset(buf.data(), 1, bytes);
  int pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (pm < 0) return Status::FromErrno(errno, "open /proc/self/pagemap");
  std::vector<page_region> vec(1024);
  std::vector<uint64_t> raw(npages);
  auto bare_scan = [&]() -> Status {
    if (!f.pagemap_scan) {
      if (pread(pm, raw.data(), npages * 8, off_t(buf.addr() / page * 8)) != ssize_t(npages * 8))
        return Status::FromErrno(errno, "pread pagemap");
      return Status::Ok();
    }
    pm_scan_arg arg{};
    arg.size = sizeof arg;
    arg.start = buf.addr();
    arg.end = buf.end();
    arg.vec = reinterpret_cast<uintptr_t>(vec.data());
    arg.vec_len = vec.size();
    // The question hmmkit asks for a private anon VMA.
    arg.return_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO | PAGE_IS_HUGE;
    while (arg.start < buf.end()) {
      if (ioctl(pm, PAGEMAP_SCAN, &arg) < 0) return Status::FromErrno(errno, "PAGEMAP_SCAN");
      arg.start = arg.walk_end;
    }
    return Status::Ok();
  };
  std::vector<double> t_scan, t_snap;
  for (int i = 0; i < rounds * 2; ++i) {
    ctx.step("snapshot round " + std::to_string(i + 1));
    auto t0 = Clock::now();
    Status st = bare_scan();
    t_scan.push_back(SecondsSince(t0));
    if (!st.ok()) {
      close(pm);
      return st;
    }
    t0 = Clock::now();
    HMMKIT_RETURN_IF_ERROR(FaultRange(as, sub, buf.addr(), buf.end(), pfns, 0));
    t_snap.push_back(SecondsSince(t0));
    HMMKIT_RETURN_IF_ERROR(CheckEntries(pfns, hmm_pfn::kValid | hmm_pfn::kWrite));
  }
  close(pm);
  Metric s = RateMetric("range_fault.snapshot", "range_fault snapshot of present anon pages",
                        "pages/s", double(npages) / Median(t_snap),
                        f.pagemap_scan ? "bare PAGEMAP_SCAN loop" : "bare pagemap pread",
                        double(npages) / Median(t_scan), 0.7);
  s.detail = std::to_string(bytes >> 20) + " MiB of 4 KiB pages, median of " +
             std::to_string(rounds * 2) + " alternating rounds; VMAs via " +
             (f.procmap_query ? "PROCMAP_QUERY" : "/proc/self/maps");
  out.push_back(std::move(s));
  as.notifiers().Remove(sub);
  return out;
}

Result<std::vector<Metric>> ScaleMetrics(BenchContext& ctx) {
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  // Quick keeps the full run's density of subscriptions per page.
  const size_t bytes = (ctx.quick ? 128u : 1024u) << 20, npages = bytes / page;
  const size_t subs = ctx.quick ? 12500 : 100000;
  const size_t step = size_t(2) << 20;
  const int rounds = ctx.quick ? 3 : 5;
  auto as_or = AddressSpace::Create();
  if (!as_or.ok()) return as_or.status();
  AddressSpace& as = **as_or;
  if (!as.features().madv_populate)
    return Status::FromErrno(ENOTSUP, "MADV_POPULATE_WRITE is needed");
  Mapping buf(bytes, step);
  if (!buf.ok()) return Status::FromErrno(ENOMEM, "mmap");
  madvise(buf.data(), bytes, MADV_NOHUGEPAGE);
  SeqOps driver_ops, crowd_ops;
  IntervalNotifier driver_sub;
  HMMKIT_RETURN_IF_ERROR(as.notifiers().Insert(driver_sub, buf.addr(), bytes, driver_ops));
  std::vector<uint64_t> pfns(step / page);

  // One cycle: clear the range (its invalidations delivered), then fault it back in 2 MiB steps.
  auto cycle = [&]() -> Result<double> {
    const auto t0 = Clock::now();
    madvise(buf.data(), bytes, MADV_DONTNEED);
    Settle(as);
    for (uintptr_t a = buf.addr(); a < buf.end(); a += step) {
      HMMKIT_RETURN_IF_ERROR(
          FaultRange(as, driver_sub, a, a + step, pfns, hmm_pfn::kReqFault | hmm_pfn::kReqWrite));
      HMMKIT_RETURN_IF_ERROR(CheckEntries(pfns, hmm_pfn::kValid | hmm_pfn::kWrite));
    }
    return SecondsSince(t0) * 1e9 / double(npages);
  };

  std::deque<IntervalNotifier> crowd;  // deque: notifiers must not move
  auto add_crowd = [&]() -> Status {
    const size_t each = bytes / subs;
    for (size_t i = 0; i < subs; ++i) {
      crowd.emplace_back();
      HMMKIT_RETURN_IF_ERROR(
          as.notifiers().Insert(crowd.back(), buf.addr() + i * each, each, crowd_ops));
    }
    return Status::Ok();
  };
  auto remove_crowd = [&] {
    for (IntervalNotifier& n : crowd) as.notifiers().Remove(n);
    crowd.clear();
  };

  std::vector<double> ns_one, ns_many;
  HMMKIT_RETURN_IF_ERROR(cycle().status());  // first touch of the whole range: not timed
  for (int i = 0; i < rounds; ++i) {
    ctx.step("1 subscription, round " + std::to_string(i + 1));
    auto one = cycle();
    if (!one.ok()) return one.status();
    ns_one.push_back(*one);
    ctx.step(std::to_string(subs) + " subscriptions, round " + std::to_string(i + 1));
    HMMKIT_RETURN_IF_ERROR(add_crowd());
    const uint64_t calls_before = crowd_ops.calls.load();
    auto many = cycle();
    const uint64_t calls = crowd_ops.calls.load() - calls_before;
    remove_crowd();
    if (!many.ok()) return many.status();
    ns_many.push_back(*many);
    if (calls < subs)
      return BenchError("the clear invalidated " + std::to_string(calls) + " of " +
                        std::to_string(subs) + " subscriptions");
  }
  as.notifiers().Remove(driver_sub);
  Metric m =
      CostMetric("scale.subscriptions",
                 "mirror cycle per page with " + std::to_string(subs) + " subscriptions", "ns/page",
                 Median(ns_many), "the same with 1 subscription", Median(ns_one), 0.8);
  m.detail = std::to_string(bytes >> 20) + " MiB, " + std::to_string(subs) +
             " subscriptions tiling it; cycle = MADV_DONTNEED + invalidations + range_fault "
             "REQ_WRITE per 2 MiB; median of " +
             std::to_string(rounds);
  return std::vector<Metric>{std::move(m)};
}

}  // namespace

extern const BenchSpec kRangeFaultBench = {
    "range_fault", "range_fault snapshot and write fault vs PAGEMAP_SCAN / MADV_POPULATE_WRITE",
    RangeFaultMetrics};
extern const BenchSpec kScaleBench = {
    "scale", "range_fault cost per page with 100,000 notifier subscriptions vs 1", ScaleMetrics};

}  // namespace hmmkit::bench
