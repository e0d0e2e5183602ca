/// @file
/// VulkanDmaEngine: a DmaEngine that runs its copies and fills on a Vulkan queue (a transfer-only
/// queue family when the device has one, else a compute or graphics family), so that a GPU's copy
/// engine, or on a machine without one the lavapipe CPU device, moves the bytes.
///
/// Who calls: anyone who owns an engine (a device, a test). Create and the destructor from an
/// ordinary thread; Submit, AllocateDeviceMemory and the accessors from any thread, concurrently.
/// Nothing here runs application code on the caller's stack: OnComplete handlers are posted.
///
/// Loading: libvulkan is not linked. Create dlopens the loader ("libvulkan.so.1" unless
/// Options::loader says otherwise), takes vkGetInstanceProcAddr with dlsym and resolves every other
/// entry point through it. The loader, and the driver (ICD) it loads, stay loaded for the life of
/// the process (so that later engines do not pay the driver's start-up again).
///
/// Memory (docs/dma.md, "The Vulkan engine", has the details and measured numbers):
///   Device memory is what AllocateDeviceMemory returns: a DEVICE_LOCAL VkDeviceMemory with a
///   buffer
///     over it, mapped into the process when the device has a DEVICE_LOCAL | HOST_VISIBLE |
///     HOST_COHERENT memory type (integrated GPUs, lavapipe, resizable-BAR boards). Without one, or
///     when asked with DeviceMemoryPlacement::kUnmapped, the allocation is not mapped: data() is
///     the start of a PROT_NONE reservation of the same size that only names the memory (a CPU
///     access faults; descriptors use the address). A descriptor endpoint whose range lies inside
///     an allocation uses its buffer directly, whatever its Memory tag says.
///   Every other address is host memory: Submit probes it when its tag is kSystem (below; a kDevice
///     tag outside the engine's allocations, an emulated device's arena, is trusted to be mapped,
///     as the DmaEngine interface promises), rounds the range out to the device's
///     minImportedHostPointerAlignment and imports it with VK_EXT_external_memory_host
///     (VkImportMemoryHostPointerInfoEXT, HOST_ALLOCATION) under a VkBuffer. Imports are shared by
///     the descriptors of one batch (overlapping or adjacent ranges are merged) and freed when the
///     batch completes, before its fence does: once a fence has completed, the engine holds no
///     reference to the batch's host memory.
///   Probing: before importing, Submit faults every page of a kSystem range in through the kernel
///     with the access the device will make: madvise(MADV_POPULATE_READ) for a source,
///     MADV_POPULATE_WRITE for a destination (one call per range, no copy). When that fails, or
///     with Options::populate_probe false, one byte of every page goes through VmAccess
///     (process_vm_readv; for a destination, the byte read and written back with
///     process_vm_writev), which names the first bad address. An unmapped or PROT_NONE source, or a
///     destination that is not writable, fails THAT descriptor with EFAULT (message: the address
///     and the side) and the others run. This is needed because a driver may not check host
///     pointers at all (lavapipe does not pin or check them: its queue thread would crash on a bad
///     one), and it makes userfaultfd-registered memory work: the probe's fault is taken in the
///     kernel, so the monitor resolves it (on its own thread; Submit waits) before the device
///     touches the page. A UFFD_USER_MODE_ONLY userfaultfd does not serve kernel faults: its
///     missing pages fail with EFAULT (as with CpuDmaEngine).
///   Fills: vkCmdFillBuffer needs a 4-byte aligned offset and size, so the aligned middle of a fill
///     is a vkCmdFillBuffer and the 0..3 bytes before and after it are vkCmdCopyBuffer from a 4 KiB
///     device buffer holding 16 bytes of every byte value (written once by Create). Every byte is
///     written by the device; the CPU writes none.
///
/// Completion: one Vulkan 1.2 timeline semaphore per engine. Each accepted batch is one
///   vkQueueSubmit that signals the next value; a completion thread owned by the engine blocks in
///   vkWaitSemaphores for the oldest pending value (no polling), then frees the batches' imports
///   and completes their fences (FenceSignal::Finish: waiters wake, OnComplete handlers are
///   posted). Batches therefore complete in submission order. Each command buffer starts with a
///   transfer->transfer barrier (so a batch sees every earlier batch's writes) and ends with a
///   transfer->host barrier (so the host sees the batch's writes once the fence completes).
///
/// Threads and locks (docs/dma.md has the table). Threads: the completion thread (started by
///   Create, joined by the destructor) completes every fence, except that Submit completes a
///   batch's fence itself, before it returns, when vkQueueSubmit fails or the device was lost
///   earlier (every descriptor then carries the error). The driver's own threads (lavapipe's queue
///   thread) do the copies. Locks, all leaves (no two are ever held together, none while a fence
///   completes or a handler runs): queue_mu_ (the VkQueue, the timeline counter, the pending list,
///   the stopping flag), pool_mu_ (idle command pools), stats_mu_ (counters), and the allocation
///   table's lock inside the shared device state.
///
/// Errors of Create: ENOENT when the loader cannot be opened (the message says to install
///   libvulkan1 and an ICD, e.g. mesa-vulkan-drivers); ENODEV when Vulkan reports no physical
///   device, or none matches Options::device_index / Options::drm_node; ENOTSUP when no candidate
///   device has everything the engine needs (the message names, per device, the missing piece:
///   Vulkan 1.2, timelineSemaphore, VK_EXT_external_memory_host, a transfer-capable queue);
///   ENOMEM/EIO when creating the Vulkan objects or the completion thread fails.
/// Errors of Submit: EINVAL for a malformed batch (ValidateBatch), or a descriptor range that
///   crosses the boundary of a device allocation (starts inside one and ends outside, or contains
///   part of one); then nothing was started. Per descriptor, in Fence::results(): EFAULT for host
///   memory that is not readable (source) or writable (destination), or that the driver refused to
///   import; another errno when the probe's system call failed otherwise (ENOMEM, EPERM: the
///   message names it); ENOMEM when an import or the command buffer could not be allocated;
///   ENOTSUP when no host-coherent memory type accepts an import; EIO
///   when vkQueueSubmit failed or the device was lost (then every descriptor of the batch that
///   had not failed already carries it).
///
/// Not supported (on purpose): host ranges whose alignment window (minImportedHostPointerAlignment,
///   4 KiB on current drivers) reaches pages that are not mapped, when that alignment is larger
///   than the page size: the probe covers those pages too and the descriptor fails with EFAULT.
///   Read-only host sources (a PROT_READ mapping, .rodata) pass the probe, but a driver that pins
///   with write access refuses the import: EFAULT, and the caller copies through writable memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "hmmkit/base/mutex.hpp"
#include "hmmkit/base/status.hpp"
#include "hmmkit/dma/dma_engine.hpp"
#include "hmmkit/dma/vm_access.hpp"

