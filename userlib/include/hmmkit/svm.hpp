/// @file
/// The application API: open a device and run kernels on ordinary pointers (malloc, new, mmap,
/// stack, globals). No copies: the device faults the pages it touches, and the driver framework
/// (driver/svm_manager.hpp) migrates them to device memory or maps them remotely.
///
///   auto dev = hmmkit::svm::Device::Open().value();
///   float* a = static_cast<float*>(malloc(n * sizeof(float)));
///   dev->Launch(n, [&](hmmkit::svm::KernelContext& k, size_t i) {
///     k.Store(&a[i], k.Load(&a[i]) * 2);
///   });
///
/// Kernels run on the device's compute units (threads for the emulated device); every Load and
/// Store goes through the device MMU: a miss raises a device fault, which the driver services
/// (range_fault, migration) before the access is replayed. A kernel touches memory only through its
/// KernelContext; a plain dereference would bypass the device.
///
/// Asynchronous work goes through a Stream: its operations run in order on a stream thread and each
/// returns a Fence. Advice (Advise) steers where pages go; QueryResidency says where they are.
///
/// Thread-safety: a Device may be used from several threads; Launch calls run one after another.
/// A Stream must be destroyed before its Device.
#pragma once

#include <chrono>
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
  /// Backend: "emu" (the emulated device). Empty: $HMMKIT_DEVICE, else "emu".
  std::string backend;
  size_t memory_bytes = size_t(256) << 20;  ///< device memory; a multiple of 2 MiB
  /// Where device memory lives: "memfd" (an anonymous arena), "drm" (a GEM object on the first DRM
  /// device with dumb buffers, e.g. vgem) or "drm:/dev/dri/cardN". Empty: $HMMKIT_DEVICE_MEMORY,
  /// else "memfd". An unavailable "drm" fails Open (ENODEV, EACCES, ENOTSUP), never falls back.
  std::string memory;
  unsigned compute_units = 4;
  bool migrate_on_fault = true;  ///< false: device faults map system memory remotely
  /// Access counters: a remotely mapped 64 KiB region that the device accessed this many times is
  /// reported to the driver, which may migrate it (promotion). 0 turns them off.
  unsigned access_counter_threshold = 256;
  /// Threshold prefetcher: once this fraction of a 2 MiB region is on the device, a fault there
  /// migrates the rest. 0 turns it off.
  double prefetch_threshold = 0.5;
};

/// Counters in the spirit of CUDA's unified-memory profiling.
struct DeviceStats {
  uint64_t device_faults = 0;    ///< faults raised by compute units (before deduplication)
  uint64_t fault_batches = 0;    ///< batches the driver serviced
  uint64_t bytes_to_device = 0;  ///< migrated system -> device
  uint64_t bytes_to_system = 0;  ///< device -> system: prefetch, eviction, CPU fault-back
  uint64_t cpu_faults = 0;       ///< CPU faults the process's monitor served since Open
  uint64_t remote_maps = 0;      ///< faults served by mapping system memory
  uint64_t thrashing_events = 0;
  uint64_t evictions = 0;           ///< device-memory chunks evicted under pressure
  uint64_t pages_prefetched = 0;    ///< by the threshold prefetcher (also in bytes_to_device)
  uint64_t counter_promotions = 0;  ///< hot remote ranges migrated after access-counter reports
  uint64_t atomics = 0;             ///< atomic operations executed by compute units
};

enum class Location { kDevice, kSystem };

/// Where the pages of a range are now.
enum class Residency { kUnpopulated, kSystem, kDevice, kMixed };
const char* ToString(Residency r);

/// cudaMemAdvise-style hints for a range; each Set has its Unset.
enum class Advice {
  /// With a Location: device faults migrate (kDevice) or map remotely (kSystem; only an explicit
  /// Prefetch moves the pages then).
  kSetPreferredLocation,
  kUnsetPreferredLocation,
  kSetReadMostly,  ///< device reads map system memory instead of migrating it
  kUnsetReadMostly,
  kSetAccessedBy,  ///< the device maps the range's present pages now and never migrates on fault
  kUnsetAccessedBy,
};

class Device;

/// What a kernel gets: memory access through the device. T must be trivially copyable, at most 8
/// bytes, and naturally aligned (an access never straddles a page).
class KernelContext {
 public:
  enum class AtomicOp : uint8_t { kAdd, kExchange, kCompareExchange };  ///< for backends

