// Synthetic hmmkit traces and stats files written per the contract (docs/hmmctl.md), so hmmctl is
// tested without the library producing them.
#pragma once

#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace hmmkit::hmmctl::testing {

inline constexpr uint64_t kPage = 4096;

inline std::string HexAddr(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "\"0x%" PRIx64 "\"", v);
  return buf;
}

inline std::string Us(double us) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.3f", us);
  return buf;
}

/// Builds the trace JSON text event by event (tid 1 "cpu fault handler", 2 "mmu notifier",
/// 3 "device emu-svm0", 4 "dma cpu0").
class TraceBuilder {
 public:
  TraceBuilder& Migrate(double ts, uint64_t start, uint64_t end, const char* dir,
                        const char* cause = "fault", double dur = 1) {
    return Duration("migrate", "migrate", 3, ts, dur,
                    "\"start\":" + HexAddr(start) + ",\"end\":" + HexAddr(end) +
                        ",\"pages\":" + std::to_string((end - start) / kPage) +
                        ",\"bytes\":" + std::to_string(end - start) + ",\"dir\":\"" + dir +
                        "\",\"cause\":\"" + cause + "\"");
  }
  TraceBuilder& MapRemote(double ts, uint64_t start, uint64_t end) {
    return Ranged("map_remote", "map", 3, ts, start, end, "");
  }
  TraceBuilder& CpuFault(double ts, uint64_t start, uint64_t end) {
    return Ranged("cpu_fault", "fault", 1, ts, start, end, ",\"write\":0");
  }
  TraceBuilder& Evict(double ts, uint64_t start, uint64_t end) {
    return Ranged("evict", "evict", 3, ts, start, end, "");
  }
  TraceBuilder& Ranged(const char* name, const char* cat, int tid, double ts, uint64_t start,
                       uint64_t end, const std::string& more) {
    return Duration(name, cat, tid, ts, 1,
                    "\"start\":" + HexAddr(start) + ",\"end\":" + HexAddr(end) +
                        ",\"pages\":" + std::to_string((end - start) / kPage) + more);
  }
  TraceBuilder& Invalidate(double ts, uint64_t start, uint64_t end, const char* kind) {
    return Instant("invalidate", "invalidate", 2, ts,
                   "\"event\":\"" + std::string(kind) + "\",\"start\":" + HexAddr(start) +
                       ",\"end\":" + HexAddr(end));
  }
  TraceBuilder& Thrash(double ts, uint64_t start, uint64_t end, double pin_ms) {
    return Instant(
        "thrash", "policy", 3, ts,
        "\"start\":" + HexAddr(start) + ",\"end\":" + HexAddr(end) + ",\"pin_ms\":" + Us(pin_ms));
  }
  TraceBuilder& FaultBatch(double ts, double dur, uint64_t start, uint64_t end, int faults) {
    return Duration("device_fault_batch", "fault", 3, ts, dur,
                    "\"faults\":" + std::to_string(faults) + ",\"start\":" + HexAddr(start) +
                        ",\"end\":" + HexAddr(end) + ",\"pages\":" + std::to_string(faults) +
                        ",\"write\":1");
  }
  TraceBuilder& Dma(double ts, double dur, uint64_t bytes) {
    return Duration("dma_copy", "dma", 4, ts, dur,
                    "\"bytes\":" + std::to_string(bytes) + ",\"dir\":\"h2d\",\"pieces\":1");
  }
  TraceBuilder& Dropped(uint64_t n) {
    dropped_ = n;
    return *this;
  }

  TraceBuilder& Duration(const char* name, const char* cat, int tid, double ts, double dur,
                         const std::string& args) {
    events_.push_back("{\"ph\":\"X\",\"name\":\"" + std::string(name) + "\",\"cat\":\"" + cat +
                      "\",\"pid\":42,\"tid\":" + std::to_string(tid) + ",\"ts\":" + Us(ts) +
                      ",\"dur\":" + Us(dur) + ",\"args\":{" + args + ",\"future_arg\":[1,2]}}");
    return *this;
  }
  TraceBuilder& Instant(const char* name, const char* cat, int tid, double ts,
                        const std::string& args) {
    events_.push_back("{\"ph\":\"i\",\"s\":\"t\",\"name\":\"" + std::string(name) +
                      "\",\"cat\":\"" + cat + "\",\"pid\":42,\"tid\":" + std::to_string(tid) +
                      ",\"ts\":" + Us(ts) + ",\"args\":{" + args + "}}");
    return *this;
  }

  std::string Text() const {
    std::string s =
        "{\"displayTimeUnit\":\"ns\",\n\"otherData\":{\"hmmkit_trace_version\":1,"
        "\"pid\":42,\"page_size\":4096,\"events\":" +
        std::to_string(events_.size()) + ",\"dropped\":" + std::to_string(dropped_) +
        ",\"ring_capacity\":1048576,\"unknown_key\":{\"x\":null}},\n\"traceEvents\":[\n";
    s += "{\"ph\":\"M\",\"name\":\"process_name\",\"pid\":42,\"tid\":0,\"args\":{\"name\":"
         "\"hmmkit synthetic\"}}";
    const char* tracks[] = {"cpu fault handler", "mmu notifier", "device emu-svm0", "dma cpu0"};
    for (int t = 1; t <= 4; ++t) {
      s += ",\n{\"ph\":\"M\",\"name\":\"thread_name\",\"pid\":42,\"tid\":" + std::to_string(t) +
           ",\"args\":{\"name\":\"" + tracks[t - 1] + "\"}}";
      s += ",\n{\"ph\":\"M\",\"name\":\"thread_sort_index\",\"pid\":42,\"tid\":" +
           std::to_string(t) + ",\"args\":{\"sort_index\":" + std::to_string(t) + "}}";
    }
    for (const std::string& e : events_) s += ",\n" + e;
    return s + "\n]}\n";
  }

 private:
  std::vector<std::string> events_;
  uint64_t dropped_ = 0;
};

/// A stats file per the contract.
inline std::string StatsText(long pid, const char* program, bool final, uint64_t faults,
                             uint64_t to_device) {
  return "{\"hmmkit_stats_version\":1,\"pid\":" + std::to_string(pid) + ",\"program\":\"" +
         program + "\",\"time_unix_ms\":1763783445000,\"final\":" + (final ? "true" : "false") +
         ",\"devices\":[{\"name\":\"emu-svm0\",\"backend\":\"emulated\",\"counters\":{"
         "\"device_faults\":" +
         std::to_string(faults) +
         ",\"fault_batches\":3,\"bytes_to_device\":" + std::to_string(to_device) +
         ",\"bytes_to_system\":8192,\"cpu_faults\":1,\"remote_maps\":0,\"thrashing_events\":0,"
         "\"evictions\":0,\"pages_prefetched\":0,\"counter_promotions\":0,\"atomics\":0}}],"
         "\"monitor\":{\"events\":5},\"trace\":{\"enabled\":false,\"events\":0,\"dropped\":0},"
         "\"future\":1}\n";
}

}  // namespace hmmkit::hmmctl::testing
