#include "hmmkit/drm/kernel_svm.hpp"

#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

#include "hmmkit/base/log.hpp"
#include "kernel_svm_uapi.hpp"

namespace hmmkit::drm {

namespace {

constexpr uint64_t kPage = 4096;

Status CheckRange(std::string_view who, uint64_t start, uint64_t size) {
  if (size == 0 || start % kPage != 0 || size % kPage != 0 || start + size < start) {
    return Status::FromErrno(EINVAL, std::string(who) + ": range " + std::to_string(start) + "+" +
                                         std::to_string(size) +
                                         " must be non-empty and page-aligned");
  }
  return Status::Ok();
}

// ---- Xe ----

class XeSvm final : public KernelSvm {
 public:
  XeSvm(std::shared_ptr<DrmDevice> dev, uint32_t vm) : dev_(std::move(dev)), vm_(vm) {}
  ~XeSvm() override {
    uapi::XeVmDestroy args{};
    args.vm_id = vm_;
    if (const int err = dev_->Ioctl(uapi::kXeVmDestroy, &args); err != 0) {
      Log().error("drm/xe: VM_DESTROY of vm {}: {}", vm_, std::strerror(err));
    }
  }
  std::string_view name() const override { return "xe"; }

  Status Mirror(uint64_t start, uint64_t size) override {
    HMMKIT_RETURN_IF_ERROR(CheckRange("xe mirror", start, size));
    uapi::XeVmBind args{};
    args.vm_id = vm_;
    args.num_binds = 1;
    args.bind.op = uapi::kXeBindOpMap;
    // The GPU VA equals the CPU VA (cpu_addr_mirror_offset 0, no BO); advice is dropped when the
    // CPU range is unmapped.
    args.bind.flags = uapi::kXeBindFlagCpuAddrMirror | uapi::kXeBindFlagMadviseAutoreset;
    args.bind.addr = start;
    args.bind.range = size;
    return Call(uapi::kXeVmBind, &args, "VM_BIND MAP CPU_ADDR_MIRROR");
  }

  Status PreferLocation(uint64_t start, uint64_t size, SvmLocation where) override {
    HMMKIT_RETURN_IF_ERROR(CheckRange("xe madvise", start, size));
    uapi::XeMadvise args = Madvise(start, size, uapi::kXeAttrPreferredLoc);
    args.u32_0 = where == SvmLocation::kDevice ? uapi::kXePreferredLocDefaultDevice
                                               : uapi::kXePreferredLocDefaultSystem;
    return Call(uapi::kXeMadvise, &args, "MADVISE PREFERRED_LOC");
  }

  Status SetAtomics(uint64_t start, uint64_t size, SvmAtomics mode) override {
    HMMKIT_RETURN_IF_ERROR(CheckRange("xe madvise", start, size));
    uapi::XeMadvise args = Madvise(start, size, uapi::kXeAttrAtomic);
    switch (mode) {
      case SvmAtomics::kDefault:
        args.u32_0 = uapi::kXeAtomicUndefined;
        break;
      case SvmAtomics::kDevice:
        args.u32_0 = uapi::kXeAtomicDevice;
        break;
      case SvmAtomics::kGlobal:
        args.u32_0 = uapi::kXeAtomicGlobal;
        break;
      case SvmAtomics::kCpu:
        args.u32_0 = uapi::kXeAtomicCpu;
        break;
    }
    return Call(uapi::kXeMadvise, &args, "MADVISE ATOMIC");
  }

  Status Prefetch(uint64_t start, uint64_t size, SvmLocation where) override {
    HMMKIT_RETURN_IF_ERROR(CheckRange("xe prefetch", start, size));
    uapi::XeVmBind args{};
    args.vm_id = vm_;
    args.num_binds = 1;
    args.bind.op = uapi::kXeBindOpPrefetch;
    args.bind.addr = start;
    args.bind.range = size;
    // Region instance 0 is system memory; "consult" follows the range's preferred location
    // (the device's VRAM after PreferLocation(kDevice)).
    args.bind.prefetch_mem_region_instance =
        where == SvmLocation::kSystem ? 0 : uapi::kXeConsultMemAdvisePrefLoc;
    return Call(uapi::kXeVmBind, &args, "VM_BIND PREFETCH");
  }

 private:
  uapi::XeMadvise Madvise(uint64_t start, uint64_t size, uint32_t type) const {
    uapi::XeMadvise args{};
    args.start = start;
    args.range = size;
    args.vm_id = vm_;
    args.type = type;
    return args;
  }
  Status Call(unsigned long request, void* args, const char* what) {
    if (const int err = dev_->Ioctl(request, args); err != 0) {
      return Status::FromErrno(err,
                               std::string("drm/xe: ") + what + " on vm " + std::to_string(vm_));
    }
    return Status::Ok();
  }

