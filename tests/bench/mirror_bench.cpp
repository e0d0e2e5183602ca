// mirror_bench: cost per page of range_fault against the bare kernel interface it is built on,
// measured in the same run on the same pages:
//   snapshot   RangeFault without REQ_FAULT on present pages  vs  a bare PAGEMAP_SCAN loop
//   fault      RangeFault with REQ_FAULT|REQ_WRITE, untouched   vs  a bare MADV_POPULATE_WRITE loop
// Each figure is the median of several rounds; ratio = baseline time / hmmkit time (higher is
// better, 1.0 = no overhead). Exits non-zero if range_fault's output is wrong.
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "hmmkit/mirror/address_space.hpp"
#include "hmmkit/mirror/mm_monitor.hpp"
#include "hmmkit/mirror/range_fault.hpp"
#include "hmmkit/mirror/uapi.hpp"

namespace {

using Clock = std::chrono::steady_clock;
using hmmkit::hmm_pfn::kReqFault;
using hmmkit::hmm_pfn::kReqWrite;
using hmmkit::hmm_pfn::kValid;
using hmmkit::hmm_pfn::kWrite;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct NullOps : hmmkit::IntervalNotifierOps {
  void Invalidate(hmmkit::IntervalNotifier& sub, const hmmkit::NotifierRange&,
                  uint64_t seq) override {
    sub.SetSeq(seq);
  }
};

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "mirror_bench: %s\n", what.c_str());
  std::exit(1);
}

struct Row {
  const char* metric;
  const char* baseline;
  double ns_hmmkit;
  double ns_baseline;
};

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else {
      std::fprintf(stderr, "usage: mirror_bench [--quick]\n");
      return 2;
    }
  }
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  const size_t bytes = (quick ? 16u : 256u) << 20;
  const size_t npages = bytes / page;
  const int rounds = quick ? 5 : 15;

  auto as_or = hmmkit::AddressSpace::Create();
  if (!as_or.ok()) Fail("AddressSpace: " + as_or.status().ToString());
  auto as = *as_or;
  const auto& f = as->features();
  if (!f.madv_populate) Fail("MADV_POPULATE is needed for the fault benchmark");

  char* buf = static_cast<char*>(
      mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (buf == MAP_FAILED) Fail("mmap");
  madvise(buf, bytes, MADV_NOHUGEPAGE);  // 4 KiB pages: the per-page cost is what we measure
  const uintptr_t start = reinterpret_cast<uintptr_t>(buf), end = start + bytes;

  NullOps ops;
  hmmkit::IntervalNotifier sub;
  if (!as->notifiers().Insert(sub, start, bytes, ops).ok()) Fail("insert");
  std::vector<uint64_t> pfns(npages);
  auto range_fault = [&](uint64_t flags) {
    hmmkit::Range r;
    r.notifier = &sub;
    r.start = start;
    r.end = end;
    r.hmm_pfns = pfns;
    r.default_flags = flags;
    for (;;) {
      r.notifier_seq = sub.ReadBegin();
      hmmkit::Status st = hmmkit::RangeFault(*as, r);
      if (st.errno_value() == EBUSY) continue;
      if (!st.ok()) Fail("RangeFault: " + st.ToString());
      return;
    }
  };
  auto reset = [&] {
    madvise(buf, bytes, MADV_DONTNEED);
    if (auto* m = as->monitor()) m->Sync();  // let the REMOVE invalidation land before timing
  };
  auto check_all = [&](uint64_t want) {
    for (size_t i = 0; i < npages; ++i)
      if ((pfns[i] & want) != want)
        Fail("entry " + std::to_string(i) + " lacks the expected flags");
  };

  std::vector<Row> rows;

  // ---- faulting untouched memory ----
  std::vector<double> t_pop, t_rf;
  for (int i = 0; i < rounds; ++i) {
    reset();
    auto t0 = Clock::now();
    if (madvise(buf, bytes, MADV_POPULATE_WRITE) != 0) Fail("populate");
    t_pop.push_back(std::chrono::duration<double, std::nano>(Clock::now() - t0).count() / npages);
    reset();
    t0 = Clock::now();
    range_fault(kReqFault | kReqWrite);
    t_rf.push_back(std::chrono::duration<double, std::nano>(Clock::now() - t0).count() / npages);
    check_all(kValid | kWrite);
  }
  rows.push_back({"range_fault REQ_WRITE, untouched anon", "MADV_POPULATE_WRITE", Median(t_rf),
                  Median(t_pop)});

  // ---- snapshot of present memory ----
  // Baseline and hmmkit rounds alternate, so both see the same machine state.
  memset(buf, 1, bytes);
  std::vector<double> t_scan, t_snap;
  int pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  std::vector<page_region> vec(1024);
  std::vector<uint64_t> ent(npages);
  auto bare_scan = [&] {
    if (!f.pagemap_scan) {
      if (pread(pm, ent.data(), npages * 8, off_t(start / page * 8)) != ssize_t(npages * 8))
        Fail("pread pagemap");
      return;
    }
    pm_scan_arg arg{};
    arg.size = sizeof arg;
    arg.start = start;
    arg.end = end;
    arg.vec = reinterpret_cast<uintptr_t>(vec.data());
    arg.vec_len = vec.size();
    // The same question hmmkit asks for a private anon VMA (FILE is known from the VMA there).
    arg.return_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO | PAGE_IS_HUGE;
    while (arg.start < end) {
      if (ioctl(pm, PAGEMAP_SCAN, &arg) < 0) Fail("PAGEMAP_SCAN");
      arg.start = arg.walk_end;
    }
  };
  for (int i = 0; i < rounds; ++i) {
    auto t0 = Clock::now();
    bare_scan();
    t_scan.push_back(std::chrono::duration<double, std::nano>(Clock::now() - t0).count() / npages);
    t0 = Clock::now();
    range_fault(0);
    t_snap.push_back(std::chrono::duration<double, std::nano>(Clock::now() - t0).count() / npages);
    check_all(kValid | kWrite);
  }
  close(pm);
  rows.push_back({"range_fault snapshot, present anon",
                  f.pagemap_scan ? "PAGEMAP_SCAN" : "pagemap pread", Median(t_snap),
                  Median(t_scan)});

  std::printf(
      "mirror_bench: %zu MiB, %zu pages, %d rounds, median; kernel %s; snapshot via %s, VMAs via "
      "%s\n",
      bytes >> 20, npages, rounds, f.kernel_release.c_str(),
      f.pagemap_scan ? "PAGEMAP_SCAN" : "/proc/self/pagemap",
      f.procmap_query ? "PROCMAP_QUERY" : "/proc/self/maps");
  std::printf("%-40s %14s %-22s %14s %7s\n", "metric", "hmmkit ns/pg", "baseline", "base ns/pg",
              "ratio");
  for (const Row& r : rows)
    std::printf("%-40s %14.1f %-22s %14.1f %7.2f\n", r.metric, r.ns_hmmkit, r.baseline,
                r.ns_baseline, r.ns_baseline / r.ns_hmmkit);
  as->notifiers().Remove(sub);
  munmap(buf, bytes);
  return 0;
}
