/// @file
/// The emulated device's page table: a 4-level radix tree over a 48-bit device virtual address
/// space, with huge leaves.
///
/// Shape (like x86-64 / most GPUs): 4 levels of 512 entries, 4 KiB pages. Level 3 is the root
/// (512 GiB per entry) and never holds a leaf; a leaf sits at level 2 (1 GiB, order 18), level 1
/// (2 MiB, order 9) or level 0 (4 KiB, order 0). An entry is empty, a leaf, or a pointer to the
/// next table page ("table page" = one node of 512 entries).
///
/// What a leaf points at (Pte::target_kind):
///   kSystem     system memory, reached through the process's own virtual address space (the
///               emulated device is the process): target = the CPU address of the leaf's first
///               byte.
///   kLocal      device-local memory: target = the device page id of the leaf's first 4 KiB page;
///               a huge leaf covers consecutive ids.
///   kExclusive  a page the device holds exclusively (make_device_exclusive): target = the CPU
///               address where the page's data lives now.
///
/// Map picks, at each address, the largest leaf that both the device address and the target allow
/// (a 2 MiB leaf needs va and the target 2 MiB-aligned, or a device page id that is a multiple of
/// 512), and replaces whatever was mapped. Unmap and Protect split a huge leaf that they cover only
/// in part and keep the rest intact. Table pages that become empty are freed at once. Leaves are
/// never merged back: after a split, a range stays in small leaves until it is mapped again.
///
/// Locking: none inside. The owner serializes: in the emulated device, every call is made with the
/// MMU lock held (exclusive for Map/Unmap/Protect, shared at least for Lookup/ForEach/stats); see
/// mmu.hpp. Owned by the DeviceMmu (embedded, not refcounted). Not copyable.
///
/// Allocation failure while building table pages throws std::bad_alloc (the table stays valid, with
/// part of the range changed); every other failure is reported before anything changes.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>

#include "hmmkit/base/status.hpp"

namespace hmmkit::emu {

inline constexpr unsigned kPageShift = 12;
inline constexpr uint64_t kPageSize = uint64_t{1} << kPageShift;  ///< 4 KiB
inline constexpr unsigned kLevelBits = 9;                         ///< 512 entries per table page
inline constexpr unsigned kEntriesPerTable = 1u << kLevelBits;
inline constexpr unsigned kLevels = 4;
inline constexpr unsigned kVaBits = 48;
inline constexpr uint64_t kVaLimit = uint64_t{1} << kVaBits;  ///< device addresses are < kVaLimit
inline constexpr unsigned kMaxLeafLevel = 2;                  ///< 1 GiB leaves; no 512 GiB leaves

/// Bytes covered by one entry at `level` (0: 4 KiB, 1: 2 MiB, 2: 1 GiB, 3: 512 GiB).
constexpr uint64_t LevelSpan(unsigned level) {
  return uint64_t{1} << (kPageShift + kLevelBits * level);
}

/// Where a leaf's data lives; see the file comment for what Pte::target means for each.
enum class Target : uint8_t { kSystem, kLocal, kExclusive };
const char* ToString(Target target);

/// Permission bits of a leaf. A leaf with no bits stays mapped (Lookup finds it) but every access
/// through it is refused with EPERM.
enum class Perm : uint8_t {
  kNone = 0,
  kRead = 1 << 0,
  kWrite = 1 << 1,
  kAtomic = 1 << 2,
  kAll = kRead | kWrite | kAtomic,
};
constexpr Perm operator|(Perm a, Perm b) {
  return Perm(uint8_t(a) | uint8_t(b));
}
constexpr Perm operator&(Perm a, Perm b) {
  return Perm(uint8_t(a) & uint8_t(b));
}
constexpr Perm operator~(Perm a) {
  return Perm(uint8_t(~uint8_t(a)) & uint8_t(Perm::kAll));
}
/// True when every bit of `bits` is in `set`.
constexpr bool HasPerms(Perm set, Perm bits) {
  return (set & bits) == bits;
}

/// The kind of a device memory access, ordered by strength: a fault raised for a stronger access
/// also serves the weaker ones on the same page (kAtomic > kWrite > kRead).
enum class Access : uint8_t { kRead = 0, kWrite = 1, kAtomic = 2 };
const char* ToString(Access access);

/// The permissions an access needs. An atomic is a read-modify-write: it needs read, write and
/// atomic (the kernel grants device atomics only on device-exclusive or device-local pages).
constexpr Perm RequiredPerms(Access access) {
  switch (access) {
    case Access::kRead:
      return Perm::kRead;
    case Access::kWrite:
      return Perm::kWrite;
    case Access::kAtomic:
      return Perm::kRead | Perm::kWrite | Perm::kAtomic;
  }
  return Perm::kAll;
}

/// A page-table entry. As an argument of Map, `order` is ignored (Map chooses it) and `target` is
/// the target of the first byte of the range.
struct Pte {
  uint64_t target = 0;
  Target target_kind = Target::kSystem;
  Perm perms = Perm::kNone;
  uint8_t order = 0;  ///< 0 (4 KiB), 9 (2 MiB) or 18 (1 GiB)

