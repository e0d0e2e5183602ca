// Private to hmmkit::dma: checking host memory before a device touches it.
//
// A driver that imports host memory may not check it (lavapipe's queue thread simply memcpy's, so
// an unmapped page would kill the process), and a real GPU's import pins pages without telling
// which page failed. ProbeHostRange makes every page of a range present with the access the device
// will make, through the kernel, so that a bad address becomes an errno and an address:
//
//   1. madvise(MADV_POPULATE_READ or MADV_POPULATE_WRITE) over the pages of the range: one system
//      call that faults the pages in exactly as a CPU access would (userfaultfd faults go to their
//      monitor and the call waits for it; copy-on-write is broken for writes) but returns an error
//      instead of raising SIGSEGV/SIGBUS. It walks page tables only, with no copy: on the machines
//      measured it costs about half of a memcpy of the range (docs/dma.md).
//   2. When that fails (or `populate` is false, or the kernel predates Linux 5.14 and answers
//      EINVAL), the range is probed page by page through VmAccess, which finds the first bad byte
//      and its errno: process_vm_readv of one byte of every page for a read; for a write, that
//      read and then process_vm_writev of the same byte values back. (The written byte is one the
//      descriptor itself is about to write, so writing back its old value cannot disturb another
//      transfer.) This path is slower (one page pinned and copied per page) but needs nothing
//      beyond what CpuDmaEngine already uses, and tests inject errors through VmAccess.
//
// mincore and msync were not chosen: they report holes but not PROT_NONE or read-only pages, and
// they fault nothing in.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>

#include "hmmkit/dma/vm_access.hpp"

namespace hmmkit::dma {

struct ProbeFault {
  int err = 0;         // EFAULT for a page that cannot be accessed; else the system call's errno
  uintptr_t addr = 0;  // the first byte of the range that could not be accessed
};

// Checks (and faults in) [addr, addr + len) for reading (write false) or writing. len > 0. Blocks
// while a userfaultfd monitor resolves faults of the range. Returns nullopt when every page can be
// accessed. Thread-safe.
std::optional<ProbeFault> ProbeHostRange(VmAccess& vm, uintptr_t addr, size_t len, bool write,
                                         bool populate);

}  // namespace hmmkit::dma
