// hmmctl: hmmkit's command-line tool. `hmmctl <command> [options]`; `hmmctl --help` lists commands.
// Exit codes: 0 ok, 1 failure, 2 usage error.
#include <cstdio>
#include <span>
#include <string_view>

#include "hmmctl.hpp"

#if HMMKIT_HMMCTL_BENCH
#include "bench_suite.hpp"
#endif

namespace hmmkit::hmmctl {
namespace {

#if HMMKIT_HMMCTL_BENCH
int BenchMain(std::span<char* const> args) {
  return bench::BenchMain(args);
}
void BenchUsage(FILE* out, const char* indent) {
  bench::BenchUsage(out, indent);
}
#else
int BenchMain(std::span<char* const>) {
  std::fprintf(stderr,
               "hmmctl bench: this hmmctl was built without the benchmark suite "
               "(configure with HMMKIT_BUILD_TESTS=ON and HMMKIT_BUILD_BENCH=ON)\n");
  return kExitFailure;
}
void BenchUsage(FILE* out, const char* indent) {
  std::fprintf(out, "%s(not built into this hmmctl: HMMKIT_BUILD_BENCH=OFF)\n", indent);
}
#endif

struct Command {
  const char* name;
  const char* summary;
  int (*main)(std::span<char* const> args);
  void (*usage)(FILE* out, const char* indent);
};

constexpr Command kCommands[] = {
    {"info", "what the running kernel offers and which mechanism hmmkit uses for each feature",
     InfoMain, InfoUsage},
    {"run", "run a sample with its counters (and optionally a trace and a residency heatmap)",
     RunMain, RunUsage},
    {"stats", "the counters of the last run or of a live process (HMMKIT_STATS=1)", StatsMain,
     StatsUsage},
    {"trace", "record a Chrome trace of a sample; summarize it; draw its residency heatmap",
     TraceMain, TraceUsage},
    {"bench", "the benchmark suite: every metric as a ratio to a baseline measured in the same run",
     BenchMain, BenchUsage},
};

void Usage(FILE* out) {
  std::fprintf(out, "usage: hmmctl <command> [options]\n       hmmctl --help\n\ncommands:\n");
  for (const Command& c : kCommands) {
    std::fprintf(out, "  %-6s %s\n", c.name, c.summary);
    c.usage(out, "         ");
  }
  std::fprintf(
      out,
      "\nenvironment:\n"
      "  HMMKIT_LOG=level        trace, debug, info, warn (default), error, off\n"
      "  HMMKIT_DISABLE=a,b      force fallbacks: pagemap_scan, procmap_query, "
      "madv_populate,\n"
      "                          uffdio_move, uffd_wp, dev_userfaultfd\n"
      "  HMMKIT_INTERPOSE=1      synchronous munmap/mremap/madvise/mprotect notifications\n"
      "                          (needs libhmmkit_interpose linked or preloaded)\n"
      "  HMMKIT_STATS=1          publish counters in HMMKIT_STATS_DIR (see hmmctl stats)\n"
      "  HMMKIT_TRACE=out.json   record a Chrome trace, written at exit (see hmmctl trace)\n"
      "  HMMKIT_SAMPLES_DIR=dir  where hmmctl run looks for samples first\n"
      "\n`hmmctl COMMAND --help` describes a command. Options take their value as\n"
      "`--name value` or `--name=value`; --json prints data as one JSON object.\n"
      "\nexit status: 0 ok; 1 failure (a sample that failed, an unreadable or malformed\n"
      "file); 2 usage error (bad option, unknown command, unknown sample)\n");
}

int Main(std::span<char* const> args) {
  if (args.empty()) {
    Usage(stderr);
    return kExitUsage;
  }
  std::string_view cmd = args[0];
  if (cmd == "--help" || cmd == "-h" || cmd == "help") {
    Usage(stdout);
    return kExitOk;
  }
  for (const Command& c : kCommands) {
    if (cmd == c.name) return c.main(args.subspan(1));
  }
  std::fprintf(stderr, "hmmctl: unknown command '%.*s'\n\n", int(cmd.size()), cmd.data());
  Usage(stderr);
  return kExitUsage;
}

}  // namespace
}  // namespace hmmkit::hmmctl

int main(int argc, char** argv) {
  std::span<char* const> args(argv, size_t(argc));
  return hmmkit::hmmctl::Main(args.empty() ? args : args.subspan(1));
}
