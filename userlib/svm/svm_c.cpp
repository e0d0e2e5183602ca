// The C interface (hmmkit/svm.h) over the C++ API: handles own C++ objects, errors become
// negative errno values plus a thread-local message.
#include <memory>
#include <string>

#include "hmmkit/svm.h"
#include "hmmkit/svm.hpp"

struct hmmkit_svm_device {
  std::unique_ptr<hmmkit::svm::Device> dev;
};
struct hmmkit_svm_stream {
  std::unique_ptr<hmmkit::svm::Stream> stream;
};
struct hmmkit_svm_fence {
  hmmkit::svm::Fence fence;
};
// A kernel's context is the C++ KernelContext itself.
struct hmmkit_svm_kctx {};

namespace {

using hmmkit::Status;
using hmmkit::svm::KernelContext;

thread_local std::string last_error;

int Fail(const Status& st) {
  last_error = st.ToString();
  return -st.errno_value();
}
int Invalid(const char* what) {
  return Fail(Status::FromErrno(EINVAL, what));
}
int Report(const Status& st) {
  return st.ok() ? 0 : Fail(st);
}

KernelContext& Ctx(hmmkit_svm_kctx* k) {
  return *reinterpret_cast<KernelContext*>(k);
}

bool ToLocation(int location, hmmkit::svm::Location* out) {
  if (location == HMMKIT_SVM_DEVICE) {
    *out = hmmkit::svm::Location::kDevice;
  } else if (location == HMMKIT_SVM_SYSTEM) {
    *out = hmmkit::svm::Location::kSystem;
  } else {
    return false;
  }
  return true;
}

hmmkit::svm::Kernel Wrap(hmmkit_svm_kernel_fn fn, void* arg) {
  return
      [fn, arg](KernelContext& k, size_t i) { fn(reinterpret_cast<hmmkit_svm_kctx*>(&k), i, arg); };
}

int FenceOut(hmmkit::svm::Fence f, hmmkit_svm_fence** out) {
  if (out) *out = new hmmkit_svm_fence{std::move(f)};
  return 0;
}

}  // namespace