namespace hmmkit::dma {

namespace vulkan_detail {
class Core;                 ///< instance, device, queue, function tables, allocation table
struct DeviceMemoryRecord;  ///< one device allocation
struct Batch;               ///< one accepted batch
struct CommandContext;      ///< a command pool and its command buffer
}  // namespace vulkan_detail

/// Where AllocateDeviceMemory places an allocation.
enum class DeviceMemoryPlacement : uint8_t {
  /// DEVICE_LOCAL | HOST_VISIBLE | HOST_COHERENT memory mapped into the process when the device has
  /// such a type and it has room; else unmapped DEVICE_LOCAL memory (see kUnmapped).
  kMappedIfPossible,
  /// DEVICE_LOCAL memory that is never mapped: data() names a PROT_NONE reservation.
  kUnmapped,
};

/// One allocation of device memory made by VulkanDmaEngine::AllocateDeviceMemory. Move-only; owns
/// its allocation and frees it on destruction or Free(). Refcounted inside: a batch in flight that
/// uses the allocation keeps the memory alive until it completes, and the allocation keeps the
/// Vulkan device alive, so it may outlive its engine (its memory then stays valid, and mapped,
/// until it is freed). One object is not thread-safe; distinct allocations may be used from any
/// threads.
class DeviceAllocation {
 public:
  DeviceAllocation() = default;  ///< empty: data() null, size() 0
  DeviceAllocation(DeviceAllocation&& other) noexcept = default;
  DeviceAllocation& operator=(DeviceAllocation&& other) noexcept;
  DeviceAllocation(const DeviceAllocation&) = delete;
  DeviceAllocation& operator=(const DeviceAllocation&) = delete;
  ~DeviceAllocation() { Free(); }

