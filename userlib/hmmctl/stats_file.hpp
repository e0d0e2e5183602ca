// The stats files a process with HMMKIT_STATS=1 publishes (docs/hmmctl.md, "Stats files"): where
// they live, reading one, and printing it.
#pragma once

#include <string>
#include <vector>

#include "json_reader.hpp"

namespace hmmkit::hmmctl {

/// `$HMMKIT_STATS_DIR`, else `${XDG_RUNTIME_DIR:-/tmp}/hmmkit-<uid>` (the library's rule).
std::string DefaultStatsDir();

/// Reads and checks a stats file: a JSON object with "hmmkit_stats_version". False with
/// "PATH: ..." otherwise.
bool LoadStats(const std::string& path, json::Value* out, std::string* error);

/// The text form: header line, each device's counters, the monitor's, the trace state.
std::string StatsText(const json::Value& stats);

/// One line for a progress display: elapsed time and the counters that show progress.
std::string ProgressLine(const json::Value* stats, double elapsed_s);

/// A live (or stale) `<pid>.json` in a stats directory.
struct LiveStats {
  long pid = 0;
  std::string path;
  bool alive = false;  // the process exists
};
/// The `<pid>.json` files of `dir`, by pid.
std::vector<LiveStats> ListLiveStats(const std::string& dir);

}  // namespace hmmkit::hmmctl
