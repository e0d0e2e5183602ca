// One seed's randomized workload: creates the mappings, runs the chosen operations on the
// emulated device and the CPU, checks every byte against the shadow after every step.
//
// Determinism: every choice comes from one std::mt19937_64 seeded with the seed, and no choice
// depends on an outcome (timing, injected failures, addresses): the same seed and --ops give the
// same operation sequence, whose digest (a hash of every draw) --digest prints.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>

#include "hmmkit/svm.hpp"
#include "injector.hpp"
#include "options.hpp"
#include "oracle.hpp"

namespace stress {

enum class Op {
  kCpuThreads,          // CPU threads verify, then write disjoint slices
  kDevRead,             // a kernel compares every Load with the shadow
  kDevWrite,            // a kernel stores values derived from seed and op index
  kPrefetch,            // to the device or to system memory
  kPrefetchConcurrent,  // several threads prefetch at once
  kAdvise,
  kMixed,  // CPU threads, a device launch and a stream prefetch at the same time, disjoint data
  kRemap,  // munmap + mmap(MAP_FIXED_NOREPLACE) at the same address
  kMremap,
  kDontNeed,
  kProtect,   // read-only (a device store must fail with EPERM) or back to read-write
  kFork,      // the child checks its view of every mapping
  kDevSweep,  // one launch over both private mappings: more than the device memory holds
  kCount
};
const char* OpName(Op op);
constexpr size_t kOpCount = static_cast<size_t>(Op::kCount);

struct Totals {
  std::array<uint64_t, kOpCount> ops{};
  uint64_t bytes_checked = 0;
  uint64_t accepted_errors = 0;  // operations failed with an injected errno
  uint64_t expected_eperm = 0;   // device stores refused on read-only memory
  uint64_t seeds_complete = 0;
  uint64_t seeds_partial = 0;  // cut short by the time budget
};

// What every seed shares. The watchdog reads `step_start_ns` (0: no step running).
struct Env {
  const Options& options;
  hmmkit::svm::Device& device;
  Injector& injector;
  History& history;
  std::string tmpdir;
  std::atomic<int64_t>& step_start_ns;
};

// Runs up to options.ops operations of `seed`, stopping early at `deadline`. Returns the digest of
// the chosen sequence. Exits the process (via Fail) on any oracle failure.
uint64_t RunSeed(Env& env, uint64_t seed, std::chrono::steady_clock::time_point deadline,
                 Totals& totals);

}  // namespace stress
