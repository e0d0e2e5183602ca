#include "injector.hpp"

#include <cerrno>
#include <random>

namespace stress {

namespace inj = hmmkit::inject;

void Injector::Arm(uint64_t seed) {
  Disarm();
  std::mt19937_64 rng(seed ^ 0x1f3c5a7e9b2d4c6eULL);  // its own stream: the op digest ignores it
  for (size_t i = 0; i < kInjectedSites.size(); ++i) {
    inj::Plan p;
    p.skip = uint32_t(rng() % 64);
    p.every = 1 + uint32_t(rng() % 8);
    // system_alloc, dma_descriptor and uffd_copy all fail a CPU fault's migration back, which
    // hmmkit retries kFaultBackAttempts (8) times before it poisons the page (SIGBUS, documented
    // in device_entries.cpp). At most 2 failures each per arming keep one fault below that.
    p.count = kInjectedSites[i] == inj::Site::kDeviceAlloc ? 1 + uint32_t(rng() % 32)
                                                           : 1 + uint32_t(rng() % 2);
    plans_[i] = p;
    inj::Arm(kInjectedSites[i], p);
  }
  armed_ = true;
}

void Injector::CollectFired() {
  for (size_t i = 0; i < kInjectedSites.size(); ++i) fired_[i] += inj::Fired(kInjectedSites[i]);
}

void Injector::Suspend() {
  if (!armed_) return;
  CollectFired();
  for (inj::Site s : kInjectedSites) inj::Disarm(s);
}

void Injector::Resume() {
  if (!armed_) return;
  for (size_t i = 0; i < kInjectedSites.size(); ++i) inj::Arm(kInjectedSites[i], plans_[i]);
}

void Injector::Disarm() {
  if (!armed_) return;
  CollectFired();
  for (inj::Site s : kInjectedSites) inj::Disarm(s);
  armed_ = false;
}

uint64_t Injector::Fired(inj::Site site) const {
  for (size_t i = 0; i < kInjectedSites.size(); ++i)
    if (kInjectedSites[i] == site) return fired_[i] + (armed_ ? inj::Fired(site) : 0);
  return 0;
}

bool Injector::Accepted(int err) {
  return err == ENOMEM || err == EIO || err == EAGAIN;
}

}  // namespace stress
