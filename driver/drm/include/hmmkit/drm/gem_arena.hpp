/// @file
/// Device memory in a GEM object: what DeviceMemory needs to carve its pages out of a DRM buffer
/// instead of a memfd, so that the migration, fault and SVM-manager code runs unchanged with
/// device memory that a real kernel driver owns (and that can be shared as a dma-buf).
#pragma once

#include <cstddef>
#include <memory>

#include "hmmkit/base/status.hpp"
#include "hmmkit/driver/device_memory.hpp"
#include "hmmkit/drm/drm_device.hpp"

namespace hmmkit::drm {

/// Creates a dumb buffer of `capacity` bytes on `dev` (its card node) and returns the arena for
/// DeviceMemory::Options::external: the buffer's dma-buf fd at offset 0 when PRIME export works,
/// else the DRM fd at the buffer's MODE_MAP_DUMB offset. The buffer lives until the DeviceMemory
/// releases `keep`. Errors: those of GemBuffer::CreateDumb (ENOTSUP on a render node or a driver
/// without dumb buffers) and MODE_MAP_DUMB; EINVAL when the buffer came out smaller than asked.
Result<driver::DeviceMemory::Options::External> GemArena(const std::shared_ptr<DrmDevice>& dev,
                                                         size_t capacity);

}  // namespace hmmkit::drm
