// The application API: open a device and run kernels on ordinary pointers (malloc, new, mmap,
// stack, globals). No copies: the device faults the pages it touches, and the driver framework
// (driver/svm_manager.hpp) migrates them to device memory or maps them remotely.
//
//   auto dev = hmmkit::svm::Device::Open().value();
//   float* a = static_cast<float*>(malloc(n * sizeof(float)));
//   dev->Launch(n, [&](hmmkit::svm::KernelContext& k, size_t i) {
//     k.Store(&a[i], k.Load(&a[i]) * 2);
//   });
//
// Kernels run on the device's compute units (threads for the emulated device); every Load and
// Store goes through the device MMU: a miss raises a device fault, which the driver services
// (range_fault, migration) before the access is replayed. A kernel touches memory only through its
// KernelContext; a plain dereference would bypass the device.
//
// Thread-safety: a Device may be used from several threads; Launch calls run one after another.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>

#include "hmmkit/base/status.hpp"

namespace hmmkit::svm {

struct DeviceOptions {
  // Backend: "emu" (the emulated device). Empty: $HMMKIT_DEVICE, else "emu".
  std::string backend;
  size_t memory_bytes = size_t(256) << 20;  // device memory; a multiple of 2 MiB
  unsigned compute_units = 4;
  bool migrate_on_fault = true;  // false: device faults map system memory remotely
};

// Counters in the spirit of CUDA's unified-memory profiling.
struct DeviceStats {
  uint64_t device_faults = 0;    // faults raised by compute units (before deduplication)
  uint64_t fault_batches = 0;    // batches the driver serviced
  uint64_t bytes_to_device = 0;  // migrated system -> device
  uint64_t bytes_to_system = 0;  // migrated device -> system (prefetch/evict)
  uint64_t cpu_faults = 0;       // CPU faults the process's monitor served since Open
  uint64_t remote_maps = 0;      // faults served by mapping system memory
  uint64_t thrashing_events = 0;
  uint64_t evictions = 0;  // device-memory chunks evicted under pressure
};

enum class Location { kDevice, kSystem };

class Device;

// What a kernel gets: memory access through the device. T must be trivially copyable, at most 8
// bytes, and naturally aligned (an access never straddles a page).
class KernelContext {
 public:
  template <class T>
  T Load(const T* p) {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8 &&
                  (sizeof(T) & (sizeof(T) - 1)) == 0);
    uint64_t raw = 0;
    Access(reinterpret_cast<uintptr_t>(p), sizeof(T), &raw, /*write=*/false);
    T v;
    std::memcpy(&v, &raw, sizeof(T));
    return v;
  }
  template <class T>
  void Store(T* p, T v) {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8 &&
                  (sizeof(T) & (sizeof(T) - 1)) == 0);
    uint64_t raw = 0;
    std::memcpy(&raw, &v, sizeof(T));
    Access(reinterpret_cast<uintptr_t>(p), sizeof(T), &raw, /*write=*/true);
  }
  unsigned compute_unit() const { return cu_; }

  virtual ~KernelContext() = default;

 protected:
  explicit KernelContext(unsigned cu) : cu_(cu) {}
  // Reads or writes `size` bytes at device address va; on a fault that the driver cannot service,
  // the launch fails with that error (the kernel's remaining work on this compute unit is skipped).
  virtual void Access(uintptr_t va, size_t size, uint64_t* value, bool write) = 0;

 private:
  unsigned cu_;
};

using Kernel = std::function<void(KernelContext& k, size_t index)>;

class Device {
 public:
  // Errors: ENODEV for an unknown backend (the message lists the known ones), ENOTSUP when the
  // kernel lacks userfaultfd (see `hmmctl info`), EINVAL for bad options.
  static Result<std::unique_ptr<Device>> Open(const DeviceOptions& options = {});
  virtual ~Device() = default;

  // Runs kernel(k, i) for every i in [0, n) on the compute units and waits. Errors: the first
  // failed access's error, naming the address and the reason (EFAULT: unmapped; EPERM: write to
  // read-only memory; ENOMEM: device memory exhausted and nothing could be evicted).
  virtual Status Launch(size_t n, const Kernel& kernel) = 0;

  // Moves [p, p + len) to the device (migrating what can migrate and mapping it) or back to system
  // memory, before it is used. Errors: EFAULT for addresses without a mapping.
  virtual Status Prefetch(const void* p, size_t len, Location to) = 0;

  virtual DeviceStats stats() const = 0;
  virtual const std::string& name() const = 0;
};

}  // namespace hmmkit::svm
