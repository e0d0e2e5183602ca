#include "hmmkit/base/fault_injection.hpp"

#include <array>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "hmmkit/base/log.hpp"

namespace hmmkit::inject {

std::atomic<uint32_t> g_armed_mask{0};

namespace {

constexpr size_t kSites = static_cast<size_t>(Site::kCount);
constexpr std::array<const char*, kSites> kNames = {
    "device_alloc", "system_alloc",  "dma_descriptor", "uffd_copy",
    "uffd_move",    "uffd_register", "monitor_read"};
constexpr std::array<int, kSites> kDefaultErrors = {ENOMEM, ENOMEM, EIO, EAGAIN,
                                                    EAGAIN, ENOMEM, EIO};

struct SiteState {
  std::mutex mu;  // leaf lock: nothing is called while it is held
  Plan plan;
  uint64_t hits = 0;
  uint64_t fired = 0;
};

std::array<SiteState, kSites>& States() {
  static std::array<SiteState, kSites> states;
  return states;
}

uint32_t Bit(Site site) {
  return 1u << static_cast<unsigned>(site);
}

struct ErrnoName {
  const char* name;
  int value;
};
constexpr ErrnoName kErrnoNames[] = {{"ENOMEM", ENOMEM}, {"EAGAIN", EAGAIN}, {"EIO", EIO},
                                     {"EEXIST", EEXIST}, {"EFAULT", EFAULT}, {"EINTR", EINTR},
                                     {"EBUSY", EBUSY},   {"ENOENT", ENOENT}, {"EPERM", EPERM},
                                     {"ENOSPC", ENOSPC}, {"EINVAL", EINVAL}, {"ESRCH", ESRCH}};

bool ParseErrno(std::string_view text, int* out) {
  for (const auto& e : kErrnoNames)
    if (text == e.name) return *out = e.value, true;
  int v = 0;
  auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || p != text.data() + text.size() || v <= 0) return false;
  *out = v;
  return true;
}

bool ParseU32(std::string_view text, uint32_t* out) {
  auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), *out);
  return ec == std::errc() && p == text.data() + text.size();
}

// Arms the sites named in HMMKIT_INJECT before main(): a bad spec must stop the run, not be
// ignored.
struct EnvironmentArming {
  EnvironmentArming() {
    const char* env = std::getenv("HMMKIT_INJECT");
    if (!env || !*env) return;
    if (Status s = ArmFromSpec(env); !s) {
      std::fprintf(stderr, "hmmkit: HMMKIT_INJECT: %s\n", s.ToString().c_str());
      std::abort();
    }
  }
} g_environment_arming;

}  // namespace

void Arm(Site site, const Plan& plan) {
  auto& st = States()[static_cast<size_t>(site)];
  Plan p = plan;
  if (p.error == 0) p.error = kDefaultErrors[static_cast<size_t>(site)];
  if (p.every == 0) p.every = 1;
  {
    std::lock_guard lock(st.mu);
    st.plan = p;
    st.hits = 0;
    st.fired = 0;
  }
  g_armed_mask.fetch_or(Bit(site), std::memory_order_relaxed);
  Log().warn("fault injection armed: {} skip={} every={} count={} errno={} ({})", Name(site),
             p.skip, p.every, p.count, p.error, std::strerror(p.error));
}

void Disarm(Site site) {
  g_armed_mask.fetch_and(~Bit(site), std::memory_order_relaxed);
}

void DisarmAll() {
  g_armed_mask.store(0, std::memory_order_relaxed);
}

int CheckSlow(Site site) {
  auto& st = States()[static_cast<size_t>(site)];
  std::lock_guard lock(st.mu);
  if ((g_armed_mask.load(std::memory_order_relaxed) & Bit(site)) == 0) return 0;
  const uint64_t hit = st.hits++;
  if (hit < st.plan.skip || st.fired >= st.plan.count) return 0;
  if ((hit - st.plan.skip) % st.plan.every != 0) return 0;
  st.fired++;
  return st.plan.error;
}

uint64_t Hits(Site site) {
  auto& st = States()[static_cast<size_t>(site)];
  std::lock_guard lock(st.mu);
  return st.hits;
}

uint64_t Fired(Site site) {
  auto& st = States()[static_cast<size_t>(site)];
  std::lock_guard lock(st.mu);
  return st.fired;
}

const char* Name(Site site) {
  const auto i = static_cast<size_t>(site);
  return i < kSites ? kNames[i] : nullptr;
}

Status ArmFromSpec(std::string_view spec) {
  while (!spec.empty()) {
    const size_t comma = spec.find(',');
    std::string_view item = spec.substr(0, comma);
    spec = comma == std::string_view::npos ? std::string_view() : spec.substr(comma + 1);
    const size_t colon = item.find(':');
    const std::string_view name = item.substr(0, colon);
    size_t index = kSites;
    for (size_t i = 0; i < kSites; i++)
      if (name == kNames[i]) index = i;
    if (index == kSites)
      return Status::FromErrno(EINVAL, "unknown fault-injection site '" + std::string(name) +
                                           "' (device_alloc, system_alloc, dma_descriptor, "
                                           "uffd_copy, uffd_move, uffd_register, monitor_read)");
    Plan plan;
    std::string_view rest = colon == std::string_view::npos ? "" : item.substr(colon + 1);
    while (!rest.empty()) {
      const size_t next = rest.find(':');
      const std::string_view kv = rest.substr(0, next);
      rest = next == std::string_view::npos ? std::string_view() : rest.substr(next + 1);
      const size_t eq = kv.find('=');
      const std::string_view key = kv.substr(0, eq);
      const std::string_view value = eq == std::string_view::npos ? "" : kv.substr(eq + 1);
      bool ok = false;
      if (key == "skip")
        ok = ParseU32(value, &plan.skip);
      else if (key == "every")
        ok = ParseU32(value, &plan.every) && plan.every > 0;
      else if (key == "count")
        ok = ParseU32(value, &plan.count);
      else if (key == "errno")
        ok = ParseErrno(value, &plan.error);
      if (!ok)
        return Status::FromErrno(EINVAL, "bad fault-injection setting '" + std::string(kv) +
                                             "' for " + std::string(name) +
                                             " (skip=N, every=N>0, count=N, errno=NAME|N)");
    }
    Arm(static_cast<Site>(index), plan);
  }
  return Status::Ok();
}

}  // namespace hmmkit::inject
