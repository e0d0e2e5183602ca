// KernelFeatures::Probe: every entry is the outcome of trying the call on the running kernel.
//
// Each probe works on its own small private mapping and its own descriptors, releases them before
// it returns, and never logs (the caller decides what to report: `hmmctl info`, AddressSpace
// warnings).
//
// HMMKIT_DISABLE forces a feature off after probing. For uffd_wp and uffdio_move it also clears the
// matching UFFD_FEATURE_* bits from uffd_features, so that code testing has_uffd_feature() sees the
// same answer as code testing the bool. dev_userfaultfd skips the /dev/userfaultfd attempt, so the
// syscall paths are probed as on a machine without the device node's permission.
#include "hmmkit/mirror/kernel_features.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string_view>
#include <utility>

#include "hmmkit/mirror/uapi.hpp"

namespace hmmkit {

namespace {

// ---- small RAII helpers (probe-local; the mirror layer proper goes through Sys) ----------------

class Fd {
 public:
  explicit Fd(int fd = -1) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  bool ok() const { return fd_ >= 0; }

 private:
  int fd_;
};

// A private anonymous mapping, unmapped on destruction.
class AnonMap {
 public:
  explicit AnonMap(size_t len, int prot = PROT_READ | PROT_WRITE) : len_(len) {
    void* p = ::mmap(nullptr, len, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    addr_ = p == MAP_FAILED ? nullptr : static_cast<char*>(p);
  }
  ~AnonMap() {
    if (addr_) ::munmap(addr_, len_);
  }
  AnonMap(const AnonMap&) = delete;
  AnonMap& operator=(const AnonMap&) = delete;
  char* data() const { return addr_; }
  uintptr_t addr() const { return reinterpret_cast<uintptr_t>(addr_); }
  bool ok() const { return addr_ != nullptr; }

 private:
  char* addr_ = nullptr;
  size_t len_;
};

// "EACCES" for EACCES; the number when the C library has no name for it.
std::string ErrnoName(int err) {
  if (const char* name = strerrorname_np(err)) return name;
  return "errno " + std::to_string(err);
}

// Runs a single syscall-like call that returns -1/errno, retrying EINTR.
template <class F>
long RetryEintr(F&& f) {
  long r;
  do {
    r = f();
  } while (r < 0 && errno == EINTR);
  return r;
}

// ---- HMMKIT_DISABLE -----------------------------------------------------------------------------

constexpr std::array<std::string_view, 6> kDisableNames = {
    "pagemap_scan", "procmap_query", "madv_populate", "uffdio_move", "uffd_wp", "dev_userfaultfd"};

// Splits HMMKIT_DISABLE (comma separated, blanks around names ignored) into the known names, which
// are honoured, and the unknown ones, which are reported.
void ParseDisable(std::set<std::string>* known_out, std::vector<std::string>* unknown_out) {
  const char* env = std::getenv("HMMKIT_DISABLE");
  if (!env) return;
  std::string_view rest(env);
  while (!rest.empty()) {
    size_t comma = rest.find(',');
    std::string_view name = rest.substr(0, comma);
    rest = comma == std::string_view::npos ? std::string_view() : rest.substr(comma + 1);
    while (!name.empty() && (name.front() == ' ' || name.front() == '\t')) name.remove_prefix(1);
    while (!name.empty() && (name.back() == ' ' || name.back() == '\t')) name.remove_suffix(1);
    if (name.empty()) continue;
    if (std::find(kDisableNames.begin(), kDisableNames.end(), name) != kDisableNames.end())
      known_out->emplace(name);
    else
      unknown_out->emplace_back(name);
  }
}

// ---- userfaultfd
// ----------------------------------------------------------------------------------

// Opens a userfaultfd the best way allowed; fills f.uffd_mode and f.uffd_error.
int OpenUffd(KernelFeatures& f, bool skip_dev_node) {
  std::string errors;
  auto note = [&errors](std::string_view what, std::string_view why) {
    if (!errors.empty()) errors += "; ";
    errors += what;
    errors += ": ";
    errors += why;
  };

  if (skip_dev_node) {
    note("/dev/userfaultfd", "disabled by HMMKIT_DISABLE");
  } else {
    Fd dev(int(RetryEintr([] { return ::open("/dev/userfaultfd", O_RDWR | O_CLOEXEC); })));
    if (!dev.ok()) {
      note("/dev/userfaultfd", "open: " + ErrnoName(errno));
    } else {
      int fd = ::ioctl(dev.get(), USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
      if (fd >= 0) {
        f.uffd_mode = UffdOpenMode::kDevNode;
        f.uffd_error.clear();
        return fd;
      }
      note("/dev/userfaultfd", "USERFAULTFD_IOC_NEW: " + ErrnoName(errno));
    }
  }

  int fd = int(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
  if (fd >= 0) {
    f.uffd_mode = UffdOpenMode::kSyscall;
    f.uffd_error = errors;
    return fd;
  }
  note("userfaultfd(2)", ErrnoName(errno));

  fd = int(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY));
  if (fd >= 0) {
    f.uffd_mode = UffdOpenMode::kSyscallUserOnly;
    f.uffd_error = errors;
    return fd;
  }
  note("userfaultfd(2) UFFD_USER_MODE_ONLY", ErrnoName(errno));

  f.uffd_mode = UffdOpenMode::kNone;
  f.uffd_error = errors;
  return -1;
}

void ProbeUffd(KernelFeatures& f, bool skip_dev_node) {
  Fd uffd(OpenUffd(f, skip_dev_node));
  if (!uffd.ok()) return;
  // features = 0 asks for nothing; the kernel answers with everything it offers.
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = 0;
  if (::ioctl(uffd.get(), UFFDIO_API, &api) != 0) {
    if (!f.uffd_error.empty()) f.uffd_error += "; ";
    f.uffd_error += "UFFDIO_API: " + ErrnoName(errno);
    return;
  }
  f.uffd_features = api.features;
  f.uffd_ioctls = api.ioctls;
  f.uffd_wp = f.has_uffd_feature(UFFD_FEATURE_PAGEFAULT_FLAG_WP);
  f.uffd_wp_shmem = f.has_uffd_feature(UFFD_FEATURE_WP_HUGETLBFS_SHMEM);
  f.uffdio_move = f.has_uffd_feature(UFFD_FEATURE_MOVE);
  f.uffd_poison = f.has_uffd_feature(UFFD_FEATURE_POISON);
}

// ---- /proc ioctls -------------------------------------------------------------------------------

bool ProbePagemapScan(size_t page) {
  AnonMap map(page);
  Fd pagemap(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
  if (!map.ok() || !pagemap.ok()) return false;
  page_region region{};
  pm_scan_arg arg{};
  arg.size = sizeof(arg);
  arg.start = map.addr();
  arg.end = map.addr() + page;
  arg.vec = reinterpret_cast<uintptr_t>(&region);
  arg.vec_len = 1;
  arg.return_mask = PAGE_IS_PRESENT;
  // >= 0 regions filled; ENOTTY before 6.7; EINVAL for an ABI the kernel does not accept.
  return RetryEintr([&] { return long(::ioctl(pagemap.get(), PAGEMAP_SCAN, &arg)); }) >= 0;
}

bool ProbeProcmapQuery(size_t page) {
  AnonMap map(page);
  Fd maps(::open("/proc/self/maps", O_RDONLY | O_CLOEXEC));
  if (!map.ok() || !maps.ok()) return false;
  procmap_query q{};
  q.size = sizeof(q);
  q.query_addr = map.addr();
  // ENOTTY before 6.11.
  if (RetryEintr([&] { return long(::ioctl(maps.get(), PROCMAP_QUERY, &q)); }) != 0) return false;
  return q.vma_start <= map.addr() && map.addr() < q.vma_end;
}

// Read-faults two pages of a fresh private anon mapping and reads their pagemap entries. Untouched
// anon memory maps the shared zero page on a read fault, so both PFNs must be equal.
void ProbePagemapPfns(KernelFeatures& f, size_t page) {
  AnonMap map(2 * page);
  Fd pagemap(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
  if (!map.ok() || !pagemap.ok()) return;
  // No THP here: a huge zero page would have another PFN (and VM_NOHUGEPAGE prevents merging
  // with a neighbouring THP-eligible VMA).
  ::madvise(map.data(), 2 * page, MADV_NOHUGEPAGE);
  uint64_t pfn[2] = {0, 0};
  for (int i = 0; i < 2; ++i) {
    volatile const char* p = map.data() + size_t(i) * page;
    (void)*p;  // read fault
    uint64_t entry = 0;
    off_t off = off_t(map.addr() / page + size_t(i)) * off_t(sizeof(entry));
    if (::pread(pagemap.get(), &entry, sizeof(entry), off) != ssize_t(sizeof(entry))) return;
    if (!(entry & pagemap_bits::kPresent)) return;
    pfn[i] = entry & pagemap_bits::kPfnMask;
  }
  f.pagemap_pfns = pfn[0] != 0;
  if (f.pagemap_pfns && pfn[0] == pfn[1]) f.zero_pfn = pfn[0];
}

bool ProbeKpageflags() {
  Fd fd(::open("/proc/kpageflags", O_RDONLY | O_CLOEXEC));
  if (!fd.ok()) return false;
  uint64_t flags = 0;
  return ::pread(fd.get(), &flags, sizeof(flags), 0) == ssize_t(sizeof(flags));
}

// ---- madvise ------------------------------------------------------------------------------------

bool ProbeMadvPopulate(size_t page) {
  AnonMap map(page);
  if (!map.ok()) return false;
  // Both were added together (5.14); EINVAL before.
  return RetryEintr([&] { return long(::madvise(map.data(), page, MADV_POPULATE_READ)); }) == 0 &&
         RetryEintr([&] { return long(::madvise(map.data(), page, MADV_POPULATE_WRITE)); }) == 0;
}

// EINVAL is also what a supporting kernel answers for a range it cannot collapse, and a VMA
// smaller than a PMD, or a PMD with no page table, is such a range. So the probe uses one aligned
// PMD-sized range with one page written: a supporting kernel collapses it (0) or fails with
// ENOMEM/EAGAIN/EBUSY; only a kernel without MADV_COLLAPSE (or a process with THP disabled by
// prctl) answers EINVAL.
bool ProbeMadvCollapse(size_t page) {
  constexpr size_t kPmd = size_t(2) << 20;  // x86-64 and arm64 with 4 KiB pages
  if (page != 4096) return false;           // other geometries: not probed, reported "no"
  AnonMap map(2 * kPmd);
  if (!map.ok()) return false;
  char* start = reinterpret_cast<char*>((map.addr() + kPmd - 1) & ~(uintptr_t(kPmd) - 1));
  start[0] = 1;
  if (::madvise(start, kPmd, MADV_COLLAPSE) == 0) return true;
  return errno != EINVAL;
}

// ---- sysfs / procfs text ------------------------------------------------------------------------

// The word in brackets of a sysfs selection line ("always [madvise] never" -> "madvise"), or "".
std::string BracketedWord(const std::string& line) {
  size_t open = line.find('[');
  size_t close = line.find(']', open == std::string::npos ? 0 : open);
  if (open == std::string::npos || close == std::string::npos) return {};
  return line.substr(open + 1, close - open - 1);
}

bool ReadLine(const char* path, std::string& line) {
  std::ifstream in(path);
  return in && std::getline(in, line);
}

void ProbeThp(KernelFeatures& f) {
  std::string line;
  if (ReadLine("/sys/kernel/mm/transparent_hugepage/enabled", line)) {
    std::string mode = BracketedWord(line);
    if (mode == "always")
      f.thp = ThpMode::kAlways;
    else if (mode == "madvise")
      f.thp = ThpMode::kMadvise;
    else if (mode == "never")
      f.thp = ThpMode::kNever;
  }
  if (ReadLine("/sys/kernel/mm/transparent_hugepage/shmem_enabled", line)) {
    f.thp_shmem = BracketedWord(line);
  }
}

void ProbeHugetlb(KernelFeatures& f) {
  std::ifstream in("/proc/meminfo");
  std::string key;
  long value = 0;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    if (!(fields >> key >> value)) continue;
    if (key == "HugePages_Total:")
      f.hugetlb_total = value;
    else if (key == "HugePages_Free:")
      f.hugetlb_free = value;
    else if (key == "Hugepagesize:")
      f.hugetlb_page_size = size_t(value) * 1024;  // kB
  }
}

// ---- mechanism rows -----------------------------------------------------------------------------

// " (PAGEMAP_SCAN disabled by HMMKIT_DISABLE)" when `name` was disabled, else "".
std::string DisabledSuffix(const KernelFeatures& f, const char* name, const char* what) {
  if (!f.disabled.count(name)) return {};
  return std::string(" (") + what + " disabled by HMMKIT_DISABLE)";
}

std::string KiB(size_t bytes) {
  return std::to_string(bytes / 1024) + " kB";
}

}  // namespace

const char* ToString(UffdOpenMode mode) {
  switch (mode) {
    case UffdOpenMode::kNone:
      return "none";
    case UffdOpenMode::kDevNode:
      return "/dev/userfaultfd";
    case UffdOpenMode::kSyscall:
      return "userfaultfd(2)";
    case UffdOpenMode::kSyscallUserOnly:
      return "userfaultfd(2) user-mode-only";
  }
  return "?";
}

const char* ToString(ThpMode mode) {
  switch (mode) {
    case ThpMode::kUnavailable:
      return "unavailable";
    case ThpMode::kAlways:
      return "always";
    case ThpMode::kMadvise:
      return "madvise";
    case ThpMode::kNever:
      return "never";
  }
  return "?";
}

KernelFeatures KernelFeatures::Probe() {
  KernelFeatures f;
  const int saved_errno = errno;
  ParseDisable(&f.disabled, &f.disabled_unknown);
  auto off = [&f](const char* name) { return f.disabled.count(name) != 0; };

  struct utsname u {};
  if (::uname(&u) == 0) f.kernel_release = u.release;
  if (long ps = ::sysconf(_SC_PAGESIZE); ps > 0) f.page_size = size_t(ps);

  ProbeUffd(f, off("dev_userfaultfd"));
  f.pagemap_scan = ProbePagemapScan(f.page_size);
  f.procmap_query = ProbeProcmapQuery(f.page_size);
  ProbePagemapPfns(f, f.page_size);
  f.kpageflags = ProbeKpageflags();
  f.madv_populate = ProbeMadvPopulate(f.page_size);
  f.madv_collapse = ProbeMadvCollapse(f.page_size);
  ProbeThp(f);
  ProbeHugetlb(f);

  if (off("pagemap_scan")) f.pagemap_scan = false;
  if (off("procmap_query")) f.procmap_query = false;
  if (off("madv_populate")) f.madv_populate = false;
  if (off("uffdio_move")) {
    f.uffdio_move = false;
    f.uffd_features &= ~uint64_t(UFFD_FEATURE_MOVE);
  }
  if (off("uffd_wp")) {
    f.uffd_wp = false;
    f.uffd_wp_shmem = false;
    f.uffd_features &= ~uint64_t(UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_HUGETLBFS_SHMEM |
                                 UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_ASYNC);
  }
  errno = saved_errno;
  return f;
}

const KernelFeatures& KernelFeatures::Get() {
  static const KernelFeatures features = Probe();  // C++11 magic static: thread-safe, once
  return features;
}

std::vector<std::pair<std::string, uint64_t>> UffdFeatureNames() {
  return {
      {"PAGEFAULT_FLAG_WP", UFFD_FEATURE_PAGEFAULT_FLAG_WP},
      {"EVENT_FORK", UFFD_FEATURE_EVENT_FORK},
      {"EVENT_REMAP", UFFD_FEATURE_EVENT_REMAP},
      {"EVENT_REMOVE", UFFD_FEATURE_EVENT_REMOVE},
      {"MISSING_HUGETLBFS", UFFD_FEATURE_MISSING_HUGETLBFS},
      {"MISSING_SHMEM", UFFD_FEATURE_MISSING_SHMEM},
      {"EVENT_UNMAP", UFFD_FEATURE_EVENT_UNMAP},
      {"SIGBUS", UFFD_FEATURE_SIGBUS},
      {"THREAD_ID", UFFD_FEATURE_THREAD_ID},
      {"MINOR_HUGETLBFS", UFFD_FEATURE_MINOR_HUGETLBFS},
      {"MINOR_SHMEM", UFFD_FEATURE_MINOR_SHMEM},
      {"EXACT_ADDRESS", UFFD_FEATURE_EXACT_ADDRESS},
      {"WP_HUGETLBFS_SHMEM", UFFD_FEATURE_WP_HUGETLBFS_SHMEM},
      {"WP_UNPOPULATED", UFFD_FEATURE_WP_UNPOPULATED},
      {"POISON", UFFD_FEATURE_POISON},
      {"WP_ASYNC", UFFD_FEATURE_WP_ASYNC},
      {"MOVE", UFFD_FEATURE_MOVE},
  };
}

std::vector<MechanismChoice> ChooseMechanisms(const KernelFeatures& f) {
  std::vector<MechanismChoice> rows;
  const bool uffd = f.uffd_mode != UffdOpenMode::kNone;

  {
    MechanismChoice r{"userfaultfd", ToString(f.uffd_mode), false, ""};
    switch (f.uffd_mode) {
      case UffdOpenMode::kDevNode:
        r.mechanism += " (USERFAULTFD_IOC_NEW)";
        break;
      case UffdOpenMode::kSyscall:
        break;
      case UffdOpenMode::kSyscallUserOnly:
        r.degraded = true;
        r.note = "system calls that touch migrated memory get EFAULT instead of faulting it back";
        break;
      case UffdOpenMode::kNone:
        r.degraded = true;
        r.note = "no CPU-side events or fault-back";
        break;
    }
    if (r.degraded && !f.uffd_error.empty()) r.note += " (" + f.uffd_error + ")";
    rows.push_back(std::move(r));
  }

  if (f.procmap_query) {
    rows.push_back({"VMA lookup", "PROCMAP_QUERY ioctl", false, ""});
  } else {
    rows.push_back({"VMA lookup", "/proc/self/maps parse", true,
                    "O(VMAs) per query" + DisabledSuffix(f, "procmap_query", "PROCMAP_QUERY")});
  }

  if (f.pagemap_scan) {
    rows.push_back({"page snapshot", "PAGEMAP_SCAN ioctl", false, ""});
  } else {
    std::string note = f.pagemap_pfns && f.zero_pfn != 0
                           ? "zero page by PFN compare"
                           : "no zero-page detection without CAP_SYS_ADMIN";
    note += f.kpageflags ? ", huge pages via /proc/kpageflags"
                         : ", huge pages only via kpageflags (unreadable: not detected)";
    rows.push_back({"page snapshot", "/proc/self/pagemap pread", true,
                    note + DisabledSuffix(f, "pagemap_scan", "PAGEMAP_SCAN")});
  }

  if (f.madv_populate) {
    rows.push_back({"CPU fault (range_fault)", "MADV_POPULATE_READ/WRITE", false, ""});
  } else {
    rows.push_back({"CPU fault (range_fault)", "none", true,
                    "range_fault with REQ_FAULT fails with ENOTSUP" +
                        DisabledSuffix(f, "madv_populate", "MADV_POPULATE")});
  }

  const uint64_t kEvents =
      UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_REMAP;
  if (uffd && (f.uffd_features & kEvents) == kEvents) {
    rows.push_back({"unmap/remove/remap events", "userfaultfd EVENT_UNMAP/REMOVE/REMAP", false,
                    "anon, shmem and hugetlbfs VMAs only"});
  } else {
    rows.push_back({"unmap/remove/remap events", "none", true,
                    "munmap/madvise/mremap are not seen: device mappings can go stale"});
  }

  if (uffd && f.uffd_wp) {
    rows.push_back({"write protection during migration", "UFFDIO_WRITEPROTECT", false, ""});
  } else {
    rows.push_back({"write protection during migration", "none", true,
                    "CPU writes are not blocked while pages migrate" +
                        DisabledSuffix(f, "uffd_wp", "userfaultfd WP")});
  }

  if (uffd && f.uffdio_move) {
    rows.push_back({"device-exclusive", "UFFDIO_MOVE", false, ""});
  } else if (uffd && f.uffd_wp) {
    rows.push_back(
        {"device-exclusive", "write-protect", true,
         "weaker read guarantee: the CPU can still read the page while the device holds it" +
             DisabledSuffix(f, "uffdio_move", "UFFDIO_MOVE")});
  } else {
    rows.push_back({"device-exclusive", "none", true, "needs UFFDIO_MOVE or userfaultfd WP"});
  }

  if (uffd && f.uffd_poison) {
    rows.push_back({"memory-failure poison", "UFFDIO_POISON", false, ""});
  } else {
    rows.push_back({"memory-failure poison", "none", true,
                    "CPU reads of a failed device page are not turned into SIGBUS"});
  }

  rows.push_back({"mprotect notifications", "interposition, opt-in", true,
                  "userfaultfd has no mprotect event: link or LD_PRELOAD libhmmkit_interpose and "
                  "set HMMKIT_INTERPOSE=1"});

  {
    MechanismChoice r{"THP", "", false, ""};
    if (f.thp == ThpMode::kUnavailable) {
      r.mechanism = "unavailable";
      r.degraded = true;
      r.note = "no huge CPU pages: 2 MiB ranges are handled as base pages";
    } else {
      r.mechanism = std::string("enabled=") + ToString(f.thp) +
                    " shmem=" + (f.thp_shmem.empty() ? "?" : f.thp_shmem);
      r.degraded = f.thp == ThpMode::kNever;
      if (r.degraded) r.note = "no huge CPU pages: 2 MiB ranges are handled as base pages";
      if (!f.madv_collapse) r.note += std::string(r.note.empty() ? "" : "; ") + "no MADV_COLLAPSE";
    }
    rows.push_back(std::move(r));
  }

  {
    MechanismChoice r{"hugetlb", "", false, ""};
    if (f.hugetlb_page_size == 0) {
      r.mechanism = "unavailable";
      r.degraded = true;
    } else {
      r.mechanism = KiB(f.hugetlb_page_size) + " pages: " + std::to_string(f.hugetlb_total) +
                    " total, " + std::to_string(f.hugetlb_free) + " free";
      if (f.hugetlb_total == 0) {
        r.degraded = true;
        r.note = "none reserved (vm.nr_hugepages = 0): MAP_HUGETLB fails with ENOMEM";
      }
    }
    rows.push_back(std::move(r));
  }
  return rows;
}

}  // namespace hmmkit
