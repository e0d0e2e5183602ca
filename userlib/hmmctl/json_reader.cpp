// The JSON reader: RFC 8259 grammar, UTF-8 passed through, \u escapes (with surrogate pairs)
// decoded to UTF-8.
#include "json_reader.hpp"

#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "hmmkit/base/json.hpp"

namespace hmmkit::hmmctl::json {
namespace {

class Parser {
 public:
  Parser(std::string_view text, std::string* error) : s_(text), error_(error) {}

  bool Document(Value* out) {
    SkipSpace();
    if (!ParseValue(out, 0)) return false;
    return End();
  }

  bool StreamingDocument(std::string_view key,
                         const std::function<bool(const Value&, size_t, std::string*)>& on_item,
                         Value* out) {
    SkipSpace();
    if (!Expect('{', "'{' (the file must hold one JSON object)")) return false;
    out->type = Type::kObject;
    SkipSpace();
    if (Peek() == '}') {
      ++pos_;
      return End();
    }
    for (;;) {
      SkipSpace();
      std::string name;
      if (!ParseString(&name)) return false;
      SkipSpace();
      if (!Expect(':', "':' after an object key")) return false;
      SkipSpace();
      if (name == key && Peek() == '[') {
        if (!StreamArray(on_item)) return false;
      } else {
        Value v;
        if (!ParseValue(&v, 1)) return false;
        out->members.push_back({std::move(name), std::move(v)});
      }
      SkipSpace();
      if (Peek() == ',') {
        ++pos_;
        continue;
      }
      if (!Expect('}', "',' or '}' in an object")) return false;
      return End();
    }
  }

 private:
  bool End() {
    SkipSpace();
    if (pos_ != s_.size()) return Fail("unexpected data after the JSON value");
    return true;
  }

  bool StreamArray(const std::function<bool(const Value&, size_t, std::string*)>& on_item) {
    ++pos_;  // '['
    SkipSpace();
    if (Peek() == ']') {
      ++pos_;
      return true;
    }
    Value item;
    for (;;) {
      SkipSpace();
      const size_t at = pos_;
      item = Value();
      if (!ParseValue(&item, 2)) return false;
      std::string msg;
      if (!on_item(item, at, &msg)) {
        pos_ = at;
        return Fail(msg);
      }
      SkipSpace();
      if (Peek() == ',') {
        ++pos_;
        continue;
      }
      return Expect(']', "',' or ']' in an array");
    }
  }

  char Peek() const { return pos_ < s_.size() ? s_[pos_] : '\0'; }

  void SkipSpace() {
    while (pos_ < s_.size() &&
           (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\r' || s_[pos_] == '\t'))
      ++pos_;
  }

  bool Fail(std::string_view what) {
    if (error_) {
      std::string got =
          pos_ >= s_.size() ? std::string("end of input") : "'" + std::string(1, s_[pos_]) + "'";
      if (pos_ < s_.size() && static_cast<unsigned char>(s_[pos_]) < 0x20)
        got = "control byte " + std::to_string(static_cast<unsigned char>(s_[pos_]));
      *error_ =
          "offset " + std::to_string(pos_) + ": " + std::string(what) + " (found " + got + ")";
    }
    return false;
  }

  bool Expect(char c, std::string_view what) {
    if (Peek() != c) return Fail("expected " + std::string(what));
    ++pos_;
    return true;
  }

  bool Literal(std::string_view word) {
    if (s_.substr(pos_, word.size()) != word) return Fail("expected a JSON value");
    pos_ += word.size();
    return true;
  }

  bool ParseValue(Value* out, int depth) {
    if (depth > kMaxDepth) return Fail("nesting deeper than " + std::to_string(kMaxDepth));
    switch (Peek()) {
      case '{':
        return ParseObject(out, depth);
      case '[':
        return ParseArray(out, depth);
      case '"':
        out->type = Type::kString;
        return ParseString(&out->string);
      case 't':
        out->type = Type::kBool;
        out->boolean = true;
        return Literal("true");
      case 'f':
        out->type = Type::kBool;
        out->boolean = false;
        return Literal("false");
      case 'n':
        out->type = Type::kNull;
        return Literal("null");
      default:
        return ParseNumber(out);
    }
  }

  bool ParseObject(Value* out, int depth) {
    ++pos_;
    out->type = Type::kObject;
    out->members.reserve(8);  // trace events have 7-9 members: one allocation, not four
    SkipSpace();
    if (Peek() == '}') {
      ++pos_;
      return true;
    }
    for (;;) {
      SkipSpace();
      std::string name;
      if (!ParseString(&name)) return false;
      SkipSpace();
      if (!Expect(':', "':' after an object key")) return false;
      SkipSpace();
      Value v;
      if (!ParseValue(&v, depth + 1)) return false;
      out->members.push_back({std::move(name), std::move(v)});
      SkipSpace();
      if (Peek() == ',') {
        ++pos_;
        continue;
      }
      return Expect('}', "',' or '}' in an object");
    }
  }

  bool ParseArray(Value* out, int depth) {
    ++pos_;
    out->type = Type::kArray;
    SkipSpace();
    if (Peek() == ']') {
      ++pos_;
      return true;
    }
    for (;;) {
      SkipSpace();
      out->items.emplace_back();
      if (!ParseValue(&out->items.back(), depth + 1)) return false;
      SkipSpace();
      if (Peek() == ',') {
        ++pos_;
        continue;
      }
      return Expect(']', "',' or ']' in an array");
    }
  }

  static int HexDigit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  }

  bool Hex4(uint32_t* out) {
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      const int d = HexDigit(Peek());
      if (d < 0) return Fail("expected 4 hex digits after \\u");
      v = v * 16 + uint32_t(d);
      ++pos_;
    }
    *out = v;
    return true;
  }

