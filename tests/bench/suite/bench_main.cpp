// The suite's driver: argument parsing, the progress line, the table and the JSON file.
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <string_view>
#include <utility>

#include "bench_suite.hpp"
#include "bench_util.hpp"
#include "hmmkit/base/json.hpp"
#include "hmmkit/mirror/kernel_features.hpp"

namespace hmmkit::bench {
namespace {

void AppendJsonString(std::string& out, std::string_view s) {
  out += JsonString(s);
}

void AppendJsonNumber(std::string& out, double v) {
  if (!std::isfinite(v)) {
    out += "null";  // JSON has no NaN/inf
    return;
  }
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.6g", v);
  out += buf;
}

// The progress line: redrawn in place on a terminal, one line per metric group otherwise (CI
// logs).
class Progress {
 public:
  explicit Progress(size_t total) : total_(total), tty_(isatty(STDERR_FILENO) == 1) {}
  void Begin(size_t index, const char* name) {
    index_ = index;
    name_ = name;
    Draw("");
  }
  void Step(const std::string& what) {
    if (tty_) Draw(what);
  }
  void End(double seconds, bool ok) {
    if (tty_) std::fprintf(stderr, "\r\033[K");
    std::fprintf(stderr, "[%zu/%zu] %s: %s in %.1f s\n", index_ + 1, total_, name_,
                 ok ? "done" : "FAILED", seconds);
  }

