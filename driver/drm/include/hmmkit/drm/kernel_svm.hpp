/// @file
/// KernelSvm: for kernels whose GPU driver mirrors the address space itself (Xe, nouveau, amdkfd),
/// the backend delegates mirroring, faults and migration to the kernel and keeps only the policy:
/// which ranges are mirrored, where they prefer to live, atomics, and prefetch.
///
///   Xe       fault-mode VM (VM_CREATE LR_MODE | FAULT_MODE), one VM_BIND MAP with
///            CPU_ADDR_MIRROR over the range, MADVISE (preferred location, atomics), VM_BIND
///            PREFETCH. Detected by DEVICE_QUERY CONFIG's HAS_CPU_ADDR_MIRROR flag.
///   nouveau  SVM_INIT (everything outside the unmanaged window is mirrored), SVM_BIND
///            MIGRATE to VRAM for prefetch; no advice, no migration to system memory on request.
///   amdkfd   /dev/kfd (not a DRM node), SVM SET_ATTR: ACCESS for the GPU, PREFERRED_LOC,
///            PREFETCH_LOC, flags for atomics (COHERENT).
///
/// Test status: CI has none of this hardware. The struct contents each call produces are checked
/// byte for byte against a recording fake of the ioctl layer (tests/unit/drm_kernel_svm_test.cpp),
/// with layouts taken from the kernel's uAPI headers; nothing here has run against a real Xe,
/// nouveau or amdkfd device yet (docs/drm.md says the same).
///
/// Thread-safety: one KernelSvm per device file; its methods may be called from any thread (the
/// kernel serializes them); it keeps no state after creation besides its ids.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string_view>

#include "hmmkit/base/status.hpp"
#include "hmmkit/drm/drm_device.hpp"

namespace hmmkit::drm {

enum class SvmLocation : uint8_t { kSystem, kDevice };
enum class SvmAtomics : uint8_t { kDefault, kDevice, kGlobal, kCpu };

class KernelSvm {
 public:
  virtual ~KernelSvm() = default;
  virtual std::string_view name() const = 0;
  /// Mirrors [start, start + size) (page-aligned): the device may access it and faults on its own.
  virtual Status Mirror(uint64_t start, uint64_t size) = 0;
  /// Where the kernel should put the range's pages when the device faults on them.
  virtual Status PreferLocation(uint64_t start, uint64_t size, SvmLocation where) = 0;
  /// Who may use atomics on the range. ENOTSUP where the driver has no such control.
  virtual Status SetAtomics(uint64_t start, uint64_t size, SvmAtomics mode) = 0;
  /// Migrates the range now. ENOTSUP where the driver cannot migrate that way.
  virtual Status Prefetch(uint64_t start, uint64_t size, SvmLocation where) = 0;
};

/// Xe. Queries HAS_CPU_ADDR_MIRROR (ENOTSUP without it, naming the flag) and creates a fault-mode
/// VM, destroyed by the destructor. `dev` must be an Xe device file (ENOTSUP otherwise).
Result<std::unique_ptr<KernelSvm>> CreateXeSvm(std::shared_ptr<DrmDevice> dev);

/// nouveau. SVM_INIT with the unmanaged window [unmanaged_addr, + unmanaged_size) (ENOSYS from the
/// kernel: SVM is not enabled for this GPU; EBUSY: already initialized for this file).
Result<std::unique_ptr<KernelSvm>> CreateNouveauSvm(std::shared_ptr<DrmDevice> dev,
                                                    uint64_t unmanaged_addr,
                                                    uint64_t unmanaged_size);

/// amdkfd: `kfd_fd` is an open /dev/kfd (the caller keeps ownership), `gpu_id` the KFD id of the
/// GPU (from the topology in sysfs). Checks the KFD ioctl version (SVM came with 1.5).
Result<std::unique_ptr<KernelSvm>> CreateKfdSvm(int kfd_fd, uint32_t gpu_id, IoctlLayer& ioctl);

}  // namespace hmmkit::drm
