// `hmmctl trace summary`: what a trace says, aggregated. Computed once (SummarizeTrace), printed
// as text or as the JSON object documented in docs/hmmctl.md.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "json_reader.hpp"
#include "trace_file.hpp"

namespace hmmkit::hmmctl {

/// The granule the "top ranges" count migrations in.
inline constexpr uint64_t kSummaryGranule = 64 * 1024;
inline constexpr size_t kSummaryTopRanges = 10;

struct TraceSummary {
  struct Name {
    std::string name;
    uint64_t count = 0;
    double total_us = 0, max_us = 0;
  };
  struct Migration {
    std::string dir, cause;
    uint64_t events = 0, pages = 0, bytes = 0;
  };
  struct Range {
    uint64_t start = 0, end = 0;
    uint64_t migrations = 0, to_device = 0, to_system = 0;
    uint64_t direction_changes = 0;  // to_device after to_system or back: ping-pong
  };
  struct Track {
    uint32_t tid = 0;
    std::string name;
    uint64_t events = 0;
    double busy_us = 0;  // union of its duration events
  };
  struct Thrash {
    double ts_us = 0;
    uint64_t start = 0, end = 0;
    double pin_ms = 0;
  };
  std::vector<Name> names;  // by count, descending
  std::vector<Migration> migrations;
  std::vector<std::pair<std::string, uint64_t>> invalidations;  // event kind -> count
  uint64_t thrash_events = 0;
  std::vector<Thrash> thrash_first;  // the first kSummaryTopRanges
  std::vector<Range> top_ranges;     // by migrations, descending
  std::vector<Track> tracks;
  double span_us = 0;
};

TraceSummary SummarizeTrace(const Trace& trace);
/// The JSON object of `hmmctl trace summary --json`.
json::Value SummaryJson(const Trace& trace, const TraceSummary& s, const std::string& file);
/// The text of `hmmctl trace summary`.
std::string SummaryText(const Trace& trace, const TraceSummary& s, const std::string& file);

}  // namespace hmmkit::hmmctl
