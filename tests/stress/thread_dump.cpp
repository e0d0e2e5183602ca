// Hang report: /proc's view of each thread, then gdb's backtraces when gdb is installed.
#include "thread_dump.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

namespace stress {
namespace {

std::string ReadFirstLine(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

bool OnPath(const char* prog) {
  const char* path = std::getenv("PATH");
  if (!path) return false;
  std::string dirs = path;
  size_t at = 0;
  while (at <= dirs.size()) {
    const size_t end = std::min(dirs.find(':', at), dirs.size());
    const std::string candidate = dirs.substr(at, end - at) + "/" + prog;
    if (::access(candidate.c_str(), X_OK) == 0) return true;
    at = end + 1;
  }
  return false;
}

void PrintProcView() {
  std::fprintf(stderr, "threads (/proc/self/task: tid name wchan syscall):\n");
  DIR* d = ::opendir("/proc/self/task");
  if (!d) return;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    const std::string task = std::string("/proc/self/task/") + e->d_name;
    std::fprintf(stderr, "  %s %s %s [%s]\n", e->d_name, ReadFirstLine(task + "/comm").c_str(),
                 ReadFirstLine(task + "/wchan").c_str(), ReadFirstLine(task + "/syscall").c_str());
  }
  ::closedir(d);
}

// Whether a gdb line is worth printing: thread headers, each thread's innermost frame (what it
// waits in), and frames in code outside the system's libraries (ours). Keeps a report of a dozen
// threads readable in a CI log.
bool Keep(const std::string& line) {
  if (line.starts_with("Thread ")) return true;
  if (!line.starts_with('#')) return false;
  if (line.starts_with("#0 ")) return true;
  const size_t at = line.rfind(" at ");
  if (at == std::string::npos) return false;
  const std::string file = line.substr(at + 4);
  return !file.starts_with("/usr/") && !file.starts_with("./") && !file.starts_with("../");
}

// "#5  0x... in NAME (args...) at FILE:LINE" -> "#5  NAME at FILE:LINE", the name cut to 100.
std::string Compact(const std::string& line) {
  if (!line.starts_with('#')) return line;
  const size_t number_end = line.find(' ');
  size_t name = line.find_first_not_of(' ', number_end);
  if (const size_t in = line.find(" in ", name);
      line.compare(name, 2, "0x") == 0 && in != std::string::npos)
    name = in + 4;
  const size_t at = line.rfind(" at ");
  const size_t args = line.find(" (", name);
  const size_t name_end = std::min(args, at);
  std::string fn =
      line.substr(name, name_end == std::string::npos ? std::string::npos : name_end - name);
  if (fn.size() > 100) fn = fn.substr(0, 97) + "...";
  return line.substr(0, number_end) + "  " + fn + (at == std::string::npos ? "" : line.substr(at));
}

// gdb's backtraces of every thread, filtered (Keep, Compact); gdb is killed after 60 s (timeout)
// so a stuck debugger cannot hide the report.
void PrintGdbBacktraces() {
  if (!OnPath("gdb")) {
    std::fprintf(stderr, "(no gdb on PATH: no backtraces)\n");
    return;
  }
  const std::string pid = std::to_string(::getpid());
  int out[2];
  if (::pipe2(out, O_CLOEXEC) != 0) return;
  std::fflush(stderr);
  // posix_spawn, not fork: fork runs the atfork handlers, and hmmkit's evicts device pages, which
  // waits on the very migrations that may be hung.
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, out[1], STDOUT_FILENO);
  posix_spawn_file_actions_adddup2(&actions, out[1], STDERR_FILENO);
  const char* argv[] = {"timeout",
                        "-s",
                        "KILL",
                        "60",
                        "gdb",
                        "-batch",
                        "-nx",
                        "-p",
                        pid.c_str(),
                        "-ex",
                        "thread apply all bt 32",
                        nullptr};
  pid_t child = -1;
  const int err =
      ::posix_spawnp(&child, "timeout", &actions, nullptr, const_cast<char* const*>(argv), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (err != 0) {
    ::close(out[0]);
    ::close(out[1]);
    std::fprintf(stderr, "(cannot start gdb: %s)\n", std::strerror(err));
    return;
  }
  ::close(out[1]);
  std::fprintf(stderr,
               "backtraces (gdb; libc and libstdc++ frames left out but each innermost):\n");
  FILE* in = ::fdopen(out[0], "r");
  if (!in) {
    ::close(out[0]);
  } else {
    char* buf = nullptr;
    size_t cap = 0;
    ssize_t n;
    while ((n = ::getline(&buf, &cap, in)) > 0) {
      std::string line(buf, size_t(n));
      while (!line.empty() && line.back() == '\n') line.pop_back();
      if (Keep(line)) std::fprintf(stderr, "  %s\n", Compact(line).c_str());
    }
    std::free(buf);
    std::fclose(in);
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  if (WIFEXITED(status) && WEXITSTATUS(status) == 128 + SIGKILL)
    std::fprintf(stderr, "(gdb did not finish in 60 s)\n");
}

}  // namespace

void AllowThreadDump() {
#ifdef PR_SET_PTRACER
  ::prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0);
#endif
}

void DumpThreads() {
  PrintProcView();
  PrintGdbBacktraces();
  std::fflush(stderr);
}

}  // namespace stress
