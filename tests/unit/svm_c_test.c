/* The C interface (hmmkit/svm.h): every call's success path and its errno-style errors, from C.
 * Exits 0 when every check holds; prints each failed check. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "hmmkit/svm.h"

static int failures;

#define CHECK(cond)                                                                            \
  do {                                                                                         \
    if (!(cond)) {                                                                             \
      fprintf(stderr, "%s:%d: CHECK failed: %s (last error: %s)\n", __FILE__, __LINE__, #cond, \
              hmmkit_svm_last_error());                                                        \
      failures++;                                                                              \
    }                                                                                          \
  } while (0)

struct saxpy {
  double a;
  const double* x;
  double* y;
  uint64_t* hits;
};

static void saxpy_kernel(hmmkit_svm_kctx* k, size_t i, void* arg) {
  struct saxpy* s = arg;
  double x = hmmkit_svm_load_f64(k, &s->x[i]);
  double y = hmmkit_svm_load_f64(k, &s->y[i]);
  hmmkit_svm_store_f64(k, &s->y[i], s->a * x + y);
  hmmkit_svm_atomic_add_u64(k, s->hits, 1);
}

static void store_kernel(hmmkit_svm_kctx* k, size_t i, void* arg) {
  (void)i;
  hmmkit_svm_store_u32(k, (uint32_t*)arg, 1);
}

struct misc {
  uint32_t u32;
  float f32;
  void* ptr;
  uint64_t cas_old[2];
  uint32_t add_old;
};

static void misc_kernel(hmmkit_svm_kctx* k, size_t i, void* arg) {
  (void)i;
  struct misc* m = arg;
  hmmkit_svm_store_u32(k, &m->u32, hmmkit_svm_load_u32(k, &m->u32) + 1);
  hmmkit_svm_store_f32(k, &m->f32, hmmkit_svm_load_f32(k, &m->f32) * 2);
  hmmkit_svm_store_ptr(k, &m->ptr, hmmkit_svm_load_ptr(k, &m->ptr));
  hmmkit_svm_store_u64(k, &m->cas_old[1], hmmkit_svm_load_u64(k, &m->cas_old[1]));
  m->add_old = hmmkit_svm_atomic_add_u32(k, &m->u32, 10);
  m->cas_old[0] = hmmkit_svm_atomic_cas_u64(k, &m->cas_old[1], 0, 5);
}

int main(void) {
  hmmkit_svm_device* dev = NULL;
  hmmkit_svm_options bad = {.backend = "nosuch"};
  CHECK(hmmkit_svm_open(&bad, &dev) == -ENODEV && dev == NULL);
  CHECK(strstr(hmmkit_svm_last_error(), "emu") != NULL);
  CHECK(hmmkit_svm_open(NULL, NULL) == -EINVAL);

  hmmkit_svm_options o = {.memory_bytes = 16u << 20, .compute_units = 2};
  int rc = hmmkit_svm_open(&o, &dev);
  if (rc == -ENOTSUP) {
    printf("svm_c_test: skipped: %s\n", hmmkit_svm_last_error());
    return 0;
  }
  CHECK(rc == 0 && dev != NULL);
  if (!dev) return 1;
  CHECK(strncmp(hmmkit_svm_name(dev), "emu", 3) == 0);

  /* A launch over malloc'd memory. */
  const size_t n = 100000;
  struct saxpy s = {.a = 2.0};
  double* x = malloc(n * sizeof(double));
  double* y = malloc(n * sizeof(double));
  s.hits = malloc(sizeof(uint64_t));
  *s.hits = 0;
  for (size_t i = 0; i < n; ++i) {
    x[i] = (double)i;
    y[i] = 1.0;
  }
  s.x = x;
  s.y = y;
  CHECK(hmmkit_svm_launch(dev, n, saxpy_kernel, &s) == 0);
  size_t wrong = 0;
  for (size_t i = 0; i < n; ++i) wrong += y[i] != 2.0 * (double)i + 1.0;
  CHECK(wrong == 0);
  CHECK(*s.hits == n);
  CHECK(hmmkit_svm_launch(NULL, n, saxpy_kernel, &s) == -EINVAL);
  CHECK(hmmkit_svm_launch(dev, n, NULL, &s) == -EINVAL);

  /* Every accessor. */
  struct misc m = {.u32 = 1, .f32 = 1.5f, .ptr = &m, .cas_old = {7, 0}};
  CHECK(hmmkit_svm_launch(dev, 1, misc_kernel, &m) == 0);
  CHECK(m.u32 == 12 && m.add_old == 2);
  CHECK(m.f32 == 3.0f && m.ptr == &m);
  CHECK(m.cas_old[0] == 0 && m.cas_old[1] == 5);

  /* Launch errors name the reason. */
  uint32_t* ro = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(hmmkit_svm_launch(dev, 1, store_kernel, ro) == -EPERM);
  CHECK(strstr(hmmkit_svm_last_error(), "read-only") != NULL);

  /* Prefetch, advise, residency. */
  int where = -1;
  CHECK(hmmkit_svm_prefetch(dev, y, n * sizeof(double), HMMKIT_SVM_SYSTEM) == 0);
  CHECK(hmmkit_svm_residency(dev, y, n * sizeof(double), &where) == 0);
  CHECK(where == HMMKIT_SVM_RESIDENT_SYSTEM);
  CHECK(hmmkit_svm_prefetch(dev, y, n * sizeof(double), 7) == -EINVAL);
  CHECK(hmmkit_svm_residency(dev, y, 0, &where) == -EINVAL);
  CHECK(hmmkit_svm_residency(dev, y, 8, NULL) == -EINVAL);
  CHECK(hmmkit_svm_advise(dev, x, n * sizeof(double), HMMKIT_SVM_SET_READ_MOSTLY,
                          HMMKIT_SVM_DEVICE) == 0);
  CHECK(hmmkit_svm_advise(dev, x, n * sizeof(double), 99, HMMKIT_SVM_DEVICE) == -EINVAL);
  CHECK(hmmkit_svm_advise(dev, x, 0, HMMKIT_SVM_SET_READ_MOSTLY, HMMKIT_SVM_DEVICE) == -EINVAL);
  munmap(ro, 4096);
  /* An address that stays unmapped: the last page below 2^47 lies at or above TASK_SIZE, so
   * nothing is ever mapped there (as test::UnmappedAddress). A freed hole is not safe: another
   * thread's new malloc arena (64 MiB aligned) can fill it, and the "unmapped" store then lands in
   * the heap (seen in CI). msync of an unmapped page fails with ENOMEM. */
  void* hole = (void*)((UINT64_C(1) << 47) - 4096);
  CHECK(msync(hole, 4096, MS_ASYNC) == -1 && errno == ENOMEM);
  CHECK(hmmkit_svm_advise(dev, hole, 8, HMMKIT_SVM_SET_READ_MOSTLY, HMMKIT_SVM_DEVICE) == -EFAULT);
  CHECK(strstr(hmmkit_svm_last_error(), "not mapped") != NULL);

  /* Streams and fences. */
  hmmkit_svm_stream* st = NULL;
  hmmkit_svm_fence* f1 = NULL;
  hmmkit_svm_fence* f2 = NULL;
  CHECK(hmmkit_svm_stream_create(dev, &st) == 0 && st != NULL);
  CHECK(hmmkit_svm_stream_prefetch(st, y, n * sizeof(double), HMMKIT_SVM_DEVICE, &f1) == 0);
  CHECK(hmmkit_svm_stream_launch(st, n, saxpy_kernel, &s, &f2) == 0);
  CHECK(hmmkit_svm_fence_wait(f2, -1) == 0);
  CHECK(hmmkit_svm_fence_ready(f1) == 1);
  CHECK(hmmkit_svm_fence_wait(f1, 1000) == 0);
  CHECK(hmmkit_svm_stream_synchronize(st) == 0);
  CHECK(*s.hits == 2 * n);
  wrong = 0;
  for (size_t i = 0; i < n; ++i) wrong += y[i] != 4.0 * (double)i + 1.0;
  CHECK(wrong == 0);
  hmmkit_svm_fence_release(f1);
  hmmkit_svm_fence_release(f2);
  CHECK(hmmkit_svm_stream_launch(st, 1, store_kernel, hole, NULL) == 0); /* unmapped */
  CHECK(hmmkit_svm_stream_synchronize(st) == -EFAULT);
  CHECK(hmmkit_svm_stream_synchronize(st) == 0);
  CHECK(hmmkit_svm_fence_wait(NULL, -1) == -EINVAL);
  hmmkit_svm_stream_destroy(st);

  hmmkit_svm_stats stats;
  CHECK(hmmkit_svm_get_stats(dev, &stats) == 0);
  CHECK(stats.device_faults > 0);
  CHECK(stats.atomics >= 2 * n);
  CHECK(hmmkit_svm_get_stats(dev, NULL) == -EINVAL);

  hmmkit_svm_close(dev);
  free(x);
  free(y);
  free(s.hits);
  if (failures) {
    fprintf(stderr, "svm_c_test: %d checks failed\n", failures);
    return 1;
  }
  printf("svm_c_test: all checks passed\n");
  return 0;
}
