// placeholder: being written. Create() fails until the monitor lands.
#include "hmmkit/mirror/mm_monitor.hpp"
namespace hmmkit {
Result<std::unique_ptr<MmMonitor>> MmMonitor::Create(AddressSpace&) {
  return Status::FromErrno(ENOTSUP, "monitor not built yet");
}
MmMonitor::~MmMonitor() = default;
}  // namespace hmmkit