extern "C" {

const char* hmmkit_svm_last_error(void) {
  return last_error.c_str();
}

int hmmkit_svm_open(const hmmkit_svm_options* options, hmmkit_svm_device** out) {
  if (!out) return Invalid("hmmkit_svm_open: out is NULL");
  *out = nullptr;
  hmmkit::svm::DeviceOptions o;
  if (options) {
    if (options->backend) o.backend = options->backend;
    if (options->memory_bytes) o.memory_bytes = options->memory_bytes;
    if (options->compute_units) o.compute_units = options->compute_units;
    o.migrate_on_fault = !options->map_remotely_on_fault;
  }
  auto dev = hmmkit::svm::Device::Open(o);
  if (!dev.ok()) return Fail(dev.status());
  *out = new hmmkit_svm_device{std::move(*dev)};
  return 0;
}

void hmmkit_svm_close(hmmkit_svm_device* dev) {
  delete dev;
}

const char* hmmkit_svm_name(const hmmkit_svm_device* dev) {
  return dev ? dev->dev->name().c_str() : "";
}

int hmmkit_svm_launch(hmmkit_svm_device* dev, size_t n, hmmkit_svm_kernel_fn fn, void* arg) {
  if (!dev || !fn) return Invalid("hmmkit_svm_launch: NULL device or kernel");
  return Report(dev->dev->Launch(n, Wrap(fn, arg)));
}

int hmmkit_svm_prefetch(hmmkit_svm_device* dev, const void* p, size_t len, int location) {
  hmmkit::svm::Location to;
  if (!dev || !ToLocation(location, &to)) return Invalid("hmmkit_svm_prefetch: bad arguments");
  return Report(dev->dev->Prefetch(p, len, to));
}

int hmmkit_svm_advise(hmmkit_svm_device* dev, const void* p, size_t len, int advice, int location) {
  hmmkit::svm::Location where;
  if (!dev || !ToLocation(location, &where)) return Invalid("hmmkit_svm_advise: bad arguments");
  if (advice < HMMKIT_SVM_SET_PREFERRED_LOCATION || advice > HMMKIT_SVM_UNSET_ACCESSED_BY)
    return Invalid("hmmkit_svm_advise: unknown advice");
  return Report(dev->dev->Advise(p, len, hmmkit::svm::Advice(advice), where));
}

int hmmkit_svm_residency(hmmkit_svm_device* dev, const void* p, size_t len, int* residency) {
  if (!dev || !residency) return Invalid("hmmkit_svm_residency: NULL argument");
  auto r = dev->dev->QueryResidency(p, len);
  if (!r.ok()) return Fail(r.status());
  *residency = int(*r);  // the enums share their order
  return 0;
}

int hmmkit_svm_get_stats(const hmmkit_svm_device* dev, hmmkit_svm_stats* out) {
  if (!dev || !out) return Invalid("hmmkit_svm_get_stats: NULL argument");
  const auto s = dev->dev->stats();
  *out = {s.device_faults,    s.fault_batches,      s.bytes_to_device,  s.bytes_to_system,
          s.cpu_faults,       s.remote_maps,        s.thrashing_events, s.evictions,
          s.pages_prefetched, s.counter_promotions, s.atomics};
  return 0;
}

int hmmkit_svm_stream_create(hmmkit_svm_device* dev, hmmkit_svm_stream** out) {
  if (!dev || !out) return Invalid("hmmkit_svm_stream_create: NULL argument");
  *out = new hmmkit_svm_stream{dev->dev->CreateStream()};
  return 0;
}

void hmmkit_svm_stream_destroy(hmmkit_svm_stream* s) {
  delete s;
}

int hmmkit_svm_stream_launch(hmmkit_svm_stream* s, size_t n, hmmkit_svm_kernel_fn fn, void* arg,
                             hmmkit_svm_fence** out) {
  if (!s || !fn) return Invalid("hmmkit_svm_stream_launch: NULL stream or kernel");
  return FenceOut(s->stream->Launch(n, Wrap(fn, arg)), out);
}

int hmmkit_svm_stream_prefetch(hmmkit_svm_stream* s, const void* p, size_t len, int location,
                               hmmkit_svm_fence** out) {
  hmmkit::svm::Location to;
  if (!s || !ToLocation(location, &to)) return Invalid("hmmkit_svm_stream_prefetch: bad arguments");
  return FenceOut(s->stream->Prefetch(p, len, to), out);
}

int hmmkit_svm_stream_synchronize(hmmkit_svm_stream* s) {
  if (!s) return Invalid("hmmkit_svm_stream_synchronize: NULL stream");
  return Report(s->stream->Synchronize());
}

int hmmkit_svm_fence_wait(hmmkit_svm_fence* f, long timeout_ms) {
  if (!f) return Invalid("hmmkit_svm_fence_wait: NULL fence");
  return Report(timeout_ms < 0 ? f->fence.Wait()
                               : f->fence.WaitFor(std::chrono::milliseconds(timeout_ms)));
}

int hmmkit_svm_fence_ready(const hmmkit_svm_fence* f) {
  return !f || f->fence.Ready() ? 1 : 0;
}

void hmmkit_svm_fence_release(hmmkit_svm_fence* f) {
  delete f;
}

uint32_t hmmkit_svm_load_u32(hmmkit_svm_kctx* k, const uint32_t* p) {
  return Ctx(k).Load(p);
}
uint64_t hmmkit_svm_load_u64(hmmkit_svm_kctx* k, const uint64_t* p) {
  return Ctx(k).Load(p);
}
float hmmkit_svm_load_f32(hmmkit_svm_kctx* k, const float* p) {
  return Ctx(k).Load(p);
}
double hmmkit_svm_load_f64(hmmkit_svm_kctx* k, const double* p) {
  return Ctx(k).Load(p);
}
void* hmmkit_svm_load_ptr(hmmkit_svm_kctx* k, void* const* p) {
  return Ctx(k).Load(p);
}
void hmmkit_svm_store_u32(hmmkit_svm_kctx* k, uint32_t* p, uint32_t v) {
  Ctx(k).Store(p, v);
}
void hmmkit_svm_store_u64(hmmkit_svm_kctx* k, uint64_t* p, uint64_t v) {
  Ctx(k).Store(p, v);
}
void hmmkit_svm_store_f32(hmmkit_svm_kctx* k, float* p, float v) {
  Ctx(k).Store(p, v);
}
void hmmkit_svm_store_f64(hmmkit_svm_kctx* k, double* p, double v) {
  Ctx(k).Store(p, v);
}
void hmmkit_svm_store_ptr(hmmkit_svm_kctx* k, void** p, void* v) {
  Ctx(k).Store(p, v);
}
uint32_t hmmkit_svm_atomic_add_u32(hmmkit_svm_kctx* k, uint32_t* p, uint32_t v) {
  return Ctx(k).AtomicAdd(p, v);
}
uint64_t hmmkit_svm_atomic_add_u64(hmmkit_svm_kctx* k, uint64_t* p, uint64_t v) {
  return Ctx(k).AtomicAdd(p, v);
}
uint64_t hmmkit_svm_atomic_cas_u64(hmmkit_svm_kctx* k, uint64_t* p, uint64_t expected,
                                   uint64_t desired) {
  return Ctx(k).AtomicCompareExchange(p, expected, desired);
}

}  // extern "C"
