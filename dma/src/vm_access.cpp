#include "hmmkit/dma/vm_access.hpp"

#include <unistd.h>

namespace hmmkit::dma {

ssize_t VmAccess::ReadV(std::span<const iovec> local, std::span<const iovec> remote) {
  return process_vm_readv(getpid(), local.data(), local.size(), remote.data(), remote.size(), 0);
}

ssize_t VmAccess::WriteV(std::span<const iovec> local, std::span<const iovec> remote) {
  return process_vm_writev(getpid(), local.data(), local.size(), remote.data(), remote.size(), 0);
}

VmAccess& VmAccess::Real() {
  static VmAccess real;
  return real;
}

}  // namespace hmmkit::dma