  std::shared_ptr<DrmDevice> dev_;
  const uint32_t vm_;
};

// DEVICE_QUERY CONFIG: the size first, then the data.
Result<std::vector<uint64_t>> XeQueryConfig(DrmDevice& dev) {
  uapi::XeDeviceQuery q{};
  q.query = uapi::kXeQueryConfig;
  if (const int err = dev.Ioctl(uapi::kXeDeviceQuery, &q); err != 0) {
    return Status::FromErrno(err, "drm/xe: DEVICE_QUERY CONFIG (size)");
  }
  if (q.size < 8 || q.size % 8 != 0) {
    return Status::FromErrno(EPROTO, "drm/xe: DEVICE_QUERY CONFIG size " + std::to_string(q.size));
  }
  std::vector<uint64_t> buf(q.size / 8);
  q.data = reinterpret_cast<uintptr_t>(buf.data());
  if (const int err = dev.Ioctl(uapi::kXeDeviceQuery, &q); err != 0) {
    return Status::FromErrno(err, "drm/xe: DEVICE_QUERY CONFIG");
  }
  // buf[0] holds num_params (and pad); info[i] is buf[1 + i].
  return std::vector<uint64_t>(buf.begin() + 1, buf.end());
}

// ---- nouveau ----

class NouveauSvm final : public KernelSvm {
 public:
  explicit NouveauSvm(std::shared_ptr<DrmDevice> dev) : dev_(std::move(dev)) {}
  std::string_view name() const override { return "nouveau"; }
  // SVM_INIT mirrors everything outside the unmanaged window; nothing more to do per range.
  Status Mirror(uint64_t start, uint64_t size) override {
    return CheckRange("nouveau mirror", start, size);
  }
  Status PreferLocation(uint64_t, uint64_t, SvmLocation) override {
    return Status::FromErrno(ENOTSUP, "drm/nouveau: no preferred-location advice in its SVM uAPI");
  }
  Status SetAtomics(uint64_t, uint64_t, SvmAtomics) override {
    return Status::FromErrno(ENOTSUP, "drm/nouveau: no atomics advice in its SVM uAPI");
  }
  Status Prefetch(uint64_t start, uint64_t size, SvmLocation where) override {
    HMMKIT_RETURN_IF_ERROR(CheckRange("nouveau prefetch", start, size));
    if (where != SvmLocation::kDevice) {
      return Status::FromErrno(ENOTSUP,
                               "drm/nouveau: SVM_BIND migrates to VRAM only (a CPU touch brings "
                               "pages back)");
    }
    uapi::NouveauSvmBind args{};
    args.header =
        uapi::kNouveauBindMigrate | (uapi::kNouveauTargetVram << uapi::kNouveauTargetShift);
    args.va_start = start;
    args.va_end = start + size;
    args.npages = size / kPage;
    if (const int err = dev_->Ioctl(uapi::kNouveauSvmBind, &args); err != 0) {
      return Status::FromErrno(err, "drm/nouveau: SVM_BIND MIGRATE to VRAM");
    }
    return Status::Ok();
  }

 private:
  std::shared_ptr<DrmDevice> dev_;
};

// ---- amdkfd ----

class KfdSvm final : public KernelSvm {
 public:
  KfdSvm(int fd, uint32_t gpu_id, IoctlLayer& ioctl) : fd_(fd), gpu_(gpu_id), ioctl_(ioctl) {}
  std::string_view name() const override { return "amdkfd"; }
  Status Mirror(uint64_t start, uint64_t size) override {
    return SetAttrs("ACCESS", start, size, {{uapi::kKfdAttrAccess, gpu_}});
  }
  Status PreferLocation(uint64_t start, uint64_t size, SvmLocation where) override {
    return SetAttrs("PREFERRED_LOC", start, size, {{uapi::kKfdAttrPreferredLoc, Loc(where)}});
  }
  Status SetAtomics(uint64_t start, uint64_t size, SvmAtomics mode) override {
    // Device-and-CPU atomics need fine-grained coherence (the COHERENT flag); the default clears
    // it.
    switch (mode) {
      case SvmAtomics::kGlobal:
        return SetAttrs("SET_FLAGS", start, size,
                        {{uapi::kKfdAttrSetFlags, uapi::kKfdFlagCoherent}});
      case SvmAtomics::kDefault:
        return SetAttrs("CLR_FLAGS", start, size,
                        {{uapi::kKfdAttrClrFlags, uapi::kKfdFlagCoherent}});
      default:
        return Status::FromErrno(ENOTSUP, "amdkfd: only default or global atomics (COHERENT)");
    }
  }
  Status Prefetch(uint64_t start, uint64_t size, SvmLocation where) override {
    return SetAttrs("PREFETCH_LOC", start, size, {{uapi::kKfdAttrPrefetchLoc, Loc(where)}});
  }

