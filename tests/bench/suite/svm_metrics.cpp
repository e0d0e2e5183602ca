// Application metrics: the emulated SVM device running vector_add with a warm TLB (the arrays
// already migrated and mapped by a first launch) vs the same loop on one CPU thread; and the cost
// of tracing (hmmkit/base/trace.hpp) on a fault- and migration-heavy workload, on vs off.
#include <unistd.h>

#include <cstdlib>
#include <memory>

#include "bench_suite.hpp"
#include "bench_util.hpp"
#include "hmmkit/base/trace.hpp"
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
  // Access counters off: their promotions run asynchronously after a launch and would migrate
  // in the middle of the timed launches (the point is a warm, settled mapping).
  svm::DeviceOptions options;
  options.access_counter_threshold = 0;
  auto dev_or = svm::Device::Open(options);
  if (!dev_or.ok()) return dev_or.status();
  svm::Device& dev = **dev_or;
  // The device's arrays, and a copy for the CPU loop: sharing them would fault them back to the
  // CPU every round and time migration instead of a warm TLB. Each array fills whole aligned
  // 2 MiB chunks, so no device range (a 2 MiB chunk) holds part of a CPU array.
  const size_t bytes = (n * sizeof(float) + (size_t(2) << 20) - 1) & ~((size_t(2) << 20) - 1);
  Mapping ma(bytes, size_t(2) << 20), mb(bytes, size_t(2) << 20), mc(bytes, size_t(2) << 20);
  Mapping mha(bytes, size_t(2) << 20), mhb(bytes, size_t(2) << 20), mhc(bytes, size_t(2) << 20);
  if (!ma.ok() || !mb.ok() || !mc.ok() || !mha.ok() || !mhb.ok() || !mhc.ok())
    return Status::FromErrno(ENOMEM, "mmap");
  auto f = [](const Mapping& m) { return reinterpret_cast<float*>(m.data()); };
  for (size_t i = 0; i < n; ++i) {
    f(ma)[i] = f(mha)[i] = float(i);
    f(mb)[i] = f(mhb)[i] = float(2 * i);
    f(mc)[i] = f(mhc)[i] = 0;
  }
  float *pa = f(ma), *pb = f(mb), *pc = f(mc);
  const svm::Kernel kernel = [=](svm::KernelContext& k, size_t i) {
    k.Store(&pc[i], k.Load(&pa[i]) + k.Load(&pb[i]));
  };
  // Warm up until a launch neither faults nor migrates: the first migrates the arrays; the next
  // may still promote remotely mapped edges through the access counters.
  svm::DeviceStats warm = dev.stats();
  int warmups = 0;
  for (;;) {
    ctx.step("warm-up launch " + std::to_string(warmups + 1));
    HMMKIT_RETURN_IF_ERROR(dev.Launch(n, kernel));
    ++warmups;
    const svm::DeviceStats now = dev.stats();
    const bool settled =
        now.device_faults == warm.device_faults && now.bytes_to_device == warm.bytes_to_device;
    warm = now;
    if (settled) break;
    if (warmups == 8) return BenchError("vector_add kept faulting or migrating after 8 launches");
  }
  std::vector<double> t_dev, t_cpu;
  for (int r = 0; r < rounds; ++r) {
    ctx.step("round " + std::to_string(r + 1));
    auto t0 = Clock::now();
    HMMKIT_RETURN_IF_ERROR(dev.Launch(n, kernel));
    t_dev.push_back(SecondsSince(t0));
    t0 = Clock::now();
    CpuVectorAdd(f(mha), f(mhb), f(mhc), n);
    t_cpu.push_back(SecondsSince(t0));
  }
  const svm::DeviceStats timed = dev.stats();
  if (timed.device_faults != warm.device_faults || timed.bytes_to_device != warm.bytes_to_device)
    return BenchError("the timed launches faulted or migrated (" +
                      std::to_string(timed.device_faults - warm.device_faults) + " faults, " +
                      std::to_string(timed.bytes_to_device - warm.bytes_to_device) +
                      " bytes to the device): the mappings were not warm");
  // Checks both results (this also faults the device's arrays back).
  for (size_t i = 0; i < n; ++i)
    if (pc[i] != float(3 * i) || f(mhc)[i] != float(3 * i))
      return BenchError("vector_add: wrong c[" + std::to_string(i) + "]");
  const svm::DeviceStats s = dev.stats();
  Metric m = RateMetric("svm.vector_add_warm", "emulated device vector_add, warm TLB", "elements/s",
                        double(n) / Median(t_dev), "the same loop on one CPU thread",
                        double(n) / Median(t_cpu), 0.25);
  m.detail = std::to_string(n) + " floats, device with " + std::to_string(options.compute_units) +
             " compute units and access counters off, median of " + std::to_string(rounds) +
             " after " + std::to_string(warmups) + " warm-up launches; " +
             std::to_string(s.device_faults) + " device faults, " +
             std::to_string(s.bytes_to_device >> 20) + " MiB to device in all";
  return std::vector<Metric>{std::move(m)};
}

