// The hmmctl binary, run as a child: exit codes, help, and the data commands on synthetic files.
// The end-to-end test (a real sample with a trace) skips when the library writes no trace yet.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "json_reader.hpp"
#include "png_decode.hpp"
#include "synthetic_trace.hpp"

#ifndef HMMCTL_BIN
#error "HMMCTL_BIN must name the hmmctl binary"
#endif

namespace hmmkit::hmmctl {
namespace {

namespace fs = std::filesystem;
using testing::kPage;
using testing::TraceBuilder;

struct Ran {
  int code = -1;
  std::string out, err;
};

std::string Slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

// A scratch directory removed at the end of the test.
class Scratch {
 public:
  Scratch() {
    std::string templ = (fs::temp_directory_path() / "hmmctl-test-XXXXXX").string();
    EXPECT_NE(mkdtemp(templ.data()), nullptr);
    dir_ = templ;
  }
  ~Scratch() {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  std::string operator/(const std::string& name) const { return dir_ + "/" + name; }
  std::string Write(const std::string& name, const std::string& text) const {
    std::ofstream(dir_ + "/" + name, std::ios::binary) << text;
    return dir_ + "/" + name;
  }
  const std::string& path() const { return dir_; }

 private:
  std::string dir_;
};

// Runs hmmctl with `args` (and `env` added), stdout and stderr captured.
Ran Hmmctl(const std::vector<std::string>& args, const std::vector<std::string>& env = {}) {
  Scratch io;
  const std::string out = io / "out", err = io / "err";
  std::vector<std::string> argv_s = {HMMCTL_BIN};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  const pid_t pid = fork();
  if (pid == 0) {
    const int o = open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    const int e = open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (o < 0 || e < 0 || dup2(o, 1) < 0 || dup2(e, 2) < 0) _exit(126);
    for (const std::string& kv : env) putenv(const_cast<char*>(kv.c_str()));
    execv(argv[0], argv.data());
    _exit(127);
  }
  Ran r;
  int status = 0;
  EXPECT_EQ(waitpid(pid, &status, 0), pid);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = Slurp(out);
  r.err = Slurp(err);
  return r;
}

json::Value ParseJson(const std::string& text) {
  json::Value v;
  std::string error;
  EXPECT_TRUE(json::Parse(text, &v, &error)) << error << "\n" << text;
  return v;
}

TEST(HmmctlCli, HelpListsCommandsAndExitCodes) {
  const Ran r = Hmmctl({"--help"});
  EXPECT_EQ(r.code, 0);
  for (const char* word : {"info", "run", "stats", "trace", "bench", "exit status"})
    EXPECT_NE(r.out.find(word), std::string::npos) << word;
}

TEST(HmmctlCli, EveryCommandHasHelp) {
  const std::vector<std::vector<std::string>> cmds = {{"info"},
                                                      {"run"},
                                                      {"stats"},
                                                      {"trace"},
                                                      {"trace", "record"},
                                                      {"trace", "summary"},
                                                      {"trace", "heatmap"}};
  for (std::vector<std::string> c : cmds) {
    c.push_back("--help");
    const Ran r = Hmmctl(c);
    EXPECT_EQ(r.code, 0) << c[0] << " " << c[1];
    EXPECT_NE(r.out.find("usage"), std::string::npos) << c[0] << " " << c[1];
  }
}

TEST(HmmctlCli, UsageErrorsExitTwo) {
  EXPECT_EQ(Hmmctl({"frobnicate"}).code, 2);
  EXPECT_EQ(Hmmctl({}).code, 2);
  EXPECT_EQ(Hmmctl({"trace"}).code, 2);
  EXPECT_EQ(Hmmctl({"trace", "frob"}).code, 2);
  EXPECT_EQ(Hmmctl({"stats", "--bogus"}).code, 2);
  EXPECT_EQ(Hmmctl({"stats", "--pid"}).code, 2);  // missing value
  EXPECT_EQ(Hmmctl({"trace", "heatmap", "x.json", "-o", "x.gif"}).code, 2);
  EXPECT_EQ(Hmmctl({"trace", "heatmap", "x.json", "-o", "x.png", "--width", "0"}).code, 2);
  EXPECT_EQ(Hmmctl({"run"}).code, 2);
}

TEST(HmmctlCli, UnknownSampleExitsTwoWithTheList) {
  const Ran r = Hmmctl({"run", "no_such_sample"});
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("unknown sample 'no_such_sample'"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("samples:"), std::string::npos) << r.err;
}

TEST(HmmctlCli, RunReportsTheChildsExitStatus) {
  // A path runs as given; /bin/true and /bin/false open no device, so there are no counters.
  const Ran ok = Hmmctl({"run", "--json", "/bin/true"});
  EXPECT_EQ(ok.code, 0) << ok.err;
  const json::Value v = ParseJson(ok.out);
  EXPECT_EQ(v.NumberAt("exit_code", -1), 0);
  EXPECT_EQ(v.Find("stats")->type, json::Type::kNull);
  const Ran bad = Hmmctl({"run", "/bin/false"});
  EXPECT_EQ(bad.code, 1);
  EXPECT_NE(bad.out.find("exited with status 1"), std::string::npos) << bad.out;
  // Arguments after -- reach the sample.
  const Ran sh = Hmmctl({"run", "--json", "/bin/sh", "--", "-c", "exit 3"});
  EXPECT_EQ(sh.code, 1);
  EXPECT_EQ(ParseJson(sh.out).NumberAt("exit_code", -1), 3);
}

TEST(HmmctlCli, RunReadsTheChildsFinalStats) {
  // A stand-in sample that writes last.json where HMMKIT_STATS_DIR points, as the library does.
  Scratch s;
  const std::string script = s.Write("fake_sample",
                                     "#!/bin/sh\n[ \"$HMMKIT_STATS\" = 1 ] || exit 9\ncat > "
                                     "\"$HMMKIT_STATS_DIR/last.json\" <<'EOF'\n" +
                                         testing::StatsText(77, "fake", true, 123, 4096) + "EOF\n");
  fs::permissions(script, fs::perms::owner_all);
  const Ran r = Hmmctl({"run", "fake_sample", "--json"}, {"HMMKIT_SAMPLES_DIR=" + s.path()});
  ASSERT_EQ(r.code, 0) << r.err;
  const json::Value v = ParseJson(r.out);
  const json::Value* stats = v.Find("stats");
  ASSERT_TRUE(stats && stats->is_object()) << r.out;
  EXPECT_EQ(stats->Find("devices")->items[0].Find("counters")->NumberAt("device_faults"), 123);
  const Ran list = Hmmctl({"run", "--list"}, {"HMMKIT_SAMPLES_DIR=" + s.path()});
  EXPECT_EQ(list.code, 0);
  EXPECT_NE(list.out.find("fake_sample"), std::string::npos) << list.out;
}

TEST(HmmctlCli, StatsOfAFile) {
  Scratch s;
  const std::string f = s.Write("x.json", testing::StatsText(1234, "vector_add", true, 42, 8192));
  const Ran text = Hmmctl({"stats", "--file", f});
  EXPECT_EQ(text.code, 0) << text.err;
  EXPECT_NE(text.out.find("vector_add (pid 1234): final"), std::string::npos) << text.out;
  EXPECT_NE(text.out.find("device_faults"), std::string::npos) << text.out;
  const Ran js = Hmmctl({"stats", "--file=" + f, "--json"});
  EXPECT_EQ(js.code, 0);
  const json::Value v = ParseJson(js.out);
  EXPECT_EQ(v.Find("devices")->items[0].Find("counters")->NumberAt("bytes_to_device"), 8192);
  EXPECT_EQ(Hmmctl({"stats", "--file", s / "missing.json"}).code, 1);
  const std::string bad = s.Write("bad.json", "{\"hmmkit_stats_version\":1,");
  const Ran r = Hmmctl({"stats", "--file", bad});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("offset 26"), std::string::npos) << r.err;
}

TEST(HmmctlCli, StatsOfADirectory) {
  Scratch s;
  s.Write("last.json", testing::StatsText(5, "stencil", true, 7, 0));
  const Ran last = Hmmctl({"stats", "--dir", s.path(), "--json"});
  EXPECT_EQ(last.code, 0) << last.err;
  EXPECT_EQ(ParseJson(last.out).StringAt("program"), "stencil");
  // Two live processes (this test and its parent): listed, not chosen.
  s.Write(std::to_string(getpid()) + ".json", testing::StatsText(getpid(), "a", false, 1, 0));
  s.Write(std::to_string(getppid()) + ".json", testing::StatsText(getppid(), "b", false, 2, 0));
  const Ran list = Hmmctl({"stats", "--dir", s.path(), "--json"});
  EXPECT_EQ(list.code, 0);
  const json::Value v = ParseJson(list.out);
  ASSERT_NE(v.Find("live"), nullptr) << list.out;
  EXPECT_EQ(v.Find("live")->items.size(), 2U);
  const Ran one = Hmmctl({"stats", "--dir", s.path(), "--pid", std::to_string(getpid())});
  EXPECT_EQ(one.code, 0);
  EXPECT_NE(one.out.find("a (pid"), std::string::npos) << one.out;
}

TEST(HmmctlCli, StatsWatchFollowsAProcessUntilItExits) {
  // Given a live process P (a child blocked in pause()) with a live stats file.
  Scratch s;
  const pid_t p = fork();
  if (p == 0) {
    pause();
    _exit(0);
  }
  ASSERT_GT(p, 0);
  const std::string live =
      s.Write(std::to_string(p) + ".json", testing::StatsText(p, "watched", false, 1, 0));
  // When `stats --watch` follows it...
  const std::string out = s / "watch.out";
  const pid_t w = fork();
  if (w == 0) {
    const int fd = open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0 || dup2(fd, 1) < 0) _exit(126);
    execl(HMMCTL_BIN, HMMCTL_BIN, "stats", "--watch", "--json", "--dir", s.path().c_str(), "--pid",
          std::to_string(p).c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  ASSERT_GT(w, 0);
  // ...and has printed the live counters once, and P then ends as the library ends a process
  // (last.json written, <pid>.json removed)...
  for (int i = 0; i < 3000 && Slurp(out).find('\n') == std::string::npos; ++i) usleep(10000);
  s.Write("last.json", testing::StatsText(p, "watched", true, 99, 0));
  fs::remove(live);
  kill(p, SIGKILL);
  int status = 0;
  ASSERT_EQ(waitpid(p, &status, 0), p);
  // ...then watch exits 0 and its last line is the final counters.
  ASSERT_EQ(waitpid(w, &status, 0), w);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  const std::string text = Slurp(out);
  const size_t first_end = text.find('\n');
  ASSERT_NE(first_end, std::string::npos);
  const json::Value first = ParseJson(text.substr(0, first_end));
  EXPECT_FALSE(first.Find("final")->boolean);
  const size_t last_start = text.rfind('\n', text.size() - 2);
  ASSERT_NE(last_start, std::string::npos) << text;
  const json::Value last = ParseJson(text.substr(last_start + 1));
  EXPECT_TRUE(last.Find("final")->boolean);
  EXPECT_EQ(last.Find("devices")->items[0].Find("counters")->NumberAt("device_faults"), 99);
}

std::string SyntheticTrace() {
  constexpr uint64_t kA = 0x7f0000000000;
  TraceBuilder b;
  b.FaultBatch(0, 5, kA, kA + 8 * kPage, 8)
      .Migrate(5, kA, kA + 8 * kPage, "to_device", "fault", 10)
      .Migrate(20, kA, kA + 2 * kPage, "to_system", "cpu_fault", 4)
      .Migrate(30, kA, kA + 2 * kPage, "to_device", "fault", 4)
      .Migrate(40, kA + 16 * kPage, kA + 20 * kPage, "to_device", "prefetch", 2)
      .CpuFault(19, kA, kA + 2 * kPage)
      .Invalidate(50, kA, kA + 4 * kPage, "unmap")
      .Invalidate(51, kA, kA + 4 * kPage, "mprotect")
      .Invalidate(52, kA, kA + 4 * kPage, "mprotect")
      .Thrash(35, kA, kA + 2 * kPage, 5)
      .Dma(6, 8, 8 * kPage)
      .Dropped(3);
  return b.Text();
}

TEST(HmmctlCli, TraceSummaryJsonCounts) {
  Scratch s;
  const std::string f = s.Write("t.json", SyntheticTrace());
  const Ran r = Hmmctl({"trace", "summary", f, "--json"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("dropped 3 events"), std::string::npos) << r.err;
  const json::Value v = ParseJson(r.out);
  EXPECT_EQ(v.NumberAt("events"), 11);
  EXPECT_EQ(v.NumberAt("dropped"), 3);
  auto name = [&](const std::string& n) -> const json::Value* {
    for (const json::Value& e : v.Find("names")->items)
      if (e.StringAt("name") == n) return &e;
    return nullptr;
  };
  ASSERT_NE(name("migrate"), nullptr);
  EXPECT_EQ(name("migrate")->NumberAt("count"), 4);
  EXPECT_DOUBLE_EQ(name("migrate")->NumberAt("total_us"), 20);
  EXPECT_DOUBLE_EQ(name("migrate")->NumberAt("max_us"), 10);
  EXPECT_DOUBLE_EQ(name("migrate")->NumberAt("mean_us"), 5);
  EXPECT_EQ(name("invalidate")->NumberAt("count"), 3);
  double to_device_fault_pages = -1, prefetch_bytes = -1;
  for (const json::Value& m : v.Find("migrations")->items) {
    if (m.StringAt("dir") == "to_device" && m.StringAt("cause") == "fault")
      to_device_fault_pages = m.NumberAt("pages");
    if (m.StringAt("cause") == "prefetch") prefetch_bytes = m.NumberAt("bytes");
  }
  EXPECT_EQ(to_device_fault_pages, 10);
  EXPECT_EQ(prefetch_bytes, 4 * 4096);
  EXPECT_EQ(v.Find("invalidations")->NumberAt("mprotect"), 2);
  EXPECT_EQ(v.Find("invalidations")->NumberAt("unmap"), 1);
  EXPECT_EQ(v.Find("thrashing")->NumberAt("events"), 1);
  // The first 64 KiB granule saw 3 migrations and 2 direction changes: the top range.
  const json::Value& top = v.Find("top_ranges")->items.at(0);
  EXPECT_EQ(top.StringAt("start"), "0x7f0000000000");
  EXPECT_EQ(top.NumberAt("migrations"), 3);
  EXPECT_EQ(top.NumberAt("direction_changes"), 2);
  // The device track was busy for the union of its durations: fault batch [0,5) and migrations.
  for (const json::Value& t : v.Find("tracks")->items)
    if (t.StringAt("name") == "device emu-svm0") {
      EXPECT_DOUBLE_EQ(t.NumberAt("busy_us"), 5 + 10 + 4 + 4 + 2);
    }
  const Ran text = Hmmctl({"trace", "summary", f});
  EXPECT_EQ(text.code, 0);
  EXPECT_NE(text.out.find("WARNING: the ring dropped 3 events"), std::string::npos) << text.out;
}

TEST(HmmctlCli, TraceSummaryOfBadFiles) {
  Scratch s;
  const Ran missing = Hmmctl({"trace", "summary", s / "none.json"});
  EXPECT_EQ(missing.code, 1);
  const std::string f = s.Write("bad.json", "{\"traceEvents\":[{\"ph\":\"X\",}]}");
  const Ran bad = Hmmctl({"trace", "summary", f});
  EXPECT_EQ(bad.code, 1);
  EXPECT_NE(bad.err.find("offset 26"), std::string::npos) << bad.err;
}

TEST(HmmctlCli, TraceHeatmapWritesPngAndSvg) {
  Scratch s;
  const std::string f = s.Write("t.json", SyntheticTrace());
  const Ran png = Hmmctl({"trace", "heatmap", f, "-o", s / "h.png", "--width", "100"});
  ASSERT_EQ(png.code, 0) << png.err;
  const std::string bytes = Slurp(s / "h.png");
  testing::DecodedPng d;
  EXPECT_EQ(testing::DecodePng(std::vector<uint8_t>(bytes.begin(), bytes.end()), &d), "");
  EXPECT_GT(d.width, 100U);
  // The spelling.
  const Ran svg = Hmmctl({"trace", "--heatmap", s / "h.svg", f, "--ranges", "all"});
  ASSERT_EQ(svg.code, 0) << svg.err;
  EXPECT_EQ(Slurp(s / "h.svg").rfind("<svg", 0), 0U);
}

TEST(HmmctlCli, EndToEndVectorAddTrace) {
  Scratch s;
  const Ran r = Hmmctl(
      {"run", "vector_add", "--trace", s / "t.json", "--heatmap", s / "h.png", "--", "65536"});
  if (!fs::exists(s / "t.json"))
    GTEST_SKIP() << "vector_add wrote no trace: the library side of HMMKIT_TRACE has not landed "
                    "(hmmctl said: "
                 << r.err << ")";
  ASSERT_EQ(r.code, 0) << r.out << r.err;
  const Ran sum = Hmmctl({"trace", "summary", s / "t.json", "--json"});
  ASSERT_EQ(sum.code, 0) << sum.err;
  const json::Value v = ParseJson(sum.out);
  double migrations = 0;
  for (const json::Value& n : v.Find("names")->items)
    if (n.StringAt("name") == "migrate") migrations = n.NumberAt("count");
  EXPECT_GT(migrations, 0);
  const std::string bytes = Slurp(s / "h.png");
  testing::DecodedPng d;
  EXPECT_EQ(testing::DecodePng(std::vector<uint8_t>(bytes.begin(), bytes.end()), &d), "");
}

}  // namespace
}  // namespace hmmkit::hmmctl
