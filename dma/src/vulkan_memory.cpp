// Core: device allocations (and their address table) and imports of host memory.
#include <sys/mman.h>
#include <unistd.h>

#include <fmt/format.h>

#include <cerrno>
#include <iterator>

#include "vulkan_device.hpp"

namespace hmmkit::dma {

namespace vulkan_detail {

namespace {

constexpr VkBufferUsageFlags kTransferUsage =
    VK_BUFFER_USAGE_TRANSFER_SRC_BIT | VK_BUFFER_USAGE_TRANSFER_DST_BIT;
constexpr VkExternalMemoryHandleTypeFlagBits kHostHandle =
    VK_EXTERNAL_MEMORY_HANDLE_TYPE_HOST_ALLOCATION_BIT_EXT;

bool OutOfMemory(VkResult r) {
  return r == VK_ERROR_OUT_OF_DEVICE_MEMORY || r == VK_ERROR_OUT_OF_HOST_MEMORY;
}

}  // namespace

DeviceMemoryRecord::~DeviceMemoryRecord() {
  core->DestroyBuffer(bound);  // vkFreeMemory unmaps a mapped allocation
  if (reserved) munmap(reinterpret_cast<void*>(addr), reserved);
}

Result<VkBuffer> Core::NewBuffer(size_t len, const void* pnext) const {
  auto create = vk::Make<VkBufferCreateInfo>(VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO, pnext);
  create.size = len;
  create.usage = kTransferUsage;
  create.sharingMode = VK_SHARING_MODE_EXCLUSIVE;
  VkBuffer buffer = VK_NULL_HANDLE;
  const VkResult r = dev_fn_.CreateBuffer(device_, &create, nullptr, &buffer);
  if (r != VK_SUCCESS) return vk::Failed(fmt::format("vkCreateBuffer of {:#x} bytes", len), r);
  return buffer;
}

void Core::DestroyBuffer(BoundBuffer& bound) const {
  if (bound.buffer) dev_fn_.DestroyBuffer(device_, bound.buffer, nullptr);
  if (bound.memory) dev_fn_.FreeMemory(device_, bound.memory, nullptr);
  bound = {};
}

Result<std::shared_ptr<DeviceMemoryRecord>> Core::AllocateDeviceMemory(
    size_t len, DeviceMemoryPlacement placement, bool publish) {
  if (len == 0) return Status::FromErrno(EINVAL, "AllocateDeviceMemory: zero length");
  if (len > max_allocation_) {
    return Status::FromErrno(
        ENOMEM, fmt::format("AllocateDeviceMemory: {:#x} bytes is more than the device's largest "
                            "allocation or buffer ({:#x})",
                            len, max_allocation_));
  }
  auto record = std::make_shared<DeviceMemoryRecord>(shared_from_this());
  record->size = len;
  record->bound.size = len;
  Result<VkBuffer> buffer = NewBuffer(len, nullptr);
  if (!buffer.ok()) return buffer.status();
  record->bound.buffer = *buffer;
  VkMemoryRequirements req{};
  dev_fn_.GetBufferMemoryRequirements(device_, *buffer, &req);

  auto alloc = vk::Make<VkMemoryAllocateInfo>(VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO);
  alloc.allocationSize = req.size;
  VkResult r = VK_ERROR_OUT_OF_DEVICE_MEMORY;
  if (placement == DeviceMemoryPlacement::kMappedIfPossible) {
    const int type = MemoryType(req.memoryTypeBits, VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT |
                                                        VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT |
                                                        VK_MEMORY_PROPERTY_HOST_COHERENT_BIT);
    if (type >= 0) {
      alloc.memoryTypeIndex = uint32_t(type);
      r = dev_fn_.AllocateMemory(device_, &alloc, nullptr, &record->bound.memory);
      if (r != VK_SUCCESS) record->bound.memory = VK_NULL_HANDLE;
      if (r == VK_SUCCESS) {
        void* p = nullptr;
        r = dev_fn_.MapMemory(device_, record->bound.memory, 0, VK_WHOLE_SIZE, 0, &p);
        if (r == VK_SUCCESS) {
          record->mapped = true;
          record->addr = reinterpret_cast<uintptr_t>(p);
        } else {
          dev_fn_.FreeMemory(device_, record->bound.memory, nullptr);
          record->bound.memory = VK_NULL_HANDLE;
        }
      }
      // Other failures than "no room" are real errors; no room in the mappable heap (a 256 MiB
      // BAR) falls back to unmapped memory below.
      if (r != VK_SUCCESS && !OutOfMemory(r) && r != VK_ERROR_MEMORY_MAP_FAILED) {
        return vk::Failed(fmt::format("AllocateDeviceMemory: {:#x} bytes", len), r);
      }
    }
  }
  if (!record->mapped) {
    // Prefer DEVICE_LOCAL memory the host cannot see (keeps a small BAR heap free), else any
    // DEVICE_LOCAL type.
    int type = -1;
    for (uint32_t i = 0; i < memory_.memoryTypeCount && type < 0; ++i) {
      const VkMemoryPropertyFlags f = memory_.memoryTypes[i].propertyFlags;
      if ((req.memoryTypeBits & (1u << i)) && (f & VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT) &&
          !(f & VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT)) {
        type = int(i);
      }
    }
    if (type < 0) type = MemoryType(req.memoryTypeBits, VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT);
    if (type < 0) {
      return Status::FromErrno(EIO,
                               "AllocateDeviceMemory: no DEVICE_LOCAL memory type accepts a "
                               "transfer buffer");
    }
    alloc.memoryTypeIndex = uint32_t(type);
    r = dev_fn_.AllocateMemory(device_, &alloc, nullptr, &record->bound.memory);
    if (r != VK_SUCCESS) {
      record->bound.memory = VK_NULL_HANDLE;
      return vk::Failed(fmt::format("AllocateDeviceMemory: {:#x} bytes", len), r);
    }
    // The reservation only names the memory: descriptors address it, the CPU cannot touch it.
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    const size_t reserve = (len + page - 1) / page * page;
    void* p = mmap(nullptr, reserve, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      return Status::FromErrno(errno, fmt::format("AllocateDeviceMemory: cannot reserve {:#x} "
                                                  "bytes of address space",
                                                  reserve));
    }
    record->addr = reinterpret_cast<uintptr_t>(p);
    record->reserved = reserve;
  }
  r = dev_fn_.BindBufferMemory(device_, record->bound.buffer, record->bound.memory, 0);
  if (r != VK_SUCCESS) return vk::Failed("AllocateDeviceMemory: vkBindBufferMemory", r);
  if (publish) {
    MutexLock lock(alloc_mu_);
    allocations_[record->addr] = Entry{len, record};
  }
  return record;
}

void Core::Unpublish(const DeviceMemoryRecord& record) {
  MutexLock lock(alloc_mu_);
  auto it = allocations_.find(record.addr);
  if (it != allocations_.end() && it->second.record.lock().get() == &record) allocations_.erase(it);
}

Core::Lookup Core::Find(uintptr_t addr, size_t len) const {
  const uintptr_t end = addr + len;  // ValidateBatch excluded wrapping ranges
  MutexLock lock(alloc_mu_);
  auto next = allocations_.upper_bound(addr);  // first allocation starting after addr
  if (next != allocations_.begin()) {
    auto prev = std::prev(next);
    if (addr < prev->first + prev->second.size) {
      if (end > prev->first + prev->second.size) return {nullptr, true};
      return {prev->second.record.lock(), false};
    }
  }
  if (next != allocations_.end() && next->first < end) return {nullptr, true};
  return {};
}

Result<BoundBuffer> Core::ImportHost(uintptr_t start, size_t len) const {
  void* const ptr = reinterpret_cast<void*>(start);
  BoundBuffer bound;
  bound.size = len;
  auto external = vk::Make<VkExternalMemoryBufferCreateInfo>(
      VK_STRUCTURE_TYPE_EXTERNAL_MEMORY_BUFFER_CREATE_INFO);
  external.handleTypes = kHostHandle;
  Result<VkBuffer> buffer = NewBuffer(len, &external);
  if (!buffer.ok()) return buffer.status();
  bound.buffer = *buffer;
  auto fail = [&](Status st) {
    DestroyBuffer(bound);
    return st;
  };
  VkMemoryRequirements req{};
  dev_fn_.GetBufferMemoryRequirements(device_, bound.buffer, &req);
  if (req.size > len) {
    return fail(Status::FromErrno(
        EIO, fmt::format("import of {:#x} bytes at {}: the driver wants {:#x} bytes for the buffer",
                         len, ptr, req.size)));
  }
  auto host = vk::Make<VkMemoryHostPointerPropertiesEXT>(
      VK_STRUCTURE_TYPE_MEMORY_HOST_POINTER_PROPERTIES_EXT);
  VkResult r = dev_fn_.GetMemoryHostPointerPropertiesEXT(device_, kHostHandle, ptr, &host);
  if (r != VK_SUCCESS) {
    return fail(vk::Failed(fmt::format("vkGetMemoryHostPointerPropertiesEXT({})", ptr), r));
  }
  // Host-coherent only: the engine never maps imports, so it could not flush or invalidate them.
  const int type =
      MemoryType(req.memoryTypeBits & host.memoryTypeBits, VK_MEMORY_PROPERTY_HOST_COHERENT_BIT);
  if (type < 0) {
    return fail(Status::FromErrno(
        ENOTSUP, fmt::format("import at {}: no host-coherent memory type accepts it (buffer types "
                             "{:#x}, host pointer types {:#x})",
                             ptr, req.memoryTypeBits, host.memoryTypeBits)));
  }
  auto import = vk::Make<VkImportMemoryHostPointerInfoEXT>(
      VK_STRUCTURE_TYPE_IMPORT_MEMORY_HOST_POINTER_INFO_EXT);
  import.handleType = kHostHandle;
  import.pHostPointer = ptr;
  auto alloc = vk::Make<VkMemoryAllocateInfo>(VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO, &import);
  alloc.allocationSize = len;
  alloc.memoryTypeIndex = uint32_t(type);
  r = dev_fn_.AllocateMemory(device_, &alloc, nullptr, &bound.memory);
  if (r != VK_SUCCESS) {
    bound.memory = VK_NULL_HANDLE;
    return fail(vk::Failed(fmt::format("import of {:#x} bytes at {}", len, ptr), r));
  }
  r = dev_fn_.BindBufferMemory(device_, bound.buffer, bound.memory, 0);
  if (r != VK_SUCCESS) return fail(vk::Failed("vkBindBufferMemory of a host import", r));
  return bound;
}

}  // namespace vulkan_detail

// DeviceAllocation: the public handle.

DeviceAllocation& DeviceAllocation::operator=(DeviceAllocation&& other) noexcept {
  if (this != &other) {
    Free();
    record_ = std::move(other.record_);
  }
  return *this;
}

void* DeviceAllocation::data() const {
  return record_ ? reinterpret_cast<void*>(record_->addr) : nullptr;
}

size_t DeviceAllocation::size() const {
  return record_ ? record_->size : 0;
}

bool DeviceAllocation::mapped() const {
  return record_ && record_->mapped;
}

void DeviceAllocation::Free() {
  if (!record_) return;
  record_->core->Unpublish(*record_);
  record_.reset();  // the last reference (this, or a batch in flight) frees the memory
}

}  // namespace hmmkit::dma
