#include "trace_summary.hpp"

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <map>
#include <tuple>
#include <unordered_map>

namespace hmmkit::hmmctl {
namespace {

std::string Hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "0x%" PRIx64, v);
  return buf;
}

// Microseconds rounded to the trace's precision (ns): no float noise in the JSON.
double Us(double us) {
  return std::round(us * 1000) / 1000;
}

// Appends one printf-formatted line to `out`.
[[gnu::format(printf, 2, 3)]] void Line(std::string* out, const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  *out += buf;
  *out += '\n';
}

struct Granule {
  uint64_t migrations = 0, to_device = 0, to_system = 0, changes = 0;
  int last = -1;  // 1 to_device, 0 to_system
};

}  // namespace

TraceSummary SummarizeTrace(const Trace& trace) {
  TraceSummary s;
  s.span_us = trace.events.empty() ? 0 : trace.last_ts_us - trace.first_ts_us;
  std::vector<TraceSummary::Name> names(trace.names.size());
  std::map<std::pair<uint16_t, uint16_t>, TraceSummary::Migration> migrations;
  uint64_t inval[std::size(kInvalidateNames)] = {};
  std::unordered_map<uint64_t, Granule> granules;
  struct TrackAcc {
    uint64_t events = 0;
    double busy = 0, cover_end = -1;
  };
  std::map<uint32_t, TrackAcc> tracks;
  for (const auto& [tid, name] : trace.tracks) tracks[tid];

  for (const TraceEvent& e : trace.events) {
    TraceSummary::Name& n = names[e.name];
    ++n.count;
    n.total_us += e.dur_us;
    n.max_us = std::max(n.max_us, e.dur_us);
    // Busy time: the union of the track's durations (events arrive sorted by start).
    TrackAcc& t = tracks[e.tid];
    ++t.events;
    if (!e.instant && e.dur_us > 0) {
      const double end = e.ts_us + e.dur_us;
      if (e.ts_us >= t.cover_end) {
        t.busy += e.dur_us;
        t.cover_end = end;
      } else if (end > t.cover_end) {
        t.busy += end - t.cover_end;
        t.cover_end = end;
      }
    }
    switch (e.kind) {
      case EventKind::kMigrate: {
        TraceSummary::Migration& m = migrations[{e.dir, e.cause}];
        ++m.events;
        m.pages += e.pages;
        m.bytes += e.bytes;
        const bool to_system = trace.strings[e.dir] == "to_system";
        if (!e.to_device && !to_system) break;
        for (uint64_t g = e.start / kSummaryGranule;
             e.end > e.start && g <= (e.end - 1) / kSummaryGranule; ++g) {
          Granule& gr = granules[g];
          ++gr.migrations;
          ++(e.to_device ? gr.to_device : gr.to_system);
          const int dir = e.to_device ? 1 : 0;
          if (gr.last >= 0 && gr.last != dir) ++gr.changes;
          gr.last = dir;
        }
        break;
      }
      case EventKind::kInvalidate:
        ++inval[size_t(e.inval)];
        break;
      case EventKind::kThrash:
        ++s.thrash_events;
        if (s.thrash_first.size() < kSummaryTopRanges)
          s.thrash_first.push_back({e.ts_us - trace.first_ts_us, e.start, e.end, e.pin_ms});
        break;
      default:
        break;
    }
  }
  for (size_t i = 0; i < names.size(); ++i) names[i].name = trace.names[i];
  std::erase_if(names, [](const TraceSummary::Name& n) { return n.count == 0; });
  std::stable_sort(names.begin(), names.end(),
                   [](const auto& a, const auto& b) { return a.count > b.count; });
  s.names = std::move(names);
  for (auto& [key, m] : migrations) {
    m.dir = trace.strings[key.first];
    m.cause = trace.strings[key.second];
    s.migrations.push_back(m);
  }
  for (size_t i = 0; i < std::size(inval); ++i)
    if (inval[i]) s.invalidations.emplace_back(kInvalidateNames[i], inval[i]);

  // Adjacent granules with the same counts are one range.
  std::vector<std::pair<uint64_t, Granule>> sorted(granules.begin(), granules.end());
  std::sort(sorted.begin(), sorted.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<TraceSummary::Range> ranges;
  for (const auto& [g, gr] : sorted) {
    const uint64_t start = g * kSummaryGranule;
    if (!ranges.empty() && ranges.back().end == start &&
        std::tie(ranges.back().migrations, ranges.back().to_device, ranges.back().to_system,
                 ranges.back().direction_changes) ==
            std::tie(gr.migrations, gr.to_device, gr.to_system, gr.changes)) {
      ranges.back().end = start + kSummaryGranule;
      continue;
    }
    ranges.push_back(
        {start, start + kSummaryGranule, gr.migrations, gr.to_device, gr.to_system, gr.changes});
  }
  std::stable_sort(ranges.begin(), ranges.end(), [](const auto& a, const auto& b) {
    return a.migrations != b.migrations ? a.migrations > b.migrations
                                        : a.direction_changes > b.direction_changes;
  });
  if (ranges.size() > kSummaryTopRanges) ranges.resize(kSummaryTopRanges);
  s.top_ranges = std::move(ranges);

  for (const auto& [tid, t] : tracks) {
    auto it = trace.tracks.find(tid);
    s.tracks.push_back({tid, it == trace.tracks.end() ? "" : it->second, t.events, t.busy});
  }
  return s;
}

json::Value SummaryJson(const Trace& trace, const TraceSummary& s, const std::string& file) {
  using json::Value;
  Value names = Value::Arr();
  for (const auto& n : s.names)
    names.Push(Value::Obj()
                   .Add("name", Value::Str(n.name))
                   .Add("count", Value::Num(double(n.count)))
                   .Add("total_us", Value::Num(Us(n.total_us)))
                   .Add("mean_us", Value::Num(Us(n.count ? n.total_us / double(n.count) : 0)))
                   .Add("max_us", Value::Num(Us(n.max_us))));
  Value migrations = Value::Arr();
  for (const auto& m : s.migrations)
    migrations.Push(Value::Obj()
                        .Add("dir", Value::Str(m.dir))
                        .Add("cause", Value::Str(m.cause))
                        .Add("events", Value::Num(double(m.events)))
                        .Add("pages", Value::Num(double(m.pages)))
                        .Add("bytes", Value::Num(double(m.bytes))));
  Value inval = Value::Obj();
  for (const auto& [kind, n] : s.invalidations) inval.Add(kind, Value::Num(double(n)));
  Value thrash_first = Value::Arr();
  for (const auto& t : s.thrash_first)
    thrash_first.Push(Value::Obj()
                          .Add("ts_us", Value::Num(Us(t.ts_us)))
                          .Add("start", Value::Str(Hex(t.start)))
                          .Add("end", Value::Str(Hex(t.end)))
                          .Add("pin_ms", Value::Num(t.pin_ms)));
  Value ranges = Value::Arr();
  for (const auto& r : s.top_ranges)
    ranges.Push(Value::Obj()
                    .Add("start", Value::Str(Hex(r.start)))
                    .Add("end", Value::Str(Hex(r.end)))
                    .Add("migrations", Value::Num(double(r.migrations)))
                    .Add("to_device", Value::Num(double(r.to_device)))
                    .Add("to_system", Value::Num(double(r.to_system)))
                    .Add("direction_changes", Value::Num(double(r.direction_changes))));
  Value tracks = Value::Arr();
  for (const auto& t : s.tracks)
    tracks.Push(
        Value::Obj()
            .Add("tid", Value::Num(t.tid))
            .Add("name", Value::Str(t.name))
            .Add("events", Value::Num(double(t.events)))
            .Add("busy_us", Value::Num(Us(t.busy_us)))
            .Add("busy_fraction",
                 Value::Num(s.span_us > 0 ? std::round(1e4 * t.busy_us / s.span_us) / 1e4 : 0)));
  return Value::Obj()
      .Add("file", Value::Str(file))
      .Add("hmmkit_trace_version", Value::Num(trace.version))
      .Add("pid", Value::Num(double(trace.pid)))
      .Add("process", Value::Str(trace.process_name))
      .Add("page_size", Value::Num(double(trace.page_size)))
      .Add("events", Value::Num(double(trace.events.size())))
      .Add("declared_events", Value::Num(double(trace.declared_events)))
      .Add("dropped", Value::Num(double(trace.dropped)))
      .Add("ring_capacity", Value::Num(double(trace.ring_capacity)))
      .Add("span_us", Value::Num(Us(s.span_us)))
      .Add("names", std::move(names))
      .Add("migrations", std::move(migrations))
      .Add("invalidations", std::move(inval))
      .Add("thrashing", Value::Obj()
                            .Add("events", Value::Num(double(s.thrash_events)))
                            .Add("first", std::move(thrash_first)))
      .Add("top_ranges", std::move(ranges))
      .Add("tracks", std::move(tracks));
}

std::string SummaryText(const Trace& trace, const TraceSummary& s, const std::string& file) {
  std::string out;
  Line(&out, "%s: %s (pid %" PRIu64 "), %zu events over %.3f ms, page size %" PRIu64, file.c_str(),
       trace.process_name.empty() ? "?" : trace.process_name.c_str(), trace.pid,
       trace.events.size(), s.span_us / 1000, trace.page_size);
  if (trace.dropped)
    Line(&out,
         "  WARNING: the ring dropped %" PRIu64 " events (capacity %" PRIu64
         "): the oldest part of the run is missing; raise HMMKIT_TRACE_EVENTS",
         trace.dropped, trace.ring_capacity);
  Line(&out, "\nevents");
  Line(&out, "  %-20s %9s %12s %11s %11s", "name", "count", "total ms", "mean us", "max us");
  for (const auto& n : s.names)
    Line(&out, "  %-20s %9" PRIu64 " %12.3f %11.3f %11.3f", n.name.c_str(), n.count,
         n.total_us / 1000, n.count ? n.total_us / double(n.count) : 0.0, n.max_us);
  Line(&out, "\nmigrations");
  if (s.migrations.empty()) Line(&out, "  none");
  for (const auto& m : s.migrations)
    Line(&out, "  %-10s %-10s %8" PRIu64 " events %10" PRIu64 " pages %12.1f KiB", m.dir.c_str(),
         m.cause.c_str(), m.events, m.pages, double(m.bytes) / 1024);
  Line(&out, "\ninvalidations");
  if (s.invalidations.empty()) Line(&out, "  none");
  for (const auto& [kind, n] : s.invalidations) Line(&out, "  %-10s %8" PRIu64, kind.c_str(), n);
  Line(&out, "\nthrashing decisions: %" PRIu64, s.thrash_events);
  for (const auto& t : s.thrash_first)
    Line(&out, "  at %10.3f ms  %s-%s  pinned %.1f ms", t.ts_us / 1000, Hex(t.start).c_str(),
         Hex(t.end).c_str(), t.pin_ms);
  Line(&out, "\ntop ranges by migrations (64 KiB granules; direction changes = ping-pong)");
  if (s.top_ranges.empty()) Line(&out, "  none");
  for (const auto& r : s.top_ranges)
    Line(&out,
         "  %18s-%-18s %6" PRIu64 " migrations (%" PRIu64 " to device, %" PRIu64
         " to system), %" PRIu64 " direction changes",
         Hex(r.start).c_str(), Hex(r.end).c_str(), r.migrations, r.to_device, r.to_system,
         r.direction_changes);
  Line(&out, "\ntracks");
  for (const auto& t : s.tracks)
    Line(&out, "  %3u %-24s %9" PRIu64 " events  busy %10.3f ms (%5.1f%%)", t.tid,
         t.name.empty() ? "?" : t.name.c_str(), t.events, t.busy_us / 1000,
         s.span_us > 0 ? 100 * t.busy_us / s.span_us : 0.0);
  return out;
}

}  // namespace hmmkit::hmmctl
