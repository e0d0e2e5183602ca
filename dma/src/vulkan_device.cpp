// Core: opening Vulkan, choosing the physical device and queue family, creating the device.
// (Device memory and host imports are in vulkan_memory.cpp.)
#include "vulkan_device.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

#include "hmmkit/base/log.hpp"

namespace hmmkit::dma::vulkan_detail {

namespace {

constexpr uint32_t kMinApi = VK_API_VERSION_1_2;  // timeline semaphores, vkWaitSemaphores

const char* const kInstallHint =
    "install a Vulkan driver (ICD), e.g. the Debian package mesa-vulkan-drivers for the lavapipe "
    "CPU device";

// What Examine learned about one physical device.
struct Candidate {
  VkPhysicalDevice physical = VK_NULL_HANDLE;
  VulkanDmaEngine::DeviceInfo info;
  uint64_t max_allocation = 0;
};

std::string QueueFlagsString(VkQueueFlags flags) {
  std::string s;
  auto add = [&](VkQueueFlags bit, const char* name) {
    if (!(flags & bit)) return;
    if (!s.empty()) s += '|';
    s += name;
  };
  add(VK_QUEUE_GRAPHICS_BIT, "graphics");
  add(VK_QUEUE_COMPUTE_BIT, "compute");
  add(VK_QUEUE_TRANSFER_BIT, "transfer");
  return s.empty() ? std::string("none") : s;
}

// The queue family to use: transfer-only first (a copy engine), then compute without graphics,
// then any family with graphics or compute (those support transfer commands whether or not they
// report the bit). -1 when no family can copy.
int PickQueueFamily(const std::vector<VkQueueFamilyProperties>& families) {
  constexpr VkQueueFlags kGc = VK_QUEUE_GRAPHICS_BIT | VK_QUEUE_COMPUTE_BIT;
  auto rank = [&](VkQueueFlags f) {
    if ((f & VK_QUEUE_TRANSFER_BIT) && !(f & kGc)) return 0;
    if ((f & VK_QUEUE_COMPUTE_BIT) && !(f & VK_QUEUE_GRAPHICS_BIT)) return 1;
    if (f & kGc) return 2;
    return 3;  // sparse binding, video, ...: no buffer copies
  };
  int best = -1;
  for (size_t i = 0; i < families.size(); ++i) {
    if (families[i].queueCount == 0 || rank(families[i].queueFlags) == 3) continue;
    if (best < 0 || rank(families[i].queueFlags) < rank(families[size_t(best)].queueFlags)) {
      best = int(i);
    }
  }
  return best;
}

// Fills `out` for `physical`, or says why the engine cannot use it: ENOTSUP naming every missing
// feature, ENODEV when Options::drm_node does not match.
Status Examine(const vk::InstanceFns& fn, VkPhysicalDevice physical, uint32_t index,
               const VulkanDmaEngine::Options& options, Candidate& out) {
  out.physical = physical;
  VulkanDmaEngine::DeviceInfo& info = out.info;
  info.physical_device_index = index;
  VkPhysicalDeviceProperties props{};
  fn.GetPhysicalDeviceProperties(physical, &props);
  info.device_name = props.deviceName;
  info.api_version = props.apiVersion;
  info.vendor_id = props.vendorID;
  info.device_id = props.deviceID;
  const std::string who = fmt::format("device {} ({})", index, info.device_name);

  uint32_t count = 0;
  fn.EnumerateDeviceExtensionProperties(physical, nullptr, &count, nullptr);
  std::vector<VkExtensionProperties> exts(count);
  fn.EnumerateDeviceExtensionProperties(physical, nullptr, &count, exts.data());
  auto has = [&](const char* name) {
    return std::any_of(exts.begin(), exts.end(), [&](const VkExtensionProperties& e) {
      return !strcmp(e.extensionName, name);
    });
  };
  const bool host_ext = has(VK_EXT_EXTERNAL_MEMORY_HOST_EXTENSION_NAME);
  const bool drm_ext = has(VK_EXT_PHYSICAL_DEVICE_DRM_EXTENSION_NAME);
  const bool api12 = props.apiVersion >= kMinApi;

  if (options.drm_node && !drm_ext) {
    return Status::FromErrno(ENODEV, fmt::format("{}: does not report its DRM node (no {})", who,
                                                 VK_EXT_PHYSICAL_DEVICE_DRM_EXTENSION_NAME));
  }
  std::vector<std::string> missing;
  if (!api12) {
    missing.push_back(fmt::format("Vulkan 1.2 for timeline semaphores (device has {})",
                                  vk::VersionString(props.apiVersion)));
  }
  if (!host_ext) missing.push_back(VK_EXT_EXTERNAL_MEMORY_HOST_EXTENSION_NAME);

  // Properties of the extensions and versions the device has. (Chaining a structure of an
  // unsupported extension or version is not allowed.)
  auto props2 =
      vk::Make<VkPhysicalDeviceProperties2>(VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2);
  auto m3 = vk::Make<VkPhysicalDeviceMaintenance3Properties>(
      VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_MAINTENANCE_3_PROPERTIES);
  auto m4 = vk::Make<VkPhysicalDeviceMaintenance4Properties>(
      VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_MAINTENANCE_4_PROPERTIES);
  auto driver = vk::Make<VkPhysicalDeviceDriverProperties>(
      VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_DRIVER_PROPERTIES);
  auto host = vk::Make<VkPhysicalDeviceExternalMemoryHostPropertiesEXT>(
      VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_EXTERNAL_MEMORY_HOST_PROPERTIES_EXT);
  auto drm = vk::Make<VkPhysicalDeviceDrmPropertiesEXT>(
      VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_DRM_PROPERTIES_EXT);
  void** tail = &props2.pNext;
  auto chain = [&](auto& s) {
    *tail = &s;
    tail = &s.pNext;
  };
  chain(m3);
  if (props.apiVersion >= VK_API_VERSION_1_3) chain(m4);
  if (api12) chain(driver);
  if (host_ext) chain(host);
  if (drm_ext) chain(drm);
  fn.GetPhysicalDeviceProperties2(physical, &props2);
  if (api12) {
    info.driver_name = driver.driverName;
    info.driver_info = driver.driverInfo;
  }
  info.import_alignment = size_t(host.minImportedHostPointerAlignment);
  out.max_allocation = m3.maxMemoryAllocationSize;
  if (props.apiVersion >= VK_API_VERSION_1_3) {
    out.max_allocation = std::min<uint64_t>(out.max_allocation, m4.maxBufferSize);
  }
  if (drm_ext && drm.hasPrimary) info.drm_primary = {drm.primaryMajor, drm.primaryMinor};
  if (drm_ext && drm.hasRender) info.drm_render = {drm.renderMajor, drm.renderMinor};
  if (options.drm_node && info.drm_primary != options.drm_node &&
      info.drm_render != options.drm_node) {
    auto node = [](const std::optional<VulkanDmaEngine::DrmNode>& n) {
      return n ? fmt::format("{}:{}", n->major, n->minor) : std::string("-");
    };
    return Status::FromErrno(
        ENODEV, fmt::format("{}: DRM nodes primary {} render {}, not {}", who,
                            node(info.drm_primary), node(info.drm_render), node(options.drm_node)));
  }

  if (api12) {
    auto f12 = vk::Make<VkPhysicalDeviceVulkan12Features>(
        VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES);
    auto f2 =
        vk::Make<VkPhysicalDeviceFeatures2>(VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2, &f12);
    fn.GetPhysicalDeviceFeatures2(physical, &f2);
    if (!f12.timelineSemaphore) missing.push_back("the timelineSemaphore feature");
  }

  fn.GetPhysicalDeviceQueueFamilyProperties(physical, &count, nullptr);
  std::vector<VkQueueFamilyProperties> families(count);
  fn.GetPhysicalDeviceQueueFamilyProperties(physical, &count, families.data());
  const int family = PickQueueFamily(families);
  if (family < 0) {
    missing.push_back("a queue family with transfer, compute or graphics");
  } else {
    info.queue_family = uint32_t(family);
    info.queue_flags = families[size_t(family)].queueFlags;
    info.transfer_only_queue = !(info.queue_flags & (VK_QUEUE_GRAPHICS_BIT | VK_QUEUE_COMPUTE_BIT));
  }
  if (host_ext &&
      (info.import_alignment == 0 || (info.import_alignment & (info.import_alignment - 1)) != 0)) {
    missing.push_back(fmt::format("a power-of-two minImportedHostPointerAlignment (reports {})",
                                  info.import_alignment));
  }
  if (!missing.empty()) {
    std::string list;
    for (const std::string& m : missing) list += (list.empty() ? "" : ", ") + m;
    return Status::FromErrno(ENOTSUP, fmt::format("{}: lacks {}", who, list));
  }
  return Status::Ok();
}

}  // namespace

Result<std::shared_ptr<Core>> Core::Create(const VulkanDmaEngine::Options& options) {
  std::shared_ptr<Core> core(new Core());
  HMMKIT_RETURN_IF_ERROR(core->CreateInstance(options));
  HMMKIT_RETURN_IF_ERROR(core->SelectAndCreateDevice(options));
  return core;
}

Core::~Core() {
  if (device_) dev_fn_.DestroyDevice(device_, nullptr);
  if (instance_) inst_fn_.DestroyInstance(instance_, nullptr);
}

Status Core::CreateInstance(const VulkanDmaEngine::Options& options) {
  Result<vk::GlobalFns> global = vk::OpenLoader(options.loader);
  if (!global.ok()) return global.status();
  global_fn_ = *global;
  uint32_t loader_version = VK_API_VERSION_1_0;
  if (global_fn_.EnumerateInstanceVersion) global_fn_.EnumerateInstanceVersion(&loader_version);
  if (loader_version < VK_API_VERSION_1_1) {
    return Status::FromErrno(
        ENOTSUP, fmt::format("Vulkan loader {} supports Vulkan {} only; the engine needs 1.2",
                             options.loader, vk::VersionString(loader_version)));
  }
  auto app = vk::Make<VkApplicationInfo>(VK_STRUCTURE_TYPE_APPLICATION_INFO);
  app.pApplicationName = "hmmkit";
  app.pEngineName = "hmmkit::dma";
  app.apiVersion = kMinApi;
  auto create = vk::Make<VkInstanceCreateInfo>(VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO);
  create.pApplicationInfo = &app;
  const VkResult r = global_fn_.CreateInstance(&create, nullptr, &instance_);
  if (r == VK_ERROR_INCOMPATIBLE_DRIVER) {
    return Status::FromErrno(
        ENODEV, fmt::format("vkCreateInstance: no Vulkan driver found ({}); {}", vk::ResultName(r),
                            kInstallHint));
  }
  if (r != VK_SUCCESS) return vk::Failed("vkCreateInstance", r);
  return vk::LoadInstanceFns(global_fn_, instance_, inst_fn_);
}

Status Core::SelectAndCreateDevice(const VulkanDmaEngine::Options& options) {
  uint32_t count = 0;
  VkResult r = inst_fn_.EnumeratePhysicalDevices(instance_, &count, nullptr);
  if (r != VK_SUCCESS) return vk::Failed("vkEnumeratePhysicalDevices", r);
  std::vector<VkPhysicalDevice> devices(count);
  r = inst_fn_.EnumeratePhysicalDevices(instance_, &count, devices.data());
  if (r != VK_SUCCESS && r != VK_INCOMPLETE) return vk::Failed("vkEnumeratePhysicalDevices", r);
  devices.resize(count);
  if (devices.empty()) {
    return Status::FromErrno(ENODEV,
                             fmt::format("Vulkan reports no physical device; {}", kInstallHint));
  }
  uint32_t first = 0, last = count;
  if (options.device_index) {
    if (*options.device_index >= count) {
      return Status::FromErrno(
          ENODEV, fmt::format("no Vulkan device {}: there are {}", *options.device_index, count));
    }
    first = *options.device_index;
    last = first + 1;
  }

  // The first candidate that has everything and whose device can be created. Reasons for the
  // others go into the error: ENOTSUP if any lacked a feature, else the first reason's errno.
  std::string reasons;
  int err = 0;
  for (uint32_t i = first; i < last; ++i) {
    Candidate c;
    Status why = Examine(inst_fn_, devices[i], i, options, c);
    if (why.ok()) {
      const float priority = 1.0f;
      auto queue = vk::Make<VkDeviceQueueCreateInfo>(VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO);
      queue.queueFamilyIndex = c.info.queue_family;
      queue.queueCount = 1;
      queue.pQueuePriorities = &priority;
      auto f12 = vk::Make<VkPhysicalDeviceVulkan12Features>(
          VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES);
      f12.timelineSemaphore = VK_TRUE;
      const char* const exts[] = {VK_EXT_EXTERNAL_MEMORY_HOST_EXTENSION_NAME};
      auto create = vk::Make<VkDeviceCreateInfo>(VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO, &f12);
      create.queueCreateInfoCount = 1;
      create.pQueueCreateInfos = &queue;
      create.enabledExtensionCount = 1;
      create.ppEnabledExtensionNames = exts;
      r = inst_fn_.CreateDevice(c.physical, &create, nullptr, &device_);
      if (r == VK_SUCCESS) {
        why = vk::LoadDeviceFns(inst_fn_, device_, dev_fn_);
        if (why.ok()) vk::PinLibraryOf(reinterpret_cast<const void*>(dev_fn_.CmdCopyBuffer));
        if (!why.ok()) {
          // Destroy through the instance-level pointer: the device table may be incomplete.
          auto destroy = reinterpret_cast<PFN_vkDestroyDevice>(
              inst_fn_.GetDeviceProcAddr(device_, "vkDestroyDevice"));
          if (destroy) destroy(device_, nullptr);
          device_ = VK_NULL_HANDLE;
          why = Status::FromErrno(
              why.errno_value(),
              fmt::format("device {} ({}): {}", i, c.info.device_name, why.message()));
        }
      } else {
        device_ = VK_NULL_HANDLE;
        why = vk::Failed(fmt::format("device {} ({}): vkCreateDevice", i, c.info.device_name), r);
      }
    }
    if (why.ok()) {
      physical_ = c.physical;
      info_ = std::move(c.info);
      max_allocation_ = c.max_allocation;
      break;
    }
    if (err == 0 || why.errno_value() == ENOTSUP) err = why.errno_value();
    reasons += (reasons.empty() ? "" : "; ") + why.message();
  }
  if (!device_) {
    return Status::FromErrno(err, fmt::format("no usable Vulkan device: {}", reasons));
  }

  dev_fn_.GetDeviceQueue(device_, info_.queue_family, 0, &queue_);
  inst_fn_.GetPhysicalDeviceMemoryProperties(physical_, &memory_);
  constexpr VkMemoryPropertyFlags kMappable = VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT |
                                              VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT |
                                              VK_MEMORY_PROPERTY_HOST_COHERENT_BIT;
  info_.mappable_device_memory = MemoryType(~0u, kMappable) >= 0;
  // Largest import: the option, clamped to what one allocation and one buffer may be, less room
  // for rounding a piece out to the alignment on both sides.
  const size_t align = info_.import_alignment;
  const uint64_t limit = std::min<uint64_t>(options.max_import_bytes, max_allocation_);
  info_.max_import_bytes = size_t(limit / align * align);

  Log().info(
      "VulkanDmaEngine: device {} '{}' (vendor {:#06x}, device {:#06x}, Vulkan {}), driver {} "
      "({}), queue family {} ({}{}), host import alignment {:#x}, max import {:#x}, device memory "
      "{}, DRM node {}",
      info_.physical_device_index, info_.device_name, info_.vendor_id, info_.device_id,
      vk::VersionString(info_.api_version), info_.driver_name, info_.driver_info,
      info_.queue_family, QueueFlagsString(info_.queue_flags),
      info_.transfer_only_queue ? ", transfer-only" : ", no transfer-only family",
      info_.import_alignment, info_.max_import_bytes,
      info_.mappable_device_memory ? "mappable" : "not mappable (PROT_NONE reservations)",
      info_.drm_render
          ? fmt::format("render {}:{}", info_.drm_render->major, info_.drm_render->minor)
      : info_.drm_primary
          ? fmt::format("primary {}:{}", info_.drm_primary->major, info_.drm_primary->minor)
          : std::string("unknown"));
  return Status::Ok();
}

int Core::MemoryType(uint32_t bits, VkMemoryPropertyFlags want) const {
  for (uint32_t i = 0; i < memory_.memoryTypeCount; ++i) {
    if ((bits & (1u << i)) && (memory_.memoryTypes[i].propertyFlags & want) == want) return int(i);
  }
  return -1;
}

}  // namespace hmmkit::dma::vulkan_detail
