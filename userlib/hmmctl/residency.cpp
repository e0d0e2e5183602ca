#include "residency.hpp"

#include <algorithm>
#include <bit>

namespace hmmkit::hmmctl {

const char* ToString(Residency r) {
  switch (r) {
    case Residency::kUntouched:
      return "untouched";
    case Residency::kSystem:
      return "system";
    case Residency::kDevice:
      return "device";
    case Residency::kRemote:
      return "remote";
    case Residency::kUnmapped:
      return "unmapped";
  }
  return "?";
}

namespace {

bool Clusters(EventKind k) {
  return k == EventKind::kCpuFault || k == EventKind::kMigrate || k == EventKind::kMapRemote ||
         k == EventKind::kEvict;
}

}  // namespace

std::vector<Cluster> FindClusters(const Trace& trace, uint64_t gap) {
  const uint64_t mask = ~(trace.page_size - 1);
  std::vector<Cluster> ranges;
  for (const TraceEvent& e : trace.events) {
    if (!Clusters(e.kind) || e.end <= e.start) continue;
    const bool moves = e.kind == EventKind::kMigrate || e.kind == EventKind::kMapRemote;
    ranges.push_back({e.start & mask, (e.end + trace.page_size - 1) & mask, 1, moves ? 1U : 0U});
  }
  std::sort(ranges.begin(), ranges.end(),
            [](const Cluster& a, const Cluster& b) { return a.start < b.start; });
  std::vector<Cluster> out;
  for (const Cluster& r : ranges) {
    if (!out.empty() && r.start <= out.back().end + gap) {
      out.back().end = std::max(out.back().end, r.end);
      out.back().events += r.events;
      out.back().migrations += r.migrations;
    } else {
      out.push_back(r);
    }
  }
  return out;
}

ResidencyReplay::ResidencyReplay(const Trace& trace, std::vector<Cluster> clusters)
    : trace_(trace), clusters_(std::move(clusters)) {
  page_shift_ = uint64_t(std::countr_zero(trace.page_size));
  size_t total = 0;
  for (const Cluster& c : clusters_) {
    base_.push_back(total);
    total += size_t((c.end - c.start) >> page_shift_);
  }
  states_.assign(total, Residency::kUntouched);
}

size_t ResidencyReplay::PageIndex(uint64_t addr) const {
  auto it = std::upper_bound(clusters_.begin(), clusters_.end(), addr,
                             [](uint64_t a, const Cluster& c) { return a < c.start; });
  if (it == clusters_.begin()) return SIZE_MAX;
  --it;
  if (addr >= it->end) return SIZE_MAX;
  return base_[size_t(it - clusters_.begin())] + size_t((addr - it->start) >> page_shift_);
}

Residency ResidencyReplay::StateAt(uint64_t addr) const {
  const size_t i = PageIndex(addr);
  return i == SIZE_MAX ? Residency::kUntouched : states_[i];
}

void ResidencyReplay::AdvanceTo(double t_us, const OnChange& on_change) {
  while (next_ < trace_.events.size() && trace_.events[next_].ts_us <= t_us)
    Apply(trace_.events[next_++], on_change);
}

void ResidencyReplay::Apply(const TraceEvent& e, const OnChange& on_change) {
  enum class Effect { kNone, kSet, kDropRemote } effect = Effect::kNone;
  Residency to = Residency::kSystem;
  switch (e.kind) {
    case EventKind::kCpuFault:
    case EventKind::kEvict:
      effect = Effect::kSet;
      break;
    case EventKind::kMigrate:
      if (e.to_device) {
        effect = Effect::kSet;
        to = Residency::kDevice;
      } else if (trace_.strings[e.dir] == "to_system") {
        effect = Effect::kSet;
      }
      break;
    case EventKind::kMapRemote:
      effect = Effect::kSet;
      to = Residency::kRemote;
      break;
    case EventKind::kInvalidate:
      if (e.inval == InvalidateKind::kUnmap || e.inval == InvalidateKind::kRemove) {
        effect = Effect::kSet;
        to = Residency::kUnmapped;
      } else {
        effect = Effect::kDropRemote;
      }
      break;
    default:
      break;
  }
  if (effect == Effect::kNone || e.end <= e.start) return;
  // Every cluster overlapping [start, end).
  auto it = std::upper_bound(clusters_.begin(), clusters_.end(), e.start,
                             [](uint64_t a, const Cluster& c) { return a < c.start; });
  if (it != clusters_.begin() && std::prev(it)->end > e.start) --it;
  for (; it != clusters_.end() && it->start < e.end; ++it) {
    const uint64_t lo = std::max(it->start, e.start) >> page_shift_ << page_shift_;
    const uint64_t hi = std::min(it->end, e.end);
    const size_t base = base_[size_t(it - clusters_.begin())];
    for (uint64_t a = lo; a < hi; a += trace_.page_size) {
      const size_t i = base + size_t((a - it->start) >> page_shift_);
      const Residency from = states_[i];
      Residency next = to;
      if (effect == Effect::kDropRemote) {
        if (from != Residency::kRemote) continue;
        next = Residency::kSystem;
      }
      if (from == next) continue;
      states_[i] = next;
      if (on_change) on_change(i, from, next);
    }
  }
}

}  // namespace hmmkit::hmmctl
