// The trace tests' JSON reader and format checker (trace_checker.hpp).
#include "trace_checker.hpp"

#include <cctype>
#include <cstdlib>
#include <set>

namespace hmmkit::test {

namespace {

struct Parser {
  const std::string& s;
  size_t i = 0;
  std::string err;

  void Ws() {
    while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
  }
  bool Fail(const std::string& what) {
    if (err.empty()) err = what + " at offset " + std::to_string(i);
    return false;
  }
  bool Lit(const char* w) {
    const std::string word(w);
    if (s.compare(i, word.size(), word) != 0) return Fail("expected " + word);
    i += word.size();
    return true;
  }
  bool String(std::string* out) {
    if (i >= s.size() || s[i] != '"') return Fail("expected a string");
    ++i;
    while (i < s.size() && s[i] != '"') {
      char c = s[i++];
      if (static_cast<unsigned char>(c) < 0x20) return Fail("control character in a string");
      if (c == '\\') {
        if (i >= s.size()) return Fail("bad escape");
        const char e = s[i++];
        switch (e) {
          case 'n':
            c = '\n';
            break;
          case 't':
            c = '\t';
            break;
          case 'r':
            c = '\r';
            break;
          case 'b':
            c = '\b';
            break;
          case 'f':
            c = '\f';
            break;
          case 'u':
            if (i + 4 > s.size()) return Fail("bad \\u escape");
            c = char(std::strtol(s.substr(i, 4).c_str(), nullptr, 16));
            i += 4;
            break;
          default:
            c = e;  // \" \\ \/
        }
      }
      out->push_back(c);
    }
    if (i >= s.size()) return Fail("unterminated string");
    ++i;
    return true;
  }
  bool Value(JsonValue* v) {
    Ws();
    if (i >= s.size()) return Fail("unexpected end");
    const char c = s[i];
    if (c == '{') {
      v->type = JsonValue::Type::kObject;
      ++i;
      Ws();
      if (i < s.size() && s[i] == '}') return ++i, true;
      for (;;) {
        Ws();
        std::string key;
        if (!String(&key)) return false;
        Ws();
        if (i >= s.size() || s[i] != ':') return Fail("expected ':'");
        ++i;
        if (v->obj.count(key)) return Fail("duplicate key " + key);
        if (!Value(&v->obj[key])) return false;
        Ws();
        if (i < s.size() && s[i] == ',') {
          ++i;
          continue;
        }
        if (i < s.size() && s[i] == '}') return ++i, true;
        return Fail("expected ',' or '}'");
      }
    }
    if (c == '[') {
      v->type = JsonValue::Type::kArray;
      ++i;
      Ws();
      if (i < s.size() && s[i] == ']') return ++i, true;
      for (;;) {
        v->arr.emplace_back();
        if (!Value(&v->arr.back())) return false;
        Ws();
        if (i < s.size() && s[i] == ',') {
          ++i;
          continue;
        }
        if (i < s.size() && s[i] == ']') return ++i, true;
        return Fail("expected ',' or ']'");
      }
    }
    if (c == '"') {
      v->type = JsonValue::Type::kString;
      return String(&v->str);
    }
    if (c == 't' || c == 'f') {
      v->type = JsonValue::Type::kBool;
      v->b = c == 't';
      return Lit(c == 't' ? "true" : "false");
    }
    if (c == 'n') return Lit("null");
    const size_t start = i;
    if (s[i] == '-') ++i;
    while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || s[i] == '.' ||
                            s[i] == 'e' || s[i] == 'E' || s[i] == '+' || s[i] == '-'))
      ++i;
    if (i == start) return Fail("unexpected character");
    v->type = JsonValue::Type::kNumber;
    v->raw_number = s.substr(start, i - start);
    v->num = std::strtod(v->raw_number.c_str(), nullptr);
    return true;
  }
};

const std::set<std::string> kAddressArgs = {"start", "end"};

// "123.456": microseconds with exactly 3 decimals.
bool IsMicros(const std::string& t) {
  const size_t dot = t.find('.');
  if (dot == std::string::npos || dot == 0 || t.size() - dot != 4) return false;
  for (size_t i = 0; i < t.size(); ++i)
    if (i != dot && !std::isdigit(static_cast<unsigned char>(t[i]))) return false;
  return true;
}

