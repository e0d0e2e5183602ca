/// @file
/// Migration between system memory and device memory (kernel: migrate_vma_setup/pages/finalize,
/// migrate_device_range, make_device_exclusive), over the real address space.
///
/// A driver migrates [start, end) of one VMA in three steps, exactly as in the kernel:
///
///   MigrateVma m{.start = s, .end = e, .src = src, .dst = dst, .pgmap_owner = owner,
///                .flags = kSelectSystem, .dst_pagemap = &device_memory};
///   MigrateVmaSetup(as, m);        // collect: src[i] has kMigrate for each page that can move;
///                                  // present pages are write-protected (writers wait), every
///                                  // other mirror gets a kMigrate invalidation with `owner`
///   for each i with src[i] & kMigrate:
///     allocate a device page, dst[i] = migrate_pfn::FromDevice(id) (the ref moves to hmmkit);
///     copy from migrate_pfn::SystemAddress(src[i]) (or zero-fill when src[i] has no kValid:
///     a hole or the zero page) with the DMA engine
///   MigrateVmaPages(m);            // commit: the CPU page is zapped, a device entry installed
///   MigrateVmaFinalize(m);         // restore what did not migrate, wake blocked writers
///
/// The other direction selects kSelectDevicePrivate (or kSelectDeviceCoherent) pages of one
/// pagemap and fills dst with system pages from MigrateVmaAllocSystemPages.
///
/// What moves (deliberate limits, as in the kernel): only private anonymous VMAs (MAP_SHARED and
/// file mappings are never migrated: src stays 0 and the caller reports ENOENT); pages pinned with
/// PinLongTerm, swapped pages, and pages that another thread unmapped or cleared during the
/// migration are skipped, never lost. Huge pages are migrated as 4 KiB pages (kCompound is not
/// produced yet; see docs/migration.md).
///
/// Concurrency: migrations of overlapping ranges are serialized (the second waits in Setup, unless
/// a MigrationNoWaitScope is open on its thread: then EBUSY). A thread never waits for its own
/// migration: a Setup overlapping a migration the calling thread has in flight (an eviction run
/// from inside a migration of the range, through the device memory allocator) fails with EDEADLK. A
/// CPU write to a page being migrated blocks until Finalize, then faults the page back if it moved.
/// CPU reads see the old page until it is zapped. Setup must not be called from an Invalidate
/// callback or with a driver lock held that such a callback takes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include "hmmkit/base/status.hpp"
#include "hmmkit/mirror/address_space.hpp"
#include "hmmkit/mirror/device_pages.hpp"

namespace hmmkit {

/// While one is open on a thread, the migrations that thread starts fail with EBUSY instead of
/// waiting for an overlapping migration of another thread (the kernel's evictions trylock pages
/// for the same reason). DeviceMemory opens one around the eviction hook it runs when an
/// allocation finds no free page: the allocating thread may be inside a migration whose pages the
/// eviction picked, and the other migration may be waiting for that very eviction to end. The
/// allocator then evicts another chunk. Nests; per thread.
class MigrationNoWaitScope {
 public:
  MigrationNoWaitScope();
  ~MigrationNoWaitScope();
  MigrationNoWaitScope(const MigrationNoWaitScope&) = delete;
  MigrationNoWaitScope& operator=(const MigrationNoWaitScope&) = delete;
};

/// Entry layout of MigrateVma::src/dst (the kernel's migrate_pfn bits).
namespace migrate_pfn {
inline constexpr uint64_t kValid = 1ULL << 0;
inline constexpr uint64_t kMigrate = 1ULL << 1;
inline constexpr uint64_t kWrite = 1ULL << 3;
inline constexpr uint64_t kCompound = 1ULL << 4;
inline constexpr unsigned kShift = 6;

inline uint64_t FromDevice(uint64_t id) {
  return (id << kShift) | kValid;
}
inline uint64_t FromSystem(const void* page) {
  return ((uintptr_t(page) >> 12) << kShift) | kValid;
}
inline uint64_t DeviceId(uint64_t e) {
  return e >> kShift;
}
inline void* SystemAddress(uint64_t e) {
  return reinterpret_cast<void*>((e >> kShift) << 12);
}
}  // namespace migrate_pfn

enum MigrateSelect : uint32_t {
  kSelectSystem = 1u << 0,
  kSelectDevicePrivate = 1u << 1,
  kSelectDeviceCoherent = 1u << 2,
  kSelectCompound = 1u << 3,  ///< accepted; huge pages still migrate as 4 KiB pages
};

namespace detail {
struct MigrateState;
}

struct MigrateVma {
  uintptr_t start = 0;
  uintptr_t end = 0;                  ///< exclusive; [start, end) must lie in one VMA
  std::span<uint64_t> src;            ///< (end - start) / page entries, written by Setup
  std::span<uint64_t> dst;            ///< same size, written by the driver
  size_t cpages = 0;                  ///< pages collected by Setup (src has kMigrate)
  size_t npages = 0;                  ///< (end - start) / page
  const void* pgmap_owner = nullptr;  ///< the migrating device; raised with kMigrate
  uint32_t flags = 0;                 ///< MigrateSelect bits
  /// kSelectSystem: the pagemap the dst device page ids belong to (required).
  DevicePagemap* dst_pagemap = nullptr;
  /// kSelectDevice*: collect only this pagemap's pages (required; its owner must be pgmap_owner).
  DevicePagemap* src_pagemap = nullptr;

