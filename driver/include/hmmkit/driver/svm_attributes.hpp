/// @file
/// Per-address-range SVM advice (kernel analogue: the attributes drm_gpusvm drivers keep per
/// madvise'd range; CUDA: cudaMemAdvise). A byte with no advice has the default SvmAttributes.
///
/// SvmAttributeMap stores only advised intervals, non-overlapping, with equal neighbours merged.
/// Not thread-safe: its owner (SvmManager) guards it with its lock.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <vector>

namespace hmmkit::driver {

enum class PreferredLocation : uint8_t {
  kNone,    ///< the policy decides (migrate on fault, thrashing pin, access counters)
  kSystem,  ///< device faults map system memory remotely; only an explicit prefetch migrates
  kDevice,  ///< device faults migrate, even when thrashing detection would pin the pages
};
const char* ToString(PreferredLocation p);

struct SvmAttributes {
  PreferredLocation preferred = PreferredLocation::kNone;
  /// Read faults map system memory remotely instead of migrating: data read by both sides stays
  /// put. (There is no read duplication: a page lives in one place, as in the kernel's HMM.)
  bool read_mostly = false;
  /// The device keeps a mapping of the range wherever its pages are: advising maps the present
  /// pages remotely at once, and faults in the range never migrate.
  bool accessed_by = false;

  bool is_default() const { return *this == SvmAttributes{}; }
  bool operator==(const SvmAttributes&) const = default;
};

class SvmAttributeMap {
 public:
  struct Run {
    uintptr_t start = 0, end = 0;
    SvmAttributes attrs;
  };

  /// Applies `update` to the attributes of every byte of [start, end) (start < end).
  void Update(uintptr_t start, uintptr_t end, const std::function<void(SvmAttributes&)>& update);
  /// Forgets the advice of [start, end) (an unmap).
  void Clear(uintptr_t start, uintptr_t end);
  SvmAttributes At(uintptr_t addr) const;
  /// The maximal run of equal attributes that contains addr, clipped to [lo, hi) (lo <= addr < hi).
  Run RunAt(uintptr_t addr, uintptr_t lo, uintptr_t hi) const;
  /// Runs covering [start, end) in address order, default runs included.
  std::vector<Run> Runs(uintptr_t start, uintptr_t end) const;
  /// Whether any byte of [start, end) carries advice.
  bool Advised(uintptr_t start, uintptr_t end) const;
  size_t interval_count() const { return map_.size(); }

 private:
  struct Interval {
    uintptr_t end;
    SvmAttributes attrs;
  };
  /// Splits the interval containing addr (if any) so that an interval starts at addr.
  void SplitAt(uintptr_t addr);
  /// Drops default intervals and merges equal, touching neighbours within [start, end].
  void Normalize(uintptr_t start, uintptr_t end);

  std::map<uintptr_t, Interval> map_;  ///< by start; only advised (non-default) intervals
};

}  // namespace hmmkit::driver
