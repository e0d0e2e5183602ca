// hmmctl subcommands. Each takes the arguments after its name and returns the process exit code:
// 0 success, 1 failure, 2 usage error (the subcommand prints its own message to stderr).
#pragma once

#include <cstdio>
#include <span>

namespace hmmkit::hmmctl {

inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;
inline constexpr int kExitUsage = 2;

// `hmmctl info [--json]`: kernel features, the mechanism chosen for each hmmkit feature, and what
// HMMKIT_DISABLE forced off.
int InfoMain(std::span<char* const> args);
void InfoUsage(FILE* out, const char* indent);

}  // namespace hmmkit::hmmctl
