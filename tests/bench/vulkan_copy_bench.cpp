// Copy bandwidth of VulkanDmaEngine against baselines measured in the same run (machines here are
// shared and noisy: read the ratios, not the absolute numbers).
//
//   system->device  engine->Copy from anonymous system memory into a mapped device allocation
//   device->system  engine->Copy back into another system buffer
//   memcpy          memcpy of the same bytes between the same two buffers, same direction
//   populate        madvise(MADV_POPULATE_READ/WRITE) of the system range alone: the probe the
//                   engine runs before it imports host memory (see dma/src/host_probe.hpp)
//
// Each figure is the median of several repetitions; an engine copy is timed from Submit to the
// fence's completion (probe, import, submission, device copy, completion thread). Every engine
// copy is checked against the source; a mismatch makes the program exit 1.
//
// Usage: vulkan_copy_bench [--quick]
//   --quick  1 and 16 MiB, 3 repetitions: the ctest smoke test (bench.vulkan_quick).
// Exit codes: 0 ok, 1 wrong data or an engine error, 77 no usable Vulkan device (ctest: skipped).
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "hmmkit/dma/vulkan_engine.hpp"

namespace {

using hmmkit::Status;
using hmmkit::dma::DeviceAllocation;
using hmmkit::dma::Memory;
using hmmkit::dma::VulkanDmaEngine;
using Clock = std::chrono::steady_clock;

constexpr int kSkip = 77;
constexpr size_t kMiB = size_t{1} << 20;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

template <class F>
double Seconds(F&& f) {
  const auto t0 = Clock::now();
  f();
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

double GBs(size_t bytes, double seconds) {
  return double(bytes) / seconds / 1e9;
}

// An anonymous mapping of `len` bytes, touched so that no measurement pays its first faults.
struct Buffer {
  explicit Buffer(size_t n) : len(n) {
    void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    data = p == MAP_FAILED ? nullptr : static_cast<char*>(p);
    if (data) std::memset(data, 0, len);
  }
  ~Buffer() {
    if (data) munmap(data, len);
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  size_t len;
  char* data;
};

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  const std::vector<size_t> sizes = quick ? std::vector<size_t>{kMiB, 16 * kMiB}
                                          : std::vector<size_t>{kMiB, 16 * kMiB, 64 * kMiB};
  const int reps = quick ? 3 : 9;

  auto created = VulkanDmaEngine::Create(VulkanDmaEngine::Options{});
  if (!created.ok()) {
    const int e = created.errno_value();
    std::printf(
        "vulkan_copy_bench: %s: %s\n",
        e == ENOENT || e == ENODEV || e == ENOTSUP ? "skipped, no usable Vulkan device" : "error",
        created.status().ToString().c_str());
    return e == ENOENT || e == ENODEV || e == ENOTSUP ? kSkip : 1;
  }
  std::unique_ptr<VulkanDmaEngine> engine = std::move(created).value();
  const VulkanDmaEngine::DeviceInfo& info = engine->device_info();
  std::printf("device: %s (%s %s), queue family %u%s; median of %d\n", info.device_name.c_str(),
              info.driver_name.c_str(), info.driver_info.c_str(), info.queue_family,
              info.transfer_only_queue ? " (transfer-only)" : "", reps);
  std::printf("%8s  %-15s %12s %12s %8s %14s\n", "size", "direction", "engine GB/s", "memcpy GB/s",
              "ratio", "populate GB/s");

  bool ok = true;
  std::mt19937_64 rng(42);
  for (size_t len : sizes) {
    Buffer src(len), back(len);
    auto dev_or = engine->AllocateDeviceMemory(len);
    if (!src.data || !back.data || !dev_or.ok()) {
      std::printf("vulkan_copy_bench: cannot allocate %zu MiB: %s\n", len / kMiB,
                  dev_or.ok() ? "mmap failed" : dev_or.status().ToString().c_str());
      return 1;
    }
    DeviceAllocation dev = std::move(dev_or).value();
    if (!dev.mapped()) {
      std::printf("vulkan_copy_bench: device memory is not mappable here; no memcpy baseline\n");
      return 1;
    }
    char* d = static_cast<char*>(dev.data());
    for (size_t i = 0; i + 8 <= len; i += 8) {
      const uint64_t v = rng();
      std::memcpy(src.data + i, &v, 8);
    }

    struct Direction {
      const char* name;
      char* to;
      Memory to_mem;
      const char* from;
      Memory from_mem;
      char* system;  // the system side, for the populate baseline
      bool system_written;
    };
    const Direction directions[] = {
        {"system->device", d, Memory::kDevice, src.data, Memory::kSystem, src.data, false},
        {"device->system", back.data, Memory::kSystem, d, Memory::kDevice, back.data, true},
    };
    for (const Direction& dir : directions) {
      std::vector<double> engine_s, memcpy_s, populate_s;
      for (int r = 0; r < reps; ++r) {
        std::memset(dir.to, 0xEE, len);
        Status st;
        engine_s.push_back(
            Seconds([&] { st = engine->Copy(dir.to, dir.to_mem, dir.from, dir.from_mem, len); }));
        if (!st.ok()) {
          std::printf("vulkan_copy_bench: %s of %zu MiB failed: %s\n", dir.name, len / kMiB,
                      st.ToString().c_str());
          return 1;
        }
        if (std::memcmp(dir.to, src.data, len) != 0) {
          std::printf("vulkan_copy_bench: %s of %zu MiB: data mismatch (repetition %d)\n", dir.name,
                      len / kMiB, r);
          ok = false;
        }
        memcpy_s.push_back(Seconds([&] { std::memcpy(dir.to, dir.from, len); }));
        populate_s.push_back(Seconds([&] {
          if (madvise(dir.system, len,
                      dir.system_written ? MADV_POPULATE_WRITE : MADV_POPULATE_READ) != 0) {
            std::perror("madvise(MADV_POPULATE_*)");
          }
        }));
      }
      const double e = GBs(len, Median(engine_s)), m = GBs(len, Median(memcpy_s));
      std::printf("%5zu MiB  %-15s %12.2f %12.2f %8.2f %14.2f\n", len / kMiB, dir.name, e, m, e / m,
                  GBs(len, Median(populate_s)));
    }
  }
  const auto stats = engine->vulkan_stats();
  std::printf("submissions %llu, imports %llu (%llu MiB), failed descriptors %llu\n",
              static_cast<unsigned long long>(stats.submissions),
              static_cast<unsigned long long>(stats.imports),
              static_cast<unsigned long long>(stats.imported_bytes / kMiB),
              static_cast<unsigned long long>(stats.failed_descriptors));
  if (!ok) {
    std::printf("vulkan_copy_bench: FAILED: copied data did not match\n");
    return 1;
  }
  if (quick) std::printf("vulkan_copy_bench --quick: data checked, ok\n");
  return 0;
}
