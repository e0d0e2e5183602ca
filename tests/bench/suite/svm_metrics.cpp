// Application metric: the emulated SVM device running vector_add with a warm TLB (the arrays
// already migrated and mapped by a first launch) vs the same loop on one CPU thread.
#include <cstdlib>
#include <memory>

#include "bench_suite.hpp"
#include "bench_util.hpp"
#include "hmmkit/svm.hpp"

namespace hmmkit::bench {
namespace {

// Kept out of line so the compiler cannot fold the baseline loop into the checks.
[[gnu::noinline]] void CpuVectorAdd(const float* a, const float* b, float* c, size_t n) {
  for (size_t i = 0; i < n; ++i) c[i] = a[i] + b[i];
}

Result<std::vector<Metric>> VectorAddMetrics(BenchContext& ctx) {
  const size_t n = size_t(1) << (ctx.quick ? 20 : 22);
  const int rounds = ctx.quick ? 3 : 5;
  auto dev_or = svm::Device::Open();
  if (!dev_or.ok()) return dev_or.status();
  svm::Device& dev = **dev_or;
  auto alloc = [n] { return static_cast<float*>(std::aligned_alloc(64, n * sizeof(float))); };
  std::unique_ptr<float, decltype(&std::free)> a(alloc(), std::free), b(alloc(), std::free),
      c(alloc(), std::free);
  if (!a || !b || !c) return Status::FromErrno(ENOMEM, "aligned_alloc");
  for (size_t i = 0; i < n; ++i) {
    a.get()[i] = float(i);
    b.get()[i] = float(2 * i);
    c.get()[i] = 0;
  }
  float *pa = a.get(), *pb = b.get(), *pc = c.get();
  const svm::Kernel kernel = [=](svm::KernelContext& k, size_t i) {
    k.Store(&pc[i], k.Load(&pa[i]) + k.Load(&pb[i]));
  };
  ctx.step("warm-up launch");
  HMMKIT_RETURN_IF_ERROR(dev.Launch(n, kernel));
  std::vector<double> t_dev, t_cpu;
  for (int r = 0; r < rounds; ++r) {
    ctx.step("round " + std::to_string(r + 1));
    auto t0 = Clock::now();
    HMMKIT_RETURN_IF_ERROR(dev.Launch(n, kernel));
    t_dev.push_back(SecondsSince(t0));
    t0 = Clock::now();
    CpuVectorAdd(pa, pb, pc, n);
    t_cpu.push_back(SecondsSince(t0));
  }
  // The CPU loop wrote the same values; check them (this also faults back what is on the device).
  for (size_t i = 0; i < n; ++i)
    if (pc[i] != float(3 * i)) return BenchError("vector_add: wrong c[" + std::to_string(i) + "]");
  const svm::DeviceStats s = dev.stats();
  Metric m = RateMetric("svm.vector_add_warm", "emulated device vector_add, warm TLB", "elements/s",
                        double(n) / Median(t_dev), "the same loop on one CPU thread",
                        double(n) / Median(t_cpu), 0.25);
  m.detail = std::to_string(n) + " floats, default device (" +
             std::to_string(svm::DeviceOptions{}.compute_units) + " compute units), median of " +
             std::to_string(rounds) + "; " + std::to_string(s.device_faults) + " device faults, " +
             std::to_string(s.bytes_to_device >> 20) + " MiB to device in all";
  return std::vector<Metric>{std::move(m)};
}

}  // namespace

extern const BenchSpec kVectorAddBench = {
    "svm", "emulated device vector_add with a warm TLB vs the same loop on the CPU",
    VectorAddMetrics};

}  // namespace hmmkit::bench
