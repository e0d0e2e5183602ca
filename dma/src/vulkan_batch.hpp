// Private to hmmkit::dma: one batch of the Vulkan engine, and the steps that turn its descriptors
// into a command buffer (vulkan_batch.cpp). The engine (vulkan_engine.cpp) runs them in Submit:
//
//   ResolveEndpoints  each endpoint is a device allocation (by address) or host memory; EINVAL for
//                     a range that crosses an allocation's boundary (nothing started yet)
//   ProbeAndImport    probes kSystem host ranges (host_probe.hpp), splits descriptors into pieces
//                     of at most piece_bytes, rounds host ranges out to the import alignment,
//                     merges overlapping or adjacent windows and imports each merged window once;
//                     a descriptor whose probe or import fails gets its error and no commands
//   Record            records the pieces of the descriptors still Ok
//
// None of these takes an engine lock; they run on the submitting thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "hmmkit/base/status.hpp"
#include "hmmkit/dma/dma_engine.hpp"
#include "hmmkit/dma/fence.hpp"
#include "hmmkit/dma/vm_access.hpp"
#include "vulkan_device.hpp"

namespace hmmkit::dma::vulkan_detail {

// Bytes of each value in the engine's fill pattern buffer, and its size.
inline constexpr size_t kPatternSlot = 16;
inline constexpr size_t kPatternBytes = 256 * kPatternSlot;

// A command pool with its one primary command buffer. Owned by the engine's idle list or by the
// one batch that uses it (the pool is externally synchronised: only its owner touches it).
struct CommandContext {
  VkCommandPool pool = VK_NULL_HANDLE;
  VkCommandBuffer cmd = VK_NULL_HANDLE;
};

// Where one side of a descriptor lies, decided at Submit.
struct Side {
  uintptr_t addr = 0;
  DeviceMemoryRecord* device = nullptr;  // the allocation that holds it; null: host memory
};

// A part of one descriptor that one copy or fill command covers, and where its two sides are.
struct Piece {
  size_t index = 0;   // descriptor
  size_t offset = 0;  // in the descriptor
  size_t len = 0;
  VkBuffer dst_buffer = VK_NULL_HANDLE;
  VkDeviceSize dst_offset = 0;
  VkBuffer src_buffer = VK_NULL_HANDLE;  // copies only
  VkDeviceSize src_offset = 0;
};

// One accepted batch. Shared by Submit and the engine's pending list; freed by whichever drops it
// last after completion. Fields are written by the submitting thread until the batch is queued,
// then only by the completion thread (the queue lock orders the hand-over).
struct Batch {
  explicit Batch(size_t n) : signal(n, n), results(n), dst(n), src(n) {}

  FenceSignal signal;                // units: one per descriptor, all finished at completion
  std::vector<Status> results;       // errors found at Submit (probe, import)
  std::vector<Side> dst, src;        // src unused for fills
  std::vector<BoundBuffer> imports;  // freed at completion, before the fence completes
  std::vector<std::shared_ptr<DeviceMemoryRecord>> device;  // allocations used, kept alive
  std::unique_ptr<CommandContext> context;                  // null when nothing was recorded
  uint64_t value = 0;  // timeline value that marks its completion
};

// What the preparation steps need from the engine. Read-only.
struct PrepareContext {
  const Core& core;
  VmAccess& vm;
  bool populate = true;               // Options::populate_probe
  size_t piece_bytes = 0;             // largest piece; its import window fits max_import_bytes
  VkBuffer pattern = VK_NULL_HANDLE;  // kPatternBytes: kPatternSlot bytes of each byte value
};

// Fills batch.dst/src and batch.device. EINVAL (message names the descriptor) for a range that
// crosses the boundary of a device allocation.
Status ResolveEndpoints(const Core& core, std::span<const Descriptor> descs, Batch& batch);

// Probes and imports (see the file comment). Sets batch.results[i] for descriptors that fail and
// fills batch.imports. Returns the pieces of the descriptors still Ok, with both sides placed.
std::vector<Piece> ProbeAndImport(const PrepareContext& ctx, std::span<const Descriptor> descs,
                                  Batch& batch);

// Records `pieces` into batch.context->cmd between a transfer->transfer barrier and a
// transfer->host barrier. Errors (begin/end of the command buffer) concern the whole batch.
Status Record(const PrepareContext& ctx, std::span<const Descriptor> descs,
              std::span<const Piece> pieces, const Batch& batch);

}  // namespace hmmkit::dma::vulkan_detail
