// Fork handling for device pages (BRIEF pitfall 2: without it a child reads zeros where the
// parent had device-private pages).
//
// pthread_atfork prepare: every live AddressSpace of this process moves its device pages and
// device-exclusive pages back to system memory, then migrations are held off until fork returns,
// so both processes get the data as ordinary anonymous memory (copy-on-write as usual). After the
// fork the parent raises a kProtectionPage invalidation over everything: its pages are now
// copy-on-write shared, and mirrors must not keep write access. A raw clone() without libc runs no
// handler: see docs/migration.md for what such a child gets.
#pragma once

#include <shared_mutex>

namespace hmmkit {

class AddressSpace;

void ForkGuardAdd(AddressSpace& as);
void ForkGuardRemove(AddressSpace& as);

// Held (shared) by every migration from Setup to Finalize; fork takes it exclusively.
std::shared_mutex& ForkMigrationLock();

}  // namespace hmmkit