// "0x7f...": lower-case hex.
bool IsHex(const std::string& t) {
  if (t.size() < 3 || t.compare(0, 2, "0x") != 0) return false;
  for (size_t i = 2; i < t.size(); ++i)
    if (!std::isdigit(static_cast<unsigned char>(t[i])) && (t[i] < 'a' || t[i] > 'f')) return false;
  return true;
}

}  // namespace

bool ParseJson(const std::string& text, JsonValue* out, std::string* error) {
  Parser p{text, 0, {}};
  bool ok = p.Value(out);
  p.Ws();
  if (ok && p.i != text.size()) ok = p.Fail("trailing text");
  if (!ok && error) *error = p.err;
  return ok;
}

uint64_t TraceEvent::Hex(const std::string& key) const {
  return std::stoull(args->at(key).str, nullptr, 16);
}
uint64_t TraceEvent::Num(const std::string& key) const {
  return args->at(key).u64();
}
std::string TraceEvent::Str(const std::string& key) const {
  return args->at(key).str;
}

std::string CheckTrace(const JsonValue& doc, std::vector<TraceEvent>* events) {
  using T = JsonValue::Type;
  if (doc.type != T::kObject) return "not an object";
  for (const char* k : {"displayTimeUnit", "otherData", "traceEvents"})
    if (!doc.has(k)) return std::string("missing ") + k;
  const JsonValue& other = doc.at("otherData");
  for (const char* k :
       {"hmmkit_trace_version", "pid", "page_size", "events", "dropped", "ring_capacity"})
    if (!other.has(k) || other.at(k).type != T::kNumber) return std::string("otherData.") + k;
  const uint64_t pid = other.at("pid").u64();
  std::map<uint64_t, std::string> names;
  std::set<uint64_t> sorted;
  bool process_named = false;
  double last_ts = -1;
  size_t xi = 0;
  for (const JsonValue& e : doc.at("traceEvents").arr) {
    for (const char* k : {"ph", "name", "pid", "tid"})
      if (!e.has(k)) return std::string("event without ") + k;
    if (e.at("pid").u64() != pid) return "pid differs from otherData.pid";
    const std::string ph = e.at("ph").str;
    const uint64_t tid = e.at("tid").u64();
    if (ph == "M") {
      const std::string n = e.at("name").str;
      if (n == "process_name") process_named = true;
      if (n == "thread_name") names[tid] = e.at("args").at("name").str;
      if (n == "thread_sort_index") sorted.insert(tid);
      continue;
    }
    if (ph != "X" && ph != "i") return "unknown ph " + ph;
    for (const char* k : {"cat", "ts", "args"})
      if (!e.has(k)) return std::string("X/i event without ") + k;
    if (ph == "i" && (!e.has("s") || e.at("s").str != "t")) return "instant without s:t";
    if (!IsMicros(e.at("ts").raw_number)) return "ts not in us.3: " + e.at("ts").raw_number;
    if (ph == "X" && (!e.has("dur") || !IsMicros(e.at("dur").raw_number)))
      return "X without dur in us.3";
    if (e.at("ts").num < last_ts) return "events out of time order";
    last_ts = e.at("ts").num;
    if (!names.count(tid) || !sorted.count(tid))
      return "no thread_name/sort_index for tid " + std::to_string(tid);
    for (const auto& [k, v] : e.at("args").obj)
      if (kAddressArgs.count(k) && (v.type != T::kString || !IsHex(v.str)))
        return "address arg " + k + " is not a hex string";
    TraceEvent te;
    te.name = e.at("name").str;
    te.cat = e.at("cat").str;
    te.ph = ph;
    te.tid = tid;
    te.track = names[tid];
    te.ts = e.at("ts").num;
    te.dur = ph == "X" ? e.at("dur").num : 0;
    te.args = &e.at("args");
    if (events) events->push_back(te);
    ++xi;
  }
  if (!process_named) return "no process_name";
  if (xi != other.at("events").u64()) return "otherData.events differs from the event count";
  return "";
}

}  // namespace hmmkit::test
