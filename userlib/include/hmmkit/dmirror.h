/** @file
 * The test_hmm-compatible device ("dmirror") over hmmkit's emulated accelerator.
 *
 * The kernel's test_hmm module exposes /dev/hmm_dmirror0..3; this API offers the same commands to
 * the calling process, over its real address space, without the module. Devices 0 and 1 have
 * device-private memory, 2 and 3 device-coherent memory; each is its own page owner, so a page on
 * device 1 is a remote page for device 0. Each open handle is one mirror of the calling process's
 * address space (kernel: one struct dmirror per open file). A forked child that opens a device gets
 * a mirror of its own address space.
 *
 * Every command takes a struct hmm_dmirror_cmd: `addr` (page-aligned), `npages`, `ptr` (a bounce
 * buffer of npages pages for READ/WRITE/MIGRATE_TO_DEV/EXCLUSIVE, one byte per page for SNAPSHOT)
 * and returns `cpages` and `faults` (zeroed on entry, written on success). Errors (-1 and errno):
 *   EINVAL  bad handle, unaligned addr, npages 0 or overflow, unknown request; for
 *           MIGRATE_TO_DEV/EXCLUSIVE a range without a VMA or without read permission
 *   EFAULT  READ/WRITE of an unmapped or PROT_NONE page
 *   EPERM   WRITE to a read-only mapping; CHECK_EXCLUSIVE while a page is still exclusive
 *   ENOENT  MIGRATE_TO_DEV: a page did not migrate (MAP_SHARED, another device's page, pinned)
 *   ENOMEM  device memory exhausted (after eviction) or HMM_DMIRROR_FLAG_FAIL_ALLOC
 *   ENOTSUP the kernel offers no userfaultfd (see `hmmctl info`)
 * Thread-safety: any thread may call; commands on one handle are serialized.
 */
#ifndef HMMKIT_DMIRROR_H_
#define HMMKIT_DMIRROR_H_

#include <linux/types.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

struct hmm_dmirror_cmd {
  __u64 addr;
  __u64 ptr;
  __u64 npages;
  __u64 cpages;
  __u64 faults;
};

#define HMM_DMIRROR_READ _IOWR('H', 0x00, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_WRITE _IOWR('H', 0x01, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_MIGRATE_TO_DEV _IOWR('H', 0x02, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_MIGRATE_TO_SYS _IOWR('H', 0x03, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_SNAPSHOT _IOWR('H', 0x04, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_EXCLUSIVE _IOWR('H', 0x05, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_CHECK_EXCLUSIVE _IOWR('H', 0x06, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_RELEASE _IOWR('H', 0x07, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_FLAGS _IOWR('H', 0x08, struct hmm_dmirror_cmd) /* cmd.npages = flags */

/** The next device allocation (or, migrating back, system allocation) fails once. */
#define HMM_DMIRROR_FLAG_FAIL_ALLOC (1ULL << 0)

/** SNAPSHOT: one byte per page. */
enum {
  HMM_DMIRROR_PROT_ERROR = 0xFF,
  HMM_DMIRROR_PROT_NONE = 0x00,
  HMM_DMIRROR_PROT_READ = 0x01,
  HMM_DMIRROR_PROT_WRITE = 0x02,
  HMM_DMIRROR_PROT_PMD = 0x04,
  HMM_DMIRROR_PROT_PUD = 0x08,
  HMM_DMIRROR_PROT_ZERO = 0x10,
  HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL = 0x20,
  HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE = 0x30,
  HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL = 0x40,
  HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE = 0x50,
};

/** Opens device `index` (0..3). Returns a handle >= 0, or -1 with errno (ENODEV: no such device;
 * ENOTSUP: no userfaultfd). */
int hmm_dmirror_open(unsigned index);
/** Runs one command. Returns 0, or -1 with errno (see above). */
int hmm_dmirror_ioctl(int handle, unsigned long request, struct hmm_dmirror_cmd* cmd);
/** mmap of a device handle: `length` bytes of driver-owned pages (kernel: pages the driver
 * inserts), mapped shared; they snapshot as READ (and WRITE with PROT_WRITE). Returns MAP_FAILED
 * with errno on error. */
void* hmm_dmirror_mmap(int handle, void* addr, size_t length, int prot, int flags, off_t offset);
/** Closes the handle; its mirror is dropped. Returns 0, or -1 with errno EINVAL. */
int hmm_dmirror_close(int handle);

#ifdef __cplusplus
}
#endif

#endif /* HMMKIT_DMIRROR_H_ */
