// The test_hmm-compatible emulated devices: one process context (the AddressSpace, four devices
// with their memory, one DMA engine) and one Mirror per open handle.
//
// Locking (order: Mirror::cmd_mu_ -> Mirror::lock_ -> emulated MMU lock; the process context lock
// is taken only to open/close and never with the others held):
//   cmd_mu_  serializes the commands of one handle (kernel: dmirror->mutex around a command).
//   lock_    the driver lock of the notifier protocol: Invalidate calls SetSeq and unmaps under it,
//            RetryLoop commits (maps) under it.
// Callbacks: Mirror::Invalidate runs on the thread that raised the invalidation (the monitor's
// event or fault thread, a migration, an application thread with interposition); it takes lock_
// and the MMU lock, never cmd_mu_.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "hmmkit/base/mutex.hpp"
#include "hmmkit/base/status.hpp"
#include "hmmkit/dma/dma_engine.hpp"
#include "hmmkit/dmirror.h"
#include "hmmkit/driver/device_memory.hpp"
#include "hmmkit/drm/drm_device.hpp"
#include "hmmkit/emu/mmu.hpp"
#include "hmmkit/mirror/address_space.hpp"
#include "hmmkit/mirror/notifier.hpp"

namespace hmmkit::dmirror {

inline constexpr unsigned kDeviceCount = 4;

// One emulated device (kernel: struct dmirror_device). Its address is its pgmap owner token.
struct EmuDevice {
  unsigned index = 0;
  PageKind kind = PageKind::kDevicePrivate;
  std::shared_ptr<driver::DeviceMemory> memory;
  std::atomic<bool> fail_system_alloc{false};  // FAIL_ALLOC for the migration back
};

// Everything one process shares between its handles. Created on the first open in a process;
// a forked child creates its own (the inherited one is dead there and is left alone).
class Context {
 public:
  static Result<Context*> ForThisProcess();
  AddressSpace& as() { return *as_; }
  EmuDevice& device(unsigned i) { return devices_[i]; }
  dma::DmaEngine& dma() { return *dma_; }

 private:
  Status Init();
  std::shared_ptr<AddressSpace> as_;
  // HMMKIT_DMIRROR_MEMORY=drm: the DRM device whose GEM objects hold device memory. Declared
  // before devices_ so that it outlives their memory.
  std::shared_ptr<drm::DrmDevice> drm_;
  EmuDevice devices_[kDeviceCount];
  std::unique_ptr<dma::DmaEngine> dma_;
};

// One open handle: a mirror of the process's address space in the device MMU (kernel: struct
// dmirror).
class Mirror final : public IntervalNotifierOps {
 public:
  Mirror(Context& ctx, EmuDevice& dev);
  ~Mirror() override;
  Status Init();

  // Runs one command; the errno of the returned Status is the ioctl's.
  Status Command(unsigned long request, hmm_dmirror_cmd& cmd) EXCLUDES(cmd_mu_);

  void Invalidate(IntervalNotifier& sub, const NotifierRange& range, uint64_t cur_seq) override
      EXCLUDES(lock_);

 private:
  Status Read(uintptr_t start, uintptr_t end, char* bounce, uint64_t* faults, bool fault)
      REQUIRES(cmd_mu_);
  Status Write(uintptr_t start, uintptr_t end, const char* bounce, uint64_t* faults)
      REQUIRES(cmd_mu_);
  // One fault round over [start, end): range_fault with REQ_FAULT (+REQ_WRITE), then map.
  Status FaultIn(uintptr_t start, uintptr_t end, bool write) REQUIRES(cmd_mu_);
  Status MigrateToDevice(uintptr_t start, uintptr_t end, uint64_t* migrated) REQUIRES(cmd_mu_);
  Status MigrateVmaToDevice(uintptr_t start, uintptr_t end, uint64_t* migrated) REQUIRES(cmd_mu_);
  Status MigrateToSystem(uintptr_t start, uintptr_t end, uint64_t* migrated) REQUIRES(cmd_mu_);
  Status Snapshot(uintptr_t start, uintptr_t end, uint8_t* out) REQUIRES(cmd_mu_);
  Status Exclusive(uintptr_t start, uintptr_t end, char* bounce) REQUIRES(cmd_mu_);
  Status CheckExclusive(uintptr_t start, uintptr_t end) REQUIRES(cmd_mu_);
  // Maps the pages of this device in [start, end) that the CPU side records as ours.
  Status MapOwnDevicePages(uintptr_t start, uintptr_t end) REQUIRES(cmd_mu_);
  Status MapDevicePagesLocked(uintptr_t start, std::span<const DevicePageInfo> info)
      REQUIRES(lock_);
  // Drops mirrored pages whose VMA is no longer writable (mprotect is not seen without
  // interposition; writes re-check).
  Status DropUnwritable(uintptr_t start, uintptr_t end) REQUIRES(cmd_mu_);

  Context& ctx_;
  EmuDevice& dev_;
  Mutex cmd_mu_;
  Mutex lock_ ACQUIRED_AFTER(cmd_mu_);
  IntervalNotifier sub_;
  emu::DeviceMmu mmu_;
};

}  // namespace hmmkit::dmirror
