/// @file
/// Fault injection: named sites in hmmkit's failure paths that a test (or HMMKIT_INJECT) can make
/// fail on purpose, so that every error path is exercised against the real kernel and the data
/// oracle can check that nothing was lost.
///
/// Sites are checked with inject::Check(site) at the one place each failure can really happen. A
/// site that fires behaves exactly as if the kernel or the allocator had returned the errno: the
/// caller's normal error handling runs (roll back, retry, report).
///
/// Cost when nothing is armed: one relaxed atomic load per check. All functions are thread-safe and
/// may be called from any context (application threads, the monitor's threads, DMA workers).
///
/// Environment: HMMKIT_INJECT="site[:key=value...][,site...]" arms sites at start-up, e.g.
///   HMMKIT_INJECT="device_alloc:every=5:errno=ENOMEM,uffd_copy:skip=100:count=3:errno=EAGAIN"
/// keys: skip (hits let through first, default 0), every (fail every n-th hit after skip, default
/// 1), count (failures in all, default unlimited), errno (a name or a number, default the site's
/// own). A malformed spec aborts at start-up with a message: a test that thinks it injects and does
/// not would prove nothing.
#pragma once

#include <atomic>
#include <cstdint>
#include <string_view>

#include "hmmkit/base/status.hpp"

namespace hmmkit::inject {

enum class Site : uint8_t {
  kDeviceAlloc,    ///< DeviceMemory hands out a device page (default ENOMEM)
  kSystemAlloc,    ///< system pages (staging) allocated when migrating back to RAM (default ENOMEM)
  kDmaDescriptor,  ///< one DMA descriptor completes with an error (default EIO)
  kUffdCopy,       ///< UFFDIO_COPY returns an error (default EAGAIN: the mm changed under us)
  kUffdMove,       ///< UFFDIO_MOVE returns an error (default EAGAIN)
  kUffdRegister,   ///< UFFDIO_REGISTER fails (default ENOMEM)
  kMonitorRead,    ///< the monitor's read() of the userfaultfd fails (default EIO)
  kCount
};

struct Plan {
  uint32_t skip = 0;            ///< hits that pass before the first failure
  uint32_t every = 1;           ///< after skip, every n-th hit fails (1: all of them)
  uint32_t count = UINT32_MAX;  ///< failures in all; then the site passes again
  int error = 0;                ///< errno to fail with; 0 means the site's default
};

/// Arms `site` with `plan` (replacing any earlier plan) and resets its counters. Logs a warning.
void Arm(Site site, const Plan& plan);
void Disarm(Site site);
void DisarmAll();

/// Called at a site. Returns 0 to go on, or the positive errno the caller must fail with.
int CheckSlow(Site site);
extern std::atomic<uint32_t> g_armed_mask;
inline int Check(Site site) {
  if ((g_armed_mask.load(std::memory_order_relaxed) & (1u << static_cast<unsigned>(site))) == 0)
    return 0;
  return CheckSlow(site);
}

/// How many times the site was checked / fired since it was last armed.
uint64_t Hits(Site site);
uint64_t Fired(Site site);

/// "device_alloc", "uffd_copy", ...; nullptr for kCount.
const char* Name(Site site);
/// Arms sites from a spec in the HMMKIT_INJECT syntax. EINVAL names the bad part.
Status ArmFromSpec(std::string_view spec);

/// Arms a site for one scope (tests).
class ScopedPlan {
 public:
  ScopedPlan(Site site, const Plan& plan) : site_(site) { Arm(site, plan); }
  ~ScopedPlan() { Disarm(site_); }
  ScopedPlan(const ScopedPlan&) = delete;
  ScopedPlan& operator=(const ScopedPlan&) = delete;

 private:
  Site site_;
};

}  // namespace hmmkit::inject
