// stencil: a 1-D three-point stencil with iterative CPU/device phases, run twice:
//   plain   the device faults in what it touches, the CPU faults back what it reads;
//   hinted  the coefficients are advised to prefer the device and prefetched once, and the two
//           grids are prefetched to the device before each device phase and back to system
//           memory before each CPU phase (on a stream, waited for with fences).
// Both runs are checked against a CPU-only reference; the counters of each are printed so that
// the difference in faults and migrations is visible.
//
// The grids come from mmap: malloc may serve even large blocks from the brk heap (its mmap
// threshold grows as blocks are freed), and the heap is mapped remotely, never migrated (hmmkit's
// own threads allocate there; see docs/svm.md).
#include <sys/mman.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include "../print_stats.hpp"
#include "hmmkit/svm.hpp"

namespace {

using hmmkit::svm::Advice;
using hmmkit::svm::Device;
using hmmkit::svm::KernelContext;
using hmmkit::svm::Location;

void Init(double* grid, double* coef, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    grid[i] = double(i % 97);
    coef[i] = 0.5 + double(i % 7) / 14.0;
  }
}

// The CPU phase: a source term at both ends, and a checksum over the whole grid.
double CpuPhase(double* grid, size_t n, int iter) {
  grid[0] += 1.0 + iter;
  grid[n - 1] -= 1.0;
  double sum = 0;
  for (size_t i = 0; i < n; ++i) sum += grid[i];
  return sum;
}

double Step(const double* in, const double* coef, size_t i, size_t n) {
  const double l = i > 0 ? in[i - 1] : in[i];
  const double r = i + 1 < n ? in[i + 1] : in[i];
  return coef[i] * (l + in[i] + r) / 3.0;
}

struct Run {
  bool ok = false;
  std::vector<double> checksums;
};

Run RunOnDevice(Device& dev, size_t n, int iters, bool hinted) {
  Run run;
  const size_t bytes = n * sizeof(double);
  auto alloc = [bytes] {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? nullptr : static_cast<double*>(p);
  };
  double* a = alloc();
  double* b = alloc();
  double* coef = alloc();
  if (!a || !b || !coef) return run;
  Init(a, coef, n);
  std::memset(b, 0, bytes);
  auto stream = dev.CreateStream();
  if (hinted) {
    hmmkit::Status st = dev.Advise(coef, bytes, Advice::kSetPreferredLocation, Location::kDevice);
    if (st.ok()) st = stream->Prefetch(coef, bytes, Location::kDevice).Wait();
    if (!st.ok()) {
      std::fprintf(stderr, "stencil: advise/prefetch: %s\n", st.ToString().c_str());
      return run;
    }
  }
  double* in = a;
  double* out = b;
  for (int it = 0; it < iters; ++it) {
    if (hinted) {
      stream->Prefetch(in, bytes, Location::kDevice);
      stream->Prefetch(out, bytes, Location::kDevice);
    }
    const double* cin = in;
    double* cout = out;
    hmmkit::svm::Fence done = stream->Launch(n, [=](KernelContext& k, size_t i) {
      const double l = i > 0 ? k.Load(&cin[i - 1]) : k.Load(&cin[i]);
      const double r = i + 1 < n ? k.Load(&cin[i + 1]) : k.Load(&cin[i]);
      k.Store(&cout[i], k.Load(&coef[i]) * (l + k.Load(&cin[i]) + r) / 3.0);
    });
    if (hinted) done = stream->Prefetch(out, bytes, Location::kSystem);
    hmmkit::Status st = done.Wait();
    if (st.ok()) st = stream->Synchronize();
    if (!st.ok()) {
      std::fprintf(stderr, "stencil: iteration %d: %s\n", it, st.ToString().c_str());
      return run;
    }
    std::swap(in, out);
    run.checksums.push_back(CpuPhase(in, n, it));
  }
  stream.reset();
  munmap(a, bytes);
  munmap(b, bytes);
  munmap(coef, bytes);
  run.ok = true;
  return run;
}

std::vector<double> Reference(size_t n, int iters) {
  std::vector<double> a(n), b(n), coef(n), sums;
  Init(a.data(), coef.data(), n);
  for (int it = 0; it < iters; ++it) {
    for (size_t i = 0; i < n; ++i) b[i] = Step(a.data(), coef.data(), i, n);
    std::swap(a, b);
    sums.push_back(CpuPhase(a.data(), n, it));
  }
  return sums;
}

}  // namespace

int main(int argc, char** argv) {
  const size_t n = argc > 1 ? std::strtoull(argv[1], nullptr, 0) : size_t(1) << 18;
  const int iters = argc > 2 ? std::atoi(argv[2]) : 6;
  if (n < 2 || iters < 1) {
    std::fprintf(stderr, "usage: stencil [points >= 2] [iterations >= 1]\n");
    return 2;
  }
  auto dev = Device::Open();
  if (!dev.ok()) {
    std::fprintf(stderr, "stencil: cannot open a device: %s\n", dev.status().ToString().c_str());
    return 2;
  }
  const std::vector<double> ref = Reference(n, iters);
  std::printf("stencil: %zu points, %d iterations, CPU and device phases on %s\n", n, iters,
              (*dev)->name().c_str());
  bool all_ok = true;
  for (bool hinted : {false, true}) {
    const auto before = (*dev)->stats();
    Run run = RunOnDevice(**dev, n, iters, hinted);
    const bool ok = run.ok && run.checksums == ref;
    all_ok &= ok;
    std::printf("  %-7s %s\n", hinted ? "hinted" : "plain", ok ? "correct" : "WRONG");
    PrintStats(hinted ? "with prefetch/advise" : "without", (*dev)->stats() - before);
  }
  return all_ok ? 0 : 1;
}
