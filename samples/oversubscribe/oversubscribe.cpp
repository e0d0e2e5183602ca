// oversubscribe: a working set three times larger than the device's memory. The device updates
// every element twice; device memory fills, the coldest chunks are evicted back to system memory,
// and the result is still exact.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../print_stats.hpp"
#include "hmmkit/svm.hpp"

int main(int argc, char** argv) {
  const size_t device_mib = argc > 1 ? std::strtoull(argv[1], nullptr, 0) : 16;
  const size_t factor = argc > 2 ? std::strtoull(argv[2], nullptr, 0) : 3;
  hmmkit::svm::DeviceOptions o;
  o.memory_bytes = device_mib << 20;
  auto dev = hmmkit::svm::Device::Open(o);
  if (!dev.ok()) {
    std::fprintf(stderr, "oversubscribe: cannot open a device: %s\n",
                 dev.status().ToString().c_str());
    return 2;
  }
  const size_t n = (device_mib << 20) * factor / sizeof(uint64_t);
  auto* data = static_cast<uint64_t*>(std::malloc(n * sizeof(uint64_t)));
  if (!data) return 2;
  for (size_t i = 0; i < n; ++i) data[i] = i;
  for (int pass = 0; pass < 2; ++pass) {
    hmmkit::Status st = (*dev)->Launch(n, [&](hmmkit::svm::KernelContext& k, size_t i) {
      k.Store(&data[i], k.Load(&data[i]) * 3 + 1);
    });
    if (!st.ok()) {
      std::fprintf(stderr, "oversubscribe: pass %d: %s\n", pass, st.ToString().c_str());
      return 1;
    }
  }
  size_t wrong = 0;
  for (size_t i = 0; i < n; ++i)
    if (data[i] != (i * 3 + 1) * 3 + 1) ++wrong;
  const auto s = (*dev)->stats();
  std::printf("oversubscribe: %zu MiB working set, %zu MiB device memory on %s: %s\n",
              (n * sizeof(uint64_t)) >> 20, device_mib, (*dev)->name().c_str(),
              wrong ? "WRONG" : "correct");
  PrintStats("two passes", s);
  std::free(data);
  // Eviction must have happened for the run to mean anything.
  if (s.evictions == 0) {
    std::printf("oversubscribe: no eviction happened; the working set fit\n");
    return 1;
  }
  return wrong ? 1 : 0;
}
