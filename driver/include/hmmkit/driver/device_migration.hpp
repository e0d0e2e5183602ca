/// @file
/// The driver side of a migration between system memory and a DeviceMemory, with the copies done by
/// a DMA engine: what a driver's migrate_to_device and its explicit migrate-back look like around
/// mirror's MigrateVma (kernel: the driver code between migrate_vma_setup and migrate_vma_pages).
///
/// Both functions work on one VMA's worth of [start, end) (page aligned, inside a single VMA; split
/// a longer range with AddressSpace::FindVmas). They take no lock of their own and may block on the
/// DMA fence; call them from a thread that is not the monitor's fault thread and that holds no lock
/// a notifier callback takes (the migration raises kMigrate invalidations and waits for them).
#pragma once

#include <cstddef>
#include <cstdint>

#include "hmmkit/base/status.hpp"
#include "hmmkit/dma/dma_engine.hpp"
#include "hmmkit/driver/device_memory.hpp"
#include "hmmkit/mirror/address_space.hpp"

namespace hmmkit::driver {

struct DeviceMigrationResult {
  size_t collected = 0;  ///< pages MigrateVmaSetup selected
  size_t migrated = 0;   ///< pages that moved
};

/// Moves the system pages of [start, end) into `mem` (owner mem.owner()). An aligned, fully
/// collected 2 MiB block gets one device folio (chunk) when one is free; the rest gets 4 KiB
/// pages. Holes and the zero page become zero-filled device pages. Pages that cannot move (pinned,
/// swapped, changed meanwhile) stay in system memory: not an error. Errors: MigrateVmaSetup's
/// (EINVAL for a bad range or one spanning VMAs, ENOTSUP without the monitor); ENOMEM when the
/// device memory ran out (after eviction; the pages allocated so far still moved); the first DMA
/// error (the pages whose copy failed stay in system memory).
Result<DeviceMigrationResult> MigrateToDevice(AddressSpace& as, DeviceMemory& mem,
                                              dma::DmaEngine& dma, uintptr_t start, uintptr_t end);

/// Moves the pages of `mem` in [start, end) back to system memory (copies with `dma`). Errors:
/// MigrateVmaSetup's, the staging allocation's, the DMA's (then nothing moves and the pages stay on
/// the device, intact).
Result<DeviceMigrationResult> MigrateToSystem(AddressSpace& as, DeviceMemory& mem,
                                              dma::DmaEngine& dma, uintptr_t start, uintptr_t end);

}  // namespace hmmkit::driver
