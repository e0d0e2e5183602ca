// Library bugs the harnesses have found and that are not fixed yet. Each has a regression input in
// tests/fuzz/regressions/<harness>/<id>, whose replay fails until the fix lands. While fuzzing,
// $HMMKIT_FUZZ_KNOWN_BUGS (a comma-separated list of ids, or "all") makes a harness accept the
// buggy outcome instead, so the fuzzer can get past it; replays never set it.
#pragma once

#include <cstdlib>
#include <cstring>

namespace hmmkit::fuzz {

inline bool KnownBugTolerated(const char* id) {
  static const char* const env = std::getenv("HMMKIT_FUZZ_KNOWN_BUGS");
  if (env == nullptr) return false;
  if (std::strcmp(env, "all") == 0) return true;
  const size_t n = std::strlen(id);
  for (const char* p = std::strstr(env, id); p != nullptr; p = std::strstr(p + 1, id))
    if ((p == env || p[-1] == ',') && (p[n] == '\0' || p[n] == ',')) return true;
  return false;
}

}  // namespace hmmkit::fuzz
