// The stats files (docs/tracing.md, "Stats files"): while HMMKIT_STATS=1, the counters of every
// open svm device are published as <dir>/<pid>.json (rewritten at most every 250 ms when they
// changed) and, when the last device closes or the process exits, as <dir>/last.json.
//
// Private to hmmkit::svm. Owned: one per process, never destroyed (the exit hook uses it).
//
// Threads and locks: one background thread per process, only while publishing and a device is
// open. Every method and the thread take mu_; mu_ is taken before any device lock (the thread
// calls PublishedDevice::stats with mu_ held), so a device never calls Add/Remove with one of its
// own locks held. The files are written with mu_ held (a write and the final removal of
// <pid>.json never cross).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "hmmkit/base/mutex.hpp"
#include "hmmkit/base/status.hpp"
#include "hmmkit/mirror/mm_monitor.hpp"
#include "hmmkit/svm.hpp"

namespace hmmkit::svm::detail {

// What the publisher reads of one open device. Both functions are called by the publisher thread
// (or by Remove, on the closing thread, or by the exit hook) with mu_ held; they may take the
// device's locks and must not call back into the publisher.
struct PublishedDevice {
  std::string name;
  std::string backend;                        // "emulated"
  std::function<DeviceStats()> stats;         // required
  std::function<MmMonitor::Stats()> monitor;  // optional: the process's monitor
};

class StatsPublisher {
 public:
  static StatsPublisher& Get();

  // Registers an open device. The settings (HMMKIT_STATS, HMMKIT_STATS_DIR, XDG_RUNTIME_DIR) are
  // read when the first device of a session opens (no device open before). Returns a handle for
  // Remove; 0 when publishing is off (Remove(0) does nothing). Errors (a directory that cannot be
  // created) are logged and turn publishing off for the session: a device never fails to open
  // because of its statistics.
  uint64_t Add(PublishedDevice d);
  // Takes the device's final counters and forgets it; the last one of a session writes
  // last.json, removes <pid>.json and joins the thread. Call it first thing in the device's
  // destructor, while stats() still works.
  void Remove(uint64_t handle);

  // Writes <pid>.json now (tests; the thread does it on its own). Errors: ENODEV when publishing
  // is off or no device is open, the errno of a failed write.
  [[nodiscard]] Status PublishNow();
  // The directory of this session ("" when publishing is off).
  std::string dir();

 private:
  struct Entry {
    uint64_t handle = 0;
    PublishedDevice dev;
    DeviceStats last{};  // the counters of the last collection (final once closed)
    bool open = true;
  };

  StatsPublisher() = default;
  void Loop();
  void AtExit();
  void CollectLocked() REQUIRES(mu_);
  std::string RenderLocked(bool final, bool with_time) REQUIRES(mu_);
  Status WriteLocked(const std::string& file, bool final) REQUIRES(mu_);
  std::thread StopSessionLocked() REQUIRES(mu_);

  Mutex mu_;
  CondVar cv_;
  bool enabled_ GUARDED_BY(mu_) = false;
  std::string dir_ GUARDED_BY(mu_);
  std::vector<Entry> entries_ GUARDED_BY(mu_);  // this session's devices, open or closed
  size_t open_ GUARDED_BY(mu_) = 0;
  uint64_t next_handle_ GUARDED_BY(mu_) = 1;
  bool stop_ GUARDED_BY(mu_) = false;
  bool exit_hook_ GUARDED_BY(mu_) = false;
  MmMonitor::Stats monitor_last_ GUARDED_BY(mu_){};  // of the last collection
  bool have_monitor_ GUARDED_BY(mu_) = false;
  std::string last_written_ GUARDED_BY(mu_);  // counters of the last <pid>.json (no time)
  std::thread thread_ GUARDED_BY(mu_);
};

}  // namespace hmmkit::svm::detail