  static void AppendUtf8(uint32_t cp, std::string* out) {
    if (cp < 0x80) {
      out->push_back(char(cp));
    } else if (cp < 0x800) {
      out->push_back(char(0xc0 | (cp >> 6)));
      out->push_back(char(0x80 | (cp & 0x3f)));
    } else if (cp < 0x10000) {
      out->push_back(char(0xe0 | (cp >> 12)));
      out->push_back(char(0x80 | ((cp >> 6) & 0x3f)));
      out->push_back(char(0x80 | (cp & 0x3f)));
    } else {
      out->push_back(char(0xf0 | (cp >> 18)));
      out->push_back(char(0x80 | ((cp >> 12) & 0x3f)));
      out->push_back(char(0x80 | ((cp >> 6) & 0x3f)));
      out->push_back(char(0x80 | (cp & 0x3f)));
    }
  }

  bool ParseString(std::string* out) {
    if (!Expect('"', "'\"' (a string)")) return false;
    for (;;) {
      // Copy the run up to the next quote, backslash or control byte in one go.
      const size_t run = pos_;
      while (pos_ < s_.size() && s_[pos_] != '"' && s_[pos_] != '\\' &&
             static_cast<unsigned char>(s_[pos_]) >= 0x20)
        ++pos_;
      out->append(s_.substr(run, pos_ - run));
      if (pos_ >= s_.size()) return Fail("unterminated string");
      const char c = s_[pos_];
      if (c == '"') {
        ++pos_;
        return true;
      }
      if (c != '\\') return Fail("unescaped control character in a string");
      ++pos_;
      const char e = Peek();
      ++pos_;
      switch (e) {
        case '"':
        case '\\':
        case '/':
          out->push_back(e);
          break;
        case 'b':
          out->push_back('\b');
          break;
        case 'f':
          out->push_back('\f');
          break;
        case 'n':
          out->push_back('\n');
          break;
        case 'r':
          out->push_back('\r');
          break;
        case 't':
          out->push_back('\t');
          break;
        case 'u': {
          uint32_t cp = 0;
          if (!Hex4(&cp)) return false;
          if (cp >= 0xd800 && cp < 0xdc00) {
            uint32_t lo = 0;
            if (Peek() != '\\' || pos_ + 1 >= s_.size() || s_[pos_ + 1] != 'u')
              return Fail("expected the low half of a surrogate pair");
            pos_ += 2;
            if (!Hex4(&lo)) return false;
            if (lo < 0xdc00 || lo >= 0xe000) return Fail("bad low surrogate");
            cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
          } else if (cp >= 0xdc00 && cp < 0xe000) {
            return Fail("lone low surrogate");
          }
          AppendUtf8(cp, out);
          break;
        }
        default:
          --pos_;
          return Fail("bad escape in a string");
      }
    }
  }

