// The seam through which device memory (driver/, issue 3) tells range_fault what lives at an
// address whose CPU page is gone (device-private) or is device memory the CPU can reach
// (device-coherent).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "hmmkit/base/status.hpp"

namespace hmmkit {

// What a range_fault entry says the page is. Values are stored in the entry (range_fault.hpp).
enum class PageKind : uint8_t {
  kSystem = 0,          // ordinary system memory
  kZero = 1,            // the shared zero page (read-only)
  kDevicePrivate = 2,   // device memory the CPU cannot reach; a CPU touch migrates it back
  kDeviceCoherent = 3,  // device memory the CPU reads and writes in place
};
const char* ToString(PageKind kind);

struct DevicePageInfo {
  PageKind kind = PageKind::kSystem;  // kSystem: no device page at this address
  const void* owner = nullptr;        // the pgmap owner token of the device holding the page
  uint64_t id = 0;                    // the device's page id (reported in the entry payload)
  bool writable = false;
  uint8_t order = 0;
};

// Implemented by device page maps. Owned by the driver; registered with AddressSpace and removed
// before it is destroyed.
class DevicePageProvider {
 public:
  virtual ~DevicePageProvider() = default;

  // Required. Fills out[i] for the page at start + i * page size, leaving kSystem where the
  // provider has no page; returns how many device pages it found. Context: the range_fault caller's
  // thread, no hmmkit lock held. Must not block on a lock held across an Invalidate callback.
  virtual size_t LookupRange(uintptr_t start, uintptr_t end, std::span<DevicePageInfo> out) = 0;

  // Required. Moves the device pages in [start, end) back to system memory (kernel: migrate_to_ram,
  // taken when a fault asks for a page another owner holds privately). Same context as LookupRange.
  // Errors: whatever the migration returns; range_fault passes them to its caller.
  virtual Status MigrateToRam(uintptr_t start, uintptr_t end) = 0;
};

}  // namespace hmmkit
