/// @file
/// Event tracing: a process-wide ring of fixed-size records that hmmkit's interesting points write
/// (device fault batches, CPU fault-back, migrations, remote maps, invalidations, evictions,
/// thrashing decisions, DMA copies), exported as Chrome/Perfetto trace JSON (docs/tracing.md has
/// the format, the event vocabulary and how to open the file).
///
/// Off by default. While off, a record site costs one relaxed atomic load and a branch
/// (`Enabled()`, inline); everything else is out of line. Turned on by `HMMKIT_TRACE=path.json`
/// at start-up (the file is written at exit; `HMMKIT_TRACE_EVENTS=N` sets the capacity) or by
/// `Enable()`.
///
/// The ring: `capacity` slots allocated at Enable. Any thread records (lock-free: an atomic
/// counter reserves the slot, a per-slot sequence publishes it). When it is full, new records are
/// dropped and counted (`TraceStats::dropped`): the file keeps the first `capacity` events after
/// Enable/Clear. Buffers are never freed while the process runs, so a late producer never writes
/// freed memory.
///
/// Locks: one internal mutex (a leaf: nothing is called with it held) guards the track table and
/// is taken by RegisterTrack/TrackFor/ForgetTrackKey/WriteChromeJson, never by a record.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <iosfwd>
#include <string>
#include <string_view>

#include "hmmkit/base/status.hpp"

namespace hmmkit::trace {

/// What an event is; the exported "name" and "cat" follow from it (docs/tracing.md's table).
enum class Name : uint8_t {
  kDeviceFaultBatch,  ///< a = {start, end, faults, pages}, small = write
  kCpuFault,          ///< a = {start, end, pages}, small = write
  kMigrate,           ///< a = {start, end, pages}, small = MigrateSmall(dir, cause)
  kMapRemote,         ///< a = {start, end, pages}
  kInvalidate,        ///< a = {start, end}, small = InvalidateKind
  kEvict,             ///< a = {start, end, pages}
  kThrash,            ///< a = {start, end, pin_ms}
  kDmaCopy,           ///< a = {bytes, pieces}, small = DmaDir
};

/// Why a migration runs (the "cause" arg of "migrate"). Set by the caller with CauseScope.
enum class Cause : uint8_t { kExplicit, kFault, kPrefetch, kEvict, kCpuFault, kPromotion };
/// The "event" arg of "invalidate".
enum class InvalidateKind : uint8_t {
  kUnmap,
  kRemove,
  kRemap,
  kMprotect,
  kMigrate,
  kExclusive,
  kRelease,
  kClear
};
/// The "dir" arg of "dma_copy".
enum class DmaDir : uint8_t { kH2D, kD2H, kD2D, kH2H };

/// The kinds of track; the exported track name is "<prefix><name>".
enum class TrackKind : uint8_t {
  kCpuFault,  ///< "cpu fault handler" (fixed: kCpuFaultTrack)
  kNotifier,  ///< "mmu notifier" (fixed: kNotifierTrack)
  kDevice,    ///< "device <name>"
  kDma,       ///< "dma <name>"
};
inline constexpr uint16_t kCpuFaultTrack = 1;
inline constexpr uint16_t kNotifierTrack = 2;

/// One recorded event (what a site hands to Record). Plain data.
struct Event {
  uint64_t ts_ns = 0;   ///< CLOCK_MONOTONIC at the start of the event (NowNs())
  uint64_t dur_ns = 0;  ///< duration; ignored for instants
  uint64_t a[4] = {0, 0, 0, 0};
  uint32_t small = 0;
  uint16_t track = 0;
  Name name = Name::kDeviceFaultBatch;
  bool instant = false;
};

constexpr uint32_t MigrateSmall(bool to_device, Cause cause) {
  return (to_device ? 1u : 0u) | (uint32_t(cause) << 8);
}

struct Options {
  size_t capacity = size_t(1) << 20;  ///< ring slots (events); at least 1
};

struct TraceStats {
  bool enabled = false;
  uint64_t events = 0;    ///< records in the ring (completed or being written)
  uint64_t dropped = 0;   ///< records lost because the ring was full
  uint64_t capacity = 0;  ///< ring slots
};

namespace detail {
extern std::atomic<bool> g_enabled;
void RecordSlow(const Event& e);
extern thread_local Cause t_cause;
}  // namespace detail

/// True while tracing records. Any thread; one relaxed load.
inline bool Enabled() {
  return detail::g_enabled.load(std::memory_order_relaxed);
}

/// CLOCK_MONOTONIC in nanoseconds (vDSO; no system call).
uint64_t NowNs();

/// Records `e` when tracing is on. Any thread, any context (no lock, no allocation, no syscall).
inline void Record(const Event& e) {
  if (Enabled()) detail::RecordSlow(e);
}

/// Starts (or restarts) recording into a ring of `o.capacity` events: what was recorded before
/// is discarded and timestamps count from now. Errors: EINVAL (capacity 0 or above 2^32),
/// ENOMEM. Any thread; not concurrently with another Enable.
[[nodiscard]] Status Enable(const Options& o = {});
/// Stops recording; what was recorded stays for WriteChromeJson/Stats until the next
/// Enable/Clear. Records being written at this moment still complete.
void Disable();
/// Discards what was recorded (the ring starts over; `dropped` resets). Safe while producers
/// run: a record racing with Clear lands in the old or the new recording, or is dropped.
void Clear();
TraceStats Stats();

/// Writes the recording as Chrome trace JSON (docs/tracing.md). Safe while producers run: it
/// writes a consistent snapshot of the records completed when it looks at each slot (records in
/// flight are left out), sorted by time. Errors: the errno of a failed open or write.
[[nodiscard]] Status WriteChromeJson(const std::string& path);
[[nodiscard]] Status WriteChromeJson(std::FILE* out);
[[nodiscard]] Status WriteChromeJson(std::ostream& out);

/// Registers a track named "<kind prefix><name>" and returns its id (a small integer, the
/// exported tid; stable for the life of the process). When the table (1024 tracks) is full, the
/// shared overflow track is returned. Any thread; takes the trace mutex.
uint16_t RegisterTrack(TrackKind kind, std::string_view name);
/// The track bound to `key` (a device's pgmap owner, a DMA engine), registering "<kind
/// prefix><name>" (or "<prefix><key in hex>" for an empty name) on first use.
uint16_t TrackFor(const void* key, TrackKind kind, std::string_view name = {});
/// Unbinds `key` (its object goes away; a new object at the same address gets a new track).
void ForgetTrackKey(const void* key);

/// Sets the cause that migrations started by this thread report, for the scope's lifetime (the
/// innermost scope wins; none: kExplicit).
class CauseScope {
 public:
  explicit CauseScope(Cause c) : saved_(detail::t_cause) { detail::t_cause = c; }
  ~CauseScope() { detail::t_cause = saved_; }
  CauseScope(const CauseScope&) = delete;
  CauseScope& operator=(const CauseScope&) = delete;

