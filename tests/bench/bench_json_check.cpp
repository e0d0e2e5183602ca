// Checks the JSON that `hmmctl bench --json` wrote: it parses, carries every metric of the suite
// once, and each metric has the documented fields with finite numbers and a ratio that is
// value/baseline or baseline/value. Usage: bench_json_check FILE. Exit 0 when well formed.
#include <boost/property_tree/json_parser.hpp>
#include <boost/property_tree/ptree.hpp>
#include <cmath>
#include <cstdio>
#include <set>
#include <string>

namespace pt = boost::property_tree;

namespace {

int failures = 0;

void Fail(const std::string& what) {
  std::fprintf(stderr, "bench_json_check: %s\n", what.c_str());
  ++failures;
}

bool Number(const pt::ptree& m, const char* key, double* out) {
  auto v = m.get_optional<std::string>(key);
  if (!v || v->empty()) return false;
  try {
    size_t used = 0;
    *out = std::stod(*v, &used);
    return used == v->size() && std::isfinite(*out);
  } catch (...) {
    return false;
  }
}

}  // namespace

int main(int argc, char** argv) try {
  if (argc != 2) {
    std::fprintf(stderr, "usage: bench_json_check FILE\n");
    return 2;
  }
  pt::ptree doc;
  try {
    pt::read_json(argv[1], doc);
  } catch (const pt::json_parser_error& e) {
    Fail(std::string("not JSON: ") + e.what());
    return 1;
  }
  if (doc.get<std::string>("suite", "") != "hmmkit-bench") Fail("\"suite\" is not hmmkit-bench");
  const std::set<std::string> expected = {
      "range_fault.write",          "range_fault.snapshot", "device_fault.service",
      "migrate.to_device_2m",       "migrate.to_device_4k", "fault_back.p50",
      "fault_back.sequential_read", "evict.full_device",    "svm.vector_add_warm",
      "invalidation.munmap_p99",    "scale.subscriptions",  "trace.overhead"};
  std::set<std::string> seen;
  auto metrics = doc.get_child_optional("metrics");
  if (!metrics) {
    Fail("no \"metrics\" array");
    return 1;
  }
  for (const auto& [key, m] : *metrics) {
    if (!key.empty()) Fail("\"metrics\" is not an array");
    const std::string name = m.get<std::string>("name", "");
    if (name.empty()) {
      Fail("a metric without a name");
      continue;
    }
    if (!seen.insert(name).second) Fail(name + ": appears twice");
    if (!expected.count(name)) Fail(name + ": not a metric of the suite");
    for (const char* k : {"unit", "baseline_name", "title"})
      if (m.get<std::string>(k, "").empty()) Fail(name + ": empty \"" + k + "\"");
    double value = 0, base = 0, ratio = 0, target = 0;
    if (!Number(m, "value", &value) || value <= 0) Fail(name + ": \"value\" is not a number > 0");
    if (!Number(m, "baseline_value", &base) || base <= 0)
      Fail(name + ": \"baseline_value\" is not a number > 0");
    if (!Number(m, "ratio", &ratio)) Fail(name + ": \"ratio\" is not a number");
    auto near = [](double a, double b) { return std::fabs(a - b) <= 2e-3 * std::fabs(b); };
    if (value > 0 && base > 0 && !near(ratio, value / base) && !near(ratio, base / value))
      Fail(name + ": \"ratio\" is neither value/baseline nor baseline/value");
    if (!m.get_child_optional("target"))
      Fail(name + ": no \"target\"");
    else if (m.get<std::string>("target") != "null" && !m.get<std::string>("target").empty() &&
             (!Number(m, "target", &target) || target <= 0))
      Fail(name + ": \"target\" is neither null nor a number > 0");
  }
  for (const std::string& n : expected)
    if (!seen.count(n)) Fail(n + ": missing");
  if (failures == 0) std::printf("bench_json_check: %zu metrics, well formed\n", seen.size());
  return failures == 0 ? 0 : 1;
} catch (const std::exception& e) {  // a malformed document the checks above did not foresee
  Fail(std::string("unexpected error: ") + e.what());
  return 1;
}
