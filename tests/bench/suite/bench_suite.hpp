// The benchmark suite behind `hmmctl bench` and `hmmkit_bench`: each metric is measured against a
// baseline in the same process run, on the same data, alternating rounds where it can, and
// reported as a ratio oriented so that higher is better (value / baseline for rates, baseline /
// value for latencies and costs). Machines here are shared and noisy: read the ratios.
//
// Each metric also checks what it measured (data survived a migration, entries are valid, every
// element of a kernel is right): a metric that measured something wrong fails the run.
#pragma once

#include <cmath>
#include <cstdio>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "hmmkit/base/status.hpp"

namespace hmmkit::bench {

struct Metric {
  std::string name;  // stable identifier, e.g. "range_fault.snapshot"
  std::string title;
  double value = NAN;
  std::string unit;  // of value and baseline_value
  std::string baseline_name;
  double baseline_value = NAN;
  double ratio = NAN;            // oriented: higher is better
  std::optional<double> target;  // the target ratio; none: report only
  std::string detail;            // one line: sizes, rounds, mechanism
};

// Rates (pages/s, GB/s): ratio = value / baseline.
Metric RateMetric(std::string name, std::string title, std::string unit, double value,
                  std::string baseline_name, double baseline, std::optional<double> target);
// Latencies and costs: ratio = baseline / value.
Metric CostMetric(std::string name, std::string title, std::string unit, double value,
                  std::string baseline_name, double baseline, std::optional<double> target);

struct BenchContext {
  bool quick = false;
  // Reports a step inside the current metric ("round 3/5"); drawn on the progress line.
  std::function<void(const std::string&)> step;
};

struct BenchSpec {
  const char* name;     // prefix of the metrics it produces; --filter matches it
  const char* summary;  // for --list
  Result<std::vector<Metric>> (*run)(BenchContext& ctx);
};

// The metric groups, in the order they run (bench_specs.cpp).
std::span<const BenchSpec> AllBenches();

// `hmmctl bench [--quick] [--json FILE] [--filter SUBSTR[,SUBSTR...]] [--list]`: runs the suite,
// prints the table to stdout, progress to stderr, writes the JSON. Returns 0 when every metric ran
// and checked its data, 1 when one failed, 2 for a usage error.
int BenchMain(std::span<char* const> args);
void BenchUsage(FILE* out, const char* indent);

// The JSON document for a run (one object per metric); exposed for tests.
std::string ToJson(const std::vector<Metric>& metrics, bool quick, double seconds);

}  // namespace hmmkit::bench
