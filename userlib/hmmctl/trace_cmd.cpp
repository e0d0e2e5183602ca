// `hmmctl trace record|summary|heatmap`: recording is `hmmctl run --trace`; summary and heatmap
// read a Chrome trace file written by HMMKIT_TRACE.
#include <cstring>

#include "hmmctl.hpp"
#include "trace_file.hpp"
#include "trace_summary.hpp"

namespace hmmkit::hmmctl {
namespace {

bool IsHelp(std::string_view a) {
  return a == "--help" || a == "-h";
}

int Unknown(const char* sub, std::string_view a) {
  std::fprintf(stderr, "hmmctl trace %s: unknown argument '%.*s'\nusage:\n", sub, int(a.size()),
               a.data());
  TraceUsage(stderr, "  ");
  return kExitUsage;
}

int Record(std::span<char* const> args) {
  RunRequest req;
  req.command = "trace record";
  size_t i = 0;
  for (; i < args.size(); ++i) {
    const std::string_view a = args[i];
    if (IsHelp(a)) {
      std::printf(
          "usage: hmmctl trace record -o OUT.json [--heatmap OUT.png|OUT.svg] [--json] SAMPLE "
          "[-- ARGS]\n\nRuns SAMPLE like `hmmctl run SAMPLE --trace OUT.json` (same output, same\n"
          "exit status).\n");
      return kExitOk;
    }
    if (a == "--json") {
      req.json = true;
      continue;
    }
    if (a == "--") {
      ++i;
      break;
    }
    int r = OptionValue(args, &i, "-o", &req.trace_path, "trace record");
    if (r == 0) r = OptionValue(args, &i, "--output", &req.trace_path, "trace record");
    if (r == 0) r = OptionValue(args, &i, "--heatmap", &req.heatmap_path, "trace record");
    if (r < 0) return kExitUsage;
    if (r > 0) continue;
    if (a.starts_with("-") || !req.sample.empty()) return Unknown("record", a);
    req.sample = a;
  }
  for (; i < args.size(); ++i) req.args.emplace_back(args[i]);
  if (req.trace_path.empty() || req.sample.empty()) {
    std::fprintf(stderr, "hmmctl trace record: needs -o OUT.json and a SAMPLE\n");
    return kExitUsage;
  }
  return RunSample(req);
}

int Load(const std::string& file, const char* sub, Trace* t) {
  std::string error;
  if (!LoadTrace(file, t, &error)) {
    std::fprintf(stderr, "hmmctl trace %s: %s\n", sub, error.c_str());
    return kExitFailure;
  }
  if (t->dropped)
    std::fprintf(stderr,
                 "hmmctl trace %s: warning: the ring dropped %llu events (capacity %llu): the "
                 "oldest part of the run is missing (raise HMMKIT_TRACE_EVENTS)\n",
                 sub, static_cast<unsigned long long>(t->dropped),
                 static_cast<unsigned long long>(t->ring_capacity));
  return kExitOk;
}

int Summary(std::span<char* const> args) {
  std::string file;
  bool json = false;
  for (std::string_view a : args) {
    if (IsHelp(a)) {
      std::printf(
          "usage: hmmctl trace summary FILE [--json]\n\nPer event name: count and durations; "
          "migrated pages and bytes per direction and\ncause; invalidations per kind; "
          "thrashing decisions; the address ranges with the\nmost migrations (ping-pong "
          "candidates); busy time per track.\n");
      return kExitOk;
    }
    if (a == "--json") {
      json = true;
    } else if (a.starts_with("-") || !file.empty()) {
      return Unknown("summary", a);
    } else {
      file = a;
    }
  }
  if (file.empty()) {
    std::fprintf(stderr, "hmmctl trace summary: which trace file?\n");
    return kExitUsage;
  }
  Trace t;
  if (int r = Load(file, "summary", &t); r != kExitOk) return r;
  const TraceSummary s = SummarizeTrace(t);
  if (json)
    std::printf("%s\n", json::Write(SummaryJson(t, s, file), 2).c_str());
  else
    std::printf("%s", SummaryText(t, s, file).c_str());
  return std::fflush(stdout) == 0 ? kExitOk : kExitFailure;
}

int HeatmapCmd(std::span<char* const> args) {
  std::string output, file, ranges = "auto", width, height;
  HeatmapOptions opt;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string_view a = args[i];
    if (IsHelp(a)) {
      std::printf(
          "usage: hmmctl trace heatmap FILE -o OUT.png|OUT.svg [--width N] [--height N]\n"
          "                            [--ranges all|auto]\n"
          "       hmmctl trace --heatmap OUT.png|OUT.svg FILE\n\n"
          "Page residency over time: rows are pages of the traced address ranges, columns\n"
          "time buckets. --width/--height: plot size in pixels (default 800x400; 2 pixels per\n"
          "time bucket, at least 2 per row). --ranges auto (default) keeps the 8 ranges with\n"
          "the most migrations, all keeps every range.\n");
      return kExitOk;
    }
    int r = OptionValue(args, &i, "-o", &output, "trace heatmap");
    if (r == 0) r = OptionValue(args, &i, "--output", &output, "trace heatmap");
    if (r == 0) r = OptionValue(args, &i, "--heatmap", &output, "trace heatmap");
    if (r == 0) r = OptionValue(args, &i, "--width", &width, "trace heatmap");
    if (r == 0) r = OptionValue(args, &i, "--height", &height, "trace heatmap");
    if (r == 0) r = OptionValue(args, &i, "--ranges", &ranges, "trace heatmap");
    if (r < 0) return kExitUsage;
    if (r > 0) continue;
    if (a.starts_with("-") || !file.empty()) return Unknown("heatmap", a);
    file = a;
  }
  if (!width.empty() && !ParsePositive(width, "--width", &opt.width, "trace heatmap"))
    return kExitUsage;
  if (!height.empty() && !ParsePositive(height, "--height", &opt.height, "trace heatmap"))
    return kExitUsage;
  if (ranges != "all" && ranges != "auto") {
    std::fprintf(stderr, "hmmctl trace heatmap: --ranges is all or auto, not '%s'\n",
                 ranges.c_str());
    return kExitUsage;
  }
  opt.all_ranges = ranges == "all";
  if (file.empty() || output.empty()) {
    std::fprintf(stderr, "hmmctl trace heatmap: needs a trace FILE and -o OUT.png|OUT.svg\n");
    return kExitUsage;
  }
  if (!output.ends_with(".png") && !output.ends_with(".svg")) {
    std::fprintf(stderr, "hmmctl trace heatmap: the output must end in .png or .svg\n");
    return kExitUsage;
  }
  Trace t;
  if (int r = Load(file, "heatmap", &t); r != kExitOk) return r;
  Heatmap map;
  std::string error;
  if (!BuildHeatmap(t, opt, &map, &error) || !WriteHeatmap(map, output, &error)) {
    std::fprintf(stderr, "hmmctl trace heatmap: %s\n", error.c_str());
    return kExitFailure;
  }
  std::printf("%s: %zu rows (%llu pages each) x %d time buckets over %.3f ms, %zu ranges\n",
              output.c_str(), map.rows.size(), static_cast<unsigned long long>(map.pages_per_row),
              map.columns, (map.t1_us - map.t0_us) / 1000, map.clusters.size());
  return kExitOk;
}

}  // namespace

