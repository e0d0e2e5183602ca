// A hmmkit Chrome trace (the contract in docs/hmmctl.md, "Trace file") read into compact events.
// Unknown event names keep their name and duration only; unknown args and otherData keys are
// ignored (forward compatible).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace hmmkit::hmmctl {

enum class EventKind : uint8_t {
  kDeviceFaultBatch,
  kCpuFault,
  kMigrate,
  kMapRemote,
  kInvalidate,
  kEvict,
  kThrash,
  kDmaCopy,
  kOther,
};

/// The `event` arg of an `invalidate`.
enum class InvalidateKind : uint8_t {
  kUnmap,
  kRemove,
  kRemap,
  kMprotect,
  kMigrate,
  kExclusive,
  kRelease,
  kClear,
  kOther
};
inline constexpr const char* kInvalidateNames[] = {
    "unmap", "remove", "remap", "mprotect", "migrate", "exclusive", "release", "clear", "other"};

/// One event; fields that its name does not carry are 0.
struct TraceEvent {
  double ts_us = 0;
  double dur_us = 0;            // 0 for instants
  uint64_t start = 0, end = 0;  // address range [start, end)
  uint64_t pages = 0, bytes = 0;
  double pin_ms = 0;  // thrash
  uint32_t name = 0;  // index into Trace::names
  uint32_t tid = 0;
  uint16_t dir = 0;    // index into Trace::strings (migrate dir, dma dir)
  uint16_t cause = 0;  // index into Trace::strings (migrate cause)
  EventKind kind = EventKind::kOther;
  InvalidateKind inval = InvalidateKind::kOther;
  bool to_device = false;  // migrate dir == "to_device"
  bool instant = false;
};

/// A whole trace; events sorted by ts (stable).
struct Trace {
  int version = 0;
  uint64_t pid = 0, page_size = 4096, declared_events = 0, dropped = 0, ring_capacity = 0;
  std::string process_name;
  std::map<uint32_t, std::string> tracks;  // tid -> track name
  std::vector<std::string> names;          // event names, indexed by TraceEvent::name
  std::vector<std::string> strings;        // dir / cause values; [0] is ""
  std::vector<TraceEvent> events;
  double first_ts_us = 0, last_ts_us = 0;  // span of the events (end of the last duration)
};

/// Parses a trace text. False with "offset N: ..." or a semantic error (e.g. "event at offset N:
/// start 0x... is not an address") when the text is not a hmmkit trace.
bool ParseTrace(std::string_view text, Trace* out, std::string* error);
/// Reads and parses `path`; errors are prefixed with the path.
bool LoadTrace(const std::string& path, Trace* out, std::string* error);

}  // namespace hmmkit::hmmctl
