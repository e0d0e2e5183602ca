// The stats files: settings, the background thread, rendering and atomic writes.
#include "stats_publisher.hpp"

#include <errno.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "hmmkit/base/internal_memory.hpp"
#include "hmmkit/base/json.hpp"
#include "hmmkit/base/log.hpp"
#include "hmmkit/base/trace.hpp"

namespace hmmkit::svm::detail {

namespace {

constexpr auto kPeriod = std::chrono::milliseconds(250);

bool StatsWanted() {
  const char* v = std::getenv("HMMKIT_STATS");
  return v != nullptr && std::string_view(v) == "1";
}

std::string DefaultDir() {
  if (const char* d = std::getenv("HMMKIT_STATS_DIR"); d != nullptr && *d != '\0') return d;
  const char* run = std::getenv("XDG_RUNTIME_DIR");
  return fmt::format("{}/hmmkit-{}", run != nullptr && *run != '\0' ? run : "/tmp", ::getuid());
}

// The directory exists (created 0700 when missing) and is a directory.
Status EnsureDir(const std::string& dir) {
  if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST)
    return Status::FromErrno(errno, "HMMKIT_STATS: creating " + dir);
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) return Status::FromErrno(errno, "HMMKIT_STATS: " + dir);
  if (!S_ISDIR(st.st_mode)) return Status::FromErrno(ENOTDIR, "HMMKIT_STATS: " + dir);
  return Status::Ok();
}

void AppendCounters(fmt::memory_buffer& out, const DeviceStats& s) {
  fmt::format_to(std::back_inserter(out),
                 R"("device_faults":{},"fault_batches":{},"bytes_to_device":{},)"
                 R"("bytes_to_system":{},"cpu_faults":{},"remote_maps":{},"thrashing_events":{},)"
                 R"("evictions":{},"pages_prefetched":{},"counter_promotions":{},"atomics":{})",
                 s.device_faults, s.fault_batches, s.bytes_to_device, s.bytes_to_system,
                 s.cpu_faults, s.remote_maps, s.thrashing_events, s.evictions, s.pages_prefetched,
                 s.counter_promotions, s.atomics);
}

void AppendMonitor(fmt::memory_buffer& out, const MmMonitor::Stats& m) {
  fmt::format_to(std::back_inserter(out),
                 R"("events_unmap":{},"events_remove":{},"events_remove_expected":{},)"
                 R"("events_remap":{},"events_fork":{},"faults":{},"faults_unhandled":{},)"
                 R"("registrations":{},"registration_failures":{},"interposed":{})",
                 m.events_unmap, m.events_remove, m.events_remove_expected, m.events_remap,
                 m.events_fork, m.faults, m.faults_unhandled, m.registrations,
                 m.registration_failures, m.interposed);
}

}  // namespace

StatsPublisher& StatsPublisher::Get() {
  static auto* p = new StatsPublisher();  // never destroyed: the exit hook uses it
  return *p;
}

uint64_t StatsPublisher::Add(PublishedDevice d) {
  MutexLock lock(mu_);
  if (open_ == 0) {  // a new session: read the settings
    entries_.clear();
    last_written_.clear();
    have_monitor_ = false;
    enabled_ = StatsWanted();
    dir_ = enabled_ ? DefaultDir() : std::string();
    if (enabled_) {
      if (Status st = EnsureDir(dir_); !st.ok()) {
        Log().error("{}; statistics files are off", st.ToString());
        enabled_ = false;
        dir_.clear();
      }
    }
  }
  if (!enabled_) return 0;
  if (!exit_hook_) {
    exit_hook_ = true;
    // Registered after the devices' own statics exist: runs before they are destroyed.
    std::atexit([] { Get().AtExit(); });
  }
  const uint64_t handle = next_handle_++;
  entries_.push_back(Entry{handle, std::move(d), {}, true});
  if (open_++ == 0) {
    stop_ = false;
    thread_ = std::thread([this] {
      InternalThreadScope internal(
          "hmmkit-stats");  // like the device's threads: its stack is never migrated
      Loop();
    });
  }
  return handle;
}

void StatsPublisher::Remove(uint64_t handle) {
  if (handle == 0) return;
  std::thread done;
  {
    MutexLock lock(mu_);
    for (Entry& e : entries_) {
      if (e.handle != handle || !e.open) continue;
      e.last = e.dev.stats();
      if (e.dev.monitor) {
        monitor_last_ = e.dev.monitor();
        have_monitor_ = true;
      }
      e.dev.stats = nullptr;  // they may point into the device that is going away
      e.dev.monitor = nullptr;
      e.open = false;
      --open_;
      break;
    }
    if (open_ == 0) done = StopSessionLocked();
  }
  cv_.NotifyAll();
  if (done.joinable()) done.join();
}

