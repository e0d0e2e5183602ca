// vector_add: c[i] = a[i] + b[i] on the device, over three malloc'd arrays. No explicit copies:
// the device faults the pages in (and migrates them), the CPU reads the result where it is.
#include <cstdio>
#include <cstdlib>
#include <memory>

#include "../print_stats.hpp"
#include "hmmkit/svm.hpp"

int main(int argc, char** argv) {
  const size_t n = argc > 1 ? std::strtoull(argv[1], nullptr, 0) : size_t(1) << 20;
  auto dev = hmmkit::svm::Device::Open();
  if (!dev.ok()) {
    std::fprintf(stderr, "vector_add: cannot open a device: %s\n", dev.status().ToString().c_str());
    return 2;
  }
  // Plain malloc: the pointers the CPU uses are the pointers the device uses.
  auto* a = static_cast<float*>(std::malloc(n * sizeof(float)));
  auto* b = static_cast<float*>(std::malloc(n * sizeof(float)));
  auto* c = static_cast<float*>(std::malloc(n * sizeof(float)));
  if (!a || !b || !c) {
    std::fprintf(stderr, "vector_add: out of memory\n");
    std::free(a);
    std::free(b);
    std::free(c);
    return 2;
  }
  for (size_t i = 0; i < n; ++i) {
    a[i] = float(i);
    b[i] = float(2 * i);
  }
  hmmkit::Status st = (*dev)->Launch(n, [&](hmmkit::svm::KernelContext& k, size_t i) {
    k.Store(&c[i], k.Load(&a[i]) + k.Load(&b[i]));
  });
  if (!st.ok()) {
    std::fprintf(stderr, "vector_add: launch failed: %s\n", st.ToString().c_str());
    std::free(a);
    std::free(b);
    std::free(c);
    return 1;
  }
  size_t wrong = 0;
  for (size_t i = 0; i < n; ++i)
    if (c[i] != float(3 * i)) ++wrong;
  const hmmkit::svm::DeviceStats s = (*dev)->stats();
  std::printf("vector_add: %zu elements on %s: %s\n", n, (*dev)->name().c_str(),
              wrong ? "WRONG" : "correct");
  PrintStats("launch", s);
  std::free(a);
  std::free(b);
  std::free(c);
  return wrong ? 1 : 0;
}
