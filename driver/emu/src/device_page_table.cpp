// DevicePageTable: recursive walks over a 4-level radix tree (see device_page_table.hpp).
//
// Every operation is one recursive descent over the entries its range overlaps. At each entry:
//   - an entry the range covers completely is replaced (Map: by a leaf when the level allows a leaf
//     and the target is aligned for it; Unmap: by nothing) without looking inside;
//   - an entry covered in part is descended into; a leaf there is first split into a table page of
//     512 leaves one level down (ChildFor), which keeps the part outside the range intact.
// After Unmap descends into a table page, it frees the page if nothing is left in it. Counters are
// kept exact by doing every entry change through SetLeaf/ClearEntry/ChildFor.
#include "hmmkit/emu/device_page_table.hpp"

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace hmmkit::emu {

struct DevicePageTable::Entry {
  std::unique_ptr<Node> child;  // non-null: a table page one level down
  Pte pte;                      // valid when leaf
  bool leaf = false;
};

struct DevicePageTable::Node {
  std::array<Entry, kEntriesPerTable> entries;
  unsigned used = 0;  // non-empty entries
};

const char* ToString(Target target) {
  switch (target) {
    case Target::kSystem:
      return "system";
    case Target::kLocal:
      return "local";
    case Target::kExclusive:
      return "exclusive";
  }
  return "?";
}

const char* ToString(Access access) {
  switch (access) {
    case Access::kRead:
      return "read";
    case Access::kWrite:
      return "write";
    case Access::kAtomic:
      return "atomic";
  }
  return "?";
}

namespace {

constexpr unsigned kRootLevel = kLevels - 1;

constexpr uint64_t AlignDown(uint64_t x, uint64_t align) {
  return x & ~(align - 1);
}

constexpr unsigned IndexAt(uint64_t va, unsigned level) {
  return unsigned((va >> (kPageShift + kLevelBits * level)) & (kEntriesPerTable - 1));
}

std::string RangeText(const char* what, uint64_t va, uint64_t size) {
  char buf[128];
  std::snprintf(buf, sizeof buf, "%s [0x%" PRIx64 ", +0x%" PRIx64 ")", what, va, size);
  return buf;
}

// EINVAL unless [va, va + size) is a non-empty, 4 KiB-aligned range below 2^48.
Status CheckRange(const char* op, uint64_t va, uint64_t size) {
  if (size == 0) return Status::FromErrno(EINVAL, RangeText(op, va, size) + ": empty range");
  if ((va | size) & (kPageSize - 1)) {
    return Status::FromErrno(EINVAL, RangeText(op, va, size) + ": not 4 KiB-aligned");
  }
  if (va >= kVaLimit || size > kVaLimit - va) {
    return Status::FromErrno(EINVAL, RangeText(op, va, size) + ": beyond the 48-bit device VA");
  }
  return Status::Ok();
}

// The target of the byte at `va` for a mapping whose byte `first_va` has target first.target.
uint64_t TargetAt(const Pte& first, uint64_t first_va, uint64_t va) {
  if (first.target_kind == Target::kLocal) return first.target + ((va - first_va) >> kPageShift);
  return first.target + (va - first_va);
}

// True when the target of the entry at `base` (aligned to LevelSpan(level)) allows a leaf there.
bool TargetAligned(const Pte& first, uint64_t first_va, uint64_t base, unsigned level) {
  const uint64_t target = TargetAt(first, first_va, base);
  if (first.target_kind == Target::kLocal) {
    return (target & ((LevelSpan(level) >> kPageShift) - 1)) == 0;
  }
  return (target & (LevelSpan(level) - 1)) == 0;
}

// The PTE of sub-leaf i of a leaf at `level` being split one level down.
Pte SubLeaf(const Pte& pte, unsigned level, unsigned i) {
  Pte sub = pte;
  const uint64_t span = LevelSpan(level - 1);
  sub.target += pte.target_kind == Target::kLocal ? i * (span >> kPageShift) : i * span;
  sub.order = uint8_t(kLevelBits * (level - 1));
  return sub;
}

}  // namespace

DevicePageTable::DevicePageTable() : root_(std::make_unique<Node>()) {
  stats_.table_pages = 1;
}

DevicePageTable::~DevicePageTable() = default;

void DevicePageTable::SetLeaf(Node& node, Entry& e, unsigned level, const Pte& pte) {
  e.pte = pte;
  e.pte.order = uint8_t(kLevelBits * level);
  e.leaf = true;
  ++node.used;
  ++stats_.leaves[level];
}

void DevicePageTable::ClearEntry(Node& node, Entry& e, unsigned level) {
  if (e.leaf) {
    e.leaf = false;
    --stats_.leaves[level];
    --node.used;
  } else if (e.child) {
    ForgetSubtree(*e.child, level - 1);
    e.child.reset();
    --stats_.table_pages;
    --node.used;
  }
}

void DevicePageTable::ForgetSubtree(const Node& node, unsigned level) {
  unsigned seen = 0;
  for (const Entry& e : node.entries) {
    if (seen == node.used) break;
    if (e.leaf) {
      --stats_.leaves[level];
      ++seen;
    } else if (e.child) {
      ForgetSubtree(*e.child, level - 1);
      --stats_.table_pages;
      ++seen;
    }
  }
}

DevicePageTable::Node& DevicePageTable::ChildFor(Node& node, Entry& e, unsigned level) {
  if (e.child) return *e.child;
  auto child = std::make_unique<Node>();
  ++stats_.table_pages;
  if (e.leaf) {
    // Split: the same mapping in 512 leaves one level down.
    for (unsigned i = 0; i < kEntriesPerTable; ++i) {
      SetLeaf(*child, child->entries[i], level - 1, SubLeaf(e.pte, level, i));
    }
    e.leaf = false;
    --stats_.leaves[level];
    ++stats_.splits;
  } else {
    ++node.used;
  }
  e.child = std::move(child);
  return *e.child;
}

Status DevicePageTable::Map(uint64_t va, uint64_t size, const Pte& first) {
  HMMKIT_RETURN_IF_ERROR(CheckRange("map", va, size));
  if (first.target_kind == Target::kLocal) {
    if (first.target > UINT64_MAX - (size >> kPageShift)) {
      return Status::FromErrno(EINVAL, RangeText("map", va, size) + ": device page id overflows");
    }
  } else {
    if (first.target & (kPageSize - 1)) {
      return Status::FromErrno(EINVAL, RangeText("map", va, size) + ": target not 4 KiB-aligned");
    }
    if (first.target > UINT64_MAX - size) {
      return Status::FromErrno(EINVAL, RangeText("map", va, size) + ": target overflows");
    }
  }
  MapIn(*root_, kRootLevel, va, va + size, first, va);
  return Status::Ok();
}

void DevicePageTable::MapIn(Node& node, unsigned level, uint64_t va, uint64_t end, const Pte& first,
                            uint64_t first_va) {
  const uint64_t span = LevelSpan(level);
  for (uint64_t base = AlignDown(va, span); base < end; base += span) {
    Entry& e = node.entries[IndexAt(base, level)];
    const uint64_t lo = std::max(va, base);
    const uint64_t hi = std::min(end, base + span);
    if (lo == base && hi == base + span && level <= kMaxLeafLevel &&
        TargetAligned(first, first_va, base, level)) {
      ClearEntry(node, e, level);
      Pte pte = first;
      pte.target = TargetAt(first, first_va, base);
      SetLeaf(node, e, level, pte);
      continue;
    }
    // Level 0 entries are always covered whole (the range is 4 KiB-aligned) and always aligned
    // (4 KiB targets, any page id), so here level > 0.
    MapIn(ChildFor(node, e, level), level - 1, lo, hi, first, first_va);
  }
}

Status DevicePageTable::Unmap(uint64_t va, uint64_t size) {
  HMMKIT_RETURN_IF_ERROR(CheckRange("unmap", va, size));
  UnmapIn(*root_, kRootLevel, va, va + size);
  return Status::Ok();
}

void DevicePageTable::UnmapIn(Node& node, unsigned level, uint64_t va, uint64_t end) {
  const uint64_t span = LevelSpan(level);
  for (uint64_t base = AlignDown(va, span); base < end && node.used != 0; base += span) {
    Entry& e = node.entries[IndexAt(base, level)];
    if (!e.leaf && !e.child) continue;
    const uint64_t lo = std::max(va, base);
    const uint64_t hi = std::min(end, base + span);
    if (lo == base && hi == base + span) {
      ClearEntry(node, e, level);
      continue;
    }
    Node& child = ChildFor(node, e, level);
    UnmapIn(child, level - 1, lo, hi);
    if (child.used == 0) ClearEntry(node, e, level);
  }
}

Status DevicePageTable::Protect(uint64_t va, uint64_t size, Perm keep_mask) {
  HMMKIT_RETURN_IF_ERROR(CheckRange("protect", va, size));
  ProtectIn(*root_, kRootLevel, va, va + size, keep_mask);
  return Status::Ok();
}

void DevicePageTable::ProtectIn(Node& node, unsigned level, uint64_t va, uint64_t end,
                                Perm keep_mask) {
  const uint64_t span = LevelSpan(level);
  for (uint64_t base = AlignDown(va, span); base < end; base += span) {
    Entry& e = node.entries[IndexAt(base, level)];
    if (e.leaf) {
      const Perm perms = e.pte.perms & keep_mask;
      if (perms == e.pte.perms) continue;
      if (std::max(va, base) == base && std::min(end, base + span) == base + span) {
        e.pte.perms = perms;
        continue;
      }
    } else if (!e.child) {
      continue;
    }
    ProtectIn(ChildFor(node, e, level), level - 1, std::max(va, base), std::min(end, base + span),
              keep_mask);
  }
}

std::optional<Translation> DevicePageTable::Lookup(uint64_t va) const {
  if (va >= kVaLimit) return std::nullopt;
  const Node* node = root_.get();
  for (unsigned level = kRootLevel;; --level) {
    const Entry& e = node->entries[IndexAt(va, level)];
    if (e.leaf) {
      return Translation{e.pte, AlignDown(va, LevelSpan(level)), LevelSpan(level)};
    }
    if (!e.child || level == 0) return std::nullopt;
    node = e.child.get();
  }
}

void DevicePageTable::ForEach(uint64_t start, uint64_t end, const LeafFn& fn) const {
  end = std::min(end, kVaLimit);
  if (start >= end) return;
  ForEachIn(*root_, kRootLevel, start, end, fn);
}

void DevicePageTable::ForEachIn(const Node& node, unsigned level, uint64_t start, uint64_t end,
                                const LeafFn& fn) const {
  const uint64_t span = LevelSpan(level);
  for (uint64_t base = AlignDown(start, span); base < end; base += span) {
    const Entry& e = node.entries[IndexAt(base, level)];
    if (e.leaf) {
      fn(base, span, e.pte);
    } else if (e.child) {
      ForEachIn(*e.child, level - 1, std::max(start, base), std::min(end, base + span), fn);
    }
  }
}

}  // namespace hmmkit::emu
