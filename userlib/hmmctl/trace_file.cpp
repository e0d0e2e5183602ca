// Reading the Chrome trace into TraceEvents: the traceEvents array is streamed, one event at a
// time, so memory is the compact event vector, not a DOM of the file.
#include "trace_file.hpp"

#include <algorithm>
#include <charconv>

#include "json_reader.hpp"

namespace hmmkit::hmmctl {
namespace {

struct KindName {
  std::string_view name;
  EventKind kind;
};
constexpr KindName kKinds[] = {
    {"device_fault_batch", EventKind::kDeviceFaultBatch},
    {"cpu_fault", EventKind::kCpuFault},
    {"migrate", EventKind::kMigrate},
    {"map_remote", EventKind::kMapRemote},
    {"invalidate", EventKind::kInvalidate},
    {"evict", EventKind::kEvict},
    {"thrash", EventKind::kThrash},
    {"dma_copy", EventKind::kDmaCopy},
};

class Interner {
 public:
  explicit Interner(std::vector<std::string>* table) : table_(table) {
    for (size_t i = 0; i < table_->size(); ++i) index_[(*table_)[i]] = uint32_t(i);
  }
  uint32_t Get(std::string_view s) {
    auto it = index_.find(s);  // transparent comparator: no allocation on a hit
    if (it != index_.end()) return it->second;
    table_->emplace_back(s);
    const auto id = uint32_t(table_->size() - 1);
    index_.emplace(std::string(s), id);
    return id;
  }

 private:
  std::vector<std::string>* table_;
  std::map<std::string, uint32_t, std::less<>> index_;
};

// An address arg: "0x..." (the contract) or, leniently, a plain number.
bool Address(const json::Value& args, std::string_view key, uint64_t* out, std::string* error) {
  const json::Value* v = args.Find(key);
  if (!v) {
    *out = 0;
    return true;
  }
  if (v->is_number() && v->number >= 0) {
    *out = uint64_t(v->number);
    return true;
  }
  if (v->is_string()) {
    std::string_view s = v->string;
    if (s.starts_with("0x") || s.starts_with("0X")) s.remove_prefix(2);
    const auto r = std::from_chars(s.data(), s.data() + s.size(), *out, 16);
    if (!s.empty() && r.ec == std::errc() && r.ptr == s.data() + s.size()) return true;
  }
  *error = "arg '" + std::string(key) + "' is not an address (\"0x...\")";
  return false;
}

uint64_t Count(const json::Value& args, std::string_view key) {
  const double d = args.NumberAt(key, 0);
  return d > 0 ? uint64_t(d) : 0;
}

}  // namespace

bool ParseTrace(std::string_view text, Trace* out, std::string* error) {
  *out = Trace();
  out->strings.emplace_back();
  Interner names(&out->names);
  Interner strings(&out->strings);
  bool any = false;
  auto on_event = [&](const json::Value& e, size_t /*offset: the parser adds it to messages*/,
                      std::string* err) {
    if (!e.is_object()) {
      *err = "a trace event must be an object";
      return false;
    }
    const std::string_view ph = e.StringAt("ph");
    const auto tid = uint32_t(e.NumberAt("tid", 0));
    const json::Value* args = e.Find("args");
    static const json::Value kEmpty = json::Value::Obj();
    if (!args || !args->is_object()) args = &kEmpty;
    if (ph == "M") {
      if (e.StringAt("name") == "thread_name")
        out->tracks[tid] = std::string(args->StringAt("name"));
      if (e.StringAt("name") == "process_name") out->process_name = args->StringAt("name");
      return true;
    }
    if (ph != "X" && ph != "i" && ph != "I") return true;  // other phases: not ours, ignored
    const json::Value* ts = e.Find("ts");
    if (!ts || !ts->is_number()) {
      *err = "event without a numeric 'ts'";
      return false;
    }
    TraceEvent ev;
    ev.ts_us = ts->number;
    ev.dur_us = ph == "X" ? std::max(0.0, e.NumberAt("dur", 0)) : 0;
    ev.instant = ph != "X";
    ev.tid = tid;
    const std::string_view name = e.StringAt("name");
    ev.name = names.Get(name);
    for (const KindName& k : kKinds)
      if (k.name == name) ev.kind = k.kind;
    std::string why;
    if (!Address(*args, "start", &ev.start, &why) || !Address(*args, "end", &ev.end, &why)) {
      *err = "event '" + std::string(name) + "': " + why;
      return false;
    }
    if (ev.end < ev.start) {
      *err = "event '" + std::string(name) + "': end below start";
      return false;
    }
    ev.pages = Count(*args, "pages");
    ev.bytes = Count(*args, "bytes");
    ev.pin_ms = args->NumberAt("pin_ms", 0);
    const std::string_view dir = args->StringAt("dir");
    ev.dir = uint16_t(strings.Get(dir));
    ev.cause = uint16_t(strings.Get(args->StringAt("cause")));
    ev.to_device = dir == "to_device";
    if (ev.kind == EventKind::kInvalidate) {
      const std::string_view kind = args->StringAt("event");
      for (size_t i = 0; i + 1 < std::size(kInvalidateNames); ++i)
        if (kind == kInvalidateNames[i]) ev.inval = InvalidateKind(i);
    }
    if (out->strings.size() > 60000) {
      *err = "too many distinct dir/cause values";
      return false;
    }
    if (!any) out->first_ts_us = ev.ts_us;
    out->first_ts_us = std::min(out->first_ts_us, ev.ts_us);
    out->last_ts_us = any ? std::max(out->last_ts_us, ev.ts_us + ev.dur_us) : ev.ts_us + ev.dur_us;
    any = true;
    out->events.push_back(ev);
    return true;
  };
  json::Value root;
  if (!json::ParseStreaming(text, "traceEvents", on_event, &root, error)) return false;
  if (const json::Value* other = root.Find("otherData"); other && other->is_object()) {
    out->version = int(other->NumberAt("hmmkit_trace_version", 0));
    out->pid = uint64_t(std::max(0.0, other->NumberAt("pid", 0)));
    out->page_size = uint64_t(std::max(0.0, other->NumberAt("page_size", 4096)));
    out->declared_events = uint64_t(std::max(0.0, other->NumberAt("events", 0)));
    out->dropped = uint64_t(std::max(0.0, other->NumberAt("dropped", 0)));
    out->ring_capacity = uint64_t(std::max(0.0, other->NumberAt("ring_capacity", 0)));
  }
  if (out->page_size == 0 || (out->page_size & (out->page_size - 1)) != 0) {
    *error = "otherData.page_size " + std::to_string(out->page_size) + " is not a power of two";
    return false;
  }
  std::stable_sort(out->events.begin(), out->events.end(),
                   [](const TraceEvent& a, const TraceEvent& b) { return a.ts_us < b.ts_us; });
  return true;
}

bool LoadTrace(const std::string& path, Trace* out, std::string* error) {
  std::string text;
  if (!json::ReadFile(path, &text, error)) return false;
  if (!ParseTrace(text, out, error)) {
    *error = path + ": " + *error;
    return false;
  }
  return true;
}

}  // namespace hmmkit::hmmctl
