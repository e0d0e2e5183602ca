// Tlb: a linear scan over a few dozen slots, with a most-recently-used shortcut (accesses of a
// kernel are mostly to the page of the previous access). LRU by time stamp; last_use == 0 marks a
// free slot.
#include "hmmkit/emu/tlb.hpp"

#include <cstdlib>

namespace hmmkit::emu {

Tlb::Tlb(size_t entries) : slots_(entries == 0 ? 1 : entries) {}

std::optional<Translation> Tlb::Lookup(uint64_t va) {
  Slot& mru = slots_[mru_];
  if (mru.last_use != 0 && mru.t.Contains(va)) {
    mru.last_use = ++clock_;
    ++stats_.hits;
    return mru.t;
  }
  for (size_t i = 0; i < slots_.size(); ++i) {
    Slot& s = slots_[i];
    if (s.last_use != 0 && s.t.Contains(va)) {
      s.last_use = ++clock_;
      mru_ = i;
      ++stats_.hits;
      return s.t;
    }
  }
  ++stats_.misses;
  return std::nullopt;
}

void Tlb::Insert(const Translation& t) {
  if (t.size == 0) std::abort();  // a leaf is never empty
  const uint64_t end = t.va + t.size;
  size_t victim = slots_.size();
  for (size_t i = 0; i < slots_.size(); ++i) {
    Slot& s = slots_[i];
    if (s.last_use != 0 && s.t.va < end && t.va < s.t.va + s.t.size) s.last_use = 0;
    if (s.last_use == 0) {
      if (victim == slots_.size() || slots_[victim].last_use != 0) victim = i;
    } else if (victim == slots_.size() ||
               (slots_[victim].last_use != 0 && s.last_use < slots_[victim].last_use)) {
      victim = i;
    }
  }
  if (slots_[victim].last_use != 0) ++stats_.evictions;
  slots_[victim].t = t;
  slots_[victim].last_use = ++clock_;
  mru_ = victim;
  ++stats_.inserts;
}

void Tlb::InvalidateRange(uint64_t start, uint64_t end) {
  ++stats_.shootdowns;
  for (Slot& s : slots_) {
    if (s.last_use != 0 && s.t.va < end && start < s.t.va + s.t.size) {
      s.last_use = 0;
      ++stats_.entries_invalidated;
    }
  }
}

void Tlb::InvalidateAll() {
  ++stats_.shootdowns;
  for (Slot& s : slots_) {
    if (s.last_use != 0) {
      s.last_use = 0;
      ++stats_.entries_invalidated;
    }
  }
}

size_t Tlb::size() const {
  size_t n = 0;
  for (const Slot& s : slots_) n += s.last_use != 0;
  return n;
}

}  // namespace hmmkit::emu
