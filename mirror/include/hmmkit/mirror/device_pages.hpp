/// @file
/// Device pages as the CPU side sees them (kernel: ZONE_DEVICE pages, struct dev_pagemap and
/// dev_pagemap_ops).
///
/// A device's memory is described to mirror/ by a DevicePagemap, implemented by the driver
/// (driver/device_memory.hpp). When a migration (migrate.hpp) moves a CPU page onto a device page,
/// the AddressSpace records a *device entry* at that address (the kernel's device-private swap
/// entry): which pagemap, which page, whether the CPU mapping was writable. The entry holds one
/// page reference (GetPage) until the page leaves the address (migrated back, unmapped, evicted).
///
/// What the CPU sees at a device entry depends on the pagemap's kind:
///   kDevicePrivate   nothing: the CPU page is zapped; a touch faults into the monitor, which calls
///                    the pagemap's MigrateToRam (kernel: migrate_to_ram) and resumes the thread.
///   kDeviceCoherent  the device page itself, mapped at the address (a shared mapping of the
///                    device arena), so the CPU reads and writes it without a fault.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "hmmkit/base/status.hpp"

namespace hmmkit {

class AddressSpace;

/// What a range_fault entry says the page is. Values are stored in the entry (range_fault.hpp).
enum class PageKind : uint8_t {
  kSystem = 0,          ///< ordinary system memory
  kZero = 1,            ///< the shared zero page (read-only)
  kDevicePrivate = 2,   ///< device memory the CPU cannot reach; a CPU touch migrates it back
  kDeviceCoherent = 3,  ///< device memory the CPU reads and writes in place
};
const char* ToString(PageKind kind);

struct DevicePageInfo {
  PageKind kind = PageKind::kSystem;  ///< kSystem: no device page at this address
  const void* owner = nullptr;        ///< the pgmap owner token of the device holding the page
  uint64_t id = 0;                    ///< the device's page id (reported in the entry payload)
  bool writable = false;
  uint8_t order = 0;
  /// Device-exclusive entries (make_device_exclusive): the page is system memory taken out of the
  /// CPU's reach for the device `owner`; `data` is where its bytes are while it is exclusive.
  bool exclusive = false;
  void* data = nullptr;
};

/// One device's memory. Implemented by the driver; registered implicitly by the device entries
/// that point at it. Lifetime rule (kernel: the pgmap outlives every page reference): a pagemap
/// must not be destroyed while any of its pages is referenced; the driver evicts them first
/// (MigrateDevicePages in migrate.hpp) and waits for the references to drop.
class DevicePagemap {
 public:
  virtual ~DevicePagemap() = default;

  /// Required, constant. The owner token (kernel: pgmap->owner). Devices that share an owner see
  /// each other's private pages as local.
  virtual const void* owner() const = 0;
  /// Required, constant. kDevicePrivate or kDeviceCoherent.
  virtual PageKind kind() const = 0;

  /// Required. Page references (kernel: get_page/put_page on a ZONE_DEVICE page). Called from any
  /// thread, with AddressSpace locks held: must not block and must not call back into mirror/. When
  /// the last reference drops the pagemap frees the page (kernel: page_free).
  virtual void GetPage(uint64_t id) = 0;
  virtual void PutPage(uint64_t id) = 0;

  /// Required. The CPU address of the page's bytes (device memory is mapped into the process), used
  /// to copy a page back when no DMA engine is involved (fork, teardown) and, for coherent
  /// pagemaps, to map the page at the application's address. Never blocks.
  virtual void* PageData(uint64_t id) = 0;
  /// Required for coherent pagemaps: the file descriptor and offset that map PageData(id)
  /// (MAP_SHARED). Private pagemaps return -1.
  virtual int ArenaFd() const { return -1; }
  virtual uint64_t ArenaOffset(uint64_t /*id*/) const { return 0; }

  /// Optional. Copies device pages to system buffers (the driver's DMA engine). The default copies
  /// with memcpy from PageData. Context: the thread running the migration back (the monitor's fault
  /// thread for CPU faults): must not touch mirrored CPU memory that could fault. Errors: the first
  /// failed copy; no page is committed then.
  virtual Status CopyToRam(std::span<const uint64_t> ids, std::span<void* const> dst);

  /// Optional. True when CopyToRam is a plain copy from PageData (host-visible device memory): a
  /// private page coming back is then copied by the kernel straight from PageData into the faulting
  /// address (UFFDIO_COPY), one copy instead of CopyToRam into staging pages plus UFFDIO_COPY.
  /// CopiedToRam(n) then reports the n pages that came back that way (for the driver's counters;
  /// same context as CopyToRam).
  virtual bool HostReadable() const { return false; }
  virtual void CopiedToRam(size_t /*pages*/) {}

  /// Optional (kernel: dev_pagemap_ops.migrate_to_ram). Called when the CPU touches a private page
  /// at `addr` (the monitor's fault thread) or a device asks for it (range_fault on another owner's
  /// page, the caller's thread). Must bring at least [addr, addr + page) back to system memory, or
  /// return an error (the faulting thread then gets SIGBUS). The default migrates the page and its
  /// neighbours within AddressSpace::Options::fault_window with MigrateVma (SELECT_DEVICE_PRIVATE)
  /// and CopyToRam.
  virtual Status MigrateToRam(AddressSpace& as, uintptr_t addr);
};

}  // namespace hmmkit