 private:
  void Draw(const std::string& what) {
    if (tty_) {
      std::fprintf(stderr, "\r\033[K[%zu/%zu] %s %s", index_ + 1, total_, name_, what.c_str());
      std::fflush(stderr);
    }
  }
  size_t total_, index_ = 0;
  const char* name_ = "";
  bool tty_;
};

void PrintTable(const std::vector<Metric>& ms) {
  std::printf("%-34s %12s %-14s %12s %-30s %7s %7s\n", "metric", "value", "unit", "baseline",
              "baseline of", "ratio", "target");
  for (const Metric& m : ms) {
    char target[16] = "-";
    if (m.target) std::snprintf(target, sizeof target, ">=%.2f", *m.target);
    const bool miss = m.target && !(m.ratio >= *m.target);
    std::printf("%-34s %12.4g %-14s %12.4g %-30s %7.2f %7s%s\n", m.name.c_str(), m.value,
                m.unit.c_str(), m.baseline_value, m.baseline_name.c_str(), m.ratio, target,
                miss ? "  (below target)" : "");
  }
  for (const Metric& m : ms)
    if (!m.detail.empty()) std::printf("  %s: %s\n", m.name.c_str(), m.detail.c_str());
}

}  // namespace

namespace {

Metric MakeMetric(std::string name, std::string title, std::string unit, double value,
                  std::string baseline_name, double baseline, std::optional<double> target,
                  double ratio) {
  return Metric{
      std::move(name), std::move(title), value, std::move(unit), std::move(baseline_name), baseline,
      ratio,           target,           {}};
}

}  // namespace

Metric RateMetric(std::string name, std::string title, std::string unit, double value,
                  std::string baseline_name, double baseline, std::optional<double> target) {
  return MakeMetric(std::move(name), std::move(title), std::move(unit), value,
                    std::move(baseline_name), baseline, target, value / baseline);
}

Metric CostMetric(std::string name, std::string title, std::string unit, double value,
                  std::string baseline_name, double baseline, std::optional<double> target) {
  return MakeMetric(std::move(name), std::move(title), std::move(unit), value,
                    std::move(baseline_name), baseline, target, baseline / value);
}

std::string ToJson(const std::vector<Metric>& metrics, bool quick, double seconds) {
  const KernelFeatures& f = KernelFeatures::Get();
  std::string out = "{\n  \"suite\": \"hmmkit-bench\",\n  \"quick\": ";
  out += quick ? "true" : "false";
  out += ",\n  \"kernel\": ";
  AppendJsonString(out, f.kernel_release);
  out += ",\n  \"cpus\": ";
  AppendJsonNumber(out, double(sysconf(_SC_NPROCESSORS_ONLN)));
  out += ",\n  \"seconds\": ";
  AppendJsonNumber(out, seconds);
  out += ",\n  \"metrics\": [";
  for (size_t i = 0; i < metrics.size(); ++i) {
    const Metric& m = metrics[i];
    out += i ? ",\n    {" : "\n    {";
    out += "\"name\": ";
    AppendJsonString(out, m.name);
    out += ", \"title\": ";
    AppendJsonString(out, m.title);
    out += ", \"value\": ";
    AppendJsonNumber(out, m.value);
    out += ", \"unit\": ";
    AppendJsonString(out, m.unit);
    out += ", \"baseline_name\": ";
    AppendJsonString(out, m.baseline_name);
    out += ", \"baseline_value\": ";
    AppendJsonNumber(out, m.baseline_value);
    out += ", \"ratio\": ";
    AppendJsonNumber(out, m.ratio);
    out += ", \"target\": ";
    if (m.target)
      AppendJsonNumber(out, *m.target);
    else
      out += "null";
    out += ", \"detail\": ";
    AppendJsonString(out, m.detail);
    out += "}";
  }
  out += "\n  ]\n}\n";
  return out;
}

void BenchUsage(FILE* out, const char* indent) {
  std::fprintf(out,
               "%s[--quick] [--json FILE] [--filter SUBSTR[,SUBSTR...]] [--list]\n"
               "%sruns the benchmark suite: each metric against a baseline measured in the same "
               "run\n"
               "%s(ratio: higher is better); --quick finishes in under a minute\n",
               indent, indent, indent);
}

int BenchMain(std::span<char* const> args) {
  bool quick = false, list = false;
  std::string json_path, filter;
  for (size_t i = 0; i < args.size(); ++i) {
    std::string_view a = args[i];
    auto value = [&](std::string& out) {
      if (i + 1 >= args.size()) return false;
      out = args[++i];
      return true;
    };
    if (a == "--quick") {
      quick = true;
    } else if (a == "--list") {
      list = true;
    } else if ((a == "--json" && value(json_path)) || (a == "--filter" && value(filter))) {
    } else if (a == "--help" || a == "-h") {
      std::printf("usage: hmmctl bench ");
      BenchUsage(stdout, "");
      return 0;
    } else {
      std::fprintf(stderr, "hmmctl bench: bad argument '%.*s'\nusage: hmmctl bench ", int(a.size()),
                   a.data());
      BenchUsage(stderr, "");
      return 2;
    }
  }
  std::vector<const BenchSpec*> chosen;
  // --filter a,b: the groups whose name contains any of the comma-separated parts.
  auto matches = [&](std::string_view name) {
    if (filter.empty()) return true;
    for (size_t pos = 0; pos <= filter.size();) {
      const size_t comma = std::min(filter.find(',', pos), filter.size());
      const std::string_view part(filter.data() + pos, comma - pos);
      if (!part.empty() && name.find(part) != std::string_view::npos) return true;
      pos = comma + 1;
    }
    return false;
  };
  for (const BenchSpec& s : AllBenches())
    if (matches(s.name)) chosen.push_back(&s);
  if (list) {
    for (const BenchSpec* s : chosen) std::printf("%-22s %s\n", s->name, s->summary);
    return 0;
  }
  if (chosen.empty()) {
    std::fprintf(stderr, "hmmctl bench: no benchmark matches '%s' (see --list)\n", filter.c_str());
    return 2;
  }
  std::FILE* json = nullptr;
  if (!json_path.empty() && !(json = std::fopen(json_path.c_str(), "w"))) {
    std::fprintf(stderr, "hmmctl bench: cannot write %s: %s\n", json_path.c_str(),
                 std::strerror(errno));
    return 1;
  }

  Progress progress(chosen.size());
  BenchContext ctx;
  ctx.quick = quick;
  ctx.step = [&](const std::string& s) { progress.Step(s); };
  std::vector<Metric> metrics;
  int rc = 0;
  const auto t_suite = Clock::now();
  for (size_t i = 0; i < chosen.size(); ++i) {
    progress.Begin(i, chosen[i]->name);
    const auto t0 = Clock::now();
    auto r = chosen[i]->run(ctx);
    progress.End(SecondsSince(t0), r.ok());
    if (!r.ok()) {
      std::fprintf(stderr, "hmmctl bench: %s failed: %s\n", chosen[i]->name,
                   r.status().ToString().c_str());
      rc = 1;
      continue;
    }
    for (Metric& m : *r) metrics.push_back(std::move(m));
  }
  const double seconds = SecondsSince(t_suite);
  std::printf("hmmkit bench%s: %zu metrics in %.1f s, kernel %s, %ld CPUs\n",
              quick ? " --quick" : "", metrics.size(), seconds,
              KernelFeatures::Get().kernel_release.c_str(), sysconf(_SC_NPROCESSORS_ONLN));
  PrintTable(metrics);
  if (json) {
    const std::string doc = ToJson(metrics, quick, seconds);
    const bool ok = std::fwrite(doc.data(), 1, doc.size(), json) == doc.size();
    if (std::fclose(json) != 0 || !ok) {
      std::fprintf(stderr, "hmmctl bench: writing %s failed\n", json_path.c_str());
      rc = 1;
    }
  }
  return rc;
}

}  // namespace hmmkit::bench
