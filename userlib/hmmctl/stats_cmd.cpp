// `hmmctl stats`: the counters of the last run (last.json) or of a live process (<pid>.json).
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <thread>

#include "hmmctl.hpp"
#include "stats_file.hpp"

namespace hmmkit::hmmctl {
namespace {

bool Alive(long pid) {
  return kill(pid_t(pid), 0) == 0 || errno == EPERM;
}

int Show(const std::string& path, bool json) {
  json::Value stats;
  std::string error;
  if (!LoadStats(path, &stats, &error)) {
    std::fprintf(stderr, "hmmctl stats: %s\n", error.c_str());
    return kExitFailure;
  }
  if (json)
    std::printf("%s\n", json::Write(stats, 2).c_str());
  else
    std::printf("%s", StatsText(stats).c_str());
  return std::fflush(stdout) == 0 ? kExitOk : kExitFailure;
}

// Redraws the counters of `pid` once per second until it exits, then shows its final counters
// when last.json is its own.
int Watch(const std::string& dir, long pid, bool json) {
  const bool tty = isatty(STDOUT_FILENO) == 1;
  const std::string live = dir + "/" + std::to_string(pid) + ".json";
  for (;;) {
    json::Value stats;
    std::string error;
    const bool have = LoadStats(live, &stats, &error);
    if (!have && !Alive(pid)) break;
    if (have) {
      if (json) {
        std::printf("%s\n", json::Write(stats).c_str());  // one object per line
      } else {
        if (tty) std::printf("\033[H\033[2J");
        std::printf("%s%s", StatsText(stats).c_str(), tty ? "" : "\n");
      }
      std::fflush(stdout);
    }
    if (!Alive(pid)) break;
    std::this_thread::sleep_for(std::chrono::seconds(1));
  }
  json::Value last;
  std::string error;
  if (LoadStats(dir + "/last.json", &last, &error) && long(last.NumberAt("pid", 0)) == pid) {
    if (json)
      std::printf("%s\n", json::Write(last).c_str());
    else
      std::printf("%s", StatsText(last).c_str());
  } else if (!json) {
    std::printf("process %ld has exited\n", pid);
  }
  return std::fflush(stdout) == 0 ? kExitOk : kExitFailure;
}

}  // namespace

void StatsUsage(FILE* out, const char* indent) {
  std::fprintf(out,
               "%shmmctl stats [--pid P | --file F | --dir D] [--json] [--watch]\n"
               "%s                     counters of the last run, or of a live process\n",
               indent, indent);
}

int StatsMain(std::span<char* const> args) {
  std::string pid_text, file, dir;
  bool json = false, watch = false;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string_view a = args[i];
    if (a == "--help" || a == "-h") {
      std::printf("usage:\n");
      StatsUsage(stdout, "  ");
      std::printf(
          "\nA process run with HMMKIT_STATS=1 publishes its counters in the stats directory\n"
          "($HMMKIT_STATS_DIR, else ${XDG_RUNTIME_DIR:-/tmp}/hmmkit-UID): <pid>.json while it\n"
          "runs, last.json when it ends. With no option: the only live process, else the list\n"
          "of live processes when there are several, else last.json.\n"
          "  --pid P    the live process P        --file F   a stats file\n"
          "  --dir D    another stats directory   --json     the file's JSON object\n"
          "  --watch    redraw a live process's counters every second until it exits\n"
          "             (with --json: one JSON object per line)\n");
      return kExitOk;
    }
    if (a == "--json") {
      json = true;
      continue;
    }
    if (a == "--watch") {
      watch = true;
      continue;
    }
    int r = OptionValue(args, &i, "--pid", &pid_text, "stats");
    if (r == 0) r = OptionValue(args, &i, "--file", &file, "stats");
    if (r == 0) r = OptionValue(args, &i, "--dir", &dir, "stats");
    if (r < 0) return kExitUsage;
    if (r > 0) continue;
    std::fprintf(stderr, "hmmctl stats: unknown argument '%.*s'\nusage:\n", int(a.size()),
                 a.data());
    StatsUsage(stderr, "  ");
    return kExitUsage;
  }
  if (!pid_text.empty() && !file.empty()) {
    std::fprintf(stderr, "hmmctl stats: --pid and --file exclude each other\n");
    return kExitUsage;
  }
  if (!file.empty()) {
    if (watch) {
      std::fprintf(stderr, "hmmctl stats: --watch follows a process (--pid), not a file\n");
      return kExitUsage;
    }
    return Show(file, json);
  }
  if (dir.empty()) dir = DefaultStatsDir();
  long pid = 0;
  if (!pid_text.empty()) {
    char* end = nullptr;
    pid = std::strtol(pid_text.c_str(), &end, 10);
    if (*end != '\0' || pid <= 0) {
      std::fprintf(stderr, "hmmctl stats: --pid wants a process id, not '%s'\n", pid_text.c_str());
      return kExitUsage;
    }
  } else {
    std::vector<LiveStats> live = ListLiveStats(dir);
    std::erase_if(live, [](const LiveStats& l) { return !l.alive; });
    if (live.size() > 1) {
      if (json) {
        json::Value list = json::Value::Arr();
        for (const LiveStats& l : live)
          list.Push(json::Value::Obj()
                        .Add("pid", json::Value::Num(double(l.pid)))
                        .Add("file", json::Value::Str(l.path)));
        std::printf("%s\n",
                    json::Write(json::Value::Obj().Add("live", std::move(list)), 2).c_str());
      } else {
        std::printf("%zu live processes in %s (choose one with --pid):\n", live.size(),
                    dir.c_str());
        for (const LiveStats& l : live) {
          json::Value s;
          std::string error;
          const bool ok = LoadStats(l.path, &s, &error);
          std::printf("  %8ld  %s\n", l.pid,
                      ok ? std::string(s.StringAt("program", "?")).c_str() : error.c_str());
        }
      }
      return kExitOk;
    }
    if (live.size() == 1) pid = live[0].pid;
  }
  if (pid == 0) {
    if (watch) {
      std::fprintf(stderr, "hmmctl stats: no live process in %s to watch\n", dir.c_str());
      return kExitFailure;
    }
    if (access((dir + "/last.json").c_str(), F_OK) != 0) {
      std::fprintf(stderr,
                   "hmmctl stats: no live process and no last.json in %s (run a program with "
                   "HMMKIT_STATS=1, or use hmmctl run)\n",
                   dir.c_str());
      return kExitFailure;
    }
    return Show(dir + "/last.json", json);
  }
  if (watch) return Watch(dir, pid, json);
  return Show(dir + "/" + std::to_string(pid) + ".json", json);
}

}  // namespace hmmkit::hmmctl
