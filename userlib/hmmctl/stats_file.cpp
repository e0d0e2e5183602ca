#include "stats_file.hpp"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>

namespace hmmkit::hmmctl {

std::string DefaultStatsDir() {
  if (const char* d = std::getenv("HMMKIT_STATS_DIR"); d && *d) return d;
  const char* run = std::getenv("XDG_RUNTIME_DIR");
  return std::string(run && *run ? run : "/tmp") + "/hmmkit-" + std::to_string(getuid());
}

bool LoadStats(const std::string& path, json::Value* out, std::string* error) {
  std::string text;
  if (!json::ReadFile(path, &text, error)) return false;
  if (!json::Parse(text, out, error)) {
    *error = path + ": " + *error;
    return false;
  }
  if (!out->is_object() || !out->Find("hmmkit_stats_version")) {
    *error = path + ": not a hmmkit stats file (no \"hmmkit_stats_version\")";
    return false;
  }
  return true;
}

namespace {

std::string Number(double v) {
  char buf[40];
  if (v == double(int64_t(v)))
    std::snprintf(buf, sizeof(buf), "%" PRId64, int64_t(v));
  else
    std::snprintf(buf, sizeof(buf), "%.3f", v);
  return buf;
}

void Counters(const json::Value* obj, const char* indent, std::string* out) {
  if (!obj || !obj->is_object()) return;
  char buf[256];
  for (const auto& [name, v] : obj->members) {
    const std::string value = v.is_number()   ? Number(v.number)
                              : v.is_string() ? v.string
                                              : json::Write(v);
    std::snprintf(buf, sizeof(buf), "%s%-24s %14s\n", indent, name.c_str(), value.c_str());
    *out += buf;
  }
}

}  // namespace

std::string StatsText(const json::Value& s) {
  std::string out;
  char buf[512];
  const auto t_ms = int64_t(s.NumberAt("time_unix_ms", 0));
  const time_t secs = time_t(t_ms / 1000);
  char when[64] = "?";
  struct tm tm {};
  if (t_ms > 0 && localtime_r(&secs, &tm)) std::strftime(when, sizeof(when), "%F %T", &tm);
  const json::Value* final = s.Find("final");
  std::snprintf(buf, sizeof(buf), "%s (pid %" PRId64 "): %s counters at %s\n",
                std::string(s.StringAt("program", "?")).c_str(), int64_t(s.NumberAt("pid", 0)),
                final && final->type == json::Type::kBool && final->boolean ? "final" : "live",
                when);
  out += buf;
  const json::Value* devices = s.Find("devices");
  if (!devices || !devices->is_array() || devices->items.empty()) out += "  no devices\n";
  if (devices && devices->is_array()) {
    for (const json::Value& d : devices->items) {
      std::snprintf(buf, sizeof(buf), "  device %s (%s)\n",
                    std::string(d.StringAt("name", "?")).c_str(),
                    std::string(d.StringAt("backend", "?")).c_str());
      out += buf;
      Counters(d.Find("counters"), "    ", &out);
    }
  }
  if (const json::Value* m = s.Find("monitor"); m && m->is_object() && !m->members.empty()) {
    out += "  monitor\n";
    Counters(m, "    ", &out);
  }
  if (const json::Value* t = s.Find("trace"); t && t->is_object()) {
    const json::Value* on = t->Find("enabled");
    std::snprintf(buf, sizeof(buf), "  trace: %s, %" PRId64 " events, %" PRId64 " dropped\n",
                  on && on->boolean ? "on" : "off", int64_t(t->NumberAt("events", 0)),
                  int64_t(t->NumberAt("dropped", 0)));
    out += buf;
  }
  return out;
}

std::string ProgressLine(const json::Value* stats, double elapsed_s) {
  char buf[256];
  double faults = 0, to_dev = 0, to_sys = 0, cpu = 0;
  if (stats) {
    if (const json::Value* devices = stats->Find("devices"); devices && devices->is_array()) {
      for (const json::Value& d : devices->items) {
        const json::Value* c = d.Find("counters");
        if (!c) continue;
        faults += c->NumberAt("device_faults");
        to_dev += c->NumberAt("bytes_to_device");
        to_sys += c->NumberAt("bytes_to_system");
        cpu += c->NumberAt("cpu_faults");
      }
    }
  }
  std::snprintf(buf, sizeof(buf),
                "[%7.1f s] device faults %.0f  to device %.1f MiB  to system %.1f MiB  CPU "
                "faults %.0f",
                elapsed_s, faults, to_dev / (1 << 20), to_sys / (1 << 20), cpu);
  return buf;
}

std::vector<LiveStats> ListLiveStats(const std::string& dir) {
  std::vector<LiveStats> out;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (!name.ends_with(".json") || name.size() <= 5) continue;
    const std::string stem = name.substr(0, name.size() - 5);
    if (!std::all_of(stem.begin(), stem.end(), [](char c) { return c >= '0' && c <= '9'; }) ||
        stem.size() > 9)
      continue;
    LiveStats l;
    l.pid = std::strtol(stem.c_str(), nullptr, 10);
    l.path = entry.path().string();
    l.alive = l.pid > 0 && (kill(pid_t(l.pid), 0) == 0 || errno == EPERM);
    out.push_back(l);
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.pid < b.pid; });
  return out;
}

}  // namespace hmmkit::hmmctl
