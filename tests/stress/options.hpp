// Command line of hmmkit_stress.
#pragma once

#include <cstdint>
#include <string>

namespace stress {

struct Options {
  bool has_seed = false;  // --seed: replay exactly this seed
  uint64_t seed = 0;
  uint64_t base_seed = 0;     // --base-seed (default: from the clock)
  uint64_t seeds = 0;         // --seeds: 0 = until the time budget is spent
  double seconds = 0;         // --seconds / --minutes: 0 = no budget (then --seeds, default 1)
  uint64_t ops = 200;         // --ops: operations per seed
  bool inject = false;        // --inject
  bool verbose = false;       // --verbose
  bool digest = false;        // --digest: print each seed's op-sequence digest
  bool interpose = true;      // --no-interpose: no mprotect ops (userfaultfd cannot see them)
  size_t device_mib = 8;      // --device-mib
  double step_timeout = 120;  // --step-timeout: a step that takes longer is reported as a hang
  int64_t corrupt_at = -1;    // --corrupt-at N: flip a bit behind the oracle's back after op N
                              // (proves the oracle catches it; the run must fail)
  int64_t hang_at = -1;       // --hang-at N: block forever after op N (proves the watchdog reports
                              // a hang with every thread's state; the run must fail)
};

// Parses argv; prints usage and exits 2 on an error.
Options ParseOptions(int argc, char** argv);

}  // namespace stress
