// The per-process context of the emulated test_hmm devices.
#include <unistd.h>

#include <cstdlib>
#include <map>
#include <string>

#include "dmirror_device.hpp"
#include "hmmkit/base/log.hpp"
#include "hmmkit/dma/cpu_engine.hpp"
#include "hmmkit/drm/discovery.hpp"
#include "hmmkit/drm/gem_arena.hpp"
#include "hmmkit/mirror/migrate.hpp"
#include "hmmkit/mirror/mm_monitor.hpp"

namespace hmmkit::dmirror {

namespace {

// Device memory per device: HMMKIT_DMIRROR_DEVICE_MB (default 256), whole 2 MiB chunks.
size_t DeviceCapacity() {
  size_t mb = 256;
  if (const char* v = std::getenv("HMMKIT_DMIRROR_DEVICE_MB")) {
    char* end = nullptr;
    unsigned long x = std::strtoul(v, &end, 10);
    if (end != v && *end == '\0' && x >= 2)
      mb = x;
    else
      Log().warn("HMMKIT_DMIRROR_DEVICE_MB={} is not a number >= 2: using {}", v, mb);
  }
  return (mb & ~size_t(1)) << 20;
}

// Where device memory lives: HMMKIT_DMIRROR_MEMORY unset or "memfd" (the default arena), "drm"
// (a GEM object on the first DRM device with dumb buffers) or "drm:/dev/dri/cardN". An explicit
// "drm" that cannot be served fails the device open: no silent fallback to a memfd. The one
// exception, logged as a warning: a coherent device whose driver cannot map single pages of a GEM
// object at their offset keeps a memfd (see DeviceMemory::Options::external).
struct MemoryChoice {
  bool drm = false;
  std::string node;  // empty: the first DRM device
};
Result<MemoryChoice> ChooseMemory() {
  MemoryChoice c;
  const char* v = std::getenv("HMMKIT_DMIRROR_MEMORY");
  if (v == nullptr || *v == '\0' || std::string(v) == "memfd") return c;
  const std::string s = v;
  if (s == "drm") {
    c.drm = true;
  } else if (s.rfind("drm:", 0) == 0 && s.size() > 4) {
    c.drm = true;
    c.node = s.substr(4);
  } else {
    return Status::FromErrno(
        EINVAL, "HMMKIT_DMIRROR_MEMORY=" + s + ": expected memfd, drm or drm:/dev/dri/cardN");
  }
  return c;
}

struct Contexts {
  Mutex mu;
  std::map<pid_t, Context*> by_pid GUARDED_BY(mu);  // leaked: a child must not destroy the parent's
};
Contexts& All() {
  static Contexts* c = new Contexts;
  return *c;
}

}  // namespace

Result<Context*> Context::ForThisProcess() {
  Contexts& all = All();
  MutexLock lock(all.mu);
  const pid_t self = ::getpid();
  auto it = all.by_pid.find(self);
  if (it != all.by_pid.end()) return it->second;
  auto ctx = std::make_unique<Context>();
  HMMKIT_RETURN_IF_ERROR(ctx->Init());
  Context* raw = ctx.release();
  all.by_pid[self] = raw;
  return raw;
}

Status Context::Init() {
  auto as = AddressSpace::Create();
  if (!as.ok()) return as.status();
  as_ = std::move(*as);
  if (!as_->monitor())
    return Status::FromErrno(ENOTSUP,
                             "the emulated test_hmm devices need userfaultfd (see `hmmctl info`)");
  dma::CpuDmaEngine::Options dopt;
  auto engine = dma::CpuDmaEngine::Create(dopt);
  if (!engine.ok()) return engine.status();
  dma_ = std::move(*engine);

  const size_t capacity = DeviceCapacity();
  auto choice = ChooseMemory();
  if (!choice.ok()) return choice.status();
  if (choice->drm) {
    auto dev = choice->node.empty() ? drm::OpenDrmDevice("", /*want_card=*/true)
                                    : drm::DrmDevice::Open(choice->node);
    if (!dev.ok()) return dev.status();
    drm_ = std::move(*dev);
  }
  for (unsigned i = 0; i < kDeviceCount; ++i) {
    EmuDevice& d = devices_[i];
    d.index = i;
    d.kind = i < 2 ? PageKind::kDevicePrivate : PageKind::kDeviceCoherent;
    driver::DeviceMemory::Options o;
    o.capacity = capacity;
    o.kind = d.kind;
    o.owner = &d;
    o.name = "hmm_dmirror" + std::to_string(i);
    AddressSpace* space = as_.get();
    // Exhaustion evicts the coldest chunk back to system memory, by device page.
    o.evict = [space](driver::DeviceMemory& mem, std::span<const uint64_t> ids) {
      return MigrateDevicePages(*space, mem, ids);
    };
    if (drm_ != nullptr) {
      auto arena = drm::GemArena(drm_, capacity);
      if (!arena.ok()) return arena.status();
      o.external = std::move(*arena);
    }
    auto mem = driver::DeviceMemory::Create(o);
    if (!mem.ok() && drm_ != nullptr && d.kind == PageKind::kDeviceCoherent &&
        mem.status().errno_value() == ENOTSUP) {
      // Coherent pages are mapped one by one at their offset, which some drivers (vgem on 6.1)
      // get wrong; the private devices still use GEM memory. Said loudly, never silently.
      Log().warn("dmirror: device {} (device-coherent) keeps a memfd arena: {}", i,
                 mem.status().message());
      o.external.reset();
      mem = driver::DeviceMemory::Create(o);
    }
    if (!mem.ok()) return mem.status();
    d.memory = std::move(*mem);
  }
  Log().info(
      "dmirror: 4 emulated devices ({} MiB each; 0-1 device-private, 2-3 device-coherent); "
      "device memory in {}",
      capacity >> 20,
      drm_ != nullptr ? drm_->version().name + " GEM objects on " + drm_->path() : "memfds");
  return Status::Ok();
}

}  // namespace hmmkit::dmirror
