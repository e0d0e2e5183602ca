// Attaches an MmMonitor to libhmmkit_interpose when that library is loaded (found at run time with
// dlsym, so hmmkit::mirror has no link-time dependency on it).
#pragma once

#include "hmmkit/base/status.hpp"

namespace hmmkit {

class MmMonitor;

// Errors: ENOTSUP when libhmmkit_interpose is not loaded or does not interpose munmap (the message
// says how to load it). Context: AddressSpace::Create.
Status InterposeAttach(MmMonitor& monitor);
// After return no interposed call is running into `monitor`. Context: ~AddressSpace.
void InterposeDetach(MmMonitor& monitor);

}  // namespace hmmkit
