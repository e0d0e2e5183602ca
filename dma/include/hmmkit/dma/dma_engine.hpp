/// @file
/// The DMA layer: asynchronous copy/fill batches between system memory and device memory.
///
/// Parts (the long form, with a complete example and the locking table, is docs/dma.md):
///   Descriptor  one copy or fill; its endpoints say which memory each side is in
///   DmaEngine   the interface: Submit(batch) -> Fence; stats; a blocking Copy helper
///   Fence       completion of one batch: Poll, Wait, WaitFor, per-descriptor results, OnComplete
///               (a handler posted to a Boost.Asio executor); see fence.hpp
///   engines     CpuDmaEngine (cpu_engine.hpp): worker threads, optional LinkModel
///
/// What an engine implements: Submit (validate the whole batch with ValidateBatch before touching
/// memory, then start the work and return a Fence made by a FenceSignal), name, stats. The blocking
/// Copy/Fill helpers come from this base class.
///
/// The layer knows nothing of devices: "device memory" is any memory the engine can always access
/// (an arena mapped in this process, a GEM mapping). "System memory" is ordinary process memory
/// that may be unmapped, PROT_NONE, or registered with userfaultfd, so an engine must turn a bad
/// system address into an EFAULT result instead of a crash (CpuDmaEngine does, see there).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

#include "hmmkit/base/status.hpp"
#include "hmmkit/dma/fence.hpp"

namespace hmmkit::dma {

/// Which memory an endpoint lies in.
enum class Memory : uint8_t {
  kSystem,  ///< process memory: may fault, may be unmapped; accessed with checks
  kDevice,  ///< device memory mapped in this process: always accessible
};

/// The writable side of a transfer.
struct Endpoint {
  void* ptr = nullptr;
  Memory memory = Memory::kSystem;
};

/// The read-only side of a transfer. An Endpoint converts to it.
struct ConstEndpoint {
  const void* ptr = nullptr;
  Memory memory = Memory::kSystem;

  ConstEndpoint() = default;
  ConstEndpoint(const void* p, Memory m) : ptr(p), memory(m) {}
  ConstEndpoint(const Endpoint& e) : ptr(e.ptr), memory(e.memory) {}  // NOLINT: implicit on purpose
};

/// One operation of a batch. A plain value: the engine copies what it needs at Submit.
struct Descriptor {
  enum class Op : uint8_t {
    kCopy,  ///< len bytes from src to dst; the ranges must not overlap
    kFill,  ///< len bytes of dst set to `fill`; src is ignored
  };

  Op op = Op::kCopy;
  Endpoint dst;
  ConstEndpoint src;
  size_t len = 0;
  uint8_t fill = 0;

  static Descriptor Copy(Endpoint dst, ConstEndpoint src, size_t len) {
    Descriptor d;
    d.op = Op::kCopy;
    d.dst = dst;
    d.src = src;
    d.len = len;
    return d;
  }
  static Descriptor Fill(Endpoint dst, uint8_t byte, size_t len) {
    Descriptor d;
    d.op = Op::kFill;
    d.dst = dst;
    d.len = len;
    d.fill = byte;
    return d;
  }
};

/// Checks a batch before anything is copied. EINVAL, naming the first bad descriptor, for: an
/// unknown op or memory kind, a null dst (or null src of a copy), a zero length, a range that wraps
/// around the address space, or a copy whose src and dst ranges overlap. Addresses are not probed:
/// an unmapped system address is a per-descriptor EFAULT at run time, not a validation error.
Status ValidateBatch(std::span<const Descriptor> batch);

/// A DMA engine. Owned by its creator (the device, or a test), not refcounted, not copyable. All
/// methods are thread-safe; Submit may be called from many threads at once.
class DmaEngine {
 public:
  struct Stats {
    uint64_t batches = 0;      ///< accepted batches
    uint64_t descriptors = 0;  ///< descriptors of accepted batches
    uint64_t bytes = 0;        ///< sum of their lengths
  };

  DmaEngine() = default;
  DmaEngine(const DmaEngine&) = delete;
  DmaEngine& operator=(const DmaEngine&) = delete;
  /// Implementations complete every fence they handed out before the destructor returns.
  virtual ~DmaEngine() = default;

  /// Required. Starts the batch and returns its fence; does not wait for the copies (it may block
  /// briefly on the engine's queue lock). The memory of every descriptor must stay valid (mapped or
  /// deliberately not) until the fence completes. Descriptors of one batch may run in any order and
  /// concurrently; two descriptors that write the same bytes leave either result.
  /// Errors: EINVAL for a malformed batch (see ValidateBatch): then nothing was started and nothing
  /// copied. Otherwise the batch is accepted, and the errors of single descriptors (EFAULT for an
  /// unmapped or PROT_NONE system address) are reported in Fence::results(); the other descriptors
  /// still run. An empty batch gives an already-complete fence.
  virtual Result<Fence> Submit(std::span<const Descriptor> batch) = 0;

  /// Required. A short constant name for logs ("cpu").
  virtual std::string_view name() const = 0;

  /// Required. Counters since creation.
  virtual Stats stats() const = 0;

  /// Blocking helpers: Submit one descriptor and Wait. Same errors as Submit, then the descriptor's
  /// own error. Must not be called on a thread that the engine needs to make progress.
  Status Copy(void* dst, Memory dst_memory, const void* src, Memory src_memory, size_t len);
  Status Fill(void* dst, Memory dst_memory, uint8_t byte, size_t len);
};

}  // namespace hmmkit::dma
