#include "hmmkit/drm/gem_arena.hpp"

#include <xf86drm.h>

#include "hmmkit/drm/gem.hpp"

namespace hmmkit::drm {

namespace {
// What the DeviceMemory keeps alive: the GEM object and the fd it maps.
struct GemArenaHold {
  GemBuffer buffer;
  UniqueFd dmabuf;
};
}  // namespace

Result<driver::DeviceMemory::Options::External> GemArena(const std::shared_ptr<DrmDevice>& dev,
                                                         size_t capacity) {
  auto buffer = GemBuffer::CreateDumb(dev, capacity);
  if (!buffer.ok()) return buffer.status();
  if (buffer->size() < capacity) {
    return Status::FromErrno(EINVAL, "GEM buffer of " + std::to_string(buffer->size()) +
                                         " bytes for a " + std::to_string(capacity) +
                                         " byte arena");
  }
  auto hold = std::make_shared<GemArenaHold>();
  hold->buffer = std::move(*buffer);
  driver::DeviceMemory::Options::External ext;
  const std::string what = dev->version().name + " GEM object " +
                           std::to_string(hold->buffer.handle()) + " on " + dev->path();
  if (auto fd = hold->buffer.ExportDmaBuf(); fd.ok()) {
    hold->dmabuf = std::move(*fd);
    ext.fd = hold->dmabuf.get();
    ext.offset = 0;
    ext.what = what + " (as a dma-buf)";
  } else {
    drm_mode_map_dumb args{};
    args.handle = hold->buffer.handle();
    if (const int err = dev->Ioctl(DRM_IOCTL_MODE_MAP_DUMB, &args); err != 0) {
      return Status::FromErrno(err, "MODE_MAP_DUMB for the arena " + what);
    }
    ext.fd = dev->fd();
    ext.offset = args.offset;
    ext.what = what + " (through the DRM fd; PRIME export: " + fd.status().message() + ")";
  }
  ext.keep = std::move(hold);
  return ext;
}

}  // namespace hmmkit::drm