  std::shared_ptr<detail::MigrateState> state;  ///< hmmkit's; set by Setup, cleared by Finalize
};

/// Collects the pages. Errors: EINVAL (unaligned, empty, spans more than one VMA, no VMA, no select
/// flag, missing pagemap, entries too short), ENOTSUP (no userfaultfd monitor: migration needs it),
/// registration errors, EAGAIN (to a device: the VMA was replaced by another mapping while the
/// range was being registered; look again and retry), EDEADLK (the calling thread is migrating an
/// overlapping range itself), EBUSY (another thread is, and a MigrationNoWaitScope is open). After
/// an error nothing was changed and Finalize need not be called.
Status MigrateVmaSetup(AddressSpace& as, MigrateVma& m);

/// For device->system migrations: points dst[i] at a fresh system staging page for every collected
/// page (hmmkit owns the staging memory; it is released by Finalize). Pages for which the driver
/// wants no migration keep dst[i] = 0. Errors: ENOMEM.
Status MigrateVmaAllocSystemPages(MigrateVma& m);

/// Commits every page with src kMigrate and dst kValid: the CPU now reaches it only through the
/// device (private), the device page (coherent), or the new system page. Pages that raced with an
/// unmap or clear lose kMigrate in src. Errors: unexpected system call failures; the pages not
/// committed are restored by Finalize either way.
Status MigrateVmaPages(MigrateVma& m);

/// Ends the migration: pages not migrated stay where they were with their data, device pages in dst
/// that were not used are released (PutPage), writers blocked since Setup resume. Always succeeds.
void MigrateVmaFinalize(MigrateVma& m);

/// migrate_device_range: moves the given pages of `pm` back to system memory wherever `as`
/// maps them, without walking VMAs (eviction). Pages not mapped anywhere are skipped. An entry
/// still at an address with no VMA once every event the monitor holds is dispatched (SyncUnread)
/// and with no change still queued over it (ChangePending: on the event thread Sync cannot wait
/// for those) outlived its mapping: notifiers get the kUnmap invalidation it missed, then the
/// entry is dropped and its reference put (PutPage), with a warning. If the monitor cannot tell
/// (messages kept arriving for 100 ms) the entry is kept and counts as a failure. A run refused
/// with EAGAIN (the mm is changing) is retried, 200 µs apart, for up to 5 s. Data is copied
/// with pm.CopyToRam. Context: any thread but the monitor's fault thread, no driver lock that an
/// Invalidate callback takes. Errors: the first failure; pages already moved stay moved.
Status MigrateDevicePages(AddressSpace& as, DevicePagemap& pm, std::span<const uint64_t> ids);

/// Moves every page of `pm` that `as` maps back to system memory. A driver calls it before it
/// destroys the pagemap (the pgmap lifetime rule). Errors: as MigrateDevicePages.
Status MigrateAllToRam(AddressSpace& as, DevicePagemap& pm);

/// The default migrate_to_ram: brings back the pages of `pm` in the fault window around `addr`
/// (AddressSpace::Options::fault_window pages, aligned, clipped to the VMA), honouring the
/// migration timeslice. Used by DevicePagemap::MigrateToRam's default.
Status MigrateToRamWindow(AddressSpace& as, DevicePagemap& pm, uintptr_t addr);

/// make_device_exclusive: takes [start, end) out of the CPU's reach for device `owner` (device
/// atomics). Device pages in the range come back to system memory first (device-coherent ones
/// too, which the kernel would take exclusive in place). Each page is faulted in writable, a
/// kExclusive invalidation with `owner` is raised, and its bytes move to hmmkit-owned memory;
/// data[i] receives where page i now lives (the device maps that). A CPU access raises a kExclusive
/// invalidation with owner nullptr (the device must drop its mapping), then restores the page.
/// The range may span several VMAs. Errors: EFAULT/EPERM as range_fault with a write fault,
/// EINVAL (bad range, `data` too short, or part of the range is a hole or not private anonymous
/// memory: the message names where), ENOTSUP (no monitor).
Status MakeDeviceExclusive(AddressSpace& as, uintptr_t start, uintptr_t end, const void* owner,
                           std::span<void*> data);

/// FOLL_LONGTERM: migrates device pages in [start, end) back to system memory, then pins the range
/// (its pages are skipped by later migrations until UnpinLongTerm). Errors: as range_fault.
Status PinLongTerm(AddressSpace& as, uintptr_t start, uintptr_t end);
void UnpinLongTerm(AddressSpace& as, uintptr_t start, uintptr_t end);

}  // namespace hmmkit
