#include "hmmkit/drm/discovery.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>
#include <xf86drm.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>

#include "hmmkit/base/log.hpp"

namespace hmmkit::drm {

namespace {

std::string BusOf(const drmDevice& d) {
  char buf[128];
  switch (d.bustype) {
    case DRM_BUS_PCI:
      std::snprintf(buf, sizeof buf, "pci %04x:%02x:%02x.%u (%04x:%04x)", d.businfo.pci->domain,
                    d.businfo.pci->bus, d.businfo.pci->dev, unsigned(d.businfo.pci->func),
                    d.deviceinfo.pci->vendor_id, d.deviceinfo.pci->device_id);
      return buf;
    case DRM_BUS_USB:
      return "usb";
    case DRM_BUS_PLATFORM:
      return std::string("platform ") + d.businfo.platform->fullname;
    case DRM_BUS_HOST1X:
      return std::string("host1x ") + d.businfo.host1x->fullname;
    default:
      return "unknown";
  }
}

// The sysfs device directory of a DRM node, which its card and render nodes share.
std::string SysfsDevice(const std::string& node) {
  struct stat st {};
  if (stat(node.c_str(), &st) != 0) return {};
  char link[64];
  std::snprintf(link, sizeof link, "/sys/dev/char/%u:%u/device", major(st.st_rdev),
                minor(st.st_rdev));
  char real[PATH_MAX];
  if (realpath(link, real) == nullptr) return {};
  return real;
}

void ReadVersion(DrmDeviceInfo& info) {
  for (const std::string& node : {info.render, info.card}) {
    if (node.empty()) continue;
    const int fd = ::open(node.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) {
      info.error = "open " + node + ": " + std::strerror(errno);
      continue;
    }
    if (drmVersionPtr v = drmGetVersion(fd)) {
      info.driver.name.assign(v->name, size_t(v->name_len));
      info.driver.desc.assign(v->desc, size_t(v->desc_len));
      info.driver.date.assign(v->date, size_t(v->date_len));
      info.driver.major = v->version_major;
      info.driver.minor = v->version_minor;
      info.driver.patch = v->version_patchlevel;
      drmFreeVersion(v);
      info.error.clear();
    } else {
      info.error = node + ": DRM_IOCTL_VERSION failed";
    }
    close(fd);
    if (!info.driver.name.empty()) return;
  }
}

}  // namespace

std::vector<DrmDeviceInfo> ListDrmDevices() {
  std::vector<DrmDeviceInfo> out;
  std::set<std::string> seen;
  const int n = drmGetDevices2(0, nullptr, 0);
  if (n > 0) {
    std::vector<drmDevicePtr> devs(size_t(n), nullptr);
    const int got = drmGetDevices2(0, devs.data(), n);
    for (int i = 0; i < got; ++i) {
      DrmDeviceInfo info;
      info.from_libdrm = true;
      if (devs[i]->available_nodes & (1 << DRM_NODE_PRIMARY))
        info.card = devs[i]->nodes[DRM_NODE_PRIMARY];
      if (devs[i]->available_nodes & (1 << DRM_NODE_RENDER))
        info.render = devs[i]->nodes[DRM_NODE_RENDER];
      info.bus = BusOf(*devs[i]);
      seen.insert(info.card);
      seen.insert(info.render);
      out.push_back(std::move(info));
    }
    drmFreeDevices(devs.data(), got > 0 ? got : 0);
  }
  // Nodes libdrm skipped, grouped by their sysfs device.
  if (DIR* dir = opendir("/dev/dri")) {
    std::vector<std::string> nodes;
    while (dirent* e = readdir(dir)) {
      const std::string name = e->d_name;
      if (name.rfind("card", 0) == 0 || name.rfind("renderD", 0) == 0) nodes.push_back(name);
    }
    closedir(dir);
    std::sort(nodes.begin(), nodes.end());
    for (const std::string& name : nodes) {
      const std::string path = "/dev/dri/" + name;
      if (seen.count(path)) continue;
      const std::string sys = SysfsDevice(path);
      DrmDeviceInfo* slot = nullptr;
      for (DrmDeviceInfo& o : out) {
        if (o.from_libdrm || sys.empty()) continue;
        const std::string& other = !o.card.empty() ? o.card : o.render;
        if (SysfsDevice(other) == sys) slot = &o;
      }
      if (slot == nullptr) {
        out.emplace_back();
        slot = &out.back();
        const size_t slash = sys.rfind('/');
        slot->bus = sys.empty() ? "unknown" : "sysfs " + sys.substr(slash + 1);
      }
      (name[0] == 'c' ? slot->card : slot->render) = path;
      seen.insert(path);
    }
  }
  for (DrmDeviceInfo& info : out) {
    ReadVersion(info);
    Log().debug("drm: device card={} render={} bus={} driver={} {}", info.card, info.render,
                info.bus, info.driver.name, info.error);
  }
  return out;
}

Result<std::shared_ptr<DrmDevice>> OpenDrmDevice(const std::string& driver, bool want_card) {
  const auto devices = ListDrmDevices();
  std::string found;
  for (const DrmDeviceInfo& d : devices) {
    const std::string& first = !d.card.empty() ? d.card : d.render;
    found += (found.empty() ? "" : ", ") + first + " (" +
             (d.driver.name.empty() ? d.error : d.driver.name) + ")";
    if (!driver.empty() && d.driver.name != driver) continue;
    if (d.driver.name.empty()) continue;
    const std::string& preferred = want_card ? d.card : d.render;
    const std::string& other = want_card ? d.render : d.card;
    return DrmDevice::Open(!preferred.empty() ? preferred : other);
  }
  // A node we could not open may be the one asked for: say so rather than "none".
  for (const DrmDeviceInfo& d : devices) {
    if (d.driver.name.empty() && !d.error.empty()) {
      return Status::FromErrno(
          EACCES, "no usable DRM device" + (driver.empty() ? "" : " with driver " + driver) + "; " +
                      d.error + " (the user needs the 'render' or 'video' group)");
    }
  }
  return Status::FromErrno(ENODEV,
                           "no DRM device" + (driver.empty() ? "" : " with driver " + driver) +
                               (found.empty() ? " (no /dev/dri nodes)" : "; found: " + found));
}

}  // namespace hmmkit::drm
