// The trace ring: recording, Enable/Disable/Clear, the track table and the cause/collector
// thread-locals. See trace_ring.hpp for the slot protocol and trace.hpp for the contract.
#include "hmmkit/base/trace.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <ctime>
#include <limits>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "hmmkit/base/mutex.hpp"
#include "trace_ring.hpp"

namespace hmmkit::trace {

namespace detail {

State& GlobalState() {
  static auto* state = new State();  // never destroyed: see State
  return *state;
}

void RecordSlow(const Event& e) {
  State& s = GlobalState();
  Ring* ring = s.ring.load(std::memory_order_acquire);
  if (ring == nullptr) return;
  const uint64_t ticket = s.head.fetch_add(1, std::memory_order_relaxed);
  const uint64_t index = ticket & kCountMask;
  if (index >= ring->capacity) return;  // full: counted as reservations beyond capacity
  Slot& slot = ring->slots[index];
  if (slot.seq.exchange(kBusy, std::memory_order_acquire) == kBusy) {
    s.busy_drops.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  slot.ts.store(e.ts_ns, std::memory_order_relaxed);
  slot.dur.store(e.instant ? 0 : e.dur_ns, std::memory_order_relaxed);
  for (int i = 0; i < 4; ++i) slot.a[i].store(e.a[i], std::memory_order_relaxed);
  slot.packed.store(uint64_t(e.small) | (uint64_t(e.track) << 32) | (uint64_t(e.name) << 48) |
                        (uint64_t(e.instant) << 56),
                    std::memory_order_relaxed);
  slot.seq.store(Tag(ticket >> kEpochShift, index), std::memory_order_release);
}

std::vector<Snapshot> CollectRecords() {
  State& s = GlobalState();
  std::vector<Snapshot> out;
  Ring* ring = s.ring.load(std::memory_order_acquire);
  if (ring == nullptr) return out;
  const uint64_t head = s.head.load(std::memory_order_acquire);
  const uint64_t epoch = head >> kEpochShift;
  const uint64_t n = std::min<uint64_t>(head & kCountMask, ring->capacity);
  out.reserve(n);
  for (uint64_t i = 0; i < n; ++i) {
    Slot& slot = ring->slots[i];
    const uint64_t tag = Tag(epoch, i);
    if (slot.seq.load(std::memory_order_acquire) != tag) continue;  // in flight or stale
    Snapshot r{};
    r.ts = slot.ts.load(std::memory_order_relaxed);
    r.dur = slot.dur.load(std::memory_order_relaxed);
    for (int k = 0; k < 4; ++k) r.a[k] = slot.a[k].load(std::memory_order_relaxed);
    const uint64_t p = slot.packed.load(std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_acquire);
    if (slot.seq.load(std::memory_order_relaxed) != tag) continue;  // rewritten meanwhile
    r.small = uint32_t(p);
    r.track = uint16_t(p >> 32);
    r.name = Name(uint8_t(p >> 48));
    r.instant = ((p >> 56) & 1) != 0;
    out.push_back(r);
  }
  return out;
}

}  // namespace detail

namespace {

using detail::GlobalState;
using detail::Ring;

constexpr size_t kMaxTracks = 1024;
constexpr uint16_t kOverflowTrack = kMaxTracks - 1;

// The track table. Names are never removed (ids stay meaningful for the recording); keys are
// unbound when their object goes away.
struct Tracks {
  Mutex mu;
  std::vector<std::string> names GUARDED_BY(mu);
  std::vector<std::pair<const void*, uint16_t>> keys GUARDED_BY(mu);
};

Tracks& GlobalTracks() {
  static auto* tracks = [] {
    auto* t = new Tracks();  // never destroyed: the exit hook writes the file late
    MutexLock lock(t->mu);
    t->names.resize(3);
    t->names[kCpuFaultTrack] = "cpu fault handler";
    t->names[kNotifierTrack] = "mmu notifier";
    return t;
  }();
  return *tracks;
}

const char* Prefix(TrackKind kind) {
  switch (kind) {
    case TrackKind::kDevice:
      return "device ";
    case TrackKind::kDma:
      return "dma ";
    default:
      return "";
  }
}

uint16_t RegisterLocked(Tracks& t, TrackKind kind, std::string_view name) REQUIRES(t.mu) {
  if (kind == TrackKind::kCpuFault) return kCpuFaultTrack;
  if (kind == TrackKind::kNotifier) return kNotifierTrack;
  if (t.names.size() >= kOverflowTrack) {
    t.names.resize(kMaxTracks);
    t.names[kOverflowTrack] = "other tracks (table full)";
    return kOverflowTrack;
  }
  // Two objects of one name (two "cpu" DMA engines) get "name", "name #2", ...
  const std::string base = std::string(Prefix(kind)) + std::string(name);
  std::string unique = base;
  for (int k = 2; std::find(t.names.begin(), t.names.end(), unique) != t.names.end(); ++k)
    unique = fmt::format("{} #{}", base, k);
  t.names.push_back(std::move(unique));
  return uint16_t(t.names.size() - 1);
}

thread_local MovedCollector* t_collector = nullptr;

}  // namespace

std::vector<std::string> detail::TrackNames() {
  Tracks& t = GlobalTracks();
  MutexLock lock(t.mu);
  return t.names;
}

uint64_t NowNs() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return uint64_t(ts.tv_sec) * 1'000'000'000u + uint64_t(ts.tv_nsec);
}

Status Enable(const Options& o) {
  if (o.capacity == 0 || o.capacity > std::numeric_limits<uint32_t>::max())
    return Status::FromErrno(EINVAL,
                             fmt::format("trace: capacity {} is not in 1..2^32-1", o.capacity));
  detail::State& s = GlobalState();
  Ring* ring = s.ring.load(std::memory_order_acquire);
  if (ring == nullptr || ring->capacity != o.capacity) {
    // A smaller or larger ring: the old one stays allocated (a producer may still hold it).
    auto* fresh = new (std::nothrow) detail::Ring(o.capacity);
    if (fresh == nullptr) return Status::FromErrno(ENOMEM, "trace: ring allocation");
    s.ring.store(fresh, std::memory_order_release);
  }
  Clear();
  s.t0.store(NowNs(), std::memory_order_relaxed);
  detail::g_enabled.store(true, std::memory_order_release);
  return Status::Ok();
}

void Disable() {
  detail::g_enabled.store(false, std::memory_order_release);
}

void Clear() {
  detail::State& s = GlobalState();
  uint64_t head = s.head.load(std::memory_order_relaxed);
  // The next epoch with no reservations; concurrent fetch_adds make the CAS retry.
  while (!s.head.compare_exchange_weak(head,
                                       ((head >> detail::kEpochShift) + 1) << detail::kEpochShift,
                                       std::memory_order_acq_rel)) {
  }
  s.busy_drops.store(0, std::memory_order_relaxed);
}

TraceStats Stats() {
  detail::State& s = GlobalState();
  TraceStats st;
  st.enabled = Enabled();
  Ring* ring = s.ring.load(std::memory_order_acquire);
  if (ring == nullptr) return st;
  const uint64_t count = s.head.load(std::memory_order_acquire) & detail::kCountMask;
  const uint64_t busy = s.busy_drops.load(std::memory_order_relaxed);
  st.capacity = ring->capacity;
  st.events = std::min<uint64_t>(count, ring->capacity);
  st.events -= std::min(st.events, busy);
  st.dropped = (count > ring->capacity ? count - ring->capacity : 0) + busy;
  return st;
}

uint16_t RegisterTrack(TrackKind kind, std::string_view name) {
  Tracks& t = GlobalTracks();
  MutexLock lock(t.mu);
  return RegisterLocked(t, kind, name);
}

uint16_t TrackFor(const void* key, TrackKind kind, std::string_view name) {
  Tracks& t = GlobalTracks();
  MutexLock lock(t.mu);
  for (const auto& [k, id] : t.keys)
    if (k == key) return id;
  const uint16_t id =
      RegisterLocked(t, kind, name.empty() ? fmt::format("{}", key) : std::string(name));
  if (id != kOverflowTrack) t.keys.emplace_back(key, id);
  return id;
}

void ForgetTrackKey(const void* key) {
  Tracks& t = GlobalTracks();
  MutexLock lock(t.mu);
  std::erase_if(t.keys, [&](const auto& e) { return e.first == key; });
}

MovedCollector::MovedCollector() : saved_(t_collector) {
  t_collector = this;
}

MovedCollector::~MovedCollector() {
  t_collector = saved_;
}

void MovedCollector::Note(uintptr_t start, uintptr_t end, uint64_t pages) {
  MovedCollector* c = t_collector;
  if (c == nullptr) return;
  c->start = std::min(c->start, start);
  c->end = std::max(c->end, end);
  c->pages += pages;
}

}  // namespace hmmkit::trace
