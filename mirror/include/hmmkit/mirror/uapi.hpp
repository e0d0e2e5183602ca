/// @file
/// Kernel uAPI that Debian 12's headers (Linux 6.1) predate, defined locally from the published
/// ABI. Each block is guarded so that newer system headers win. Nothing here is used without a
/// run-time probe (see kernel_features.hpp): a definition being present says nothing about the
/// running kernel.
#pragma once

#include <linux/fs.h>
#include <linux/types.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

// ---- madvise (5.14: POPULATE_*, 6.1: COLLAPSE) ----
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif

// ---- userfaultfd ----
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
#endif

#ifndef _UFFDIO_MOVE
#define _UFFDIO_MOVE (0x05)
#endif
#ifndef UFFDIO_MOVE
struct uffdio_move {
  __u64 dst;
  __u64 src;
  __u64 len;
  __u64 mode;  ///< UFFDIO_MOVE_MODE_*
  __s64 move;  ///< out: bytes moved, or -errno
};
#define UFFDIO_MOVE_MODE_DONTWAKE ((__u64)1 << 0)
#define UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES ((__u64)1 << 1)
#define UFFDIO_MOVE _IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)
#endif

#ifndef _UFFDIO_POISON
#define _UFFDIO_POISON (0x08)
#endif
#ifndef UFFDIO_POISON
struct uffdio_poison {
  struct uffdio_range range;
  __u64 mode;
  __s64 updated;  ///< out: bytes poisoned, or -errno
};
#define UFFDIO_POISON_MODE_DONTWAKE ((__u64)1 << 0)
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#endif

// ---- PAGEMAP_SCAN on /proc/<pid>/pagemap (6.7) ----
#ifndef PAGEMAP_SCAN
#define PAGE_IS_WPALLOWED (1 << 0)
#define PAGE_IS_WRITTEN (1 << 1)
#define PAGE_IS_FILE (1 << 2)
#define PAGE_IS_PRESENT (1 << 3)
#define PAGE_IS_SWAPPED (1 << 4)
#define PAGE_IS_PFNZERO (1 << 5)
#define PAGE_IS_HUGE (1 << 6)
#define PAGE_IS_SOFT_DIRTY (1 << 7)

struct page_region {
  __u64 start;
  __u64 end;  ///< exclusive
  __u64 categories;
};

#define PM_SCAN_WP_MATCHING (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)

struct pm_scan_arg {
  __u64 size;
  __u64 flags;
  __u64 start;
  __u64 end;
  __u64 walk_end;  ///< out: where the walk stopped
  __u64 vec;
  __u64 vec_len;
  __u64 max_pages;
  __u64 category_inverted;
  __u64 category_mask;
  __u64 category_anyof_mask;
  __u64 return_mask;
};

#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#endif

// ---- PROCMAP_QUERY on /proc/<pid>/maps (6.11) ----
#ifndef PROCMAP_QUERY
enum procmap_query_flags {
  PROCMAP_QUERY_VMA_READABLE = 0x01,
  PROCMAP_QUERY_VMA_WRITABLE = 0x02,
  PROCMAP_QUERY_VMA_EXECUTABLE = 0x04,
  PROCMAP_QUERY_VMA_SHARED = 0x08,
  PROCMAP_QUERY_COVERING_OR_NEXT_VMA = 0x10,
  PROCMAP_QUERY_FILE_BACKED_VMA = 0x20,
};

struct procmap_query {
  __u64 size;
  __u64 query_flags;
  __u64 query_addr;
  __u64 vma_start;  ///< out
  __u64 vma_end;    ///< out, exclusive
  __u64 vma_flags;  ///< out: PROCMAP_QUERY_VMA_*
  __u64 vma_page_size;
  __u64 vma_offset;
  __u64 inode;
  __u32 dev_major;
  __u32 dev_minor;
  __u32 vma_name_size;  ///< in: buffer size; out: name length incl. NUL, 0 when anonymous
  __u32 build_id_size;
  __u64 vma_name_addr;
  __u64 build_id_addr;
};

#define PROCMAP_QUERY _IOWR(0x66, 17, struct procmap_query)
#endif

static_assert(sizeof(struct procmap_query) == 104, "procmap_query ABI");
static_assert(sizeof(struct pm_scan_arg) == 96, "pm_scan_arg ABI");
static_assert(sizeof(struct page_region) == 24, "page_region ABI");
static_assert(sizeof(struct uffdio_move) == 40, "uffdio_move ABI");

// ---- /proc/<pid>/pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst) ----
namespace hmmkit::pagemap_bits {
inline constexpr __u64 kPfnMask = (1ULL << 55) - 1;
inline constexpr __u64 kSoftDirty = 1ULL << 55;
inline constexpr __u64 kExclusive = 1ULL << 56;  ///< page mapped by exactly one process
inline constexpr __u64 kUffdWp = 1ULL << 57;
inline constexpr __u64 kFileOrShared = 1ULL << 61;
inline constexpr __u64 kSwapped = 1ULL << 62;
inline constexpr __u64 kPresent = 1ULL << 63;
}  // namespace hmmkit::pagemap_bits

/// /proc/kpageflags bits used to tell a THP or hugetlb page in the pagemap fallback.
namespace hmmkit::kpageflags_bits {
inline constexpr __u64 kCompoundHead = 1ULL << 15;
inline constexpr __u64 kHuge = 1ULL << 17;  ///< hugetlb
inline constexpr __u64 kThp = 1ULL << 22;
}  // namespace hmmkit::kpageflags_bits
