/// @file
/// A compute unit's TLB: a small, fully associative cache of page-table leaves with LRU
/// replacement.
///
/// An entry caches a whole leaf (base, size, PTE), so a 2 MiB or 1 GiB leaf costs one entry, as on
/// real GPUs. There is no negative caching: a miss that finds nothing in the page table inserts
/// nothing. Entries never overlap: Insert drops any entry that overlaps the new one.
///
/// Thread safety: none. A Tlb is owned by one compute unit and used by the thread that runs that
/// unit; the DeviceMmu shoots entries down only while it holds its lock exclusively, when no
/// compute unit is translating (mmu.hpp). Owned by the DeviceMmu (one per compute unit).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "hmmkit/emu/device_page_table.hpp"

namespace hmmkit::emu {

class Tlb {
 public:
  static constexpr size_t kDefaultEntries = 64;

  struct Stats {
    uint64_t hits = 0;
    uint64_t misses = 0;
    uint64_t inserts = 0;
    uint64_t evictions = 0;   ///< valid entries replaced by Insert because the TLB was full
    uint64_t shootdowns = 0;  ///< InvalidateRange / InvalidateAll calls
    uint64_t entries_invalidated = 0;  ///< entries those calls dropped
  };

  /// entries >= 1.
  explicit Tlb(size_t entries = kDefaultEntries);
  Tlb(const Tlb&) = delete;
  Tlb& operator=(const Tlb&) = delete;

  /// The cached leaf that contains va, or nullopt. Counts a hit or a miss; a hit makes the entry
  /// the most recently used.
  std::optional<Translation> Lookup(uint64_t va);
  /// Caches a leaf (t.size > 0), replacing overlapping entries, else a free entry, else the least
  /// recently used one.
  void Insert(const Translation& t);
  /// Drops every entry that overlaps [start, end). Counts one shootdown.
  void InvalidateRange(uint64_t start, uint64_t end);
  /// Drops every entry. Counts one shootdown.
  void InvalidateAll();

  size_t capacity() const { return slots_.size(); }
  size_t size() const;  ///< valid entries
  const Stats& stats() const { return stats_; }

 private:
  struct Slot {
    Translation t;
    uint64_t last_use = 0;  ///< 0: invalid
  };

  std::vector<Slot> slots_;
  uint64_t clock_ = 0;  ///< LRU time stamps
  size_t mru_ = 0;      ///< slot of the last hit or insert, checked first
  Stats stats_;
};

}  // namespace hmmkit::emu
