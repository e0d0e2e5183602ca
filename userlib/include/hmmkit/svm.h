/** @file
 * The C interface of hmmkit's SVM application API (the C++ API is hmmkit/svm.hpp).
 *
 * Every function that can fail returns 0 on success or a negative errno value, and records a
 * message naming the address and the reason, which hmmkit_svm_last_error() returns (per thread,
 * valid until the thread's next failing call). Errors:
 *   -EINVAL  bad arguments (NULL handle, empty range, unknown advice)
 *   -ENODEV  unknown backend
 *   -ENOTSUP the kernel lacks a feature the device needs (userfaultfd)
 *   -EFAULT  an address without a mapping
 *   -EPERM   a write to read-only memory
 *   -ENOMEM  device memory exhausted and nothing could be evicted
 *   -ETIMEDOUT a fence wait ran out of time
 *
 * Kernels are C functions run by the device's compute units, one call per index; they touch
 * memory only through the hmmkit_svm_load_* / store_* / atomic_* functions of their context (a
 * failed access fails the launch and returns 0). A device may be used from several threads; a
 * stream must be destroyed before its device, a fence may outlive both.
 */
#ifndef HMMKIT_SVM_H
#define HMMKIT_SVM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct hmmkit_svm_device hmmkit_svm_device;
typedef struct hmmkit_svm_stream hmmkit_svm_stream;
typedef struct hmmkit_svm_fence hmmkit_svm_fence;
typedef struct hmmkit_svm_kctx hmmkit_svm_kctx;

typedef void (*hmmkit_svm_kernel_fn)(hmmkit_svm_kctx* k, size_t index, void* arg);

typedef struct hmmkit_svm_options {
  const char* backend;       /**< NULL or "": $HMMKIT_DEVICE, else "emu" */
  size_t memory_bytes;       /**< 0: 256 MiB */
  unsigned compute_units;    /**< 0: 4 */
  int map_remotely_on_fault; /**< nonzero: device faults map system memory instead of migrating */
} hmmkit_svm_options;

enum hmmkit_svm_location { HMMKIT_SVM_DEVICE = 0, HMMKIT_SVM_SYSTEM = 1 };

enum hmmkit_svm_residency {
  HMMKIT_SVM_UNPOPULATED = 0,
  HMMKIT_SVM_RESIDENT_SYSTEM = 1,
  HMMKIT_SVM_RESIDENT_DEVICE = 2,
  HMMKIT_SVM_MIXED = 3,
};

enum hmmkit_svm_advice {
  HMMKIT_SVM_SET_PREFERRED_LOCATION = 0,
  HMMKIT_SVM_UNSET_PREFERRED_LOCATION = 1,
  HMMKIT_SVM_SET_READ_MOSTLY = 2,
  HMMKIT_SVM_UNSET_READ_MOSTLY = 3,
  HMMKIT_SVM_SET_ACCESSED_BY = 4,
  HMMKIT_SVM_UNSET_ACCESSED_BY = 5,
};

typedef struct hmmkit_svm_stats {
  uint64_t device_faults, fault_batches, bytes_to_device, bytes_to_system, cpu_faults, remote_maps,
      thrashing_events, evictions, pages_prefetched, counter_promotions, atomics;
} hmmkit_svm_stats;

const char* hmmkit_svm_last_error(void);

/** options may be NULL (defaults). */
int hmmkit_svm_open(const hmmkit_svm_options* options, hmmkit_svm_device** out);
void hmmkit_svm_close(hmmkit_svm_device* dev); /**< NULL is ignored */
const char* hmmkit_svm_name(const hmmkit_svm_device* dev);

int hmmkit_svm_launch(hmmkit_svm_device* dev, size_t n, hmmkit_svm_kernel_fn fn, void* arg);
int hmmkit_svm_prefetch(hmmkit_svm_device* dev, const void* p, size_t len, int location);
int hmmkit_svm_advise(hmmkit_svm_device* dev, const void* p, size_t len, int advice, int location);
int hmmkit_svm_residency(hmmkit_svm_device* dev, const void* p, size_t len, int* residency);
int hmmkit_svm_get_stats(const hmmkit_svm_device* dev, hmmkit_svm_stats* out);

/** Streams: in-order asynchronous work; each call may return a fence (out may be NULL). */
int hmmkit_svm_stream_create(hmmkit_svm_device* dev, hmmkit_svm_stream** out);
void hmmkit_svm_stream_destroy(hmmkit_svm_stream* s); /**< waits for queued work */
int hmmkit_svm_stream_launch(hmmkit_svm_stream* s, size_t n, hmmkit_svm_kernel_fn fn, void* arg,
                             hmmkit_svm_fence** out);
int hmmkit_svm_stream_prefetch(hmmkit_svm_stream* s, const void* p, size_t len, int location,
                               hmmkit_svm_fence** out);
int hmmkit_svm_stream_synchronize(hmmkit_svm_stream* s); /**< first error since the last one */
/** timeout_ms < 0: no limit. Returns the operation's result. */
int hmmkit_svm_fence_wait(hmmkit_svm_fence* f, long timeout_ms);
int hmmkit_svm_fence_ready(const hmmkit_svm_fence* f); /**< 1 or 0 */
void hmmkit_svm_fence_release(hmmkit_svm_fence* f);

/** Inside a kernel. */
uint32_t hmmkit_svm_load_u32(hmmkit_svm_kctx* k, const uint32_t* p);
uint64_t hmmkit_svm_load_u64(hmmkit_svm_kctx* k, const uint64_t* p);
float hmmkit_svm_load_f32(hmmkit_svm_kctx* k, const float* p);
double hmmkit_svm_load_f64(hmmkit_svm_kctx* k, const double* p);
void* hmmkit_svm_load_ptr(hmmkit_svm_kctx* k, void* const* p);
void hmmkit_svm_store_u32(hmmkit_svm_kctx* k, uint32_t* p, uint32_t v);
void hmmkit_svm_store_u64(hmmkit_svm_kctx* k, uint64_t* p, uint64_t v);
void hmmkit_svm_store_f32(hmmkit_svm_kctx* k, float* p, float v);
void hmmkit_svm_store_f64(hmmkit_svm_kctx* k, double* p, double v);
void hmmkit_svm_store_ptr(hmmkit_svm_kctx* k, void** p, void* v);
uint32_t hmmkit_svm_atomic_add_u32(hmmkit_svm_kctx* k, uint32_t* p, uint32_t v);
uint64_t hmmkit_svm_atomic_add_u64(hmmkit_svm_kctx* k, uint64_t* p, uint64_t v);
uint64_t hmmkit_svm_atomic_cas_u64(hmmkit_svm_kctx* k, uint64_t* p, uint64_t expected,
                                   uint64_t desired);

#ifdef __cplusplus
}
#endif

#endif /* HMMKIT_SVM_H */
