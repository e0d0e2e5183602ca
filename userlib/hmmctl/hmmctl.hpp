// hmmctl subcommands. Each takes the arguments after its name and returns the process exit code:
// 0 success, 1 failure, 2 usage error (the subcommand prints its own message to stderr).
#pragma once

#include <cstdio>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "heatmap.hpp"

namespace hmmkit::hmmctl {

inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;
inline constexpr int kExitUsage = 2;

// `hmmctl info [--json]`: kernel features, the mechanism chosen for each hmmkit feature, and what
// HMMKIT_DISABLE forced off.
int InfoMain(std::span<char* const> args);
void InfoUsage(FILE* out, const char* indent);

// `hmmctl run SAMPLE ...`: run a sample with stats (and optionally a trace and a heatmap).
int RunMain(std::span<char* const> args);
void RunUsage(FILE* out, const char* indent);

// `hmmctl stats ...`: the counters of the last run or of a live process.
int StatsMain(std::span<char* const> args);
void StatsUsage(FILE* out, const char* indent);

// `hmmctl trace record|summary|heatmap ...`.
int TraceMain(std::span<char* const> args);
void TraceUsage(FILE* out, const char* indent);

// What `run` and `trace record` share.
struct RunRequest {
  std::string command;  // "run" or "trace record", for messages
  std::string sample;
  std::vector<std::string> args;  // after "--"
  std::string trace_path;         // empty: no trace kept
  std::string heatmap_path;       // empty: no heatmap
  HeatmapOptions heatmap;
  bool json = false;
};
int RunSample(const RunRequest& req);

// Option parsing shared by the commands: `--name value` and `--name=value`. When args[*i] is the
// option, stores the value, advances *i past it and returns 1; returns 0 when it is another
// argument and -1 (after printing "hmmctl CMD: --name needs a value") when the value is missing.
int OptionValue(std::span<char* const> args, size_t* i, std::string_view name, std::string* value,
                const char* cmd);
// Parses a positive int option value; prints the error and returns false on bad input.
bool ParsePositive(const std::string& text, std::string_view name, int* out, const char* cmd);

}  // namespace hmmkit::hmmctl
