// `hmmctl run` and `hmmctl trace record`: find a sample, run it as a child with its stats (and
// trace) redirected into a private directory, then report its exit status and final counters.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <thread>

#include "hmmctl.hpp"
#include "json_reader.hpp"
#include "stats_file.hpp"
#include "trace_file.hpp"

namespace hmmkit::hmmctl {

int OptionValue(std::span<char* const> args, size_t* i, std::string_view name, std::string* value,
                const char* cmd) {
  const std::string_view a = args[*i];
  if (a == name) {
    if (*i + 1 >= args.size()) {
      std::fprintf(stderr, "hmmctl %s: %.*s needs a value\n", cmd, int(name.size()), name.data());
      return -1;
    }
    *value = args[++*i];
    return 1;
  }
  if (a.size() > name.size() && a.starts_with(name) && a[name.size()] == '=') {
    *value = std::string(a.substr(name.size() + 1));
    return 1;
  }
  return 0;
}

bool ParsePositive(const std::string& text, std::string_view name, int* out, const char* cmd) {
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno != 0 || v <= 0 || v > 100000) {
    std::fprintf(stderr, "hmmctl %s: %.*s wants a positive number, not '%s'\n", cmd,
                 int(name.size()), name.data(), text.c_str());
    return false;
  }
  *out = int(v);
  return true;
}

namespace {

namespace fs = std::filesystem;

// Where samples are looked for, in order.
std::vector<std::string> SampleDirs() {
  std::vector<std::string> dirs;
  if (const char* d = std::getenv("HMMKIT_SAMPLES_DIR"); d && *d) dirs.emplace_back(d);
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    dirs.push_back((exe.parent_path().parent_path() / "samples").string());  // build tree
    dirs.push_back((exe.parent_path().parent_path() / "libexec" / "hmmkit" / "samples").string());
  }
  return dirs;
}

bool IsExecutableFile(const fs::path& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(p.c_str(), X_OK) == 0;
}

// name -> path of every sample found (the first directory that has a name wins).
std::map<std::string, std::string> ListSamples() {
  std::map<std::string, std::string> out;
  for (const std::string& dir : SampleDirs()) {
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(dir, ec)) {
      if (IsExecutableFile(e.path())) out.emplace(e.path().filename().string(), e.path().string());
    }
  }
  return out;
}

void PrintSampleList(FILE* out) {
  const auto samples = ListSamples();
  std::fprintf(out, "samples:\n");
  for (const auto& [name, path] : samples)
    std::fprintf(out, "  %-16s %s\n", name.c_str(), path.c_str());
  if (samples.empty()) std::fprintf(out, "  none found\n");
  std::fprintf(out, "searched:");
  for (const std::string& d : SampleDirs()) std::fprintf(out, " %s", d.c_str());
  std::fprintf(out, "\n");
}

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

// Ignores SIGINT and SIGQUIT while the child runs (the terminal sends them to it too): we stay
// to report how it ended. Restored on scope exit.
class IgnoreInterrupts {
 public:
  IgnoreInterrupts() {
    struct sigaction ign {};
    ign.sa_handler = SIG_IGN;
    sigaction(SIGINT, &ign, &old_int_);
    sigaction(SIGQUIT, &ign, &old_quit_);
  }
  ~IgnoreInterrupts() {
    sigaction(SIGINT, &old_int_, nullptr);
    sigaction(SIGQUIT, &old_quit_, nullptr);
  }
  IgnoreInterrupts(const IgnoreInterrupts&) = delete;
  IgnoreInterrupts& operator=(const IgnoreInterrupts&) = delete;

 private:
  struct sigaction old_int_ {};
  struct sigaction old_quit_ {};
};

// Waits for the child; on a terminal, redraws a progress line on stderr from its live stats file.
int WaitChild(pid_t pid, const std::string& stats_dir,
              std::chrono::steady_clock::time_point start) {
  const bool progress = isatty(STDERR_FILENO) == 1;
  int status = 0;
  if (!progress) {
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    return status;
  }
  bool drawn = false;
  const std::string live = stats_dir + "/" + std::to_string(pid) + ".json";
  for (;;) {
    const pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid || (r < 0 && errno != EINTR)) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
    const double t = Seconds(start);
    if (t < 1.0) continue;  // short runs get no progress line
    json::Value stats;
    std::string ignored;
    const bool have = LoadStats(live, &stats, &ignored);
    std::fprintf(stderr, "\r\033[K%s", ProgressLine(have ? &stats : nullptr, t).c_str());
    std::fflush(stderr);
    drawn = true;
  }
  if (drawn) std::fprintf(stderr, "\r\033[K");
  return status;
}

// A private directory for the child's stats (and temporary trace); removed with its contents.
class TempDir {
 public:
  bool Create(std::string* error) {
    const char* tmp = std::getenv("TMPDIR");
    std::string templ = std::string(tmp && *tmp ? tmp : "/tmp") + "/hmmctl-run-XXXXXX";
    if (!mkdtemp(templ.data())) {
      *error = templ + ": " + std::strerror(errno);
      return false;
    }
    path_ = templ;
    return true;
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) fs::remove_all(path_, ec);
  }
  TempDir() = default;
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

}  // namespace

