/// @file
/// JSON text helpers shared by hmmkit's tools (hmmctl info, hmmctl bench): no parser, no DOM.
#pragma once

#include <cstdio>
#include <string>
#include <string_view>

namespace hmmkit {

/// `s` as a JSON string literal, quotes included: control characters escaped, UTF-8 passed through.
inline std::string JsonString(std::string_view s) {
  std::string out = "\"";
  for (char ch : s) {
    auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      default:
        if (c < 0x20 || c == 0x7f) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += ch;
        }
    }
  }
  return out + "\"";
}

}  // namespace hmmkit