// The last device closed (or the process exits): last.json, <pid>.json removed, thread stopped.
std::thread StatsPublisher::StopSessionLocked() {
  CollectLocked();
  Status st = WriteLocked("last.json", /*final=*/true);
  if (!st.ok()) Log().warn("{}", st.ToString());
  ::unlink(fmt::format("{}/{}.json", dir_, ::getpid()).c_str());
  stop_ = true;
  return std::move(thread_);
}

Status StatsPublisher::PublishNow() {
  MutexLock lock(mu_);
  if (!enabled_ || open_ == 0)
    return Status::FromErrno(ENODEV, "HMMKIT_STATS is off or no device is open");
  CollectLocked();
  return WriteLocked(fmt::format("{}.json", ::getpid()), /*final=*/false);
}

std::string StatsPublisher::dir() {
  MutexLock lock(mu_);
  return dir_;
}

void StatsPublisher::Loop() {
  MutexLock lock(mu_);
  for (;;) {
    const auto next = std::chrono::steady_clock::now() + kPeriod;
    cv_.WaitUntil(mu_, next, [&]() REQUIRES(mu_) { return stop_; });
    if (stop_) return;
    CollectLocked();
    const std::string counters = RenderLocked(/*final=*/false, /*with_time=*/false);
    if (counters == last_written_) continue;  // nothing changed
    Status st = WriteLocked(fmt::format("{}.json", ::getpid()), /*final=*/false);
    if (!st.ok()) Log().debug("{}", st.ToString());
  }
}

void StatsPublisher::AtExit() {
  std::thread done;
  {
    MutexLock lock(mu_);
    if (open_ == 0) return;  // written when the last device closed
    done = StopSessionLocked();
    open_ = 0;
  }
  cv_.NotifyAll();
  if (done.joinable()) done.join();
}

void StatsPublisher::CollectLocked() {
  for (Entry& e : entries_) {
    if (!e.open) continue;
    e.last = e.dev.stats();
    if (e.dev.monitor) {
      monitor_last_ = e.dev.monitor();
      have_monitor_ = true;
    }
  }
}

std::string StatsPublisher::RenderLocked(bool final, bool with_time) {
  fmt::memory_buffer out;
  auto o = std::back_inserter(out);
  const long long now_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                               std::chrono::system_clock::now().time_since_epoch())
                               .count();
  fmt::format_to(o, R"({{"hmmkit_stats_version":1,"pid":{},"program":{},"time_unix_ms":{},)",
                 ::getpid(), JsonString(program_invocation_short_name), with_time ? now_ms : 0);
  fmt::format_to(o, R"("final":{},"devices":[)", final ? "true" : "false");
  for (size_t i = 0; i < entries_.size(); ++i) {
    const Entry& e = entries_[i];
    fmt::format_to(o, R"({}{{"name":{},"backend":{},"counters":{{)", i ? "," : "",
                   JsonString(e.dev.name), JsonString(e.dev.backend));
    AppendCounters(out, e.last);
    fmt::format_to(o, "}}}}");
  }
  fmt::format_to(o, R"(],"monitor":{{)");
  if (have_monitor_) AppendMonitor(out, monitor_last_);
  const trace::TraceStats t = trace::Stats();
  fmt::format_to(o, R"(}},"trace":{{"enabled":{},"events":{},"dropped":{}}}}})",
                 t.enabled ? "true" : "false", t.events, t.dropped);
  fmt::format_to(o, "\n");
  return fmt::to_string(out);
}

Status StatsPublisher::WriteLocked(const std::string& file, bool final) {
  const std::string doc = RenderLocked(final, /*with_time=*/true);
  if (!final) last_written_ = RenderLocked(final, /*with_time=*/false);
  const std::string path = fmt::format("{}/{}", dir_, file);
  const std::string tmp = fmt::format("{}/.{}.{}.tmp", dir_, file, ::getpid());
  std::FILE* f = std::fopen(tmp.c_str(), "w");
  if (f == nullptr) return Status::FromErrno(errno, "HMMKIT_STATS: creating " + tmp);
  const bool wrote = std::fwrite(doc.data(), 1, doc.size(), f) == doc.size();
  const int err = errno;
  if (std::fclose(f) != 0 || !wrote) {
    ::unlink(tmp.c_str());
    return Status::FromErrno(wrote ? errno : err, "HMMKIT_STATS: writing " + tmp);
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int rerr = errno;
    ::unlink(tmp.c_str());
    return Status::FromErrno(rerr, "HMMKIT_STATS: renaming to " + path);
  }
  return Status::Ok();
}

}  // namespace hmmkit::svm::detail
