// libFuzzer harness for the C application API (hmmkit/svm.h) over the emulated device.
//
// One device (small memory, two compute units) is opened on the first input and kept: opening
// starts threads and maps device memory. Each input maps a small arena of its own, decodes a
// sequence of calls and unmaps everything again:
//   - launches (direct or on a stream) of an increment kernel over the arena's counters, and of
//     "probe" kernels that make one access to a read-only, PROT_NONE, unmapped, non-canonical or
//     misaligned address;
//   - Prefetch / Advise / QueryResidency with pointers in and around the arena, NULL, page 0, the
//     top of the user half, ranges that wrap around, and out-of-range location/advice values;
//   - streams, fences (waits with and without timeouts), opens with bad options, NULL arguments.
// Checks (abort on violation): every result is 0 or one of the documented negative errnos, and the
// one the contract names where it names one; counters hold exactly the increments of the launches
// that succeeded; a range prefetched to the device reports DEVICE residency; the read-only page
// and the memory around the arena never change; the device's statistics never go backwards.
#include <sys/mman.h>

#include <cerrno>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <iterator>
#include <memory>
#include <vector>

#include "byte_reader.hpp"
#include "hmmkit/svm.h"
#include "known_bugs.hpp"

namespace hmmkit::fuzz {
namespace {

constexpr size_t kPage = 4096;
// Arena pages: [canary][counters x kCounterPages][read-only][PROT_NONE][canary]
constexpr size_t kCounterPages = 4;
constexpr size_t kCounters = kCounterPages * kPage / sizeof(uint32_t);
constexpr size_t kArenaPages = kCounterPages + 4;
constexpr uint8_t kCanary = 0x5A;
constexpr uint64_t kTopUserPage = (uint64_t{1} << 47) - kPage;  // never mappable on x86-64
constexpr int kMaxStreams = 2;

[[noreturn]] __attribute__((format(printf, 1, 2))) void Violation(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::fputs("fuzz invariant violated: ", stderr);
  std::vfprintf(stderr, fmt, ap);
  std::fprintf(stderr, " (last error: %s)\n", hmmkit_svm_last_error());
  va_end(ap);
  std::abort();
}

bool Documented(int rc) {
  switch (-rc) {
    case EINVAL:
    case ENODEV:
    case ENOTSUP:
    case EFAULT:
    case EPERM:
    case ENOMEM:
    case ETIMEDOUT:
      return true;
    default:
      return false;
  }
}

void Expect(const char* what, int rc, std::initializer_list<int> allowed) {
  if (rc != 0 && !Documented(rc)) Violation("%s: undocumented result %d", what, rc);
  for (int a : allowed)
    if (rc == a) return;
  Violation("%s: result %d (%s) not among the expected ones", what, rc,
            rc ? std::strerror(-rc) : "ok");
}

// Kernel arguments live in the harness until every stream is drained.
struct IncArg {
  uint32_t* base;
  bool atomic;
};
void IncKernel(hmmkit_svm_kctx* k, size_t i, void* arg) {
  const auto* a = static_cast<const IncArg*>(arg);
  if (a->atomic)
    hmmkit_svm_atomic_add_u32(k, a->base + i, 1);
  else
    hmmkit_svm_store_u32(k, a->base + i, hmmkit_svm_load_u32(k, a->base + i) + 1);
}

enum class ProbeOp : uint8_t { kLoad, kStore, kAtomic, kLoad64 };
struct ProbeArg {
  uintptr_t addr;
  ProbeOp op;
  uint64_t loaded;
};
void ProbeKernel(hmmkit_svm_kctx* k, size_t, void* arg) {
  auto* a = static_cast<ProbeArg*>(arg);
  switch (a->op) {
    case ProbeOp::kLoad:
      a->loaded = hmmkit_svm_load_u32(k, reinterpret_cast<const uint32_t*>(a->addr));
      break;
    case ProbeOp::kStore:
      hmmkit_svm_store_u32(k, reinterpret_cast<uint32_t*>(a->addr), 7);
      break;
    case ProbeOp::kAtomic:
      hmmkit_svm_atomic_add_u32(k, reinterpret_cast<uint32_t*>(a->addr), 1);
      break;
    case ProbeOp::kLoad64:
      a->loaded = hmmkit_svm_load_u64(k, reinterpret_cast<const uint64_t*>(a->addr));
      break;
  }
}

hmmkit_svm_device* SharedDevice(bool* unsupported) {
  static hmmkit_svm_device* dev = nullptr;
  static int open_rc = 1;
  if (open_rc == 1) {
    hmmkit_svm_options o{};
    o.backend = "emu";
    o.memory_bytes = size_t(4) << 20;
    o.compute_units = 2;
    open_rc = hmmkit_svm_open(&o, &dev);
    if (open_rc != 0 && open_rc != -ENOTSUP) Violation("open: %d", open_rc);
  }
  *unsupported = open_rc != 0;
  return dev;
}

class Harness {
 public:
  Harness(ByteReader& in, hmmkit_svm_device* dev) : in_(in), dev_(dev) {
    void* p = ::mmap(nullptr, kArenaPages * kPage, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) Violation("mmap arena: %d", errno);
    base_ = static_cast<uint8_t*>(p);
    std::memset(base_, kCanary, kPage);
    std::memset(Page(kArenaPages - 1), kCanary, kPage);
    for (size_t i = 0; i < kCounters; ++i) counters()[i] = uint32_t(i * 3);
    expected_.assign(counters(), counters() + kCounters);
    std::memset(ro(), 0x3C, kPage);
    if (::mprotect(ro(), kPage, PROT_READ) != 0 || ::mprotect(none(), kPage, PROT_NONE) != 0)
      Violation("mprotect: %d", errno);
    hmmkit_svm_get_stats(dev_, &stats_);
  }

