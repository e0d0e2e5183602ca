#include "vulkan_loader.hpp"

#include <dlfcn.h>

#include <fmt/format.h>

#include <cerrno>

namespace hmmkit::dma::vk {

namespace {

template <class Fn>
Fn Cast(PFN_vkVoidFunction f) {
  return reinterpret_cast<Fn>(f);
}

}  // namespace

Result<GlobalFns> OpenLoader(const std::string& library) {
  // Never closed (see the file comment of vulkan_loader.hpp).
  void* handle = dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!handle) {
    const char* why = dlerror();
    return Status::FromErrno(
        ENOENT, fmt::format("Vulkan loader {} cannot be opened ({}); install the Vulkan loader "
                            "(Debian: libvulkan1) and an ICD, e.g. mesa-vulkan-drivers for the "
                            "lavapipe CPU device",
                            library, why ? why : "no reason given"));
  }
  GlobalFns fns;
  // dlsym returns void*; POSIX guarantees the round trip to a function pointer.
  fns.GetInstanceProcAddr =
      reinterpret_cast<PFN_vkGetInstanceProcAddr>(dlsym(handle, "vkGetInstanceProcAddr"));
  if (!fns.GetInstanceProcAddr) {
    return Status::FromErrno(
        ENOTSUP, fmt::format("{} has no vkGetInstanceProcAddr: not a Vulkan loader", library));
  }
#define HMMKIT_VK_LOAD(name) \
  fns.name = Cast<PFN_vk##name>(fns.GetInstanceProcAddr(VK_NULL_HANDLE, "vk" #name));
  HMMKIT_VK_GLOBAL_FNS(HMMKIT_VK_LOAD)
#undef HMMKIT_VK_LOAD
  if (!fns.CreateInstance) {
    return Status::FromErrno(
        ENOTSUP, fmt::format("{} does not resolve vkCreateInstance: not a Vulkan loader", library));
  }
  return fns;
}

void PinLibraryOf(const void* code) {
  Dl_info info{};
  if (dladdr(code, &info) == 0 || !info.dli_fname) return;
  // RTLD_NOLOAD: only if loaded already (it is); RTLD_NODELETE sticks to the loaded object. The
  // handle's reference is never dropped either.
  dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
}

Status LoadInstanceFns(const GlobalFns& global, VkInstance instance, InstanceFns& out) {
#define HMMKIT_VK_LOAD(name)                                                                     \
  out.name = Cast<PFN_vk##name>(global.GetInstanceProcAddr(instance, "vk" #name));               \
  if (!out.name) {                                                                               \
    return Status::FromErrno(ENOTSUP, "Vulkan instance lacks vk" #name " (Vulkan 1.1+ needed)"); \
  }
  HMMKIT_VK_INSTANCE_FNS(HMMKIT_VK_LOAD)
#undef HMMKIT_VK_LOAD
  return Status::Ok();
}

Status LoadDeviceFns(const InstanceFns& instance, VkDevice device, DeviceFns& out) {
#define HMMKIT_VK_LOAD(name)                                                                  \
  out.name = Cast<PFN_vk##name>(instance.GetDeviceProcAddr(device, "vk" #name));              \
  if (!out.name) {                                                                            \
    return Status::FromErrno(ENOTSUP, "Vulkan device lacks vk" #name                          \
                                      " (needs Vulkan 1.2 and VK_EXT_external_memory_host)"); \
  }
  HMMKIT_VK_DEVICE_FNS(HMMKIT_VK_LOAD)
#undef HMMKIT_VK_LOAD
  return Status::Ok();
}

std::string ResultName(VkResult result) {
  switch (result) {
#define HMMKIT_VK_CASE(r) \
  case r:                 \
    return #r;
    HMMKIT_VK_CASE(VK_SUCCESS)
    HMMKIT_VK_CASE(VK_NOT_READY)
    HMMKIT_VK_CASE(VK_TIMEOUT)
    HMMKIT_VK_CASE(VK_INCOMPLETE)
    HMMKIT_VK_CASE(VK_ERROR_OUT_OF_HOST_MEMORY)
    HMMKIT_VK_CASE(VK_ERROR_OUT_OF_DEVICE_MEMORY)
    HMMKIT_VK_CASE(VK_ERROR_INITIALIZATION_FAILED)
    HMMKIT_VK_CASE(VK_ERROR_DEVICE_LOST)
    HMMKIT_VK_CASE(VK_ERROR_MEMORY_MAP_FAILED)
    HMMKIT_VK_CASE(VK_ERROR_LAYER_NOT_PRESENT)
    HMMKIT_VK_CASE(VK_ERROR_EXTENSION_NOT_PRESENT)
    HMMKIT_VK_CASE(VK_ERROR_FEATURE_NOT_PRESENT)
    HMMKIT_VK_CASE(VK_ERROR_INCOMPATIBLE_DRIVER)
    HMMKIT_VK_CASE(VK_ERROR_TOO_MANY_OBJECTS)
    HMMKIT_VK_CASE(VK_ERROR_FORMAT_NOT_SUPPORTED)
    HMMKIT_VK_CASE(VK_ERROR_FRAGMENTED_POOL)
    HMMKIT_VK_CASE(VK_ERROR_UNKNOWN)
    HMMKIT_VK_CASE(VK_ERROR_OUT_OF_POOL_MEMORY)
    HMMKIT_VK_CASE(VK_ERROR_INVALID_EXTERNAL_HANDLE)
    HMMKIT_VK_CASE(VK_ERROR_FRAGMENTATION)
    HMMKIT_VK_CASE(VK_ERROR_INVALID_OPAQUE_CAPTURE_ADDRESS)
#undef HMMKIT_VK_CASE
    default:
      return fmt::format("VkResult({})", static_cast<int>(result));
  }
}

int ResultErrno(VkResult result) {
  switch (result) {
    case VK_ERROR_OUT_OF_HOST_MEMORY:
    case VK_ERROR_OUT_OF_DEVICE_MEMORY:
    case VK_ERROR_OUT_OF_POOL_MEMORY:
    case VK_ERROR_FRAGMENTED_POOL:
    case VK_ERROR_FRAGMENTATION:
    case VK_ERROR_TOO_MANY_OBJECTS:
      return ENOMEM;
    case VK_ERROR_INVALID_EXTERNAL_HANDLE:
      return EFAULT;
    case VK_ERROR_EXTENSION_NOT_PRESENT:
    case VK_ERROR_FEATURE_NOT_PRESENT:
    case VK_ERROR_INCOMPATIBLE_DRIVER:
    case VK_ERROR_LAYER_NOT_PRESENT:
      return ENOTSUP;
    default:
      return EIO;
  }
}

Status Failed(std::string_view what, VkResult result) {
  return Status::FromErrno(ResultErrno(result), fmt::format("{}: {}", what, ResultName(result)));
}

std::string VersionString(uint32_t version) {
  return fmt::format("{}.{}.{}", VK_API_VERSION_MAJOR(version), VK_API_VERSION_MINOR(version),
                     VK_API_VERSION_PATCH(version));
}

}  // namespace hmmkit::dma::vk