 private:
  Cause saved_;
};
/// The cause set by the innermost CauseScope of this thread.
inline Cause CurrentCause() {
  return detail::t_cause;
}

/// A duration event: the start time is taken at construction when tracing is on; the caller
/// fills `ev` (args, track) and the destructor records it. Nothing is recorded when tracing was
/// off at construction, or after Cancel().
class Span {
 public:
  Span(Name name, uint16_t track) {
    if (Enabled()) {
      ev.name = name;
      ev.track = track;
      ev.ts_ns = NowNs();
    }
  }
  ~Span() {
    if (ev.ts_ns != 0) {
      ev.dur_ns = NowNs() - ev.ts_ns;
      Record(ev);
    }
  }
  Span(const Span&) = delete;
  Span& operator=(const Span&) = delete;
  bool active() const { return ev.ts_ns != 0; }
  void Cancel() { ev.ts_ns = 0; }

  Event ev;
};

/// Collects the runs of pages that migrations of this thread moved to system memory while it
/// lives (CPU fault-back and eviction report what came back). Nested collectors: the innermost
/// gets the runs.
class MovedCollector {
 public:
  MovedCollector();
  ~MovedCollector();
  MovedCollector(const MovedCollector&) = delete;
  MovedCollector& operator=(const MovedCollector&) = delete;

  /// Called by the migration code for each run that moved ([start, end), pages).
  static void Note(uintptr_t start, uintptr_t end, uint64_t pages);

  uintptr_t start = UINTPTR_MAX;  ///< lowest start noted
  uintptr_t end = 0;              ///< highest end noted
  uint64_t pages = 0;             ///< pages noted

 private:
  MovedCollector* saved_;
};

}  // namespace hmmkit::trace
