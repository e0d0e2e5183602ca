// Page residency replayed from a trace: the contract's "residency effect" column applied to a
// per-page state array over the address clusters the events touch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "trace_file.hpp"

namespace hmmkit::hmmctl {

enum class Residency : uint8_t { kUntouched, kSystem, kDevice, kRemote, kUnmapped };
inline constexpr int kResidencyCount = 5;
const char* ToString(Residency r);

/// A page-aligned address range [start, end) that events touched; ranges closer than the merge
/// gap are one cluster.
struct Cluster {
  uint64_t start = 0, end = 0;
  uint64_t events = 0;      // residency-changing events that touch it
  uint64_t migrations = 0;  // migrate and map_remote events among them
};

/// Clusters of the ranges of cpu_fault, migrate, map_remote and evict events (invalidations and
/// fault batches may span unrelated memory, so they only apply inside clusters), sorted by
/// address. `gap` is in bytes.
std::vector<Cluster> FindClusters(const Trace& trace, uint64_t gap);

/// The most pages a replay tracks (one byte each).
inline constexpr uint64_t kMaxReplayPages = uint64_t(1) << 26;

/// Replays a trace's events in time order over `clusters` (which must not overlap and be sorted).
/// An event takes effect at its start `ts`. Owned by the caller; holds a reference to `trace`.
class ResidencyReplay {
 public:
  /// Called for each page whose state changes: its index (see PageIndex), old and new state.
  using OnChange = std::function<void(size_t page, Residency from, Residency to)>;

  ResidencyReplay(const Trace& trace, std::vector<Cluster> clusters);

  /// Applies every not yet applied event with ts <= t_us.
  void AdvanceTo(double t_us, const OnChange& on_change = {});
  /// The state of the page holding `addr` (kUntouched outside every cluster).
  Residency StateAt(uint64_t addr) const;
  /// The page index of `addr` across the clusters, or SIZE_MAX outside them.
  size_t PageIndex(uint64_t addr) const;
  size_t total_pages() const { return states_.size(); }
  const std::vector<Cluster>& clusters() const { return clusters_; }
  /// Index of the first page of cluster i.
  size_t cluster_base(size_t i) const { return base_[i]; }

 private:
  void Apply(const TraceEvent& e, const OnChange& on_change);

  const Trace& trace_;
  std::vector<Cluster> clusters_;
  std::vector<size_t> base_;
  std::vector<Residency> states_;
  size_t next_ = 0;
  uint64_t page_shift_ = 12;
};

}  // namespace hmmkit::hmmctl
