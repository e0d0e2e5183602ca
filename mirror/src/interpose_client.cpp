// placeholder: being written.
#include "interpose_client.hpp"
namespace hmmkit {
Status InterposeAttach(MmMonitor&) { return Status::FromErrno(ENOTSUP, "not built yet"); }
void InterposeDetach(MmMonitor&) {}
}  // namespace hmmkit
