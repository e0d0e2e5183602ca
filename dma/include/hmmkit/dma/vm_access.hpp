/// @file
/// VmAccess: the checked access to this process's own memory that engines use for system-memory
/// endpoints, behind a small interface so that tests can inject errors (EINTR, short transfers,
/// EFAULT) while real-kernel tests stay the default.
///
/// process_vm_readv/process_vm_writev on getpid() copy between two ranges of our own address space
/// through the kernel: an unmapped or PROT_NONE address gives EFAULT instead of SIGSEGV, and a page
/// registered with userfaultfd blocks the caller until its monitor resolves the fault.
///
/// Contract: each method behaves like the system call of the same name applied to this process:
/// it returns the number of bytes transferred (possibly fewer than asked: callers loop) or -1 with
/// errno set. Implementations must be thread-safe. Owned by whoever creates it; must outlive every
/// engine that uses it.
#pragma once

#include <sys/types.h>
#include <sys/uio.h>

#include <span>

namespace hmmkit::dma {

class VmAccess {
 public:
  virtual ~VmAccess() = default;
  /// Copies from the `remote` ranges into the `local` ranges (process_vm_readv).
  virtual ssize_t ReadV(std::span<const iovec> local, std::span<const iovec> remote);
  /// Copies from the `local` ranges into the `remote` ranges (process_vm_writev).
  virtual ssize_t WriteV(std::span<const iovec> local, std::span<const iovec> remote);

  /// The process-wide real implementation.
  static VmAccess& Real();
};

}  // namespace hmmkit::dma
