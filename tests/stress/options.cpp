#include "options.hpp"

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace stress {

namespace {

[[noreturn]] void Usage(const char* why) {
  std::fprintf(stderr,
               "hmmkit_stress: %s\n"
               "usage: hmmkit_stress [--seed S | --base-seed B] [--seeds N] [--seconds S | "
               "--minutes M]\n"
               "                     [--ops N] [--inject] [--verbose] [--digest] [--no-interpose]\n"
               "                     [--device-mib N] [--step-timeout S] [--corrupt-at N]\n"
               "                     [--hang-at N]\n",
               why);
  std::exit(2);
}

uint64_t ParseU64(const char* flag, const char* text) {
  char* end = nullptr;
  errno = 0;
  const unsigned long long v = std::strtoull(text, &end, 0);
  if (errno || end == text || *end) Usage(flag);
  return v;
}

double ParseDouble(const char* flag, const char* text) {
  char* end = nullptr;
  const double v = std::strtod(text, &end);
  if (end == text || *end || v < 0) Usage(flag);
  return v;
}

}  // namespace

Options ParseOptions(int argc, char** argv) {
  Options o;
  o.base_seed = static_cast<uint64_t>(std::chrono::system_clock::now().time_since_epoch() /
                                      std::chrono::microseconds(1));
  for (int i = 1; i < argc; ++i) {
    const char* a = argv[i];
    auto value = [&]() -> const char* {
      if (i + 1 >= argc) Usage(a);
      return argv[++i];
    };
    if (!std::strcmp(a, "--seed")) {
      o.has_seed = true;
      o.seed = ParseU64(a, value());
    } else if (!std::strcmp(a, "--base-seed")) {
      o.base_seed = ParseU64(a, value());
    } else if (!std::strcmp(a, "--seeds")) {
      o.seeds = ParseU64(a, value());
    } else if (!std::strcmp(a, "--seconds")) {
      o.seconds = ParseDouble(a, value());
    } else if (!std::strcmp(a, "--minutes")) {
      o.seconds = 60 * ParseDouble(a, value());
    } else if (!std::strcmp(a, "--ops")) {
      o.ops = ParseU64(a, value());
    } else if (!std::strcmp(a, "--device-mib")) {
      o.device_mib = ParseU64(a, value());
    } else if (!std::strcmp(a, "--step-timeout")) {
      o.step_timeout = ParseDouble(a, value());
    } else if (!std::strcmp(a, "--corrupt-at")) {
      o.corrupt_at = int64_t(ParseU64(a, value()));
    } else if (!std::strcmp(a, "--hang-at")) {
      o.hang_at = int64_t(ParseU64(a, value()));
    } else if (!std::strcmp(a, "--inject")) {
      o.inject = true;
    } else if (!std::strcmp(a, "--verbose")) {
      o.verbose = true;
    } else if (!std::strcmp(a, "--digest")) {
      o.digest = true;
    } else if (!std::strcmp(a, "--no-interpose")) {
      o.interpose = false;
    } else {
      Usage(a);
    }
  }
  if (o.ops == 0) Usage("--ops must be at least 1");
  if (o.device_mib == 0 || o.device_mib % 2) Usage("--device-mib must be a positive multiple of 2");
  if (o.has_seed) o.seeds = 1;
  if (o.seeds == 0 && o.seconds == 0) o.seeds = 1;
  return o;
}

}  // namespace stress