  ~Harness() {
    Drain();
    CheckMemory();
    for (auto* s : streams_) hmmkit_svm_stream_destroy(s);
    for (auto& f : held_) hmmkit_svm_fence_release(f.fence);
    ::munmap(base_, kArenaPages * kPage);
    CheckStats();
  }

  void Step();

 private:
  uint8_t* Page(size_t i) const { return base_ + i * kPage; }
  uint32_t* counters() const { return reinterpret_cast<uint32_t*>(Page(1)); }
  uint8_t* ro() const { return Page(1 + kCounterPages); }
  uint8_t* none() const { return Page(2 + kCounterPages); }

  // A pointer and length chosen around the arena or from the invalid ones; the result says which.
  enum class Target { kCounterRange, kReadOnly, kProtNone, kHole, kWraps, kMixed, kNonCanonical };
  Target ChooseRange(const void** p, size_t* len);
  void Launch();
  void Probe();
  void Prefetch();
  void Advise();
  void Residency();
  void StreamOp();
  void BadCalls();
  void OpenOther();
  // Waits for every stream; returns with no device work in flight.
  void Drain();
  void CheckMemory();
  void CheckStats();

  ByteReader& in_;
  hmmkit_svm_device* dev_;
  uint8_t* base_ = nullptr;
  std::vector<uint32_t> expected_;
  std::vector<hmmkit_svm_stream*> streams_;
  // A fence and the results its operation may report.
  struct HeldFence {
    hmmkit_svm_fence* fence;
    std::vector<int> allowed;
  };
  std::vector<HeldFence> held_;
  std::vector<std::unique_ptr<IncArg>> args_;  // stream launches read them until drained
  // Results Synchronize may report: 0 and the errors of the prefetches queued since the last one.
  std::vector<std::vector<int>> sync_allowed_;
  bool advised_ = false;
  bool in_flight_ = false;  // stream work may be running: no CPU access to the counters
  hmmkit_svm_stats stats_{};
};

Harness::Target Harness::ChooseRange(const void** p, size_t* len) {
  const uint8_t mode = in_.U8() % 12;
  const size_t off = in_.Below(kPage);
  auto at = [&](const void* base, size_t max_len) {
    *p = static_cast<const uint8_t*>(base) + off % max_len;
    *len = 1 + in_.Below(max_len - off % max_len);
  };
  switch (mode) {
    case 0:
    case 1:
    case 2:
    case 3:
      at(counters(), kCounterPages * kPage);
      return Target::kCounterRange;
    case 4:
      at(ro(), kPage);
      return Target::kReadOnly;
    case 5:
      at(none(), kPage);
      return Target::kProtNone;
    case 6:  // counters through the PROT_NONE page
      *p = counters();
      *len = (kCounterPages + 2) * kPage - in_.Below(kPage);
      return Target::kMixed;
    case 7:
      *p = reinterpret_cast<const void*>(uintptr_t(off));  // page 0, NULL included
      *len = 1 + in_.Below(kPage - off);
      return Target::kHole;
    case 8:
      *p = reinterpret_cast<const void*>(uintptr_t(kTopUserPage + off));
      *len = 1 + in_.Below(kPage - off);
      return Target::kHole;
    case 9:  // p + len wraps around, or reaches past the user half
      *p = in_.Bool() ? static_cast<const void*>(counters())
                      : reinterpret_cast<const void*>(~uintptr_t{0} - off);
      *len = ~size_t{0} - in_.Below(2 * kPage);
      return Target::kWraps;
    default:  // non-canonical: the kernel half, the vsyscall page
      *p = reinterpret_cast<const void*>(in_.Bool() ? uintptr_t{0xffffffffff600000}
                                                    : (uintptr_t{1} << 47) + off * kPage);
      *len = 1 + in_.Below(kPage);
      return Target::kNonCanonical;
  }
}

void Harness::Launch() {
  const size_t first = in_.Below(kCounters);
  const size_t n = in_.Below(kCounters - first + 1);  // 0 included: a launch of nothing
  args_.push_back(std::make_unique<IncArg>(IncArg{counters() + first, in_.Bool()}));
  const int rc = hmmkit_svm_launch(dev_, n, IncKernel, args_.back().get());
  Expect("launch", rc, {0});
  for (size_t i = 0; i < n; ++i) ++expected_[first + i];
}

void Harness::Probe() {
  Drain();  // loads compare against expected_
  ProbeArg a{};
  a.op = ProbeOp(in_.Below(4));
  const size_t slot = in_.Below(kCounters);
  std::vector<int> allowed;
  switch (in_.Below(6)) {
    case 0:
      a.addr = reinterpret_cast<uintptr_t>(counters() + slot);
      allowed = {a.op == ProbeOp::kLoad64 && slot % 2 ? -EINVAL : 0};  // 8-byte loads: aligned
      break;
    case 1:
      a.addr = reinterpret_cast<uintptr_t>(ro()) + 8 * in_.Below(kPage / 8);
      allowed = {a.op == ProbeOp::kStore || a.op == ProbeOp::kAtomic ? -EPERM : 0};
      break;
    case 2:
      a.addr = reinterpret_cast<uintptr_t>(none()) + 8 * in_.Below(kPage / 8);
      allowed = {-EFAULT};  // as hmm_range_fault on a VMA without VM_READ; EPERM is for writes
      if (KnownBugTolerated("svm-prot-none-eperm")) allowed.push_back(-EPERM);
      break;
    case 3:
      a.addr = in_.Bool() ? 8 * in_.Below(kPage / 8) : kTopUserPage + 8 * in_.Below(kPage / 8);
      allowed = {-EFAULT};
      break;
    case 4:
      a.addr = in_.Bool() ? uintptr_t{0xffffffffff600000} : (uintptr_t{1} << 47);
      allowed = {-EFAULT, -EINVAL};
      break;
    default:  // misaligned: accesses never straddle a page, so the device refuses them
      a.addr = reinterpret_cast<uintptr_t>(counters() + slot) + 1 + in_.Below(3);
      allowed = {-EINVAL};
      break;
  }
  const int rc = hmmkit_svm_launch(dev_, 1, ProbeKernel, &a);
  bool ok = false;
  for (int x : allowed) ok |= x == rc;
  if (!ok || (rc != 0 && !Documented(rc)))
    Violation("probe op %d at %#lx: result %d (%s)", int(a.op), a.addr, rc,
              rc ? std::strerror(-rc) : "ok");
  if (rc != 0) return;
  const auto* p = reinterpret_cast<const uint8_t*>(a.addr);
  if (p >= ro() && p < ro() + kPage && a.op == ProbeOp::kLoad && a.loaded != 0x3C3C3C3Cu)
    Violation("probe load of the read-only page: %#lx", static_cast<unsigned long>(a.loaded));
  if (p >= Page(1) && p < ro()) {
    const size_t i = (a.addr - reinterpret_cast<uintptr_t>(counters())) / 4;
    if (a.op == ProbeOp::kLoad && a.loaded != expected_[i])
      Violation("probe load of counter %zu: %lu, expected %u", i,
                static_cast<unsigned long>(a.loaded), expected_[i]);
    if (a.op == ProbeOp::kStore) expected_[i] = 7;
    if (a.op == ProbeOp::kAtomic) ++expected_[i];
    if (a.op == ProbeOp::kLoad64) {
      const uint64_t want =
          uint64_t(expected_[i]) |
          (i + 1 < kCounters && i % 2 == 0 ? uint64_t(expected_[i + 1]) << 32 : 0);
      if (i % 2 == 0 && a.loaded != want)
        Violation("probe 64-bit load of counters %zu..%zu: %#lx", i, i + 1,
                  static_cast<unsigned long>(a.loaded));
    }
  }
}

// The results a prefetch of this target may have (location valid).
std::vector<int> PrefetchResults(int target, size_t len, int location) {
  if (len == 0) return {0};
  std::vector<int> r;
  switch (target) {
    case 0:  // counters
    case 1:  // read-only
      return {0, -ENOMEM};
    case 2:  // PROT_NONE: mapped, but nothing to move
    case 5:  // counters through PROT_NONE
      return {0, -EFAULT, -ENOMEM};
    case 3:  // hole
      r = {-EFAULT};
      break;
    default:  // wraps or non-canonical
      r = {-EFAULT, -EINVAL};
      break;
  }
  // svm.hpp: "Errors: EFAULT for addresses without a mapping", in both directions.
  if (location == HMMKIT_SVM_SYSTEM && KnownBugTolerated("prefetch-system-unmapped-ok"))
    r.push_back(0);
  // A range whose end wraps past 2^64 is empty to Pages(), so nothing is checked or moved.
  if (target == 4 /* kWraps */ && KnownBugTolerated("prefetch-wrapping-range-ok")) r.push_back(0);
  return r;
}

void Harness::Prefetch() {
  const void* p;
  size_t len;
  const Target t = ChooseRange(&p, &len);
  if (in_.U8() % 8 == 0) len = 0;
  const uint8_t l = in_.U8() % 8;
  const int location = l < 6 ? l % 2 : (l == 6 ? -1 : 2 + in_.U8());
  std::vector<int> allowed = location == 0 || location == 1 ? PrefetchResults(int(t), len, location)
                                                            : std::vector<int>{-EINVAL};
  const int rc = hmmkit_svm_prefetch(dev_, p, len, location);
  bool ok = false;
  for (int x : allowed) ok |= x == rc;
  if (!ok || (rc != 0 && !Documented(rc)))
    Violation("prefetch %p+%zu to %d (target %d): result %d (%s)", p, len, location, int(t), rc,
              rc ? std::strerror(-rc) : "ok");
  // Nothing else runs: what was just prefetched to the device is there.
  // (Not after advice in this input: read-mostly or accessed-by may keep pages in system memory.)
  if (rc == 0 && len && location == HMMKIT_SVM_DEVICE && t == Target::kCounterRange &&
      !in_flight_ && !advised_) {
    int r = -1;
    Expect("residency after prefetch", hmmkit_svm_residency(dev_, p, len, &r), {0});
    if (r != HMMKIT_SVM_RESIDENT_DEVICE)
      Violation("%p+%zu prefetched to the device reports residency %d", p, len, r);
  }
}

void Harness::Advise() {
  const void* p;
  size_t len;
  const Target t = ChooseRange(&p, &len);
  if (in_.U8() % 8 == 0) len = 0;
  const uint8_t a = in_.U8();
  const int advice = a < 240 ? a % 6 : int(int8_t(a)) * 1000 + (a & 1 ? 6 : -1);
  const uint8_t l = in_.U8() % 8;
  const int location = l < 6 ? l % 2 : (l == 6 ? -1 : 2);
  std::vector<int> allowed;
  if (advice < 0 || advice > 5 || location < 0 || location > 1 || len == 0)
    allowed = {-EINVAL};
  else if (t == Target::kCounterRange || t == Target::kReadOnly)
    allowed = {0};
  else if (t == Target::kProtNone || t == Target::kMixed)
    allowed = {0, -EFAULT};
  else if (t == Target::kHole)
    allowed = {-EFAULT};
  else
    allowed = {-EFAULT, -EINVAL};
  advised_ = true;
  const int rc = hmmkit_svm_advise(dev_, p, len, advice, location);
  bool ok = false;
  for (int x : allowed) ok |= x == rc;
  if (!ok || (rc != 0 && !Documented(rc)))
    Violation("advise %p+%zu advice %d location %d (target %d): result %d (%s)", p, len, advice,
              location, int(t), rc, rc ? std::strerror(-rc) : "ok");
}

void Harness::Residency() {
  const void* p;
  size_t len;
  const Target t = ChooseRange(&p, &len);
  if (in_.U8() % 8 == 0) len = 0;
  int r = -1;
  const int rc = hmmkit_svm_residency(dev_, p, len, &r);
  std::vector<int> allowed;
  if (len == 0)
    allowed = {-EINVAL};
  else if (t == Target::kCounterRange || t == Target::kReadOnly || t == Target::kProtNone ||
           t == Target::kMixed)
    allowed = {0};  // every page has a mapping
  else if (t == Target::kHole)
    allowed = {-EFAULT};
  else
    allowed = {-EFAULT, -EINVAL};
  bool ok = false;
  for (int x : allowed) ok |= x == rc;
  if (!ok || (rc != 0 && !Documented(rc)))
    Violation("residency %p+%zu (target %d): result %d (%s)", p, len, int(t), rc,
              rc ? std::strerror(-rc) : "ok");
  if (rc == 0 && (r < HMMKIT_SVM_UNPOPULATED || r > HMMKIT_SVM_MIXED))
    Violation("residency %p+%zu: value %d", p, len, r);
}

void Harness::StreamOp() {
  const uint8_t op = in_.U8() % 8;
  if (streams_.empty() || (op == 0 && streams_.size() < kMaxStreams)) {
    hmmkit_svm_stream* s = nullptr;
    Expect("stream_create", hmmkit_svm_stream_create(dev_, &s), {0});
    streams_.push_back(s);
    sync_allowed_.push_back({0});
    return;
  }
  const size_t si = in_.Below(streams_.size());
  hmmkit_svm_stream* s = streams_[si];
  const bool want_fence = in_.Bool();
  hmmkit_svm_fence* f = nullptr;
  switch (op) {
    case 1:
    case 2: {
      const size_t first = in_.Below(kCounters);
      const size_t n = in_.Below(kCounters - first + 1);
      args_.push_back(std::make_unique<IncArg>(IncArg{counters() + first, in_.Bool()}));
      Expect(
          "stream_launch",
          hmmkit_svm_stream_launch(s, n, IncKernel, args_.back().get(), want_fence ? &f : nullptr),
          {0});
      for (size_t i = 0; i < n; ++i) ++expected_[first + i];
      in_flight_ = true;
      if (f) held_.push_back({f, {0}});
      break;
    }
    case 3: {
      const void* p;
      size_t len;
      const Target t = ChooseRange(&p, &len);
      const int location = in_.Bool() ? HMMKIT_SVM_DEVICE : HMMKIT_SVM_SYSTEM;
      const int rc = hmmkit_svm_stream_prefetch(s, p, len, location, want_fence ? &f : nullptr);
      Expect("stream_prefetch", rc, {0});  // errors arrive through the fence
      std::vector<int> results = PrefetchResults(int(t), len, location);
      for (int r : results) sync_allowed_[si].push_back(r);
      in_flight_ = true;
      if (f) held_.push_back({f, results});
      break;
    }
    case 4: {
      const int rc = hmmkit_svm_stream_synchronize(s);
      bool ok = false;
      for (int x : sync_allowed_[si]) ok |= x == rc;
      if (!ok) Violation("stream_synchronize: %d (%s)", rc, std::strerror(-rc));
      sync_allowed_[si] = {0};
      break;
    }
    case 5:
    case 6: {
      if (held_.empty()) break;
      const size_t fi = in_.Below(held_.size());
      const long timeout = in_.Bool() ? -1 : long(in_.Below(3));
      const int rc = hmmkit_svm_fence_wait(held_[fi].fence, timeout);
      bool ok = rc == -ETIMEDOUT && timeout >= 0;
      for (int x : held_[fi].allowed) ok |= x == rc;
      if (!ok) Violation("fence_wait(%ld): %d (%s)", timeout, rc, std::strerror(-rc));
      if (rc != -ETIMEDOUT && hmmkit_svm_fence_ready(held_[fi].fence) != 1)
        Violation("fence_wait returned %d but the fence is not ready", rc);
      if (in_.Bool()) {
        hmmkit_svm_fence_release(held_[fi].fence);
        held_.erase(held_.begin() + long(fi));
      }
      break;
    }
    default: {
      // Destroying waits for the queued work; its errors are dropped with it.
      hmmkit_svm_stream_destroy(s);
      streams_.erase(streams_.begin() + long(si));
      sync_allowed_.erase(sync_allowed_.begin() + long(si));
      break;
    }
  }
}

void Harness::BadCalls() {
  int r = 0;
  hmmkit_svm_stream* s = nullptr;
  hmmkit_svm_stats st{};
  switch (in_.Below(12)) {
    case 0:
      Expect("launch(NULL)", hmmkit_svm_launch(nullptr, 1, IncKernel, nullptr), {-EINVAL});
      break;
    case 1:
      Expect("launch(fn NULL)", hmmkit_svm_launch(dev_, 1, nullptr, nullptr), {-EINVAL});
      break;
    case 2:
      Expect("prefetch(NULL)", hmmkit_svm_prefetch(nullptr, counters(), 4, 0), {-EINVAL});
      break;
    case 3:
      Expect("residency(out NULL)", hmmkit_svm_residency(dev_, counters(), 4, nullptr), {-EINVAL});
      break;
    case 4:
      Expect("residency(NULL)", hmmkit_svm_residency(nullptr, counters(), 4, &r), {-EINVAL});
      break;
    case 5:
      Expect("get_stats(NULL)", hmmkit_svm_get_stats(nullptr, &st), {-EINVAL});
      break;
    case 6:
      Expect("stream_create(NULL)", hmmkit_svm_stream_create(nullptr, &s), {-EINVAL});
      break;
    case 7:
      Expect("stream_create(out NULL)", hmmkit_svm_stream_create(dev_, nullptr), {-EINVAL});
      break;
    case 8:
      Expect("stream_synchronize(NULL)", hmmkit_svm_stream_synchronize(nullptr), {-EINVAL});
      break;
    case 9:
      Expect("fence_wait(NULL)", hmmkit_svm_fence_wait(nullptr, 0), {-EINVAL});
      break;
    case 10:
      if (hmmkit_svm_fence_ready(nullptr) != 1) Violation("fence_ready(NULL) is not 1");
      hmmkit_svm_fence_release(nullptr);
      hmmkit_svm_close(nullptr);
      if (std::strcmp(hmmkit_svm_name(nullptr), "") != 0) Violation("name(NULL) is not empty");
      if (hmmkit_svm_name(dev_)[0] == '\0') Violation("the device has no name");
      break;
    default:
      Expect("open(out NULL)", hmmkit_svm_open(nullptr, nullptr), {-EINVAL});
      Expect("stream_launch(NULL)",
             hmmkit_svm_stream_launch(nullptr, 1, IncKernel, nullptr, nullptr), {-EINVAL});
      Expect("stream_prefetch(NULL)",
             hmmkit_svm_stream_prefetch(nullptr, counters(), 4, 0, nullptr), {-EINVAL});
      break;
  }
}

// A second device with fuzzed options: bad ones fail with their documented error, good ones work.
void Harness::OpenOther() {
  static const char* const kBackends[] = {nullptr, "", "emu", "emu", "nope", "EMU"};
  static const size_t kSizes[] = {0,    size_t(2) << 20, size_t(4) << 20, 1,
                                  4096, size_t(3) << 20, size_t(1) << 50, ~size_t{0}};
  static const unsigned kUnits[] = {0, 1, 3, 256, 257, ~0u};
  hmmkit_svm_options o{};
  o.backend = kBackends[in_.Below(std::size(kBackends))];
  o.memory_bytes = kSizes[in_.Below(std::size(kSizes))];
  o.compute_units = kUnits[in_.Below(std::size(kUnits))];
  o.map_remotely_on_fault = in_.Bool();
  const bool bad_backend = o.backend && *o.backend && std::strcmp(o.backend, "emu") != 0;
  const bool bad_units = o.compute_units > 256;
  const bool bad_size = o.memory_bytes != 0 && o.memory_bytes % (size_t(2) << 20) != 0;
  const bool huge = o.memory_bytes > (size_t(1) << 40);
  std::vector<int> allowed;
  if (bad_backend)
    allowed = {-ENODEV};
  else if (bad_units || bad_size || huge)
    allowed = {-EINVAL, -ENOMEM};
  else
    allowed = {0, -ENOMEM};
  hmmkit_svm_device* other = reinterpret_cast<hmmkit_svm_device*>(&o);  // must be overwritten
  const int rc = hmmkit_svm_open(&o, &other);
  bool ok = false;
  for (int x : allowed) ok |= x == rc;
  if (!ok || (rc != 0 && !Documented(rc)))
    Violation("open(backend %s, %zu bytes, %u units): %d (%s)", o.backend ? o.backend : "NULL",
              o.memory_bytes, o.compute_units, rc, rc ? std::strerror(-rc) : "ok");
  if (rc != 0) {
    if (other != nullptr) Violation("a failed open left *out set");
    return;
  }
  // The new device sees the same memory: one launch over the counters.
  Drain();
  const size_t n = 1 + in_.Below(kCounters);
  IncArg a{counters(), in_.Bool()};
  Expect("launch on the second device", hmmkit_svm_launch(other, n, IncKernel, &a), {0});
  for (size_t i = 0; i < n; ++i) ++expected_[i];
  hmmkit_svm_close(other);
}

void Harness::Drain() {
  for (size_t i = 0; i < streams_.size(); ++i) {
    const int rc = hmmkit_svm_stream_synchronize(streams_[i]);
    bool ok = false;
    for (int x : sync_allowed_[i]) ok |= x == rc;
    if (!ok) Violation("stream_synchronize (drain): %d (%s)", rc, std::strerror(-rc));
    sync_allowed_[i] = {0};
  }
  in_flight_ = false;
}

void Harness::CheckMemory() {
  for (size_t i = 0; i < kCounters; ++i)
    if (counters()[i] != expected_[i])
      Violation("counter %zu is %u, expected %u", i, counters()[i], expected_[i]);
  for (size_t i = 0; i < kPage; ++i)
    if (ro()[i] != 0x3C || base_[i] != kCanary || Page(kArenaPages - 1)[i] != kCanary)
      Violation("read-only or canary byte %zu changed", i);
}

void Harness::CheckStats() {
  hmmkit_svm_stats now{};
  Expect("get_stats", hmmkit_svm_get_stats(dev_, &now), {0});
  const uint64_t* a = &stats_.device_faults;
  const uint64_t* b = &now.device_faults;
  for (size_t i = 0; i < sizeof(now) / sizeof(uint64_t); ++i)
    if (b[i] < a[i])
      Violation("statistic %zu went backwards: %lu -> %lu", i, static_cast<unsigned long>(a[i]),
                static_cast<unsigned long>(b[i]));
}

void Harness::Step() {
  switch (in_.U8() % 16) {
    case 0:
    case 1:
    case 2:
      Launch();
      break;
    case 3:
    case 4:
      Probe();
      break;
    case 5:
    case 6:
      Prefetch();
      break;
    case 7:
      Advise();
      break;
    case 8:
      Residency();
      break;
    case 9:
    case 10:
    case 11:
      StreamOp();
      break;
    case 12:
      BadCalls();
      break;
    case 13:
      if (in_.U8() % 4 == 0) OpenOther();
      break;
    default:
      Drain();
      CheckMemory();  // a CPU read: device pages come back
      break;
  }
}

}  // namespace
}  // namespace hmmkit::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace hmmkit::fuzz;
  bool unsupported = false;
  hmmkit_svm_device* dev = SharedDevice(&unsupported);
  if (unsupported) return 0;  // no userfaultfd here: nothing can run
  ByteReader in(data, size);
  {
    Harness h(in, dev);
    for (int i = 0; i < 48 && !in.empty(); ++i) h.Step();
  }
  // The cached device still works after the input: a launch over fresh memory.
  // (Own mapping: a launch on the binary's globals would migrate their page.)
  void* page = ::mmap(nullptr, kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (page == MAP_FAILED) Violation("mmap: %d", errno);
  auto* check = static_cast<uint32_t*>(page);
  for (size_t i = 0; i < 64; ++i) check[i] = 1;
  IncArg a{check, false};
  Expect("consistency launch", hmmkit_svm_launch(dev, 64, IncKernel, &a), {0});
  for (size_t i = 0; i < 64; ++i)
    if (check[i] != 2) Violation("consistency launch: %u", check[i]);
  ::munmap(page, kPage);
  return 0;
}
