// A small JSON reader for the files hmmctl reads (Chrome traces, stats files): a recursive-descent
// parser into a small DOM. Linear in the input; nesting is limited to kMaxDepth so bad input
// cannot exhaust the stack. Large arrays can be streamed element by element (ParseStreaming) so a
// trace of a million events never exists as one DOM.
//
// Errors: every function returns false and fills `error` with "offset N: what was expected";
// the DOM is then unspecified. Nothing here throws or aborts on bad input.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace hmmkit::hmmctl::json {

inline constexpr int kMaxDepth = 256;

enum class Type : uint8_t { kNull, kBool, kNumber, kString, kArray, kObject };

struct Member;

/// One JSON value. Owned by its parent (plain value type); objects keep members in file order
/// and Find() returns the first member of a name.
struct Value {
  Type type = Type::kNull;
  bool boolean = false;
  double number = 0;
  std::string string;           // kString
  std::vector<Value> items;     // kArray
  std::vector<Member> members;  // kObject

  bool is_object() const { return type == Type::kObject; }
  bool is_array() const { return type == Type::kArray; }
  bool is_number() const { return type == Type::kNumber; }
  bool is_string() const { return type == Type::kString; }
  /// Builders for output (defined below, where Member is complete).
  static Value Num(double v);
  static Value Str(std::string v);
  static Value Bool(bool v);
  static Value Obj();
  static Value Arr();
  /// Appends a member (objects) and returns *this, for building output.
  Value& Add(std::string key, Value v);
  /// Appends an item (arrays) and returns *this.
  Value& Push(Value v);

  /// The member `key` of an object, or nullptr (also when this is not an object).
  const Value* Find(std::string_view key) const;
  /// The number at `key`, or `fallback` when absent or not a number.
  double NumberAt(std::string_view key, double fallback = 0) const;
  /// The string at `key`, or `fallback` when absent or not a string.
  std::string_view StringAt(std::string_view key, std::string_view fallback = {}) const;
};

/// One member of an object. A plain struct, not std::pair: pair's constructor traits need Value
/// complete, which it is not inside its own definition (clang with libstdc++ rejects it).
struct Member {
  std::string first;
  Value second;
};

inline Value Value::Num(double v) {
  Value x;
  x.type = Type::kNumber;
  x.number = v;
  return x;
}

inline Value Value::Str(std::string v) {
  Value x;
  x.type = Type::kString;
  x.string = std::move(v);
  return x;
}

inline Value Value::Bool(bool v) {
  Value x;
  x.type = Type::kBool;
  x.boolean = v;
  return x;
}

inline Value Value::Obj() {
  Value x;
  x.type = Type::kObject;
  return x;
}

inline Value Value::Arr() {
  Value x;
  x.type = Type::kArray;
  return x;
}

inline Value& Value::Add(std::string key, Value v) {
  members.push_back({std::move(key), std::move(v)});
  return *this;
}

inline Value& Value::Push(Value v) {
  items.push_back(std::move(v));
  return *this;
}

/// Parses one complete JSON text (surrounding whitespace allowed, nothing after it).
bool Parse(std::string_view text, Value* out, std::string* error);

/// Like Parse for a top-level object, but the array member named `stream_key` is not stored:
/// `on_item` gets each of its elements in order (and its byte offset, for messages) and may
/// return false with an error to stop. The returned object holds every other member.
bool ParseStreaming(
    std::string_view text, std::string_view stream_key,
    const std::function<bool(const Value&, size_t offset, std::string* error)>& on_item, Value* out,
    std::string* error);

/// Reads a whole file; false with "PATH: strerror" on failure.
bool ReadFile(const std::string& path, std::string* out, std::string* error);

/// Serializes `v` (compact when indent < 0, else pretty with that many spaces per level).
std::string Write(const Value& v, int indent = -1);

}  // namespace hmmkit::hmmctl::json
