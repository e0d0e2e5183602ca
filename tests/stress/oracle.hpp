// The oracle: compares mappings with their shadows, keeps the op history, reports a failure with
// everything needed to replay it.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace stress {

struct Mismatch {
  size_t elem = 0;  // index of the first element that differs
  uint64_t expected = 0;
  uint64_t actual = 0;
};

// The first element of mem[0, n) that differs from shadow, or nothing. Reads through the CPU, so
// device-resident pages are brought back on the way.
std::optional<Mismatch> FindMismatch(const uint64_t* mem, const uint64_t* shadow, size_t n);

// The last operations, for the failure report. Thread-safe.
class History {
 public:
  void Add(std::string line);
  // Never blocks (the watchdog calls it while the workload may hang holding nothing of ours).
  std::vector<std::string> Tail();

 private:
  std::mutex mu_;
  std::deque<std::string> lines_;
};

// What a failure report needs to say how to reproduce it.
struct ReplayInfo {
  uint64_t seed = 0;
  uint64_t ops = 0;
  bool inject = false;
  bool interpose = true;
  size_t device_mib = 8;
};

std::string ReplayCommand(const ReplayInfo& r);
// Prints `what`, the history tail and the replay command; exits with `code` without running
// static destructors (hmmkit's threads may be in any state).
[[noreturn]] void Fail(const ReplayInfo& r, History& h, const std::string& what, int code = 1);

// SIGBUS/SIGSEGV on a mapping (a poisoned page: data hmmkit gave up on) is reported like an oracle
// failure: the address, the history and the replay command. `r` must outlive the run.
void InstallCrashReport(const ReplayInfo* r, History* h);

}  // namespace stress
