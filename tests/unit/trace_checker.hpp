// A tiny JSON reader and a checker of hmmkit's trace format (docs/tracing.md), for the trace
// tests: enough JSON for what hmmkit writes (objects, arrays, strings without \u escapes beyond
// ASCII, numbers, true/false/null).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace hmmkit::test {

struct JsonValue {
  enum class Type { kNull, kBool, kNumber, kString, kArray, kObject } type = Type::kNull;
  bool b = false;
  double num = 0;
  std::string raw_number;  // the number's text (exact integers above 2^53)
  std::string str;
  std::vector<JsonValue> arr;
  std::map<std::string, JsonValue> obj;

  bool has(const std::string& k) const { return type == Type::kObject && obj.count(k) != 0; }
  const JsonValue& at(const std::string& k) const { return obj.at(k); }
  uint64_t u64() const { return std::stoull(raw_number); }
};

// Parses `text`; on a syntax error returns false and says where in *error.
bool ParseJson(const std::string& text, JsonValue* out, std::string* error);

// One X/i event of a trace, decoded.
struct TraceEvent {
  std::string name, cat, ph, track;
  uint64_t tid = 0;
  double ts = 0, dur = 0;
  const JsonValue* args = nullptr;
  uint64_t Hex(const std::string& key) const;  // an address arg ("0x...")
  uint64_t Num(const std::string& key) const;  // a count arg
  std::string Str(const std::string& key) const;
};

// Checks `doc` against the trace contract: top-level keys and otherData, metadata for every tid
// used, required keys per event, ts/dur with 3 decimals, time order, hex address strings.
// Returns "" when valid, else the first problem; fills *events (which point into doc).
std::string CheckTrace(const JsonValue& doc, std::vector<TraceEvent>* events);

}  // namespace hmmkit::test