int RunSample(const RunRequest& req) {
  const char* cmd = req.command.c_str();
  std::string path;
  if (req.sample.find('/') != std::string::npos) {
    path = req.sample;  // a path: run it as given
  } else {
    const auto samples = ListSamples();
    auto it = samples.find(req.sample);
    if (it == samples.end()) {
      std::fprintf(stderr, "hmmctl %s: unknown sample '%s'\n", cmd, req.sample.c_str());
      PrintSampleList(stderr);
      return kExitUsage;
    }
    path = it->second;
  }
  if (!IsExecutableFile(path)) {
    std::fprintf(stderr, "hmmctl %s: %s is not an executable file\n", cmd, path.c_str());
    return kExitUsage;
  }
  if (!req.heatmap_path.empty() && !req.heatmap_path.ends_with(".png") &&
      !req.heatmap_path.ends_with(".svg")) {
    std::fprintf(stderr, "hmmctl %s: the heatmap file must end in .png or .svg\n", cmd);
    return kExitUsage;
  }
  TempDir dir;
  std::string error;
  if (!dir.Create(&error)) {
    std::fprintf(stderr, "hmmctl %s: cannot create a stats directory: %s\n", cmd, error.c_str());
    return kExitFailure;
  }
  std::string trace = req.trace_path;
  if (trace.empty() && !req.heatmap_path.empty()) trace = dir.path() + "/trace.json";
  if (!trace.empty()) {
    // An old file must not pass for this run's trace.
    if (::unlink(trace.c_str()) != 0 && errno != ENOENT) {
      std::fprintf(stderr, "hmmctl %s: cannot replace %s: %s\n", cmd, trace.c_str(),
                   std::strerror(errno));
      return kExitFailure;
    }
  }

  std::vector<std::string> argv_s = {path};
  argv_s.insert(argv_s.end(), req.args.begin(), req.args.end());
  std::vector<char*> argv;
  for (std::string& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);

  std::fflush(stdout);
  std::fflush(stderr);
  const auto start = std::chrono::steady_clock::now();
  int status = 0;
  pid_t pid = -1;
  {
    IgnoreInterrupts ignore;
    pid = fork();
    if (pid < 0) {
      std::fprintf(stderr, "hmmctl %s: fork: %s\n", cmd, std::strerror(errno));
      return kExitFailure;
    }
    if (pid == 0) {
      // Child: default signal dispositions back, the environment set, then the sample.
      signal(SIGINT, SIG_DFL);
      signal(SIGQUIT, SIG_DFL);
      setenv("HMMKIT_STATS", "1", 1);
      setenv("HMMKIT_STATS_DIR", dir.path().c_str(), 1);
      if (!trace.empty()) setenv("HMMKIT_TRACE", trace.c_str(), 1);
      if (req.json) dup2(STDERR_FILENO, STDOUT_FILENO);  // stdout carries only our JSON
      execv(path.c_str(), argv.data());
      std::fprintf(stderr, "hmmctl %s: cannot run %s: %s\n", cmd, path.c_str(),
                   std::strerror(errno));
      _exit(127);
    }
    status = WaitChild(pid, dir.path(), start);
  }
  const double wall_s = Seconds(start);

  json::Value stats;
  const bool have_stats = LoadStats(dir.path() + "/last.json", &stats, &error);
  std::string stats_note;
  if (!have_stats)
    stats_note =
        "no final counters (the sample opened no device, or its hmmkit publishes no "
        "stats): " +
        error;

  bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
  std::string trace_note;
  uint64_t trace_events = 0, trace_dropped = 0;
  if (!trace.empty()) {
    Trace t;
    if (!LoadTrace(trace, &t, &error)) {
      trace_note = "no trace: " + error;
      ok = false;
    } else {
      trace_events = t.events.size();
      trace_dropped = t.dropped;
      if (!req.heatmap_path.empty()) {
        Heatmap map;
        if (!BuildHeatmap(t, req.heatmap, &map, &error) ||
            !WriteHeatmap(map, req.heatmap_path, &error)) {
          trace_note = "no heatmap: " + error;
          ok = false;
        }
      }
    }
  }

  if (req.json) {
    using json::Value;
    Value args = Value::Arr();
    for (const std::string& a : req.args) args.Push(Value::Str(a));
    Value out = Value::Obj();
    out.Add("sample", Value::Str(req.sample))
        .Add("path", Value::Str(path))
        .Add("args", std::move(args))
        .Add("pid", Value::Num(pid))
        .Add("exit_code", WIFEXITED(status) ? Value::Num(WEXITSTATUS(status)) : Value())
        .Add("signal", WIFSIGNALED(status) ? Value::Num(WTERMSIG(status)) : Value())
        .Add("wall_s", Value::Num(wall_s))
        .Add("stats", have_stats ? std::move(stats) : Value());
    if (!trace.empty()) {
      out.Add("trace", req.trace_path.empty() ? Value() : Value::Str(req.trace_path))
          .Add("trace_events", Value::Num(double(trace_events)))
          .Add("trace_dropped", Value::Num(double(trace_dropped)));
    }
    if (!req.heatmap_path.empty()) out.Add("heatmap", Value::Str(req.heatmap_path));
    if (!trace_note.empty()) out.Add("error", Value::Str(trace_note));
    std::printf("%s\n", json::Write(out, 2).c_str());
  } else {
    if (WIFEXITED(status))
      std::printf("hmmctl: %s exited with status %d after %.3f s\n", req.sample.c_str(),
                  WEXITSTATUS(status), wall_s);
    else if (WIFSIGNALED(status))
      std::printf("hmmctl: %s was killed by signal %d (%s) after %.3f s\n", req.sample.c_str(),
                  WTERMSIG(status), strsignal(WTERMSIG(status)), wall_s);
    if (have_stats)
      std::printf("%s", StatsText(stats).c_str());
    else
      std::printf("  %s\n", stats_note.c_str());
    if (!trace.empty() && trace_note.empty()) {
      if (!req.trace_path.empty())
        std::printf("trace: %s (%llu events, %llu dropped)\n", req.trace_path.c_str(),
                    static_cast<unsigned long long>(trace_events),
                    static_cast<unsigned long long>(trace_dropped));
      if (!req.heatmap_path.empty()) std::printf("heatmap: %s\n", req.heatmap_path.c_str());
    }
  }
  if (!trace_note.empty()) std::fprintf(stderr, "hmmctl %s: %s\n", cmd, trace_note.c_str());
  if (trace_dropped)
    std::fprintf(stderr, "hmmctl %s: warning: the trace ring dropped %llu events\n", cmd,
                 static_cast<unsigned long long>(trace_dropped));
  if (std::fflush(stdout) != 0) return kExitFailure;
  return ok ? kExitOk : kExitFailure;
}

