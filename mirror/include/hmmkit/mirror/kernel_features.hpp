/// @file
/// What the running kernel offers, probed once at run time, and which mechanism each hmmkit feature
/// uses.
///
/// Nothing is assumed from headers or version numbers: every entry is the result of trying the
/// call. HMMKIT_DISABLE=name[,name...] forces a fallback for testing (names: pagemap_scan,
/// procmap_query, madv_populate, uffdio_move, uffd_wp, dev_userfaultfd); the probe reports such an
/// entry as "disabled by HMMKIT_DISABLE".
#pragma once

#include <cstddef>
#include <cstdint>
#include <set>
#include <string>
#include <vector>

namespace hmmkit {

enum class UffdOpenMode : uint8_t {
  kNone,             ///< userfaultfd unavailable (see uffd_error)
  kDevNode,          ///< /dev/userfaultfd + USERFAULTFD_IOC_NEW (6.1+; root or ACL)
  kSyscall,          ///< userfaultfd(2), kernel faults allowed (CAP_SYS_PTRACE or sysctl)
  kSyscallUserOnly,  ///< userfaultfd(2) with UFFD_USER_MODE_ONLY: system calls touching registered
                     ///< missing pages get EFAULT instead of waiting for the monitor
};
const char* ToString(UffdOpenMode mode);

enum class ThpMode : uint8_t { kUnavailable, kAlways, kMadvise, kNever };
const char* ToString(ThpMode mode);

struct KernelFeatures {
  std::string kernel_release;  ///< uname -r
  size_t page_size = 4096;

  /// userfaultfd
  UffdOpenMode uffd_mode = UffdOpenMode::kNone;
  std::string uffd_error;      ///< why a better open mode (or any) failed, for the report
  uint64_t uffd_features = 0;  ///< UFFD_FEATURE_* the kernel offers (UFFDIO_API handshake)
  uint64_t uffd_ioctls = 0;    ///< _UFFDIO_* bits from the API handshake
  bool uffd_wp = false;        ///< write-protect mode on anon memory (PAGEFAULT_FLAG_WP)
  bool uffd_wp_shmem = false;  ///< ... on shmem and hugetlbfs (WP_HUGETLBFS_SHMEM)
  bool uffdio_move = false;    ///< UFFDIO_MOVE (6.8+)
  bool uffd_poison = false;    ///< UFFDIO_POISON (6.6+)

  /// /proc interfaces
  bool pagemap_scan = false;   ///< PAGEMAP_SCAN ioctl (6.7+)
  bool procmap_query = false;  ///< PROCMAP_QUERY ioctl (6.11+)
  bool pagemap_pfns = false;   ///< /proc/self/pagemap shows PFNs (CAP_SYS_ADMIN)
  bool kpageflags = false;     ///< /proc/kpageflags readable (root)
  uint64_t zero_pfn = 0;       ///< PFN of the shared zero page, when pagemap_pfns

  bool madv_populate = false;  ///< MADV_POPULATE_READ/WRITE (5.14+)
  bool madv_collapse = false;  ///< MADV_COLLAPSE (6.1+)

  ThpMode thp = ThpMode::kUnavailable;
  std::string thp_shmem;         ///< /sys/kernel/mm/transparent_hugepage/shmem_enabled selection
  size_t hugetlb_page_size = 0;  ///< default huge page size, 0 when hugetlb is unavailable
  long hugetlb_total = 0;        ///< HugePages_Total
  long hugetlb_free = 0;         ///< HugePages_Free

  std::set<std::string> disabled;             ///< names from HMMKIT_DISABLE that were honoured
  std::vector<std::string> disabled_unknown;  ///< names from HMMKIT_DISABLE that mean nothing

  bool has_uffd_feature(uint64_t bit) const { return (uffd_features & bit) != 0; }

  /// Probes the running kernel. Cheap enough to call in tests; does not log.
  static KernelFeatures Probe();
  /// The process-wide probe, made on first use (thread-safe).
  static const KernelFeatures& Get();
};

/// One row of "which mechanism each hmmkit feature uses" for `hmmctl info` and the logs.
struct MechanismChoice {
  std::string feature;    ///< e.g. "VMA lookup"
  std::string mechanism;  ///< e.g. "PROCMAP_QUERY ioctl"
  bool degraded = false;  ///< true when a fallback or nothing at all is used
  std::string note;       ///< what the fallback costs or lacks
};
std::vector<MechanismChoice> ChooseMechanisms(const KernelFeatures& f);

/// Names of the UFFD_FEATURE_* bits, low to high, for reports.
std::vector<std::pair<std::string, uint64_t>> UffdFeatureNames();

}  // namespace hmmkit
