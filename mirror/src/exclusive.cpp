// make_device_exclusive over the real address space: the page's bytes move to hmmkit-owned memory
// that only the owning device maps; a CPU touch faults (missing page) and restores them after the
// device has been told to drop its mapping (DeviceEntries::RestoreExclusive).
//
// This is stronger than the write-protect variant the brief allows: CPU reads are excluded too.
// UFFDIO_MOVE could avoid the copy; it needs the staging range registered on the same
// userfaultfd, which is left for later (docs/migration.md).
#include <fmt/format.h>
#include <sys/mman.h>

#include <cstring>
#include <mutex>
#include <vector>

#include "device_entries.hpp"
#include "fork_guard.hpp"
#include "hmmkit/mirror/migrate.hpp"
#include "hmmkit/mirror/mm_monitor.hpp"

namespace hmmkit {

Status MakeDeviceExclusive(AddressSpace& as, uintptr_t start, uintptr_t end, const void* owner,
                           std::span<void*> data) {
  const size_t page = as.features().page_size;
  if (start >= end || ((start | end) & (page - 1)))
    return Status::FromErrno(EINVAL, "make_device_exclusive: bad range");
  const size_t n = (end - start) / page;
  if (data.size() < n) return Status::FromErrno(EINVAL, "make_device_exclusive: data too short");
  MmMonitor* monitor = as.monitor();
  if (!monitor)
    return Status::FromErrno(ENOTSUP, "make_device_exclusive needs the userfaultfd monitor");
  // An munmap returns before its event is dispatched: until then the monitor still counts the old
  // mapping's range as registered, and a new mapping at the same address would not be registered
  // (UFFDIO_WRITEPROTECT then fails with ENOENT). Let pending events land first, as migrations do.
  if (monitor->pending_changes() != 0) monitor->Sync();
  // Device-coherent pages are mapped from their device's shared arena: the VMA over them is
  // MAP_SHARED until they come back. Bring every device page of the range back first (the kernel
  // takes a coherent page exclusive in place; here its data moves to system memory, intact).
  // One call per fault window: an entry an earlier call already brought back is skipped.
  for (const auto& seen : as.device_entries().Collect(start, end)) {
    const uintptr_t va = seen.first;
    detail::DeviceEntry now;
    if (!as.device_entries().Find(va, &now) || now.exclusive || !now.pagemap) continue;
    HMMKIT_RETURN_IF_ERROR(now.pagemap->MigrateToRam(as, va));
  }
  // Private anonymous memory without holes. Not necessarily one VMA: coherent pages that came
  // back in separate runs (fault windows, arena offsets that were not consecutive) each land in a
  // VMA of their own, which the kernel does not merge (their anon_vmas differ).
  auto vmas = as.FindVmas(start, end);
  if (!vmas.ok()) return vmas.status();
  uintptr_t covered = start;
  for (const Vma& v : *vmas) {
    if (v.start > covered) break;
    if (!v.migratable())
      return Status::FromErrno(
          EINVAL, fmt::format("make_device_exclusive: {:#x}-{:#x} is not private anonymous memory",
                              v.start, v.end));
    covered = v.end;
  }
  if (covered < end)
    return Status::FromErrno(
        EINVAL, fmt::format("make_device_exclusive: nothing is mapped at {:#x}", covered));
  detail::DeviceEntries& entries = as.device_entries();
  std::shared_lock<std::shared_mutex> fork_lock(ForkMigrationLock());
  HMMKIT_RETURN_IF_ERROR(entries.EnsureRouted(start, end));
  // Writable and present first (this also brings device-private pages back).
  HMMKIT_RETURN_IF_ERROR(as.Populate(start, end, /*write=*/true));

  HMMKIT_RETURN_IF_ERROR(entries.BeginMigration(start, end));
  Status result = Status::Ok();
  {
    NotifierTree::Scope scope(as.notifiers(),
                              NotifierRange{start, end, InvalidateEvent::kExclusive, owner});
    result = monitor->WriteProtect(start, end - start, true);
    if (result.ok()) {
      std::vector<uintptr_t> moved;
      for (size_t i = 0; i < n && result.ok(); ++i) {
        const uintptr_t va = start + i * page;
        void* copy = entries.staging().Alloc();
        if (!copy) {
          result = Status::FromErrno(ENOMEM, "make_device_exclusive: staging memory");
          break;
        }
        std::memcpy(copy, reinterpret_cast<void*>(va), page);
        detail::DeviceEntry e;
        e.exclusive = true;
        e.exclusive_owner = owner;
        e.data = copy;
        e.writable = true;
        e.migrated_at = std::chrono::steady_clock::now();
        entries.Insert(va, e);
        data[i] = copy;
        moved.push_back(va);
      }
      if (result.ok()) {
        const uint64_t token = monitor->ExpectRemove(start, end, MmMonitor::OwnChange::kZap);
        if (as.sys().Madvise(reinterpret_cast<void*>(start), end - start, MADV_DONTNEED) != 0)
          result = Status::FromErrno(errno, "make_device_exclusive: MADV_DONTNEED");
        monitor->EndExpect(token);
      }
      if (!result.ok()) {
        // Undo: the pages are still mapped (or the copies are exact); drop the entries.
        for (uintptr_t va : moved) {
          detail::DeviceEntry e;
          if (entries.Take(va, &e)) entries.staging().Free(e.data);
        }
        monitor->WriteProtect(start, end - start, false).IgnoreError();
      }
    }
  }
  entries.EndMigration(start, end);
  return result;
}

}  // namespace hmmkit
