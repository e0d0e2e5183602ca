// Tracing and the stats files end to end, on the emulated svm device: what a prefetch, a kernel,
// a CPU touch and an munmap leave in the trace, and the files HMMKIT_STATS=1 writes.
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "hmmkit/base/trace.hpp"
#include "hmmkit/svm.hpp"
#include "stats_publisher.hpp"
#include "test_support.hpp"
#include "trace_checker.hpp"

namespace hmmkit::test {
namespace {

using svm::Device;
using svm::KernelContext;

std::unique_ptr<Device> OpenOrSkipReason(std::string* why) {
  svm::DeviceOptions o;
  o.memory_bytes = size_t(16) << 20;
  o.compute_units = 2;
  auto dev = Device::Open(o);
  if (!dev.ok()) {
    *why = dev.status().ToString();
    return nullptr;
  }
  return std::move(*dev);
}

struct Exported {
  JsonValue doc;
  std::vector<TraceEvent> events;
};

void ExportTrace(Exported* out) {
  std::ostringstream s;
  ASSERT_TRUE(trace::WriteChromeJson(s).ok());
  std::string err;
  out->doc = JsonValue{};
  ASSERT_TRUE(ParseJson(s.str(), &out->doc, &err)) << err;
  out->events.clear();
  ASSERT_EQ(CheckTrace(out->doc, &out->events), "");
}

// Tracing off again and the ring empty after the test.
struct TraceOn {
  TraceOn() { EXPECT_TRUE(trace::Enable().ok()); }
  ~TraceOn() {
    trace::Disable();
    trace::Clear();
  }
};

TEST(TraceSvmTest, PrefetchKernelCpuTouchAndUnmapAreTraced) {
  const TraceOn on;
  std::string why;
  std::unique_ptr<Device> dev = OpenOrSkipReason(&why);
  if (!dev) GTEST_SKIP() << why;
  const size_t page = PageSize(), n = 512;
  Mapping buf = Mapping::AlignedAnon(n * page, 2 << 20);
  for (size_t i = 0; i < n; ++i) buf.page(i)[0] = 1;

  // Given a buffer prefetched to the device and a kernel that writes every page of it,
  ASSERT_TRUE(dev->Prefetch(buf.data(), n * page, svm::Location::kDevice).ok());
  const uint64_t prefetched = dev->stats().bytes_to_device / page;
  ASSERT_TRUE(dev->Launch(n,
                          [&](KernelContext& k, size_t i) {
                            k.Store(reinterpret_cast<uint64_t*>(buf.page(i)), uint64_t(i) + 100);
                          })
                  .ok());
  // and a second buffer the device reads without a prefetch (device faults),
  Mapping other = Mapping::AlignedAnon(64 * page, 2 << 20);
  for (size_t i = 0; i < 64; ++i) other.page(i)[0] = 2;
  std::atomic<uint64_t> sum{0};
  ASSERT_TRUE(dev->Launch(64,
                          [&](KernelContext& k, size_t i) {
                            sum += k.Load(reinterpret_cast<const uint8_t*>(other.page(i)));
                          })
                  .ok());
  EXPECT_EQ(sum.load(), 128u);
  // when the CPU reads page 0 back and the last 64 pages are unmapped,
  EXPECT_EQ(*reinterpret_cast<volatile uint64_t*>(buf.page(0)), 100u);
  const uintptr_t unmap_start = buf.addr() + (n - 64) * page, unmap_end = buf.end();
  ASSERT_EQ(::munmap(reinterpret_cast<void*>(unmap_start), unmap_end - unmap_start), 0);

  // then the trace has all of it. The unmap is dispatched by the monitor thread: wait for it.
  Exported x;
  const TraceEvent* unmap = nullptr;
  for (auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);;) {
    ExportTrace(&x);
    for (const TraceEvent& e : x.events)
      if (e.name == "invalidate" && e.Str("event") == "unmap" && e.Hex("start") == unmap_start &&
          e.Hex("end") == unmap_end)
        unmap = &e;
    if (unmap || std::chrono::steady_clock::now() > deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_NE(unmap, nullptr) << "no invalidate(unmap) of exactly the unmapped range";
  EXPECT_EQ(unmap->track, "mmu notifier");

  const std::string device_track = "device " + dev->name();
  std::vector<int> moved(n, 0);
  uint64_t to_device = 0;
  bool cpu_fault = false, fault_batch = false, cpu_migrate = false, dma = false;
  for (const TraceEvent& e : x.events) {
    if (e.name == "migrate") {
      EXPECT_EQ(e.track, device_track);
      EXPECT_EQ(e.Num("bytes"), e.Num("pages") * page);
      EXPECT_EQ(e.Hex("end") - e.Hex("start"), e.Num("pages") * page);
      if (e.Str("dir") == "to_device" && e.Str("cause") == "prefetch" &&
          e.Hex("start") >= buf.addr() && e.Hex("end") <= buf.end()) {
        to_device += e.Num("pages");
        for (uint64_t a = e.Hex("start"); a < e.Hex("end"); a += page)
          moved[(a - buf.addr()) / page]++;
      }
      if (e.Str("dir") == "to_system" && e.Str("cause") == "cpu_fault" &&
          e.Hex("start") <= buf.addr() && buf.addr() < e.Hex("end"))
        cpu_migrate = true;
    }
    if (e.name == "cpu_fault") {
      EXPECT_EQ(e.track, "cpu fault handler");
      if (e.Hex("start") <= buf.addr() && buf.addr() < e.Hex("end")) {
        cpu_fault = true;
        EXPECT_GE(e.Num("pages"), 1u);
        EXPECT_EQ(e.Num("write"), 0u);
      }
    }
    if (e.name == "device_fault_batch") {
      EXPECT_EQ(e.track, device_track);
      EXPECT_GE(e.Num("faults"), e.Num("pages"));
      if (e.Hex("start") >= other.addr() && e.Hex("end") <= other.end()) fault_batch = true;
    }
    if (e.name == "dma_copy") {
      EXPECT_EQ(e.track.rfind("dma cpu", 0), 0u) << e.track;
      dma = true;
    }
  }
  EXPECT_EQ(to_device, n);  // every page exactly once
  EXPECT_EQ(prefetched, n);
  for (size_t i = 0; i < n; ++i) EXPECT_EQ(moved[i], 1) << "page " << i;
  EXPECT_TRUE(cpu_fault);
  EXPECT_TRUE(cpu_migrate);
  EXPECT_TRUE(fault_batch);
  EXPECT_TRUE(dma);
  ::munmap(buf.data(), (n - 64) * page);  // the rest of the partly unmapped buffer
  buf.Release();
}

// ---- stats files -------------------------------------------------------------------------------

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

void ExpectCounters(const JsonValue& c, const svm::DeviceStats& s) {
  EXPECT_EQ(c.at("device_faults").u64(), s.device_faults);
  EXPECT_EQ(c.at("fault_batches").u64(), s.fault_batches);
  EXPECT_EQ(c.at("bytes_to_device").u64(), s.bytes_to_device);
  EXPECT_EQ(c.at("bytes_to_system").u64(), s.bytes_to_system);
  EXPECT_EQ(c.at("cpu_faults").u64(), s.cpu_faults);
  EXPECT_EQ(c.at("remote_maps").u64(), s.remote_maps);
  EXPECT_EQ(c.at("thrashing_events").u64(), s.thrashing_events);
  EXPECT_EQ(c.at("evictions").u64(), s.evictions);
  EXPECT_EQ(c.at("pages_prefetched").u64(), s.pages_prefetched);
  EXPECT_EQ(c.at("counter_promotions").u64(), s.counter_promotions);
  EXPECT_EQ(c.at("atomics").u64(), s.atomics);
}

// Sets the environment for the stats files and restores it.
struct StatsEnv {
  StatsEnv() {
    char tmpl[] = "/tmp/hmmkit-stats-test-XXXXXX";
    dir = ::mkdtemp(tmpl);
    ::setenv("HMMKIT_STATS", "1", 1);
    ::setenv("HMMKIT_STATS_DIR", dir.c_str(), 1);
  }
  ~StatsEnv() {
    ::unsetenv("HMMKIT_STATS");
    ::unsetenv("HMMKIT_STATS_DIR");
    std::remove((dir + "/last.json").c_str());
    std::remove((dir + "/" + std::to_string(::getpid()) + ".json").c_str());
    ::rmdir(dir.c_str());
  }
  std::string dir;
};

TEST(StatsFilesTest, PidFileMatchesDeviceStatsAndLastJsonAppearsAtClose) {
  const StatsEnv env;
  std::string why;
  std::unique_ptr<Device> dev = OpenOrSkipReason(&why);
  if (!dev) GTEST_SKIP() << why;
  ASSERT_EQ(svm::detail::StatsPublisher::Get().dir(), env.dir);
  const size_t page = PageSize();
  Mapping buf = Mapping::AlignedAnon(32 * page, 2 << 20);
  for (size_t i = 0; i < 32; ++i) buf.page(i)[0] = 1;
  ASSERT_TRUE(dev->Launch(32,
                          [&](KernelContext& k, size_t i) {
                            k.Store(reinterpret_cast<uint8_t*>(buf.page(i)), uint8_t(7));
                          })
                  .ok());
  EXPECT_EQ(buf.page(3)[0], 7);  // a CPU fault-back, if the page had moved

  // Given a device with work done, when the publisher writes <pid>.json,
  ASSERT_TRUE(svm::detail::StatsPublisher::Get().PublishNow().ok());
  const svm::DeviceStats now = dev->stats();
  const std::string pid_file = env.dir + "/" + std::to_string(::getpid()) + ".json";
  JsonValue doc;
  std::string err;
  ASSERT_TRUE(ParseJson(ReadFile(pid_file), &doc, &err)) << err;
  // then it names the process and holds the device's counters.
  EXPECT_EQ(doc.at("hmmkit_stats_version").u64(), 1u);
  EXPECT_EQ(doc.at("pid").u64(), uint64_t(::getpid()));
  EXPECT_FALSE(doc.at("final").b);
  ASSERT_EQ(doc.at("devices").arr.size(), 1u);
  const JsonValue& d = doc.at("devices").arr[0];
  EXPECT_EQ(d.at("name").str, dev->name());
  EXPECT_EQ(d.at("backend").str, "emulated");
  EXPECT_GT(now.device_faults, 0u);
  ExpectCounters(d.at("counters"), now);
  EXPECT_TRUE(doc.at("monitor").has("faults"));
  EXPECT_TRUE(doc.at("trace").has("enabled"));

  // When the last device closes, last.json (final) replaces <pid>.json.
  dev.reset();
  EXPECT_NE(::access(pid_file.c_str(), F_OK), 0);
  JsonValue last;
  ASSERT_TRUE(ParseJson(ReadFile(env.dir + "/last.json"), &last, &err)) << err;
  EXPECT_TRUE(last.at("final").b);
  ASSERT_EQ(last.at("devices").arr.size(), 1u);
  ExpectCounters(last.at("devices").arr[0].at("counters"), now);
  EXPECT_EQ(svm::detail::StatsPublisher::Get().PublishNow().errno_value(), ENODEV);
}

TEST(StatsFilesTest, TheThreadWritesThePidFileOnItsOwn) {
  const StatsEnv env;
  std::string why;
  std::unique_ptr<Device> dev = OpenOrSkipReason(&why);
  if (!dev) GTEST_SKIP() << why;
  // Given an open device and no explicit publish, when the publisher's period passes (a bounded
  // wait for the file, not a timing assertion),
  const std::string pid_file = env.dir + "/" + std::to_string(::getpid()) + ".json";
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (::access(pid_file.c_str(), F_OK) != 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  // then <pid>.json is there, not final, naming the device.
  JsonValue doc;
  std::string err;
  ASSERT_TRUE(ParseJson(ReadFile(pid_file), &doc, &err)) << err;
  EXPECT_FALSE(doc.at("final").b);
  ASSERT_EQ(doc.at("devices").arr.size(), 1u);
  EXPECT_EQ(doc.at("devices").arr[0].at("name").str, dev->name());
}

TEST(StatsFilesTest, OffByDefault) {
  ::unsetenv("HMMKIT_STATS");
  std::string why;
  std::unique_ptr<Device> dev = OpenOrSkipReason(&why);
  if (!dev) GTEST_SKIP() << why;
  EXPECT_EQ(svm::detail::StatsPublisher::Get().dir(), "");
  EXPECT_EQ(svm::detail::StatsPublisher::Get().PublishNow().errno_value(), ENODEV);
}

}  // namespace
}  // namespace hmmkit::test