// One round of the ping-pong workload: the CPU checks and rewrites one word per page, pages in a
// scattered order (faulting back what is on the device), then a kernel increments that word on the
// device (device faults, migrations to the device). Returns an error when a word is not what the
// last round left.
Status PingPongRound(svm::Device& dev, uint64_t* words, size_t pages, size_t stride,
                     uint64_t round) {
  // A scattered order (a stride prime to the page count): no sequential stream for the fault-back
  // window to grow on, so the CPU takes many small fault-backs.
  for (size_t i = 0; i < pages; ++i) {
    const size_t p = (i * 97) % pages;
    if (round > 0 && words[p * stride] != (round - 1) * 1000000 + p + 1)
      return BenchError("trace overhead: page " + std::to_string(p) + " lost the device's write");
    words[p * stride] = round * 1000000 + p;
  }
  return dev.Launch(pages, [=](svm::KernelContext& k, size_t i) {
    k.Store(&words[i * stride], k.Load(&words[i * stride]) + 1);
  });
}

// Single-thread cost of a record site, in ns per call, with tracing as it is now.
[[gnu::noinline]] double RecordSiteNs(size_t calls) {
  trace::Event e;
  e.name = trace::Name::kMapRemote;
  e.track = trace::kCpuFaultTrack;
  const auto t0 = Clock::now();
  for (size_t i = 0; i < calls; ++i) {
    e.a[0] = i;
    trace::Record(e);
  }
  return SecondsSince(t0) * 1e9 / double(calls);
}

Result<std::vector<Metric>> TraceOverheadMetrics(BenchContext& ctx) {
  if (trace::Enabled())
    return BenchError("tracing is on (HMMKIT_TRACE?): the overhead metric compares on with off");
  const size_t pages = ctx.quick ? 1024 : 4096;
  const int rounds = ctx.quick ? 4 : 8;  // of each kind, alternating
  const size_t page = size_t(::sysconf(_SC_PAGESIZE)), stride = page / sizeof(uint64_t);
  svm::DeviceOptions options;
  options.access_counter_threshold = 0;  // no asynchronous promotions between the rounds
  auto dev_or = svm::Device::Open(options);
  if (!dev_or.ok()) return dev_or.status();
  svm::Device& dev = **dev_or;
  Mapping buf(pages * page, size_t(2) << 20);
  if (!buf.ok()) return Status::FromErrno(ENOMEM, "mmap");
  auto* words = reinterpret_cast<uint64_t*>(buf.data());
  uint64_t round = 0;
  for (int w = 0; w < 2; ++w)  // warm-up: first touch, then the steady back-and-forth
    HMMKIT_RETURN_IF_ERROR(PingPongRound(dev, words, pages, stride, round++));
  std::vector<double> t_off, t_on;
  uint64_t events = 0, dropped = 0;
  double traced_seconds = 0;
  for (int r = 0; r < 2 * rounds; ++r) {
    // off, on, on, off, off, on, ...: neither kind always runs first.
    const bool on = (r % 4 == 1) || (r % 4 == 2);
    ctx.step("round " + std::to_string(r + 1) + (on ? " on" : " off"));
    if (on) HMMKIT_RETURN_IF_ERROR(trace::Enable({.capacity = size_t(1) << 20}));
    const auto t0 = Clock::now();
    Status st = PingPongRound(dev, words, pages, stride, round++);
    const double t = SecondsSince(t0);
    if (on) {
      trace::Disable();
      t_on.push_back(t);
      traced_seconds += t;
      events += trace::Stats().events;
      dropped += trace::Stats().dropped;
    } else {
      t_off.push_back(t);
    }
    HMMKIT_RETURN_IF_ERROR(st);
  }
  if (events == 0) return BenchError("trace overhead: the traced rounds recorded nothing");
  // The site itself: a disabled check, and a record into the ring from one thread.
  const size_t calls = ctx.quick ? 1000000 : 4000000;
  const double off_ns = RecordSiteNs(calls);
  HMMKIT_RETURN_IF_ERROR(trace::Enable({.capacity = calls}));
  const double on_ns = RecordSiteNs(calls);
  trace::Disable();
  trace::Clear();

  const double off = Median(t_off), on = Median(t_on);
  Metric m = CostMetric("trace.overhead", "fault/migration ping-pong, tracing on vs off", "s/round",
                        on, "the same rounds with tracing off", off, std::nullopt);
  char line[512];
  std::snprintf(line, sizeof(line),
                "%zu pages, medians of %d alternating rounds; time on/off %.3f; %.0f events/s "
                "recorded (%llu events, %llu dropped); a record site costs %.1f ns off, %.1f ns "
                "on (one thread)",
                pages, rounds, on / off, double(events) / traced_seconds,
                static_cast<unsigned long long>(events), static_cast<unsigned long long>(dropped),
                off_ns, on_ns);
  m.detail = line;
  return std::vector<Metric>{std::move(m)};
}

}  // namespace

extern const BenchSpec kTraceOverheadBench = {
    "trace", "tracing on vs off on a fault- and migration-heavy svm workload",
    TraceOverheadMetrics};

extern const BenchSpec kVectorAddBench = {
    "svm", "emulated device vector_add with a warm TLB vs the same loop on the CPU",
    VectorAddMetrics};

}  // namespace hmmkit::bench
