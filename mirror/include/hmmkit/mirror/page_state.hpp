/// @file
/// Per-page state of the CPU page tables, as a snapshot reads it (PAGEMAP_SCAN or
/// /proc/self/pagemap).
#pragma once

#include <cstdint>

namespace hmmkit {

struct PageState {
  enum Flag : uint8_t {
    kPresent = 1 << 0,  ///< a page is mapped
    kZero = 1 << 1,     ///< ... and it is the shared zero page (or the huge zero page)
    kHuge = 1 << 2,     ///< ... by a PMD/PUD leaf (THP or hugetlb); `order` says which
    kSwapped = 1 << 3,  ///< not present, in swap
    kFile = 1 << 4,     ///< page-cache or shared-anon page (not private anon)
    kExclusive =
        1 << 5,  ///< mapped by this process only (pagemap bit 56); see AddressSpace::Options
  };
  uint8_t flags = 0;
  uint8_t order = 0;  ///< map order: 0 (4 KiB), 9 (2 MiB), 18 (1 GiB)

  bool has(Flag f) const { return (flags & f) != 0; }
  bool present() const { return has(kPresent); }
};
static_assert(sizeof(PageState) == 2);

}  // namespace hmmkit