void RunUsage(FILE* out, const char* indent) {
  std::fprintf(out,
               "%shmmctl run SAMPLE [--trace OUT.json] [--heatmap OUT.png|OUT.svg] [--json] "
               "[-- ARGS]\n"
               "%s                     run a sample with HMMKIT_STATS=1, report its counters\n"
               "%shmmctl run --list    the samples found\n",
               indent, indent, indent);
}

int RunMain(std::span<char* const> args) {
  RunRequest req;
  req.command = "run";
  size_t i = 0;
  for (; i < args.size(); ++i) {
    const std::string_view a = args[i];
    std::string value;
    if (a == "--help" || a == "-h") {
      std::printf("usage:\n");
      RunUsage(stdout, "  ");
      std::printf(
          "\nThe sample runs as a child (its output passed through; to stderr with --json) with\n"
          "HMMKIT_STATS=1 and a private HMMKIT_STATS_DIR; its final counters are printed after\n"
          "it exits. --trace keeps the Chrome trace (HMMKIT_TRACE); --heatmap renders the\n"
          "residency heatmap of the trace. Samples are looked up in $HMMKIT_SAMPLES_DIR, next\n"
          "to hmmctl (../samples) and in ../libexec/hmmkit/samples; SAMPLE may also be a path.\n"
          "exit status: 0 the sample succeeded, 1 it failed (or no trace/heatmap), 2 usage or\n"
          "unknown sample.\n");
      return kExitOk;
    }
    if (a == "--list") {
      PrintSampleList(stdout);
      return kExitOk;
    }
    if (a == "--json") {
      req.json = true;
      continue;
    }
    if (a == "--") {
      ++i;
      break;
    }
    int r = OptionValue(args, &i, "--trace", &req.trace_path, "run");
    if (r == 0) r = OptionValue(args, &i, "--heatmap", &req.heatmap_path, "run");
    if (r < 0) return kExitUsage;
    if (r > 0) continue;
    if (a.starts_with("-")) {
      std::fprintf(stderr, "hmmctl run: unknown option '%.*s'\nusage:\n", int(a.size()), a.data());
      RunUsage(stderr, "  ");
      return kExitUsage;
    }
    if (!req.sample.empty()) {
      std::fprintf(stderr,
                   "hmmctl run: one sample only ('%s', then '%.*s'); sample arguments go "
                   "after '--'\n",
                   req.sample.c_str(), int(a.size()), a.data());
      return kExitUsage;
    }
    req.sample = a;
  }
  for (; i < args.size(); ++i) req.args.emplace_back(args[i]);
  if (req.sample.empty()) {
    std::fprintf(stderr, "hmmctl run: which sample?\nusage:\n");
    RunUsage(stderr, "  ");
    PrintSampleList(stderr);
    return kExitUsage;
  }
  return RunSample(req);
}

}  // namespace hmmkit::hmmctl