  friend bool operator==(const Pte&, const Pte&) = default;
};

/// One leaf as found by a walk: the PTE plus the device range it covers, [va, va + size).
struct Translation {
  Pte pte;
  uint64_t va = 0;    ///< leaf base (aligned to size)
  uint64_t size = 0;  ///< kPageSize << pte.order

  bool Contains(uint64_t addr) const { return addr - va < size; }
  /// kSystem / kExclusive: the CPU address that backs device address `addr` (which the leaf
  /// contains).
  uint64_t CpuAddress(uint64_t addr) const { return pte.target + (addr - va); }
  /// kLocal: the device page id that backs device address `addr` (which the leaf contains); the
  /// byte offset in that page is addr % kPageSize.
  uint64_t LocalPage(uint64_t addr) const { return pte.target + ((addr - va) >> kPageShift); }

  friend bool operator==(const Translation&, const Translation&) = default;
};

class DevicePageTable {
 public:
  /// Live counts (not totals), except splits.
  struct Stats {
    uint64_t table_pages = 0;  ///< allocated table pages, the root included
    std::array<uint64_t, kMaxLeafLevel + 1>
        leaves{};         ///< leaves per level: [0] 4 KiB, [1] 2 MiB, [2] 1 GiB
    uint64_t splits = 0;  ///< huge leaves split since creation
  };

  /// Called for each mapped leaf, in increasing address order: the leaf's base, its size, its PTE.
  using LeafFn = std::function<void(uint64_t va, uint64_t size, const Pte& pte)>;

  DevicePageTable();
  ~DevicePageTable();
  DevicePageTable(const DevicePageTable&) = delete;
  DevicePageTable& operator=(const DevicePageTable&) = delete;

  /// Maps [va, va + size) to the target described by `first` (target of byte va, kind, perms),
  /// replacing what was mapped there; parts of huge leaves outside the range are preserved. The
  /// target advances with the address: by bytes for kSystem/kExclusive, by one device page id per
  /// 4 KiB for kLocal. Caller holds the MMU lock exclusively.
  /// Errors (nothing changed): EINVAL when size is 0, va or size is not 4 KiB-aligned, the range
  /// overflows or reaches past 2^48, a kSystem/kExclusive target is not 4 KiB-aligned, or the
  /// target overflows over the range.
  Status Map(uint64_t va, uint64_t size, const Pte& first);

  /// Unmaps [va, va + size); unmapped holes inside are fine. Huge leaves at the edges are split and
  /// their outside parts kept; table pages left empty are freed. Caller holds the MMU lock
  /// exclusively. Errors (nothing changed): EINVAL as for Map's range.
  Status Unmap(uint64_t va, uint64_t size);

  /// Clears, in every leaf of [va, va + size), the permission bits that are not in keep_mask.
  /// A huge leaf that the range covers in part is split only if its permissions actually change.
  /// Caller holds the MMU lock exclusively. Errors (nothing changed): EINVAL as for Map's range.
  Status Protect(uint64_t va, uint64_t size, Perm keep_mask);

  /// The leaf that maps va, or nullopt (also for va >= 2^48). Caller holds the MMU lock (shared
  /// is enough).
  std::optional<Translation> Lookup(uint64_t va) const;

  /// Calls fn for every mapped leaf that overlaps [start, end), in address order. Leaves are
  /// reported whole, not clipped to the range. fn must not change the table. Caller holds the MMU
  /// lock (shared is enough).
  void ForEach(uint64_t start, uint64_t end, const LeafFn& fn) const;

  /// Caller holds the MMU lock (shared is enough).
  const Stats& stats() const { return stats_; }

 private:
  struct Node;
  struct Entry;

  void MapIn(Node& node, unsigned level, uint64_t va, uint64_t end, const Pte& first,
             uint64_t first_va);
  void UnmapIn(Node& node, unsigned level, uint64_t va, uint64_t end);
  void ProtectIn(Node& node, unsigned level, uint64_t va, uint64_t end, Perm keep_mask);
  void ForEachIn(const Node& node, unsigned level, uint64_t start, uint64_t end,
                 const LeafFn& fn) const;

  /// Entry helpers; they keep Node::used and stats_ exact.
  void SetLeaf(Node& node, Entry& e, unsigned level, const Pte& pte);
  void ClearEntry(Node& node, Entry& e, unsigned level);
  Node& ChildFor(Node& node, Entry& e, unsigned level);  ///< allocates, or splits a leaf
  void ForgetSubtree(const Node& node, unsigned level);  ///< subtracts a subtree from stats_

  std::unique_ptr<Node> root_;
  Stats stats_;
};

}  // namespace hmmkit::emu
