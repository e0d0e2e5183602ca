#include "oracle.hpp"

#include <signal.h>
#include <unistd.h>

#include <cinttypes>
#include <cstdio>
#include <cstring>

namespace stress {

std::optional<Mismatch> FindMismatch(const uint64_t* mem, const uint64_t* shadow, size_t n) {
  // memcmp per 64 KiB block first (fast), then the element inside the block.
  constexpr size_t kBlock = 8192;
  for (size_t b = 0; b < n; b += kBlock) {
    const size_t len = std::min(kBlock, n - b);
    if (std::memcmp(mem + b, shadow + b, len * sizeof(uint64_t)) == 0) continue;
    for (size_t i = b; i < b + len; ++i) {
      const uint64_t v = mem[i];
      if (v != shadow[i]) return Mismatch{i, shadow[i], v};
    }
  }
  return std::nullopt;
}

void History::Add(std::string line) {
  std::lock_guard<std::mutex> lock(mu_);
  lines_.push_back(std::move(line));
  if (lines_.size() > 24) lines_.pop_front();
}

std::vector<std::string> History::Tail() {
  std::unique_lock<std::mutex> lock(mu_, std::try_to_lock);
  if (!lock.owns_lock()) return {"(history busy)"};
  return {lines_.begin(), lines_.end()};
}

std::string ReplayCommand(const ReplayInfo& r) {
  char buf[256];
  std::snprintf(buf, sizeof buf, "hmmkit_stress --seed %" PRIu64 " --ops %" PRIu64 "%s%s", r.seed,
                r.ops, r.inject ? " --inject" : "", r.interpose ? "" : " --no-interpose");
  std::string s = buf;
  if (r.device_mib != 8) s += " --device-mib " + std::to_string(r.device_mib);
  return s;
}

void Fail(const ReplayInfo& r, History& h, const std::string& what, int code) {
  std::fflush(stdout);
  std::fprintf(stderr, "\nhmmkit_stress: FAILED (seed %" PRIu64 "): %s\nlast operations:\n", r.seed,
               what.c_str());
  for (const std::string& line : h.Tail()) std::fprintf(stderr, "  %s\n", line.c_str());
  std::fprintf(stderr, "replay: %s\n", ReplayCommand(r).c_str());
  std::fflush(stderr);
  ::_exit(code);
}

namespace {
std::atomic<const ReplayInfo*> g_replay{nullptr};
std::atomic<History*> g_history{nullptr};

void OnCrash(int sig, siginfo_t* info, void*) {
  // Not async-signal-safe (it formats and may allocate), but the process is lost anyway and the
  // replay line is what matters.
  const ReplayInfo* r = g_replay.load();
  History* h = g_history.load();
  if (!r || !h) {
    ::signal(sig, SIG_DFL);
    ::raise(sig);
    return;
  }
  char buf[128];
  std::snprintf(buf, sizeof buf, "%s at %p (a poisoned page is data hmmkit gave up on)",
                sig == SIGBUS ? "SIGBUS" : "SIGSEGV", info->si_addr);
  Fail(*r, *h, buf, 1);
}
}  // namespace

void InstallCrashReport(const ReplayInfo* r, History* h) {
  g_replay.store(r);
  g_history.store(h);
  struct sigaction sa = {};
  sa.sa_sigaction = OnCrash;
  sa.sa_flags = SA_SIGINFO | SA_RESETHAND;
  sigemptyset(&sa.sa_mask);
  ::sigaction(SIGBUS, &sa, nullptr);
  ::sigaction(SIGSEGV, &sa, nullptr);
}

}  // namespace stress
