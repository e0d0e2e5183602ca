#include "workload.hpp"

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include "mapping.hpp"

namespace stress {

namespace svm = hmmkit::svm;
using Clock = std::chrono::steady_clock;

const char* OpName(Op op) {
  static constexpr const char* kNames[] = {
      "cpu_threads", "dev_read", "dev_write", "prefetch", "prefetch_concurrent",
      "advise",      "mixed",    "remap",     "mremap",   "dontneed",
      "protect",     "fork",     "dev_sweep"};
  static_assert(std::size(kNames) == kOpCount);
  return kNames[static_cast<size_t>(op)];
}

namespace {

// Sizes: the private mappings (the ones that migrate) together exceed the device memory of the
// default 8 MiB device, so eviction runs.
constexpr size_t kMappingBytes[] = {6 << 20, 6 << 20, 2 << 20, 2 << 20, 2 << 20};
// fork() waits in the kernel until the monitor reads UFFD_EVENT_FORK, and ThreadSanitizer holds
// its runtime locks across fork(), which the monitor's reader needs: no fork under TSan (the same
// limit as tests/support/test_support.hpp).
#if defined(__SANITIZE_THREAD__)
constexpr bool kForkWorks = false;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
constexpr bool kForkWorks = false;
#else
constexpr bool kForkWorks = true;
#endif
#else
constexpr bool kForkWorks = true;
#endif

// With --inject, fresh plans every this many operations (each plan fails only a few times).
constexpr uint64_t kRearmEvery = 10;
// Relative frequency of each Op.
constexpr unsigned kWeights[kOpCount] = {12, 12, 14, 10, 5, 6, 12, 6, 4, 6, 6, 3, 4};

uint64_t Mix64(uint64_t x) {  // splitmix64's finalizer
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

struct Span {
  size_t first = 0;
  size_t n = 0;
};

// The first mismatch a kernel saw (reads compare inside the kernel).
struct KernelMismatch {
  std::atomic<uint64_t> count{0};
  std::atomic<size_t> elem{SIZE_MAX};
  std::atomic<uint64_t> actual{0};
  void Record(size_t i, uint64_t v) {
    if (count.fetch_add(1) == 0) {
      elem.store(i);
      actual.store(v);
    }
  }
};

class Workload {
 public:
  Workload(Env& env, uint64_t seed, Totals& totals)
      : env_(env), dev_(env.device), seed_(seed), totals_(totals), rng_(seed) {
    replay_.seed = seed;
    replay_.ops = env.options.ops;
    replay_.inject = env.options.inject;
    replay_.interpose = env.options.interpose;
    replay_.device_mib = env.options.device_mib;
  }

  uint64_t Run(Clock::time_point deadline) {
    for (size_t k = 0; k < static_cast<size_t>(Kind::kCount); ++k) {
      std::string why;
      maps_.emplace_back();
      if (Create(Kind(k), kMappingBytes[k], env_.tmpdir, &maps_.back(), &why))
        Fail(replay_, env_.history, "setup: " + why, 2);
    }
    stream_ = dev_.CreateStream();
    InstallCrashReport(&replay_, &env_.history);
    bool complete = true;
    for (op_ = 0; op_ < env_.options.ops; ++op_) {
      if (Clock::now() >= deadline) {
        complete = false;
        break;
      }
      env_.step_start_ns.store(Clock::now().time_since_epoch().count());
      if (env_.options.inject && op_ % kRearmEvery == 0) env_.injector.Arm(seed_ * 1000003 + op_);
      Step();
      if (int64_t(op_) == env_.options.corrupt_at) CorruptOne();
      if (int64_t(op_) == env_.options.hang_at)
        for (;;) ::pause();  // the watchdog ends the process
      CheckAll("after");
      env_.step_start_ns.store(0);
    }
    env_.injector.Disarm();
    if (Status st = stream_->Synchronize(); !st.ok() && !Accepted(st))
      Fail(replay_, env_.history, "stream: " + st.ToString());
    stream_.reset();
    InstallCrashReport(nullptr, nullptr);
    for (Mapping& m : maps_) Destroy(m);
    ++(complete ? totals_.seeds_complete : totals_.seeds_partial);
    return digest_;
  }

 private:
  using Status = hmmkit::Status;

  // Every choice goes through Draw, so the digest covers the whole sequence.
  uint64_t Draw(uint64_t n) {
    const uint64_t v = rng_() % n;
    digest_ = Mix64(digest_ ^ v) + n;
    return v;
  }
  Mapping& DrawMapping() { return maps_[Draw(maps_.size())]; }
  // Elements: a whole mapping now and then, else up to 64 Ki elements.
  Span DrawElems(const Mapping& m) {
    if (Draw(4) == 0) return {0, m.elems()};
    const size_t first = Draw(m.elems());
    return {first, 1 + Draw(std::min<size_t>(65536, m.elems() - first))};
  }
  Span DrawPages(const Mapping& m) {
    if (Draw(5) == 0) return {0, m.pages()};
    const size_t first = Draw(m.pages());
    return {first, 1 + Draw(std::min<size_t>(256, m.pages() - first))};
  }
  svm::Location DrawLocation() { return Draw(2) ? svm::Location::kDevice : svm::Location::kSystem; }

  uint64_t Value(size_t elem) const {
    return Mix64(seed_ * 0x100000001b3ULL + op_ * 0x9e37ULL + elem) | 1;
  }

  bool Accepted(const Status& st) const {
    return env_.injector.armed() && Injector::Accepted(st.errno_value());
  }
  void CountAccepted() { ++totals_.accepted_errors; }

  void Log(const char* fmt, ...) __attribute__((format(printf, 2, 3))) {
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    char line[320];
    std::snprintf(line, sizeof line, "#%" PRIu64 " %s", op_, buf);
    if (env_.options.verbose) std::printf("  %s\n", line);
    env_.history.Add(line);
  }

  [[noreturn]] void Fail2(const std::string& what) { Fail(replay_, env_.history, what); }

  std::string Where(const Mapping& m, size_t elem) const {
    char buf[160];
    std::snprintf(buf, sizeof buf, "mapping %s (base %p, %zu bytes%s) offset 0x%zx (element %zu)",
                  KindName(m.kind), static_cast<void*>(m.base), m.bytes,
                  m.read_only ? ", read-only" : "", elem * sizeof(uint64_t), elem);
    return buf;
  }
  std::string Values(uint64_t expected, uint64_t actual) const {
    char buf[96];
    std::snprintf(buf, sizeof buf, ": expected 0x%016" PRIx64 ", actual 0x%016" PRIx64, expected,
                  actual);
    return buf;
  }

  void CheckAll(const char* when) {
    for (Mapping& m : maps_) {
      if (auto mm = FindMismatch(m.base, m.shadow.data(), m.elems()))
        Fail2(std::string("oracle ") + when + " op #" + std::to_string(op_) + ": " +
              Where(m, mm->elem) + Values(mm->expected, mm->actual));
      totals_.bytes_checked += m.bytes;
    }
  }

  // --corrupt-at: a write the shadow does not know about (the oracle must report it).
  void CorruptOne() {
    for (Mapping& m : maps_) {
      if (m.read_only) continue;
      m.base[m.elems() / 2] ^= 0x100;
      return;
    }
  }

  void Step() {
    unsigned total = 0;
    for (unsigned w : kWeights) total += w;
    uint64_t pick = Draw(total);
    size_t k = 0;
    while (pick >= kWeights[k]) pick -= kWeights[k++];
    const Op op = Op(k);
    ++totals_.ops[k];
    switch (op) {
      case Op::kCpuThreads:
        return CpuThreads();
      case Op::kDevRead:
        return DevRead();
      case Op::kDevWrite:
        return DevWrite();
      case Op::kPrefetch:
        return PrefetchOne();
      case Op::kPrefetchConcurrent:
        return PrefetchConcurrent();
      case Op::kAdvise:
        return AdviseOne();
      case Op::kMixed:
        return Mixed();
      case Op::kRemap:
        return Remap();
      case Op::kMremap:
        return Mremap();
      case Op::kDontNeed:
        return DontNeedOp();
      case Op::kProtect:
        return ProtectOp();
      case Op::kFork:
        return Fork();
      case Op::kDevSweep:
        return DevSweep();
      default:
        break;
    }
  }

  // --- CPU threads: each verifies its slice against the shadow, then (maybe) writes it.
  struct SliceResult {
    std::optional<Mismatch> bad;
  };
  void CpuSlice(Mapping& m, Span s, bool write, SliceResult* r) {
    if (auto mm = FindMismatch(m.base + s.first, m.shadow.data() + s.first, s.n)) {
      mm->elem += s.first;
      r->bad = mm;
      return;
    }
    if (!write) return;
    for (size_t i = s.first; i < s.first + s.n; ++i) m.base[i] = Value(i);
    std::lock_guard<std::mutex> lock(shadow_mu_);
    for (size_t i = s.first; i < s.first + s.n; ++i) m.shadow[i] = Value(i);
  }
  // Runs `threads` CPU threads over disjoint slices of s while `concurrent` runs on this thread.
  template <class F>
  void WithCpuThreads(Mapping& m, Span s, unsigned threads, bool write, F&& concurrent) {
    std::vector<SliceResult> results(threads);
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < threads; ++t) {
      const Span slice{s.first + s.n * t / threads, s.n * (t + 1) / threads - s.n * t / threads};
      ts.emplace_back([this, &m, slice, write, r = &results[t]] { CpuSlice(m, slice, write, r); });
    }
    concurrent();
    for (auto& t : ts) t.join();
    for (const SliceResult& r : results)
      if (r.bad)
        Fail2("CPU thread read before its write: " + Where(m, r.bad->elem) +
              Values(r.bad->expected, r.bad->actual));
  }
  void CpuThreads() {
    Mapping& m = DrawMapping();
    const Span s = DrawElems(m);
    const unsigned threads = 1 + unsigned(Draw(4));
    const bool write = Draw(4) != 0 && !m.read_only;
    Log("cpu_threads %s [%zu,+%zu) threads=%u write=%d", KindName(m.kind), s.first, s.n, threads,
        write);
    WithCpuThreads(m, s, threads, write, [] {});
  }

  // --- Device kernels.
  // Reads s on the device, comparing each Load with the shadow inside the kernel.
  void DeviceRead(Mapping& m, Span s) {
    KernelMismatch km;
    const uint64_t* base = m.base;
    const uint64_t* shadow = m.shadow.data();
    Status st = dev_.Launch(s.n, [&](svm::KernelContext& k, size_t i) {
      const size_t e = s.first + i;
      const uint64_t v = k.Load(&base[e]);
      if (v != shadow[e]) km.Record(e, v);
    });
    if (!st.ok()) {
      // A failed access returns 0 to the kernel: comparisons of a failed launch prove nothing.
      if (!Accepted(st)) Fail2("device read launch failed: " + st.ToString());
      CountAccepted();
      return;
    }
    if (km.count.load())
      Fail2("device read saw stale data (" + std::to_string(km.count.load()) + " elements): " +
            Where(m, km.elem.load()) + Values(m.shadow[km.elem.load()], km.actual.load()));
  }
  // Stores Value(e) to every stride-th element of s on the device.
  void DeviceWrite(Mapping& m, Span s, size_t stride) {
    const size_t n = (s.n + stride - 1) / stride;
    uint64_t* base = m.base;
    Status st = dev_.Launch(n, [&](svm::KernelContext& k, size_t i) {
      const size_t e = s.first + i * stride;
      k.Store(&base[e], Value(e));
    });
    if (m.read_only) {
      if (st.ok()) Fail2("device store to read-only " + Where(m, s.first) + " succeeded");
      if (st.errno_value() == EPERM) {
        ++totals_.expected_eperm;
      } else if (Accepted(st)) {
        CountAccepted();
      } else {
        Fail2("device store to read-only memory: want EPERM, got " + st.ToString());
      }
      return;  // CheckAll proves nothing changed
    }
    if (st.ok()) {
      for (size_t i = 0; i < n; ++i) m.shadow[s.first + i * stride] = Value(s.first + i * stride);
      return;
    }
    if (!Accepted(st)) Fail2("device write launch failed: " + st.ToString());
    CountAccepted();
    // A failed launch leaves each element old or new, never torn; the shadow adopts what is there.
    for (size_t i = 0; i < n; ++i) {
      const size_t e = s.first + i * stride;
      const uint64_t v = m.base[e];
      if (v != m.shadow[e] && v != Value(e))
        Fail2("torn or foreign value after a failed device write: " + Where(m, e) +
              Values(m.shadow[e], v) + " (new would be " + std::to_string(Value(e)) + ")");
      m.shadow[e] = v;
    }
  }
  void DevRead() {
    Mapping& m = DrawMapping();
    const Span s = DrawElems(m);
    Log("dev_read %s [%zu,+%zu)", KindName(m.kind), s.first, s.n);
    DeviceRead(m, s);
  }
  void DevWrite() {
    Mapping& m = DrawMapping();
    const Span s = DrawElems(m);
    const size_t stride = Draw(3) == 0 ? kElemsPerPage + 1 : 1;  // one element per page, or all
    Log("dev_write %s [%zu,+%zu) stride=%zu%s", KindName(m.kind), s.first, s.n, stride,
        m.read_only ? " (read-only)" : "");
    DeviceWrite(m, s, stride);
  }

  // One launch over both private mappings (the ones that migrate; together more than the device
  // memory), touching every 8th element: reads compare with the shadow, read-write mappings get new
  // values. Eviction has to run for it to finish.
  void DevSweep() {
    constexpr size_t kStride = 8;
    Mapping& a = maps_[size_t(Kind::kPrivateAnon)];
    Mapping& b = maps_[size_t(Kind::kThpAnon)];
    const size_t na = a.elems() / kStride;
    const size_t n = na + b.elems() / kStride;
    Log("dev_sweep private-anon + thp-anon, every %zu-th element", kStride);
    KernelMismatch km;
    std::atomic<int> bad_map{0};
    Status st = dev_.Launch(n, [&](svm::KernelContext& k, size_t i) {
      Mapping& m = i < na ? a : b;
      const size_t e = (i < na ? i : i - na) * kStride;
      const uint64_t v = k.Load(&m.base[e]);
      if (v != m.shadow[e] && km.count.load(std::memory_order_relaxed) == 0) {
        bad_map.store(i < na ? 0 : 1);
        km.Record(e, v);
      }
      if (!m.read_only) k.Store(&m.base[e], Value(e));
    });
    Mapping* both[] = {&a, &b};
    if (st.ok()) {
      if (km.count.load()) {
        Mapping& m = *both[bad_map.load()];
        Fail2("device sweep saw stale data: " + Where(m, km.elem.load()) +
              Values(m.shadow[km.elem.load()], km.actual.load()));
      }
      for (Mapping* m : both)
        if (!m->read_only)
          for (size_t e = 0; e < m->elems(); e += kStride) m->shadow[e] = Value(e);
      return;
    }
    if (!Accepted(st)) Fail2("device sweep failed: " + st.ToString());
    CountAccepted();
    for (Mapping* m : both) {
      if (m->read_only) continue;
      for (size_t e = 0; e < m->elems(); e += kStride) {
        const uint64_t v = m->base[e];
        if (v != m->shadow[e] && v != Value(e))
          Fail2("torn or foreign value after a failed sweep: " + Where(*m, e) +
                Values(m->shadow[e], v));
        m->shadow[e] = v;
      }
    }
  }

  // --- Prefetch and advice.
  void CheckPrefetch(const Status& st, const char* what) {
    if (st.ok()) return;
    if (!Accepted(st)) Fail2(std::string(what) + " failed: " + st.ToString());
    CountAccepted();
  }
  void PrefetchOne() {
    Mapping& m = DrawMapping();
    const Span p = DrawPages(m);
    const svm::Location to = DrawLocation();
    Log("prefetch %s pages [%zu,+%zu) to %s", KindName(m.kind), p.first, p.n,
        to == svm::Location::kDevice ? "device" : "system");
    CheckPrefetch(dev_.Prefetch(m.base + p.first * kElemsPerPage, p.n * kPage, to), "prefetch");
  }
  void PrefetchConcurrent() {
    struct Job {
      const void* p;
      size_t len;
      svm::Location to;
      Status st;
    };
    std::vector<Job> jobs(2 + Draw(2));
    for (Job& j : jobs) {
      Mapping& m = DrawMapping();
      const Span p = DrawPages(m);
      j = {m.base + p.first * kElemsPerPage, p.n * kPage, DrawLocation(), Status()};
    }
    Log("prefetch_concurrent x%zu", jobs.size());
    std::vector<std::thread> ts;
    for (Job& j : jobs) ts.emplace_back([this, &j] { j.st = dev_.Prefetch(j.p, j.len, j.to); });
    for (auto& t : ts) t.join();
    for (const Job& j : jobs) CheckPrefetch(j.st, "concurrent prefetch");
  }
  void AdviseOne() {
    Mapping& m = DrawMapping();
    const Span p = DrawPages(m);
    const auto advice = svm::Advice(Draw(6));
    const svm::Location where = DrawLocation();
    Log("advise %s pages [%zu,+%zu) advice=%d where=%d", KindName(m.kind), p.first, p.n,
        int(advice), int(where));
    CheckPrefetch(dev_.Advise(m.base + p.first * kElemsPerPage, p.n * kPage, advice, where),
                  "advise");
  }

  // --- CPU threads, a device launch and a stream prefetch at once, on disjoint data.
  void Mixed() {
    Mapping& m = DrawMapping();
    Span s = DrawElems(m);
    s.n = std::max<size_t>(s.n, 64);
    if (s.first + s.n > m.elems()) s.first = m.elems() - s.n;
    const unsigned threads = 1 + unsigned(Draw(3));
    const bool cpu_write = Draw(2) && !m.read_only;
    const bool dev_write = Draw(2) && !m.read_only;
    Mapping& pm = DrawMapping();  // the prefetch may overlap anything: it moves, never changes
    const Span pp = DrawPages(pm);
    const svm::Location to = DrawLocation();
    const Span cpu{s.first, s.n / 2};
    const Span dev{s.first + s.n / 2, s.n - s.n / 2};
    Log("mixed %s cpu [%zu,+%zu) x%u write=%d, dev [%zu,+%zu) write=%d, stream prefetch %s "
        "pages [%zu,+%zu) to %d",
        KindName(m.kind), cpu.first, cpu.n, threads, cpu_write, dev.first, dev.n, dev_write,
        KindName(pm.kind), pp.first, pp.n, int(to));
    svm::Fence f = stream_->Prefetch(pm.base + pp.first * kElemsPerPage, pp.n * kPage, to);
    WithCpuThreads(m, cpu, threads, cpu_write, [&] {
      if (dev_write) {
        DeviceWrite(m, dev, 1);
      } else {
        DeviceRead(m, dev);
      }
    });
    CheckPrefetch(f.Wait(), "stream prefetch");
  }

  // --- Changes to the mappings. Each may first move its target to the device, so that the
  // change meets device-resident pages.
  void MaybePrefetchFirst(Mapping& m, Span pages) {
    if (!Draw(2)) return;
    CheckPrefetch(dev_.Prefetch(m.base + pages.first * kElemsPerPage, pages.n * kPage,
                                svm::Location::kDevice),
                  "prefetch before a change");
  }
  void EnvError(int err, const std::string& why) {
    if (err) Fail(replay_, env_.history, "environment (not hmmkit): " + why, 2);
  }
  void Remap() {
    Mapping& m = DrawMapping();
    const Span p = DrawPages(m);
    Log("remap %s pages [%zu,+%zu)", KindName(m.kind), p.first, p.n);
    MaybePrefetchFirst(m, p);
    std::string why;
    EnvError(UnmapAndRemap(m, p.first, p.n, &why), why);
  }
  void Mremap() {
    Mapping& m = DrawMapping();
    Log("mremap %s", KindName(m.kind));
    MaybePrefetchFirst(m, {0, m.pages()});
    std::string why;
    EnvError(Move(m, &why), why);
  }
  void DontNeedOp() {
    Mapping& m = DrawMapping();
    const Span p = DrawPages(m);
    Log("dontneed %s pages [%zu,+%zu)", KindName(m.kind), p.first, p.n);
    MaybePrefetchFirst(m, p);
    std::string why;
    EnvError(DontNeed(m, p.first, p.n, &why), why);
  }
  void ProtectOp() {
    Mapping& m = DrawMapping();
    const bool ro = !m.read_only;
    const Span s = DrawElems(m);
    Log("protect %s %s", KindName(m.kind), ro ? "read-only" : "read-write");
    if (ro && !env_.options.interpose) return;  // userfaultfd cannot see mprotect (documented)
    MaybePrefetchFirst(m, {0, m.pages()});
    std::string why;
    EnvError(Protect(m, ro, &why), why);
    if (ro) DeviceWrite(m, s, 1);  // must fail with EPERM and change nothing
  }

  // --- fork: prepare evicts device pages, so the child sees exactly the shadow.
  void Fork() {
    Mapping& m = DrawMapping();
    Log("fork (prefetching %s first)%s", KindName(m.kind), kForkWorks ? "" : ": skipped (TSan)");
    MaybePrefetchFirst(m, {0, m.pages()});
    if (!kForkWorks) return;
    // An injected failure in fork's eviction is documented data loss for the child: not tested.
    env_.injector.Suspend();
    std::fflush(stdout);
    std::fflush(stderr);
    const pid_t pid = ::fork();
    if (pid == 0) ChildCheck();
    env_.injector.Resume();
    if (pid < 0) EnvError(errno, "fork");
    int status = 0;
    if (::waitpid(pid, &status, 0) != pid) EnvError(errno, "waitpid");
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
      Fail2("fork child's view differs from the shadow (its message above), status " +
            std::to_string(status));
    for (const Mapping& mm : maps_) totals_.bytes_checked += mm.bytes;
  }
  [[noreturn]] void ChildCheck() {
    // Only memory reads, snprintf and write: the parent's other threads do not exist here.
    for (const Mapping& m : maps_) {
      if (auto mm = FindMismatch(m.base, m.shadow.data(), m.elems())) {
        char buf[256];
        const int n = std::snprintf(
            buf, sizeof buf,
            "fork child: %s offset 0x%zx: expected 0x%016" PRIx64 ", actual 0x%016" PRIx64 "\n",
            KindName(m.kind), mm->elem * sizeof(uint64_t), mm->expected, mm->actual);
        if (::write(2, buf, size_t(n)) < 0) ::_exit(3);
        ::_exit(1);
      }
    }
    ::_exit(0);
  }

  Env& env_;
  svm::Device& dev_;
  const uint64_t seed_;
  Totals& totals_;
  std::mt19937_64 rng_;
  uint64_t digest_ = 0xcbf29ce484222325ULL;
  uint64_t op_ = 0;
  ReplayInfo replay_;
  std::vector<Mapping> maps_;
  std::unique_ptr<svm::Stream> stream_;
  std::mutex shadow_mu_;  // the oracle's lock: CPU threads update their shadow slices under it
};

}  // namespace

uint64_t RunSeed(Env& env, uint64_t seed, Clock::time_point deadline, Totals& totals) {
  Workload w(env, seed, totals);
  return w.Run(deadline);
}

}  // namespace stress
