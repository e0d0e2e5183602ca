// SvmAttributeMap: an interval map of advice (svm_attributes.hpp).
#include "hmmkit/driver/svm_attributes.hpp"

#include <algorithm>
#include <iterator>

namespace hmmkit::driver {

const char* ToString(PreferredLocation p) {
  switch (p) {
    case PreferredLocation::kNone:
      return "none";
    case PreferredLocation::kSystem:
      return "system";
    case PreferredLocation::kDevice:
      return "device";
  }
  return "?";
}

void SvmAttributeMap::SplitAt(uintptr_t addr) {
  auto it = map_.upper_bound(addr);
  if (it == map_.begin()) return;
  --it;
  if (it->first >= addr || it->second.end <= addr) return;
  Interval tail = it->second;
  it->second.end = addr;
  map_.emplace(addr, tail);
}

void SvmAttributeMap::Normalize(uintptr_t start, uintptr_t end) {
  auto it = map_.lower_bound(start);
  if (it != map_.begin()) --it;
  while (it != map_.end() && it->first <= end) {
    if (it->second.attrs.is_default()) {
      it = map_.erase(it);
      continue;
    }
    auto next = std::next(it);
    if (next != map_.end() && next->first == it->second.end &&
        next->second.attrs == it->second.attrs) {
      it->second.end = next->second.end;
      map_.erase(next);
      continue;  // the grown interval may merge again
    }
    it = next;
  }
}

void SvmAttributeMap::Update(uintptr_t start, uintptr_t end,
                             const std::function<void(SvmAttributes&)>& update) {
  if (start >= end) return;
  SplitAt(start);
  SplitAt(end);
  // Fill the gaps with default intervals so that every byte gets the update.
  uintptr_t cursor = start;
  auto it = map_.lower_bound(start);
  while (cursor < end) {
    if (it != map_.end() && it->first == cursor) {
      cursor = it->second.end;
      ++it;
      continue;
    }
    const uintptr_t gap_end = (it != map_.end() && it->first < end) ? it->first : end;
    it = std::next(map_.emplace_hint(it, cursor, Interval{gap_end, SvmAttributes{}}));
    cursor = gap_end;
  }
  for (auto i = map_.lower_bound(start); i != map_.end() && i->first < end; ++i)
    update(i->second.attrs);
  Normalize(start, end);
}

void SvmAttributeMap::Clear(uintptr_t start, uintptr_t end) {
  Update(start, end, [](SvmAttributes& a) { a = SvmAttributes{}; });
}

SvmAttributes SvmAttributeMap::At(uintptr_t addr) const {
  auto it = map_.upper_bound(addr);
  if (it == map_.begin()) return {};
  --it;
  return addr < it->second.end ? it->second.attrs : SvmAttributes{};
}

SvmAttributeMap::Run SvmAttributeMap::RunAt(uintptr_t addr, uintptr_t lo, uintptr_t hi) const {
  auto next = map_.upper_bound(addr);
  if (next != map_.begin()) {
    auto prev = std::prev(next);
    if (addr < prev->second.end)
      return {std::max(lo, prev->first), std::min(hi, prev->second.end), prev->second.attrs};
  }
  // A default gap: between the previous interval's end and the next interval's start. Merging
  // keeps advised intervals apart from equal ones, so the gap is the whole default run.
  const uintptr_t s = next == map_.begin() ? 0 : std::prev(next)->second.end;
  const uintptr_t e = next == map_.end() ? UINTPTR_MAX : next->first;
  return {std::max(lo, s), std::min(hi, e), SvmAttributes{}};
}

std::vector<SvmAttributeMap::Run> SvmAttributeMap::Runs(uintptr_t start, uintptr_t end) const {
  std::vector<Run> out;
  for (uintptr_t a = start; a < end;) {
    Run r = RunAt(a, start, end);
    out.push_back(r);
    a = r.end;
  }
  return out;
}

bool SvmAttributeMap::Advised(uintptr_t start, uintptr_t end) const {
  auto it = map_.upper_bound(start);
  if (it != map_.begin() && std::prev(it)->second.end > start) return true;
  return it != map_.end() && it->first < end;
}

}  // namespace hmmkit::driver
