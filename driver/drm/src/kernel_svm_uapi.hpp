// The uAPI of the kernels that implement SVM themselves, defined here because Debian 12's headers
// predate Xe and its madvise, and <linux/kfd_ioctl.h> does not compile without <drm/drm.h>.
// Layouts follow include/uapi/drm/xe_drm.h, nouveau_drm.h and linux/kfd_ioctl.h; the
// static_asserts pin the sizes the kernel expects.
#pragma once

#include <xf86drm.h>

#include <cstdint>

namespace hmmkit::drm::uapi {

// ---- Xe ----
struct XeDeviceQuery {
  uint64_t extensions;
  uint32_t query;
  uint32_t size;
  uint64_t data;
  uint64_t reserved[2];
};
struct XeVmCreate {
  uint64_t extensions;
  uint32_t flags;
  uint32_t vm_id;
  uint64_t reserved[2];
};
struct XeVmDestroy {
  uint32_t vm_id;
  uint32_t pad;
  uint64_t reserved[2];
};
struct XeVmBindOp {
  uint64_t extensions;
  uint32_t obj;
  uint16_t pat_index;
  uint16_t pad;
  uint64_t obj_offset;  // union: obj_offset / userptr / cpu_addr_mirror_offset
  uint64_t range;
  uint64_t addr;
  uint32_t op;
  uint32_t flags;
  uint32_t prefetch_mem_region_instance;
  uint32_t pad2;
  uint64_t reserved[3];
};
struct XeVmBind {
  uint64_t extensions;
  uint32_t vm_id;
  uint32_t exec_queue_id;
  uint32_t pad;
  uint32_t num_binds;
  XeVmBindOp bind;  // union with vector_of_binds (num_binds > 1)
  uint32_t pad2;
  uint32_t num_syncs;
  uint64_t syncs;
  uint64_t reserved[2];
};
struct XeMadvise {
  uint64_t extensions;
  uint64_t start;
  uint64_t range;
  uint32_t vm_id;
  uint32_t type;
  // union: preferred_mem_loc {u32 devmem_fd; u16 migration_policy; u16 region_instance;
  // u64 reserved} / atomic {u32 val; u32 pad; u64 reserved} / pat_index (same shape)
  uint32_t u32_0;
  uint16_t u16_4;
  uint16_t u16_6;
  uint64_t u_reserved;
  uint64_t reserved[2];
};
static_assert(sizeof(XeDeviceQuery) == 40 && sizeof(XeVmCreate) == 32);
static_assert(sizeof(XeVmDestroy) == 24 && sizeof(XeVmBindOp) == 80);
static_assert(sizeof(XeVmBind) == 136 && sizeof(XeMadvise) == 64);

inline constexpr unsigned long kXeDeviceQuery = DRM_IOWR(DRM_COMMAND_BASE + 0x00, XeDeviceQuery);
inline constexpr unsigned long kXeVmCreate = DRM_IOWR(DRM_COMMAND_BASE + 0x03, XeVmCreate);
inline constexpr unsigned long kXeVmDestroy = DRM_IOW(DRM_COMMAND_BASE + 0x04, XeVmDestroy);
inline constexpr unsigned long kXeVmBind = DRM_IOW(DRM_COMMAND_BASE + 0x05, XeVmBind);
inline constexpr unsigned long kXeMadvise = DRM_IOW(DRM_COMMAND_BASE + 0x0c, XeMadvise);
static_assert(kXeDeviceQuery == 0xC0286440 && kXeVmCreate == 0xC0206443);
static_assert(kXeVmDestroy == 0x40186444 && kXeVmBind == 0x40886445 && kXeMadvise == 0x4040644C);

inline constexpr uint32_t kXeQueryConfig = 2;
inline constexpr uint32_t kXeConfigFlags = 1;  // index into the config's info[]
inline constexpr uint32_t kXeConfigVaBits = 3;
inline constexpr uint64_t kXeFlagHasCpuAddrMirror = 1u << 2;
inline constexpr uint32_t kXeVmCreateLrMode = 1u << 1;
inline constexpr uint32_t kXeVmCreateFaultMode = 1u << 2;
inline constexpr uint32_t kXeBindOpMap = 0x0;
inline constexpr uint32_t kXeBindOpPrefetch = 0x4;
inline constexpr uint32_t kXeBindFlagCpuAddrMirror = 1u << 5;
inline constexpr uint32_t kXeBindFlagMadviseAutoreset = 1u << 6;
inline constexpr uint32_t kXeConsultMemAdvisePrefLoc = 0xffffffffu;  // -1
inline constexpr uint32_t kXeAttrPreferredLoc = 0;
inline constexpr uint32_t kXeAttrAtomic = 1;
inline constexpr uint32_t kXePreferredLocDefaultDevice = 0;
inline constexpr uint32_t kXePreferredLocDefaultSystem = 0xffffffffu;  // -1
inline constexpr uint32_t kXeAtomicUndefined = 0, kXeAtomicDevice = 1, kXeAtomicGlobal = 2,
                          kXeAtomicCpu = 3;

// ---- nouveau ----
struct NouveauSvmInit {
  uint64_t unmanaged_addr;
  uint64_t unmanaged_size;
};
struct NouveauSvmBind {
  uint64_t header;
  uint64_t va_start;
  uint64_t va_end;
  uint64_t npages;
  uint64_t stride;
  uint64_t result;
  uint64_t reserved0;
  uint64_t reserved1;
};
static_assert(sizeof(NouveauSvmInit) == 16 && sizeof(NouveauSvmBind) == 64);
inline constexpr unsigned long kNouveauSvmInit = DRM_IOWR(DRM_COMMAND_BASE + 0x08, NouveauSvmInit);
inline constexpr unsigned long kNouveauSvmBind = DRM_IOWR(DRM_COMMAND_BASE + 0x09, NouveauSvmBind);
static_assert(kNouveauSvmInit == 0xC0106448 && kNouveauSvmBind == 0xC0406449);
inline constexpr uint64_t kNouveauBindMigrate = 0;             // command, bits 0..7
inline constexpr uint64_t kNouveauTargetVram = 0x80000000ull;  // target, bits 16..47
inline constexpr unsigned kNouveauTargetShift = 16;

// ---- amdkfd ----
struct KfdGetVersion {
  uint32_t major_version;
  uint32_t minor_version;
};
struct KfdSvmAttribute {
  uint32_t type;
  uint32_t value;
};
struct KfdSvmArgs {
  uint64_t start_addr;
  uint64_t size;
  uint32_t op;
  uint32_t nattr;
  // KfdSvmAttribute attrs[nattr] follow
};
static_assert(sizeof(KfdGetVersion) == 8 && sizeof(KfdSvmAttribute) == 8 &&
              sizeof(KfdSvmArgs) == 24);
inline constexpr unsigned long kKfdGetVersion = _IOR('K', 0x01, KfdGetVersion);
// The request's size field must cover the attributes too: the kernel copies that many bytes.
inline constexpr unsigned long KfdSvmRequest(uint32_t nattr) {
  return _IOWR('K', 0x20, KfdSvmArgs) + ((unsigned long)(8 * nattr) << _IOC_SIZESHIFT);
}
static_assert(KfdSvmRequest(0) == 0xC0184B20 && KfdSvmRequest(2) == 0xC0284B20);
inline constexpr uint32_t kKfdSvmSetAttr = 0;
inline constexpr uint32_t kKfdAttrPreferredLoc = 0, kKfdAttrPrefetchLoc = 1, kKfdAttrAccess = 2,
                          kKfdAttrSetFlags = 5, kKfdAttrClrFlags = 6;
inline constexpr uint32_t kKfdLocationSysmem = 0;
inline constexpr uint32_t kKfdFlagCoherent = 0x02;

}  // namespace hmmkit::drm::uapi
