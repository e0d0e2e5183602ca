// Prints a device's SVM counters (shared by the samples).
#pragma once

#include <cinttypes>
#include <cstdio>

#include "hmmkit/svm.hpp"

inline void PrintStats(const char* what, const hmmkit::svm::DeviceStats& s) {
  std::printf("  %-22s device faults %6" PRIu64 " (%" PRIu64 " batches)  to device %8" PRIu64
              " KiB  to system %8" PRIu64 " KiB  CPU faults %6" PRIu64 "  remote maps %5" PRIu64
              "  prefetched pages %6" PRIu64 "  promotions %3" PRIu64 "  thrashing %3" PRIu64
              "  evictions %4" PRIu64 "\n",
              what, s.device_faults, s.fault_batches, s.bytes_to_device >> 10,
              s.bytes_to_system >> 10, s.cpu_faults, s.remote_maps, s.pages_prefetched,
              s.counter_promotions, s.thrashing_events, s.evictions);
}

// The difference of two snapshots (what one phase did).
inline hmmkit::svm::DeviceStats operator-(const hmmkit::svm::DeviceStats& a,
                                          const hmmkit::svm::DeviceStats& b) {
  hmmkit::svm::DeviceStats d;
  d.device_faults = a.device_faults - b.device_faults;
  d.fault_batches = a.fault_batches - b.fault_batches;
  d.bytes_to_device = a.bytes_to_device - b.bytes_to_device;
  d.bytes_to_system = a.bytes_to_system - b.bytes_to_system;
  d.cpu_faults = a.cpu_faults - b.cpu_faults;
  d.remote_maps = a.remote_maps - b.remote_maps;
  d.thrashing_events = a.thrashing_events - b.thrashing_events;
  d.evictions = a.evictions - b.evictions;
  d.pages_prefetched = a.pages_prefetched - b.pages_prefetched;
  d.counter_promotions = a.counter_promotions - b.counter_promotions;
  d.atomics = a.atomics - b.atomics;
  return d;
}