  /// The start of the allocation in this process: the mapping when mapped(), else a PROT_NONE
  /// reservation of size() bytes. Descriptors address the memory through [data(), data() + size()).
  void* data() const;
  size_t size() const;
  /// True when data() is CPU-accessible memory (host-coherent: no flush needed).
  bool mapped() const;
  explicit operator bool() const { return record_ != nullptr; }

  /// Removes the allocation from its engine's address table at once (later descriptors that name
  /// its range are host memory again) and drops this handle. The memory is freed when no batch in
  /// flight uses it any more. Idempotent.
  void Free();

 private:
  friend class VulkanDmaEngine;
  explicit DeviceAllocation(std::shared_ptr<vulkan_detail::DeviceMemoryRecord> record)
      : record_(std::move(record)) {}

  std::shared_ptr<vulkan_detail::DeviceMemoryRecord> record_;
};

/// Owned by its creator (unique_ptr from Create); not copyable.
class VulkanDmaEngine final : public DmaEngine {
 public:
  /// A DRM device node: major and minor of /dev/dri/cardN or /dev/dri/renderDN.
  struct DrmNode {
    int64_t major = 0;
    int64_t minor = 0;
    bool operator==(const DrmNode&) const = default;
  };

  struct Options {
    /// Index into vkEnumeratePhysicalDevices' list; none: the first device that has everything the
    /// engine needs (and that vkCreateDevice accepts).
    std::optional<uint32_t> device_index{};
    /// Only a device that reports this primary or render node through VK_EXT_physical_device_drm
    /// (a device without the extension never matches).
    std::optional<DrmNode> drm_node{};
    /// What dlopen opens: a soname or a path.
    std::string loader = "libvulkan.so.1";
    /// Largest host import (and copy command) Submit makes; larger descriptors are split. Clamped
    /// to the device's maxMemoryAllocationSize and maxBufferSize. At least 1 MiB.
    size_t max_import_bytes = size_t{256} << 20;
    /// Probe host ranges with madvise(MADV_POPULATE_READ/WRITE) first (one call per range), and
    /// page by page through `vm` only when that fails, to find the bad page. false: always page by
    /// page (slower; for tests that inject errors through `vm`).
    bool populate_probe = true;
    /// Page-by-page probe access to host memory; null: VmAccess::Real(). Must outlive the engine.
    VmAccess* vm = nullptr;
  };

  /// What Create chose. Set at creation, constant after.
  struct DeviceInfo {
    uint32_t physical_device_index = 0;  ///< in vkEnumeratePhysicalDevices order
    std::string device_name;             ///< VkPhysicalDeviceProperties::deviceName
    std::string driver_name;             ///< VkPhysicalDeviceDriverProperties
    std::string driver_info;
    uint32_t api_version = 0;  ///< VK_MAKE_API_VERSION of the device
    uint32_t vendor_id = 0;
    uint32_t device_id = 0;
    uint32_t queue_family = 0;
    uint32_t queue_flags = 0;             ///< VkQueueFlags of that family
    bool transfer_only_queue = false;     ///< the family has neither graphics nor compute
    size_t import_alignment = 0;          ///< minImportedHostPointerAlignment
    size_t max_import_bytes = 0;          ///< Options::max_import_bytes after clamping
    bool mappable_device_memory = false;  ///< a DEVICE_LOCAL | HOST_VISIBLE | HOST_COHERENT type
    std::optional<DrmNode> drm_primary;   ///< from VK_EXT_physical_device_drm, when exposed
    std::optional<DrmNode> drm_render;
  };

  /// Counters beyond DmaEngine::Stats.
  struct VulkanStats {
    uint64_t submissions = 0;         ///< vkQueueSubmit calls that succeeded
    uint64_t imports = 0;             ///< host ranges imported
    uint64_t imported_bytes = 0;      ///< their sizes, after rounding out
    uint64_t failed_descriptors = 0;  ///< descriptors whose result is an error
  };