void TraceUsage(FILE* out, const char* indent) {
  std::fprintf(out,
               "%shmmctl trace record -o OUT.json [--heatmap OUT.png|OUT.svg] SAMPLE [-- ARGS]\n"
               "%shmmctl trace summary FILE [--json]\n"
               "%shmmctl trace heatmap FILE -o OUT.png|OUT.svg [--width N] [--height N] "
               "[--ranges all|auto]\n",
               indent, indent, indent);
}

int TraceMain(std::span<char* const> args) {
  if (args.empty()) {
    std::fprintf(stderr, "hmmctl trace: which subcommand?\nusage:\n");
    TraceUsage(stderr, "  ");
    return kExitUsage;
  }
  const std::string_view sub = args[0];
  if (IsHelp(sub)) {
    std::printf("usage:\n");
    TraceUsage(stdout, "  ");
    std::printf("\n`hmmctl trace SUBCOMMAND --help` tells more.\n");
    return kExitOk;
  }
  if (sub == "record") return Record(args.subspan(1));
  if (sub == "summary") return Summary(args.subspan(1));
  if (sub == "heatmap") return HeatmapCmd(args.subspan(1));
  if (sub.starts_with("--heatmap")) return HeatmapCmd(args);  // `trace --heatmap OUT FILE`
  std::fprintf(stderr, "hmmctl trace: unknown subcommand '%.*s'\nusage:\n", int(sub.size()),
               sub.data());
  TraceUsage(stderr, "  ");
  return kExitUsage;
}

}  // namespace hmmkit::hmmctl
