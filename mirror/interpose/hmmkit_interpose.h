/* libhmmkit_interpose: opt-in interposition of munmap, mremap, madvise, mprotect and
 * mmap(MAP_FIXED).
 *
 * Linked into an executable (hmmkit::interpose) or preloaded (LD_PRELOAD=libhmmkit_interpose.so),
 * the library defines those symbols, calls the registered hooks on the calling thread BEFORE the
 * change, then makes the system call itself. With no hook registered the wrappers cost one atomic
 * load.
 *
 * Hooks run on the application thread that changes its mappings, with whatever locks it holds; a
 * hook must not call the interposed functions (nested calls on the same thread skip the hooks).
 * Calls that glibc makes internally (malloc's own munmap) do not go through these symbols;
 * userfaultfd events still cover them for registered ranges.
 */
#ifndef HMMKIT_INTERPOSE_H
#define HMMKIT_INTERPOSE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum hmmkit_interpose_kind {
  HMMKIT_INTERPOSE_UNMAP =
      0, /* munmap, mremap (old range, and new range with MREMAP_FIXED), mmap MAP_FIXED */
  HMMKIT_INTERPOSE_CLEAR = 1,   /* madvise DONTNEED, DONTNEED_LOCKED, FREE, REMOVE, PAGEOUT */
  HMMKIT_INTERPOSE_PROTECT = 2, /* mprotect */
};

typedef void (*hmmkit_interpose_hook)(void* ctx, uintptr_t start, uintptr_t end, int kind);

/* Registers a hook; returns a slot >= 0, or -1 when all slots are taken. Thread-safe. */
int hmmkit_interpose_register(hmmkit_interpose_hook hook, void* ctx);
/* Unregisters; after return the hook is not running on any thread and will not be called again.
 * Must not be called from inside a hook. */
void hmmkit_interpose_unregister(int slot);

#ifdef __cplusplus
}
#endif

#endif /* HMMKIT_INTERPOSE_H */
