// Chrome/Perfetto trace JSON from the ring (the format is in docs/tracing.md).
#include <errno.h>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <ostream>
#include <string>
#include <vector>

#include "hmmkit/base/json.hpp"
#include "hmmkit/base/trace.hpp"
#include "trace_ring.hpp"

namespace hmmkit::trace {

namespace {

using detail::Snapshot;

const char* NameOf(Name n) {
  switch (n) {
    case Name::kDeviceFaultBatch:
      return "device_fault_batch";
    case Name::kCpuFault:
      return "cpu_fault";
    case Name::kMigrate:
      return "migrate";
    case Name::kMapRemote:
      return "map_remote";
    case Name::kInvalidate:
      return "invalidate";
    case Name::kEvict:
      return "evict";
    case Name::kThrash:
      return "thrash";
    case Name::kDmaCopy:
      return "dma_copy";
  }
  return "unknown";
}

const char* CategoryOf(Name n) {
  switch (n) {
    case Name::kDeviceFaultBatch:
    case Name::kCpuFault:
      return "fault";
    case Name::kMigrate:
      return "migrate";
    case Name::kMapRemote:
      return "map";
    case Name::kInvalidate:
      return "invalidate";
    case Name::kEvict:
      return "evict";
    case Name::kThrash:
      return "policy";
    case Name::kDmaCopy:
      return "dma";
  }
  return "unknown";
}

const char* CauseName(uint32_t c) {
  static constexpr const char* kNames[] = {"explicit", "fault",     "prefetch",
                                           "evict",    "cpu_fault", "promotion"};
  return c < std::size(kNames) ? kNames[c] : "explicit";
}

const char* InvalidateName(uint32_t k) {
  static constexpr const char* kNames[] = {"unmap",   "remove",    "remap",   "mprotect",
                                           "migrate", "exclusive", "release", "clear"};
  return k < std::size(kNames) ? kNames[k] : "clear";
}

const char* DmaDirName(uint32_t d) {
  static constexpr const char* kNames[] = {"h2d", "d2h", "d2d", "h2h"};
  return d < std::size(kNames) ? kNames[d] : "h2h";
}

// Microseconds with 3 decimals: nanosecond precision, no floating point.
void AppendUs(fmt::memory_buffer& out, uint64_t ns) {
  fmt::format_to(std::back_inserter(out), "{}.{:03}", ns / 1000, ns % 1000);
}

void AppendArgs(fmt::memory_buffer& out, const Snapshot& r, uint64_t page) {
  auto o = std::back_inserter(out);
  switch (r.name) {
    case Name::kDeviceFaultBatch:
      fmt::format_to(o, R"("faults":{},"start":"{:#x}","end":"{:#x}","pages":{},"write":{})",
                     r.a[2], r.a[0], r.a[1], r.a[3], r.small != 0 ? 1 : 0);
      break;
    case Name::kCpuFault:
      fmt::format_to(o, R"("start":"{:#x}","end":"{:#x}","pages":{},"write":{})", r.a[0], r.a[1],
                     r.a[2], r.small != 0 ? 1 : 0);
      break;
    case Name::kMigrate:
      fmt::format_to(
          o, R"("start":"{:#x}","end":"{:#x}","pages":{},"bytes":{},"dir":"{}","cause":"{}")",
          r.a[0], r.a[1], r.a[2], r.a[2] * page, (r.small & 1) != 0 ? "to_device" : "to_system",
          CauseName(r.small >> 8));
      break;
    case Name::kMapRemote:
    case Name::kEvict:
      fmt::format_to(o, R"("start":"{:#x}","end":"{:#x}","pages":{})", r.a[0], r.a[1], r.a[2]);
      break;
    case Name::kInvalidate:
      fmt::format_to(o, R"("event":"{}","start":"{:#x}","end":"{:#x}")", InvalidateName(r.small),
                     r.a[0], r.a[1]);
      break;
    case Name::kThrash:
      fmt::format_to(o, R"("start":"{:#x}","end":"{:#x}","pin_ms":{})", r.a[0], r.a[1], r.a[2]);
      break;
    case Name::kDmaCopy:
      fmt::format_to(o, R"("bytes":{},"dir":"{}","pieces":{})", r.a[0], DmaDirName(r.small),
                     r.a[1]);
      break;
  }
}

std::string ProgramName() {
  return program_invocation_short_name != nullptr ? program_invocation_short_name : "?";
}

// The whole document. Built in memory: the writers below only move bytes.
fmt::memory_buffer Render() {
  const TraceStats stats = Stats();
  std::vector<Snapshot> recs = detail::CollectRecords();
  const std::vector<std::string> tracks = detail::TrackNames();
  const uint64_t t0 = detail::GlobalState().t0.load(std::memory_order_relaxed);
  for (Snapshot& r : recs) r.ts = r.ts > t0 ? r.ts - t0 : 0;
  std::stable_sort(recs.begin(), recs.end(),
                   [](const Snapshot& a, const Snapshot& b) { return a.ts < b.ts; });
  const long pid = long(::getpid());
  const uint64_t page = uint64_t(::sysconf(_SC_PAGESIZE));

  fmt::memory_buffer out;
  auto o = std::back_inserter(out);
  fmt::format_to(o,
                 R"({{"displayTimeUnit":"ns","otherData":{{"hmmkit_trace_version":1,"pid":{},)"
                 R"("page_size":{},"events":{},"dropped":{},"ring_capacity":{}}},"traceEvents":[)",
                 pid, page, recs.size(), stats.dropped, stats.capacity);
  fmt::format_to(o,
                 "\n"
                 R"({{"ph":"M","name":"process_name","pid":{},"tid":0,"args":{{"name":{}}}}})",
                 pid, JsonString("hmmkit " + ProgramName()));
  for (size_t tid = 1; tid < tracks.size(); ++tid) {
    if (tracks[tid].empty()) continue;
    fmt::format_to(o,
                   ",\n"
                   R"({{"ph":"M","name":"thread_name","pid":{},"tid":{},"args":{{"name":{}}}}})",
                   pid, tid, JsonString(tracks[tid]));
    fmt::format_to(
        o,
        ",\n"
        R"({{"ph":"M","name":"thread_sort_index","pid":{},"tid":{},"args":{{"sort_index":{}}}}})",
        pid, tid, tid);
  }
  for (const Snapshot& r : recs) {
    const char* ph = r.instant ? R"("ph":"i","s":"t")" : R"("ph":"X")";
    fmt::format_to(o, ",\n{{{},\"name\":\"{}\",\"cat\":\"{}\",\"pid\":{},\"tid\":{},\"ts\":", ph,
                   NameOf(r.name), CategoryOf(r.name), pid, r.track);
    AppendUs(out, r.ts);
    if (!r.instant) {
      fmt::format_to(o, ",\"dur\":");
      AppendUs(out, r.dur);
    }
    fmt::format_to(o, ",\"args\":{{");
    AppendArgs(out, r, page);
    fmt::format_to(o, "}}}}");
  }
  fmt::format_to(o, "\n]}}\n");
  return out;
}

}  // namespace

Status WriteChromeJson(std::FILE* out) {
  if (out == nullptr) return Status::FromErrno(EINVAL, "trace: null FILE*");
  const fmt::memory_buffer doc = Render();
  if (std::fwrite(doc.data(), 1, doc.size(), out) != doc.size() || std::fflush(out) != 0)
    return Status::FromErrno(errno, "trace: writing the JSON");
  return Status::Ok();
}

Status WriteChromeJson(std::ostream& out) {
  const fmt::memory_buffer doc = Render();
  out.write(doc.data(), std::streamsize(doc.size()));
  out.flush();
  if (!out) return Status::FromErrno(EIO, "trace: writing the JSON to the stream");
  return Status::Ok();
}

Status WriteChromeJson(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) return Status::FromErrno(errno, "trace: opening " + path);
  Status st = WriteChromeJson(f);
  if (std::fclose(f) != 0 && st.ok()) st = Status::FromErrno(errno, "trace: closing " + path);
  return st;
}

}  // namespace hmmkit::trace