  // T is often a pointer to a struct (a kernel loads node->next): sizeof(T) is meant.
  // NOLINTBEGIN(bugprone-sizeof-expression)
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
  // NOLINTEND(bugprone-sizeof-expression)
  /// Atomic read-modify-write, coherent with CPU atomics on the same address (std::atomic_ref):
  /// device memory is updated in place, system memory at its CPU address. T: a 4- or 8-byte
  /// integer. Each returns the value before the operation.
  template <class T>
  T AtomicAdd(T* p, T v) {
    return Rmw(p, AtomicOp::kAdd, v, T{});
  }
  template <class T>
  T AtomicExchange(T* p, T v) {
    return Rmw(p, AtomicOp::kExchange, v, T{});
  }
  /// Stores `desired` if *p == expected; returns the old value either way.
  template <class T>
  T AtomicCompareExchange(T* p, T expected, T desired) {
    return Rmw(p, AtomicOp::kCompareExchange, expected, desired);
  }

  unsigned compute_unit() const { return cu_; }

  virtual ~KernelContext() = default;

 protected:
  explicit KernelContext(unsigned cu) : cu_(cu) {}
  /// Reads or writes `size` bytes at device address va; on a fault that the driver cannot service,
  /// the launch fails with that error (the kernel's remaining work on this compute unit is
  /// skipped).
  virtual void Access(uintptr_t va, size_t size, uint64_t* value, bool write) = 0;
  /// Performs op on the `size`-byte integer at va; returns the old value (0 after a failure, which
  /// fails the launch as Access does).
  virtual uint64_t Atomic(uintptr_t va, size_t size, AtomicOp op, uint64_t a, uint64_t b) = 0;

 private:
  template <class T>
  T Rmw(T* p, AtomicOp op, T a, T b) {
    static_assert(std::is_integral_v<T> && (sizeof(T) == 4 || sizeof(T) == 8));
    using U = std::make_unsigned_t<T>;
    return T(
        U(Atomic(reinterpret_cast<uintptr_t>(p), sizeof(T), op, uint64_t(U(a)), uint64_t(U(b)))));
  }
  unsigned cu_;
};

using Kernel = std::function<void(KernelContext& k, size_t index)>;

namespace detail {
struct FenceState;
}

/// Signalled when the stream operation it was returned for (and everything queued before it) is
/// done; carries that operation's result. Copyable; a default Fence is signalled and Ok.
class Fence {
 public:
  Fence() = default;
  bool Ready() const;
  /// Waits for the signal; returns the operation's status.
  Status Wait() const;
  /// As Wait, but ETIMEDOUT if not signalled within `timeout`.
  Status WaitFor(std::chrono::milliseconds timeout) const;

 private:
  friend class Stream;
  explicit Fence(std::shared_ptr<detail::FenceState> s) : state_(std::move(s)) {}
  std::shared_ptr<detail::FenceState> state_;
};

class Device;

/// An in-order queue of device work, run by one stream thread. Operations queued on different
/// streams may run concurrently (launches still take turns on the compute units).
class Stream {
 public:
  explicit Stream(Device& dev);
  ~Stream();  ///< waits for the queued work
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  Fence Launch(size_t n, Kernel kernel);
  Fence Prefetch(const void* p, size_t len, Location to);
  /// Signalled once everything queued before it is done; Ok.
  Fence Signal();
  /// Waits for everything queued; returns the first error since the last Synchronize.
  Status Synchronize();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

class Device {
 public:
  /// Errors: ENODEV for an unknown backend (the message lists the known ones), ENOTSUP when the
  /// kernel lacks userfaultfd (see `hmmctl info`), EINVAL for bad options.
  static Result<std::unique_ptr<Device>> Open(const DeviceOptions& options = {});
  virtual ~Device() = default;

  /// Runs kernel(k, i) for every i in [0, n) on the compute units and waits. Errors: the first
  /// failed access's error, naming the address and the reason (EFAULT: unmapped; EPERM: write to
  /// read-only memory; ENOMEM: device memory exhausted and nothing could be evicted).
  virtual Status Launch(size_t n, const Kernel& kernel) = 0;

  /// Moves [p, p + len) to the device (migrating what can migrate and mapping it) or back to system
  /// memory, before it is used. Errors: EFAULT for addresses without a mapping.
  virtual Status Prefetch(const void* p, size_t len, Location to) = 0;

  /// Applies advice to [p, p + len) (widened to pages). `where` matters for kSetPreferredLocation
  /// only. Errors: EINVAL (len 0), EFAULT (part of the range is not mapped).
  virtual Status Advise(const void* p, size_t len, Advice advice,
                        Location where = Location::kDevice) = 0;
  /// Where the pages of [p, p + len) are. Errors: EINVAL (len 0), EFAULT (not mapped).
  virtual Result<Residency> QueryResidency(const void* p, size_t len) = 0;

  /// A new stream on this device (which must outlive it).
  std::unique_ptr<Stream> CreateStream() { return std::make_unique<Stream>(*this); }

  virtual DeviceStats stats() const = 0;
  virtual const std::string& name() const = 0;
};

}  // namespace hmmkit::svm
