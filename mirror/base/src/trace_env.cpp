// HMMKIT_TRACE / HMMKIT_TRACE_EVENTS: tracing from start-up, the file written at exit.
//
// The initializer below runs during the base library's static initialization. This file defines
// the flag every record site reads, so it is linked into every program that can record.
// The file is written by an atexit handler registered here, early: it runs after main returns
// and after the handlers and static destructors registered later (devices' owners among them).
// A device still open then keeps recording into the ring, which is never freed; the file is a
// snapshot of what was complete when it was written, and recording stops first.
#include <cstdlib>
#include <string>

#include "hmmkit/base/log.hpp"
#include "hmmkit/base/trace.hpp"

namespace hmmkit::trace {

namespace detail {
std::atomic<bool> g_enabled{false};
thread_local Cause t_cause = Cause::kExplicit;
}  // namespace detail

namespace {

std::string& ExitPath() {
  static auto* path = new std::string();  // never destroyed: read by the atexit handler
  return *path;
}

void WriteAtExit() {
  Disable();
  Status st = WriteChromeJson(ExitPath());
  const TraceStats s = Stats();
  if (!st.ok()) {
    Log().error("HMMKIT_TRACE: {}", st.ToString());
  } else if (s.dropped > 0) {
    Log().warn("HMMKIT_TRACE: wrote {} ({} events; {} dropped: raise HMMKIT_TRACE_EVENTS)",
               ExitPath(), s.events, s.dropped);
  }
}

bool StartFromEnvironment() {
  const char* path = std::getenv("HMMKIT_TRACE");
  if (path == nullptr || *path == '\0') return false;
  Options o;
  if (const char* n = std::getenv("HMMKIT_TRACE_EVENTS"); n != nullptr && *n != '\0') {
    char* end = nullptr;
    const unsigned long long v = std::strtoull(n, &end, 10);
    if (*end != '\0' || v == 0) {
      Log().error("HMMKIT_TRACE_EVENTS='{}' is not a positive number; using {}", n, o.capacity);
    } else {
      o.capacity = size_t(v);
    }
  }
  ExitPath() = path;
  if (Status st = Enable(o); !st.ok()) {
    Log().error("HMMKIT_TRACE: tracing stays off: {}", st.ToString());
    return false;
  }
  std::atexit(WriteAtExit);
  Log().warn("tracing on ({} events); writing {} at exit", o.capacity, ExitPath());
  return true;
}

[[maybe_unused]] const bool g_started = StartFromEnvironment();

}  // namespace

}  // namespace hmmkit::trace
