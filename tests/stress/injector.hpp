// Seeded fault-injection plans for --inject (hmmkit/base/fault_injection.hpp).
#pragma once

#include <array>
#include <cstdint>

#include "hmmkit/base/fault_injection.hpp"

namespace stress {

// The sites the workload arms: allocation of device and system pages, DMA, and UFFDIO_COPY.
inline constexpr std::array<hmmkit::inject::Site, 4> kInjectedSites = {
    hmmkit::inject::Site::kDeviceAlloc, hmmkit::inject::Site::kSystemAlloc,
    hmmkit::inject::Site::kDmaDescriptor, hmmkit::inject::Site::kUffdCopy};

// Not thread-safe; used by the workload's main thread only.
class Injector {
 public:
  // Arms every site with a plan drawn from `seed` (a few failures each); called again every few
  // operations with a new seed, between steps (no fault is being served then).
  void Arm(uint64_t seed);
  // Disarms for a section whose failure hmmkit documents as data loss (fork's eviction), then
  // arms the same plans again (their counters restart; Fired() keeps the total).
  void Suspend();
  void Resume();
  void Disarm();
  // Failures injected at `site` since the program started.
  uint64_t Fired(hmmkit::inject::Site site) const;
  bool armed() const { return armed_; }
  // Whether an operation may fail with `err` while sites are armed (their errnos).
  static bool Accepted(int err);

 private:
  void CollectFired();
  bool armed_ = false;
  std::array<hmmkit::inject::Plan, kInjectedSites.size()> plans_{};
  std::array<uint64_t, kInjectedSites.size()> fired_{};  // from earlier arming periods
};

}  // namespace stress