  bool ParseNumber(Value* out) {
    // Validate the JSON number grammar first (from_chars accepts more, e.g. "inf", leading '+').
    const size_t start = pos_;
    size_t p = pos_;
    auto digit = [&](size_t i) { return i < s_.size() && s_[i] >= '0' && s_[i] <= '9'; };
    if (p < s_.size() && s_[p] == '-') ++p;
    if (!digit(p)) {
      pos_ = p;
      return Fail(p == start ? "expected a JSON value" : "expected a digit after '-'");
    }
    if (s_[p] == '0') {
      ++p;
    } else {
      while (digit(p)) ++p;
    }
    if (p < s_.size() && s_[p] == '.') {
      ++p;
      if (!digit(p)) {
        pos_ = p;
        return Fail("expected a digit after '.'");
      }
      while (digit(p)) ++p;
    }
    if (p < s_.size() && (s_[p] == 'e' || s_[p] == 'E')) {
      ++p;
      if (p < s_.size() && (s_[p] == '+' || s_[p] == '-')) ++p;
      if (!digit(p)) {
        pos_ = p;
        return Fail("expected a digit in the exponent");
      }
      while (digit(p)) ++p;
    }
    double v = 0;
    const auto r = std::from_chars(s_.data() + start, s_.data() + p, v);
    if (r.ec == std::errc::result_out_of_range) return Fail("number out of range");
    if (r.ec != std::errc() || r.ptr != s_.data() + p) return Fail("malformed number");
    out->type = Type::kNumber;
    out->number = v;
    pos_ = p;
    return true;
  }

  std::string_view s_;
  std::string* error_;
  size_t pos_ = 0;
};

void WriteTo(const Value& v, int indent, int level, std::string* out) {
  auto newline = [&](int lv) {
    if (indent < 0) return;
    out->push_back('\n');
    out->append(size_t(indent) * size_t(lv), ' ');
  };
  switch (v.type) {
    case Type::kNull:
      *out += "null";
      break;
    case Type::kBool:
      *out += v.boolean ? "true" : "false";
      break;
    case Type::kNumber: {
      char buf[40];
      if (std::isfinite(v.number) && v.number == std::floor(v.number) &&
          std::fabs(v.number) < 9.007199254740992e15) {
        std::snprintf(buf, sizeof(buf), "%.0f", v.number);
      } else if (std::isfinite(v.number)) {
        // The shortest of 15 or 17 digits that reads back as the same double.
        std::snprintf(buf, sizeof(buf), "%.15g", v.number);
        double back = 0;
        std::from_chars(buf, buf + std::strlen(buf), back);
        if (back != v.number) std::snprintf(buf, sizeof(buf), "%.17g", v.number);
      } else {
        std::snprintf(buf, sizeof(buf), "null");
      }
      *out += buf;
      break;
    }
    case Type::kString:
      *out += JsonString(v.string);
      break;
    case Type::kArray:
      out->push_back('[');
      for (size_t i = 0; i < v.items.size(); ++i) {
        if (i) out->push_back(',');
        newline(level + 1);
        WriteTo(v.items[i], indent, level + 1, out);
      }
      if (!v.items.empty()) newline(level);
      out->push_back(']');
      break;
    case Type::kObject:
      out->push_back('{');
      for (size_t i = 0; i < v.members.size(); ++i) {
        if (i) out->push_back(',');
        newline(level + 1);
        *out += JsonString(v.members[i].first);
        *out += indent < 0 ? ":" : ": ";
        WriteTo(v.members[i].second, indent, level + 1, out);
      }
      if (!v.members.empty()) newline(level);
      out->push_back('}');
      break;
  }
}

}  // namespace

const Value* Value::Find(std::string_view key) const {
  if (type != Type::kObject) return nullptr;
  for (const auto& [k, v] : members)
    if (k == key) return &v;
  return nullptr;
}

double Value::NumberAt(std::string_view key, double fallback) const {
  const Value* v = Find(key);
  return v && v->is_number() ? v->number : fallback;
}

std::string_view Value::StringAt(std::string_view key, std::string_view fallback) const {
  const Value* v = Find(key);
  return v && v->is_string() ? std::string_view(v->string) : fallback;
}

bool Parse(std::string_view text, Value* out, std::string* error) {
  *out = Value();
  return Parser(text, error).Document(out);
}

bool ParseStreaming(std::string_view text, std::string_view stream_key,
                    const std::function<bool(const Value&, size_t, std::string*)>& on_item,
                    Value* out, std::string* error) {
  *out = Value();
  return Parser(text, error).StreamingDocument(stream_key, on_item, out);
}

bool ReadFile(const std::string& path, std::string* out, std::string* error) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) {
    *error = path + ": " + std::strerror(errno);
    return false;
  }
  out->clear();
  char buf[1 << 16];
  size_t n = 0;
  while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) out->append(buf, n);
  const bool bad = std::ferror(f) != 0;
  const int err = errno;
  std::fclose(f);
  if (bad) {
    *error = path + ": " + std::strerror(err);
    return false;
  }
  return true;
}

std::string Write(const Value& v, int indent) {
  std::string out;
  WriteTo(v, indent, 0, &out);
  return out;
}

}  // namespace hmmkit::hmmctl::json
