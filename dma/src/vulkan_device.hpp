// Private to hmmkit::dma: the Vulkan state a VulkanDmaEngine shares with its device allocations.
//
// Core owns the instance, the chosen physical device, the logical device with its one queue, the
// function tables and the table of device allocations. It is refcounted (shared_ptr): the engine
// holds one reference and every DeviceMemoryRecord another, so the device outlives the engine
// while an allocation is still held, and is destroyed with the last of them.
//
// Thread-safety: the device-level calls made here (buffer and memory creation, host imports) are
// not externally synchronised in Vulkan and run from any thread. The VkQueue is the engine's: it
// is used only under the engine's queue_mu_ (and by Create before any other thread exists).
// alloc_mu_ is a leaf lock.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>

#include "hmmkit/base/mutex.hpp"
#include "hmmkit/base/status.hpp"
#include "hmmkit/dma/vulkan_engine.hpp"
#include "vulkan_loader.hpp"

namespace hmmkit::dma::vulkan_detail {

// A VkBuffer over the whole of its own VkDeviceMemory. Plain handles; freed with
// Core::DestroyBuffer.
struct BoundBuffer {
  VkBuffer buffer = VK_NULL_HANDLE;
  VkDeviceMemory memory = VK_NULL_HANDLE;
  size_t size = 0;
};

// One device allocation. Owned by shared_ptr: its DeviceAllocation handle and every batch in
// flight that uses it. Set at creation, constant after; the destructor frees the Vulkan objects and
// the PROT_NONE reservation of an unmapped allocation.
struct DeviceMemoryRecord {
  explicit DeviceMemoryRecord(std::shared_ptr<Core> c) : core(std::move(c)) {}
  ~DeviceMemoryRecord();
  DeviceMemoryRecord(const DeviceMemoryRecord&) = delete;
  DeviceMemoryRecord& operator=(const DeviceMemoryRecord&) = delete;

  std::shared_ptr<Core> core;
  BoundBuffer bound;
  uintptr_t addr = 0;   // the mapping, or the reservation
  size_t size = 0;      // bytes asked for
  size_t reserved = 0;  // length of the PROT_NONE reservation; 0 when mapped
  bool mapped = false;
};

class Core : public std::enable_shared_from_this<Core> {
 public:
  // Opens the loader, creates the instance, selects the physical device and queue family (see
  // VulkanDmaEngine::Options) and creates the device. Errors: see VulkanDmaEngine::Create.
  static Result<std::shared_ptr<Core>> Create(const VulkanDmaEngine::Options& options);
  ~Core();
  Core(const Core&) = delete;
  Core& operator=(const Core&) = delete;

  const vk::DeviceFns& fn() const { return dev_fn_; }
  VkDevice device() const { return device_; }
  // Only under the engine's queue_mu_ (or before the engine has other threads).
  VkQueue queue() const { return queue_; }
  const VulkanDmaEngine::DeviceInfo& info() const { return info_; }

  // A buffer of `len` bytes over its own DEVICE_LOCAL memory (see DeviceMemoryPlacement).
  // `publish`: enter it in the allocation table so that descriptors find it by address (the
  // engine's own buffers are not published). Errors: EINVAL for len 0; ENOMEM; EIO.
  Result<std::shared_ptr<DeviceMemoryRecord>> AllocateDeviceMemory(size_t len,
                                                                   DeviceMemoryPlacement placement,
                                                                   bool publish)
      EXCLUDES(alloc_mu_);
  // Removes `record` from the allocation table (no-op when it is not there).
  void Unpublish(const DeviceMemoryRecord& record) EXCLUDES(alloc_mu_);

  // What the allocation table says about [addr, addr + len): the allocation that contains it,
  // or nothing (host memory), or that the range crosses an allocation's boundary.
  struct Lookup {
    std::shared_ptr<DeviceMemoryRecord> record;
    bool crosses = false;
  };
  Lookup Find(uintptr_t addr, size_t len) const EXCLUDES(alloc_mu_);

  // Imports the host range [start, start + len) (both multiples of info().import_alignment) with
  // VK_EXT_external_memory_host and binds a buffer over it. Errors: EFAULT when the driver refuses
  // the pointer, ENOMEM, ENOTSUP when no host-coherent memory type accepts it, EIO.
  Result<BoundBuffer> ImportHost(uintptr_t start, size_t len) const;
  // Destroys the buffer and frees its memory (either may be null).
  void DestroyBuffer(BoundBuffer& bound) const;

 private:
  Core() = default;
  Status CreateInstance(const VulkanDmaEngine::Options& options);
  Status SelectAndCreateDevice(const VulkanDmaEngine::Options& options);
  // A buffer with TRANSFER_SRC | TRANSFER_DST usage of `len` bytes; `pnext` chains external-memory
  // info.
  Result<VkBuffer> NewBuffer(size_t len, const void* pnext) const;
  // First type in `bits` that has all of `want`; -1 when none.
  int MemoryType(uint32_t bits, VkMemoryPropertyFlags want) const;

  // Set at creation, constant after.
  vk::GlobalFns global_fn_{};
  vk::InstanceFns inst_fn_{};
  vk::DeviceFns dev_fn_{};
  VkInstance instance_ = VK_NULL_HANDLE;
  VkPhysicalDevice physical_ = VK_NULL_HANDLE;
  VkDevice device_ = VK_NULL_HANDLE;
  VkQueue queue_ = VK_NULL_HANDLE;
  VkPhysicalDeviceMemoryProperties memory_{};
  VulkanDmaEngine::DeviceInfo info_;
  uint64_t max_allocation_ = 0;  // maxMemoryAllocationSize (and maxBufferSize when known)

  struct Entry {
    size_t size = 0;
    std::weak_ptr<DeviceMemoryRecord> record;
  };
  mutable Mutex alloc_mu_;
  std::map<uintptr_t, Entry> allocations_ GUARDED_BY(alloc_mu_);  // by start address
};

}  // namespace hmmkit::dma::vulkan_detail