 private:
  uint32_t Loc(SvmLocation where) const {
    return where == SvmLocation::kDevice ? gpu_ : uapi::kKfdLocationSysmem;
  }
  Status SetAttrs(const char* what, uint64_t start, uint64_t size,
                  std::initializer_list<uapi::KfdSvmAttribute> attrs) {
    HMMKIT_RETURN_IF_ERROR(CheckRange("amdkfd svm", start, size));
    // The args and their attributes in one buffer, as the kernel copies them.
    std::vector<uint64_t> buf((sizeof(uapi::KfdSvmArgs) + attrs.size() * 8) / 8);
    auto* args = reinterpret_cast<uapi::KfdSvmArgs*>(buf.data());
    args->start_addr = start;
    args->size = size;
    args->op = uapi::kKfdSvmSetAttr;
    args->nattr = uint32_t(attrs.size());
    std::memcpy(buf.data() + 3, attrs.begin(), attrs.size() * sizeof(uapi::KfdSvmAttribute));
    if (ioctl_.Ioctl(fd_, uapi::KfdSvmRequest(uint32_t(attrs.size())), buf.data()) != 0) {
      const int err = errno;
      return Status::FromErrno(err,
                               std::string("amdkfd: SVM SET_ATTR ") + what +
                                   (err == EPERM ? " (kernel built without HSA_AMD_SVM?)" : ""));
    }
    return Status::Ok();
  }

  const int fd_;
  const uint32_t gpu_;
  IoctlLayer& ioctl_;
};

}  // namespace

Result<std::unique_ptr<KernelSvm>> CreateXeSvm(std::shared_ptr<DrmDevice> dev) {
  if (dev->version().name != "xe") {
    return Status::FromErrno(ENOTSUP, "kernel SVM for Xe on driver " + dev->version().name);
  }
  auto config = XeQueryConfig(*dev);
  if (!config.ok()) return config.status();
  const uint64_t flags =
      config->size() > uapi::kXeConfigFlags ? (*config)[uapi::kXeConfigFlags] : 0;
  if ((flags & uapi::kXeFlagHasCpuAddrMirror) == 0) {
    return Status::FromErrno(ENOTSUP,
                             "drm/xe: " + dev->path() +
                                 " lacks DRM_XE_QUERY_CONFIG_FLAG_HAS_CPU_ADDR_MIRROR (no SVM on "
                                 "this GPU or kernel)");
  }
  uapi::XeVmCreate create{};
  create.flags = uapi::kXeVmCreateLrMode | uapi::kXeVmCreateFaultMode;
  if (const int err = dev->Ioctl(uapi::kXeVmCreate, &create); err != 0) {
    return Status::FromErrno(err, "drm/xe: VM_CREATE LR_MODE | FAULT_MODE");
  }
  Log().info("drm/xe: {}: fault-mode vm {} (CPU address mirror)", dev->path(), create.vm_id);
  return std::unique_ptr<KernelSvm>(new XeSvm(std::move(dev), create.vm_id));
}

Result<std::unique_ptr<KernelSvm>> CreateNouveauSvm(std::shared_ptr<DrmDevice> dev,
                                                    uint64_t unmanaged_addr,
                                                    uint64_t unmanaged_size) {
  if (dev->version().name != "nouveau") {
    return Status::FromErrno(ENOTSUP, "kernel SVM for nouveau on driver " + dev->version().name);
  }
  uapi::NouveauSvmInit init{};
  init.unmanaged_addr = unmanaged_addr;
  init.unmanaged_size = unmanaged_size;
  if (const int err = dev->Ioctl(uapi::kNouveauSvmInit, &init); err != 0) {
    return Status::FromErrno(err, std::string("drm/nouveau: SVM_INIT") +
                                      (err == ENOSYS ? " (SVM is not enabled for this GPU)" : ""));
  }
  Log().info("drm/nouveau: {}: SVM initialized", dev->path());
  return std::unique_ptr<KernelSvm>(new NouveauSvm(std::move(dev)));
}

Result<std::unique_ptr<KernelSvm>> CreateKfdSvm(int kfd_fd, uint32_t gpu_id, IoctlLayer& ioctl) {
  uapi::KfdGetVersion v{};
  if (ioctl.Ioctl(kfd_fd, uapi::kKfdGetVersion, &v) != 0) {
    return Status::FromErrno(errno, "amdkfd: GET_VERSION (is this /dev/kfd?)");
  }
  if (v.major_version < 1 || (v.major_version == 1 && v.minor_version < 5)) {
    return Status::FromErrno(ENOTSUP, "amdkfd: ioctl version " + std::to_string(v.major_version) +
                                          "." + std::to_string(v.minor_version) +
                                          " has no SVM (needs 1.5)");
  }
  return std::unique_ptr<KernelSvm>(new KfdSvm(kfd_fd, gpu_id, ioctl));
}

}  // namespace hmmkit::drm
