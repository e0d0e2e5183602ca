// Small helpers over the userfaultfd ioctls, used by the monitor (defined in mm_monitor.cpp).
#pragma once

#include <cstdint>

#include "hmmkit/base/status.hpp"
#include "hmmkit/mirror/sys.hpp"
#include "hmmkit/mirror/uapi.hpp"

namespace hmmkit::uffd {

// ioctl retried on EINTR; returns 0 or -1 with errno set.
int IoctlRetry(Sys& sys, int fd, unsigned long request, void* arg);

// UFFDIO_REGISTER of [start, end) with `modes` (UFFDIO_REGISTER_MODE_*). Errors: the ioctl's errno.
Status Register(Sys& sys, int fd, uintptr_t start, uintptr_t end, uint64_t modes);
Status Unregister(Sys& sys, int fd, uintptr_t start, uintptr_t end);

}  // namespace hmmkit::uffd
