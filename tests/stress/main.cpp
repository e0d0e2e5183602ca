// hmmkit_stress: seeded, randomized workloads on the emulated device over anonymous, THP, shared,
// memfd and file mappings, each checked byte for byte against a shadow copy after every step.
// Usage and the shadow model: tests/stress/README.md.
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>

#include "hmmkit/svm.hpp"
#include "injector.hpp"
#include "options.hpp"
#include "oracle.hpp"
#include "thread_dump.hpp"
#include "workload.hpp"

namespace {

using Clock = std::chrono::steady_clock;

// Reports a step that runs longer than the limit as a hang (with the replay line) and exits 3.
class Watchdog {
 public:
  Watchdog(double limit_s, stress::History& h, std::atomic<int64_t>& step_start,
           std::atomic<uint64_t>& seed, const stress::Options& o)
      : thread_([=, this, &h, &step_start, &seed, &o] {
          std::unique_lock<std::mutex> lock(mu_);
          while (!cv_.wait_for(lock, std::chrono::seconds(1), [this] { return stop_; })) {
            const int64_t start = step_start.load();
            if (start == 0) continue;
            const double ran = std::chrono::duration<double>(Clock::now().time_since_epoch() -
                                                             Clock::duration(start))
                                   .count();
            if (ran < limit_s) continue;
            stress::ReplayInfo r{seed.load(), o.ops, o.inject, o.interpose, o.device_mib};
            stress::DumpThreads();  // before the summary, which ends with the replay line
            stress::Fail(r, h, "a step ran for " + std::to_string(int(ran)) + " s: a hang", 3);
          }
        }) {}
  ~Watchdog() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;  // last: starts after the members it uses
};

}  // namespace

int main(int argc, char** argv) {
  stress::Options o = stress::ParseOptions(argc, argv);
  stress::AllowThreadDump();
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // --verbose lines survive a crash
  // mprotect is seen only through interposition (docs/architecture.md); the library is linked in.
  if (o.interpose) ::setenv("HMMKIT_INTERPOSE", "1", 0);
  const char* tmp = std::getenv("TMPDIR");
  const std::string tmpdir = tmp && *tmp ? tmp : "/tmp";

  hmmkit::svm::DeviceOptions dopt;
  dopt.memory_bytes = o.device_mib << 20;
  auto dev = hmmkit::svm::Device::Open(dopt);
  if (!dev.ok() && o.interpose && dev.status().errno_value() == ENOTSUP) {
    // TSan intercepts munmap itself, so the interposer cannot: run without mprotect ops.
    std::printf("hmmkit_stress: no interposition (%s): mprotect is left out\n",
                dev.status().ToString().c_str());
    ::setenv("HMMKIT_INTERPOSE", "0", 1);
    o.interpose = false;
    dev = hmmkit::svm::Device::Open(dopt);
  }
  if (!dev.ok()) {
    std::fprintf(stderr, "hmmkit_stress: cannot open a device: %s\n",
                 dev.status().ToString().c_str());
    return 2;
  }
  const uint64_t first_seed = o.has_seed ? o.seed : o.base_seed;
  std::printf("hmmkit_stress: %s %" PRIu64 ", %" PRIu64
              " ops per seed, %s%zu MiB device memory%s\n",
              o.has_seed ? "seed" : "base seed", first_seed, o.ops,
              o.seconds > 0 ? ("budget " + std::to_string(int(o.seconds)) + " s, ").c_str() : "",
              o.device_mib, o.inject ? ", fault injection on" : "");
  std::fflush(stdout);

  stress::History history;
  stress::Injector injector;
  std::atomic<int64_t> step_start{0};
  std::atomic<uint64_t> current_seed{first_seed};
  stress::Totals totals;
  stress::Env env{o, **dev, injector, history, tmpdir, step_start};
  const auto t0 = Clock::now();
  const auto deadline = o.seconds > 0 ? t0 + std::chrono::duration_cast<Clock::duration>(
                                                 std::chrono::duration<double>(o.seconds))
                                      : Clock::time_point::max();
  {
    Watchdog watchdog(o.step_timeout, history, step_start, current_seed, o);
    for (uint64_t i = 0; o.seeds == 0 || i < o.seeds; ++i) {
      if (Clock::now() >= deadline) break;
      const uint64_t seed = first_seed + i;
      current_seed.store(seed);
      const auto s0 = Clock::now();
      const uint64_t digest = stress::RunSeed(env, seed, deadline, totals);
      const double secs = std::chrono::duration<double>(Clock::now() - s0).count();
      if (o.digest || o.verbose || o.seconds > 0)
        std::printf("seed %" PRIu64 ": %.1f s, digest: %016" PRIx64 "\n", seed, secs, digest);
      std::fflush(stdout);
    }
  }
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();

  uint64_t ops = 0;
  for (uint64_t n : totals.ops) ops += n;
  std::printf("summary: seeds %" PRIu64 " (%" PRIu64 " complete, %" PRIu64
              " cut by the budget), %" PRIu64 " ops in %.1f s (%.1f ops/s)\n",
              totals.seeds_complete + totals.seeds_partial, totals.seeds_complete,
              totals.seeds_partial, ops, secs, secs > 0 ? double(ops) / secs : 0.0);
  std::printf("  ops:");
  for (size_t k = 0; k < stress::kOpCount; ++k)
    std::printf(" %s=%" PRIu64, stress::OpName(stress::Op(k)), totals.ops[k]);
  std::printf("\n  bytes checked: %" PRIu64 " (%.2f GiB)\n", totals.bytes_checked,
              double(totals.bytes_checked) / double(1ull << 30));
  std::printf("  device stores refused on read-only memory (EPERM): %" PRIu64
              "; operations failed with an injected errno: %" PRIu64 "\n",
              totals.expected_eperm, totals.accepted_errors);
  std::printf("  injected failures:");
  for (hmmkit::inject::Site s : stress::kInjectedSites)
    std::printf(" %s=%" PRIu64, hmmkit::inject::Name(s), injector.Fired(s));
  const auto st = (*dev)->stats();
  std::printf("\n  device: faults=%" PRIu64 " to_device=%" PRIu64 " MiB to_system=%" PRIu64
              " MiB cpu_faults=%" PRIu64 " remote_maps=%" PRIu64 " evictions=%" PRIu64
              " thrashing=%" PRIu64 "\n",
              st.device_faults, st.bytes_to_device >> 20, st.bytes_to_system >> 20, st.cpu_faults,
              st.remote_maps, st.evictions, st.thrashing_events);
  std::printf("hmmkit_stress: PASSED\n");
  std::fflush(stdout);
  return 0;
}
