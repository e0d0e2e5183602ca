// Small helpers shared by the metric groups: timing, order statistics, aligned mappings and the
// multi-threaded memcpy baseline.
#pragma once

#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "hmmkit/base/status.hpp"

namespace hmmkit::bench {

using Clock = std::chrono::steady_clock;

inline double SecondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

inline double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

inline double Percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[std::min(v.size() - 1, size_t(p * double(v.size())))];
}

inline Status BenchError(const std::string& what) {
  return Status::FromErrno(EIO, what);
}

// An anonymous private mapping of len bytes at an `align`-aligned address; unmapped by the
// destructor.
class Mapping {
 public:
  Mapping(size_t len, size_t align) : len_(len) {
    char* p = static_cast<char*>(
        mmap(nullptr, len + align, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (p == MAP_FAILED) return;
    char* a = reinterpret_cast<char*>((uintptr_t(p) + align - 1) & ~(align - 1));
    if (a > p) munmap(p, size_t(a - p));
    if (size_t tail = size_t(p + len + align - (a + len)); tail > 0) munmap(a + len, tail);
    data_ = a;
  }
  ~Mapping() {
    if (data_) munmap(data_, len_);
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  bool ok() const { return data_ != nullptr; }
  char* data() const { return data_; }
  uintptr_t addr() const { return reinterpret_cast<uintptr_t>(data_); }
  uintptr_t end() const { return addr() + len_; }
  size_t size() const { return len_; }
  // Forgets the mapping (the caller unmapped it).
  void Release() { data_ = nullptr; }

 private:
  char* data_ = nullptr;
  size_t len_;
};

// memcpy split over `threads` threads (the copy engine's worker count): the baseline for copies
// an engine spreads over its workers.
inline void ParallelMemcpy(void* dst, const void* src, size_t len, unsigned threads) {
  if (threads <= 1) {
    std::memcpy(dst, src, len);
    return;
  }
  const size_t part = (len / threads + 4095) & ~size_t(4095);
  std::vector<std::thread> ts;
  for (unsigned t = 1; t < threads; ++t) {
    const size_t off = std::min(len, part * t), n = std::min(len - off, part);
    ts.emplace_back([=] {
      std::memcpy(static_cast<char*>(dst) + off, static_cast<const char*>(src) + off, n);
    });
  }
  std::memcpy(dst, src, std::min(len, part));
  for (auto& t : ts) t.join();
}

// The rate at which the kernel hands out fresh 4 KiB anonymous pages (MADV_POPULATE_WRITE), in
// GB/s: the ceiling for anything that brings data back into new anonymous pages (UFFDIO_COPY
// allocates each page it fills). 0 when the kernel lacks MADV_POPULATE_WRITE.
inline double PageAllocationGbs(size_t len) {
  Mapping m(len, 4096);
  if (!m.ok()) return 0;
  madvise(m.data(), len, MADV_NOHUGEPAGE);
  const auto t0 = Clock::now();
  if (madvise(m.data(), len, 23 /* MADV_POPULATE_WRITE */) != 0) return 0;
  return double(len) / SecondsSince(t0) / 1e9;
}

inline std::string Fixed(double v, int digits = 2) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

}  // namespace hmmkit::bench