  /// Opens Vulkan, picks the device and queue family, creates the device, the timeline semaphore
  /// and the fill pattern, and starts the completion thread. Logs the choice at info level. Blocks
  /// for a few milliseconds (driver start-up). Errors: see the file comment; EINVAL for
  /// max_import_bytes below 1 MiB.
  static Result<std::unique_ptr<VulkanDmaEngine>> Create(const Options& options);

  /// Drains: waits until every submitted batch has completed on the device, completes its fence,
  /// then joins the completion thread and destroys the engine's Vulkan objects. Every fence handed
  /// out is complete when this returns. Device allocations still held stay valid. Must not be
  /// called while another thread may still call Submit. May be called from an OnComplete handler
  /// (those never run on the completion thread).
  ~VulkanDmaEngine() override;

  /// See DmaEngine::Submit and the file comment. Blocks for the probes and imports and briefly on
  /// queue_mu_; a probe of a userfaultfd-registered page blocks until the monitor resolves it.
  Result<Fence> Submit(std::span<const Descriptor> descs) override
      EXCLUDES(queue_mu_, pool_mu_, stats_mu_);
  std::string_view name() const override { return "vulkan"; }
  Stats stats() const override EXCLUDES(stats_mu_);
  VulkanStats vulkan_stats() const EXCLUDES(stats_mu_);

  /// Allocates `len` bytes of device memory (see DeviceMemoryPlacement). Thread-safe. Errors:
  /// EINVAL for len 0; ENOMEM when the device has no room or len exceeds maxMemoryAllocationSize;
  /// EIO for other driver failures.
  Result<DeviceAllocation> AllocateDeviceMemory(
      size_t len, DeviceMemoryPlacement placement = DeviceMemoryPlacement::kMappedIfPossible);

  const DeviceInfo& device_info() const;
  /// The chosen device's DRM node when VK_EXT_physical_device_drm reports one: its render node,
  /// else its primary node.
  std::optional<DrmNode> drm_node() const;
  const Options& options() const { return options_; }

 private:
  struct Objects;  ///< the engine's own Vulkan objects: timeline semaphore, fill pattern

  explicit VulkanDmaEngine(const Options& options);
  /// Create's second half: the device state, the semaphore, the pattern, the thread.
  Status Init() EXCLUDES(queue_mu_, pool_mu_);
  /// Queues `batch` behind the pending ones; on failure nothing was queued (the caller completes
  /// it). Takes queue_mu_.
  Status Queue(const std::shared_ptr<vulkan_detail::Batch>& batch) EXCLUDES(queue_mu_);
  void CompletionLoop() EXCLUDES(queue_mu_, pool_mu_, stats_mu_);
  /// Frees what `batch` holds (imports, command pool, allocation references), then completes its
  /// fence with `error` for every descriptor that had not failed (Ok: none). No engine lock held.
  void Complete(vulkan_detail::Batch& batch, const Status& error)
      EXCLUDES(queue_mu_, pool_mu_, stats_mu_);
  Result<std::unique_ptr<vulkan_detail::CommandContext>> GetContext() EXCLUDES(pool_mu_);
  void PutContext(std::unique_ptr<vulkan_detail::CommandContext> context) EXCLUDES(pool_mu_);

  /// Set at creation, read-only after.
  const Options options_;
  VmAccess& vm_;
  std::shared_ptr<vulkan_detail::Core> core_;
  std::unique_ptr<Objects> vk_;

  Mutex queue_mu_;
  CondVar pending_cv_;
  uint64_t last_value_ GUARDED_BY(queue_mu_) = 0;  ///< last timeline value handed to a submission
  std::deque<std::shared_ptr<vulkan_detail::Batch>> pending_
      GUARDED_BY(queue_mu_);  ///< in value order
  bool stopping_ GUARDED_BY(queue_mu_) = false;
  bool device_lost_ GUARDED_BY(queue_mu_) = false;

  Mutex pool_mu_;
  std::vector<std::unique_ptr<vulkan_detail::CommandContext>> idle_contexts_ GUARDED_BY(pool_mu_);

  mutable Mutex stats_mu_;
  Stats stats_ GUARDED_BY(stats_mu_);
  VulkanStats vulkan_stats_ GUARDED_BY(stats_mu_);

  std::thread completion_;  ///< started by Create, joined by the destructor
};

}  // namespace hmmkit::dma
