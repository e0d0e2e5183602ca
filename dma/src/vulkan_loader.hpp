// Private to hmmkit::dma: the Vulkan loader opened at run time, and the function tables the Vulkan
// engine calls through. Nothing here is linked against libvulkan: OpenLoader dlopens it, takes
// vkGetInstanceProcAddr with dlsym, and every other entry point comes from that (global and
// instance level) or from vkGetDeviceProcAddr (device level, which skips the loader's dispatch).
//
// Neither the loader library nor the driver (ICD) is ever unloaded. The loader dlcloses an ICD
// when the last instance is destroyed; reloading lavapipe then repeats its start-up for every
// engine (about 60 ms instead of 15 ms), and leak checkers cannot name frames of an unloaded
// library (the one-time allocations of its pthread_once initialisers are reported as leaks from
// "<unknown module>"). So OpenLoader never dlcloses, and PinLibraryOf marks the ICD RTLD_NODELETE
// once a device exists. dlopen of an already open library only takes a reference, so each engine
// may call OpenLoader again.
//
// Thread-safety: the tables are plain structs of function pointers, filled once and read-only
// after; the Vulkan rules on external synchronisation apply to the calls themselves.
#pragma once

#define VK_NO_PROTOTYPES
#include <vulkan/vulkan.h>

#include <string>
#include <string_view>

#include "hmmkit/base/status.hpp"

namespace hmmkit::dma::vk {

// Global entry points (vkGetInstanceProcAddr with a null instance). vkEnumerateInstanceVersion is
// optional: a Vulkan 1.0 loader lacks it.
#define HMMKIT_VK_GLOBAL_FNS(X) \
  X(CreateInstance)             \
  X(EnumerateInstanceVersion)

#define HMMKIT_VK_INSTANCE_FNS(X)           \
  X(DestroyInstance)                        \
  X(EnumeratePhysicalDevices)               \
  X(GetPhysicalDeviceProperties)            \
  X(GetPhysicalDeviceProperties2)           \
  X(GetPhysicalDeviceFeatures2)             \
  X(GetPhysicalDeviceQueueFamilyProperties) \
  X(GetPhysicalDeviceMemoryProperties)      \
  X(EnumerateDeviceExtensionProperties)     \
  X(CreateDevice)                           \
  X(GetDeviceProcAddr)

#define HMMKIT_VK_DEVICE_FNS(X)        \
  X(DestroyDevice)                     \
  X(GetDeviceQueue)                    \
  X(QueueSubmit)                       \
  X(QueueWaitIdle)                     \
  X(CreateBuffer)                      \
  X(DestroyBuffer)                     \
  X(GetBufferMemoryRequirements)       \
  X(AllocateMemory)                    \
  X(FreeMemory)                        \
  X(BindBufferMemory)                  \
  X(MapMemory)                         \
  X(GetMemoryHostPointerPropertiesEXT) \
  X(CreateCommandPool)                 \
  X(DestroyCommandPool)                \
  X(ResetCommandPool)                  \
  X(AllocateCommandBuffers)            \
  X(BeginCommandBuffer)                \
  X(EndCommandBuffer)                  \
  X(CmdCopyBuffer)                     \
  X(CmdFillBuffer)                     \
  X(CmdPipelineBarrier)                \
  X(CreateSemaphore)                   \
  X(DestroySemaphore)                  \
  X(WaitSemaphores)                    \
  X(GetSemaphoreCounterValue)

#define HMMKIT_VK_MEMBER(name) PFN_vk##name name = nullptr;

struct GlobalFns {
  PFN_vkGetInstanceProcAddr GetInstanceProcAddr = nullptr;
  HMMKIT_VK_GLOBAL_FNS(HMMKIT_VK_MEMBER)
};
struct InstanceFns {
  HMMKIT_VK_INSTANCE_FNS(HMMKIT_VK_MEMBER)
};
struct DeviceFns {
  HMMKIT_VK_DEVICE_FNS(HMMKIT_VK_MEMBER)
};

#undef HMMKIT_VK_MEMBER

// dlopens `library` (a soname or a path; RTLD_NOW | RTLD_LOCAL) and fills the global table.
// Errors: ENOENT when the library cannot be opened (the message carries dlerror() and says to
// install libvulkan1 and an ICD such as mesa-vulkan-drivers); ENOTSUP when it has no
// vkGetInstanceProcAddr or no vkCreateInstance (not a Vulkan loader).
Result<GlobalFns> OpenLoader(const std::string& library);

// Marks the shared object that contains `code` (a device-level entry point: the ICD, or a layer)
// RTLD_NODELETE, so that it stays loaded for the rest of the process. Best effort: does nothing
// when dladdr cannot tell.
void PinLibraryOf(const void* code);

// Fills the instance table through vkGetInstanceProcAddr. ENOTSUP naming the first missing entry
// point (a Vulkan 1.0 instance lacks the *2 queries).
Status LoadInstanceFns(const GlobalFns& global, VkInstance instance, InstanceFns& out);

// Fills the device table through vkGetDeviceProcAddr. ENOTSUP naming the first missing entry point
// (vkWaitSemaphores needs a Vulkan 1.2 device; vkGetMemoryHostPointerPropertiesEXT needs
// VK_EXT_external_memory_host enabled).
Status LoadDeviceFns(const InstanceFns& instance, VkDevice device, DeviceFns& out);

// "VK_ERROR_DEVICE_LOST", or the number for codes this table does not know.
std::string ResultName(VkResult result);

// The errno a failed call maps to: ENOMEM for the out-of-memory codes, EFAULT for an invalid
// external handle (a host pointer the driver refused), ENOTSUP for missing features, extensions
// and drivers, EIO for the rest (device lost included).
int ResultErrno(VkResult result);

// Status for a failed Vulkan call: "<what>: VK_ERROR_..." with ResultErrno.
Status Failed(std::string_view what, VkResult result);

// A zeroed Vulkan structure with its sType set (and pNext, when given).
template <class T>
T Make(VkStructureType type, const void* next = nullptr) {
  T s{};
  s.sType = type;
  s.pNext = const_cast<void*>(next);  // some pNext members are void*, some const void*
  return s;
}

// "1.3.230" for a VK_MAKE_API_VERSION value.
std::string VersionString(uint32_t version);

}  // namespace hmmkit::dma::vk
