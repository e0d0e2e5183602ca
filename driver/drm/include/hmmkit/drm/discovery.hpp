/// @file
/// Discovery of the DRM devices of this machine.
///
/// ListDrmDevices asks libdrm (drmGetDevices2) and then scans /dev/dri for nodes libdrm skipped
/// (it drops devices whose bus it cannot describe, which is what virtual drivers such as vgem look
/// like on x86), so every node appears once. For each device it opens one node to read the driver
/// version (drmGetVersion); a node that cannot be opened is still listed, with the reason.
#pragma once

#include <string>
#include <vector>

#include "hmmkit/base/status.hpp"
#include "hmmkit/drm/drm_device.hpp"

namespace hmmkit::drm {

struct DrmDeviceInfo {
  std::string card;          ///< "/dev/dri/card0", or empty
  std::string render;        ///< "/dev/dri/renderD128", or empty
  std::string bus;           ///< "pci 0000:00:02.0 (8086:46a6)", "platform vgem", "unknown"
  bool from_libdrm = false;  ///< false: found by the /dev/dri scan only
  DriverVersion driver;      ///< empty name when no node could be opened
  std::string error;         ///< why the version could not be read (e.g. no permission), or empty
};

/// Never fails: no /dev/dri gives an empty list. Logs (debug) what was found.
std::vector<DrmDeviceInfo> ListDrmDevices();

/// The first device whose driver is `driver` (any driver when empty), opened on its card node when
/// `want_card` (needed for dumb buffers) else on its render node (falling back to the other node).
/// Errors: ENODEV with the list of what exists ("no DRM device with driver vgem; found: ..."), or
/// the open error of the node (EACCES names the groups to join).
Result<std::shared_ptr<DrmDevice>> OpenDrmDevice(const std::string& driver, bool want_card);

}  // namespace hmmkit::drm
