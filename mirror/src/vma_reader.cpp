// VMA queries (PROCMAP_QUERY, else /proc/self/maps) and VmaKind classification. See vma_reader.hpp.
#include "vma_reader.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <string_view>

#include <fmt/format.h>

#include "hmmkit/base/mutex.hpp"
#include "hmmkit/mirror/uapi.hpp"

namespace hmmkit {

const char* ToString(VmaKind kind) {
  switch (kind) {
    case VmaKind::kAnon:
      return "anon";
    case VmaKind::kShmem:
      return "shmem";
    case VmaKind::kFile:
      return "file";
    case VmaKind::kHugetlb:
      return "hugetlb";
    case VmaKind::kSpecial:
      return "special";
  }
  return "?";
}

namespace {

constexpr size_t kNameBufSize = 4096;     // PATH_MAX: d_path() fails beyond it anyway
constexpr size_t kMapsChunk = 64 * 1024;  // read(2) size for /proc/self/maps
constexpr std::string_view kDeleted = " (deleted)";

bool StartsWith(std::string_view s, std::string_view p) {
  return s.substr(0, p.size()) == p;
}
bool EndsWith(std::string_view s, std::string_view p) {
  return s.size() >= p.size() && s.substr(s.size() - p.size()) == p;
}

// ---- Filesystem of a device number ----------------------------------------------------------

enum class FsClass : uint8_t { kUnknown, kShmem, kHugetlb, kOther };
struct DevInfo {
  FsClass fs = FsClass::kUnknown;
  size_t page_size = 0;  // hugetlb page size; 0: the default size
};

// "2M", "1G", "2048k" -> bytes; 0 when unparsable.
size_t ParseSize(std::string_view s) {
  size_t v = 0;
  size_t i = 0;
  for (; i < s.size() && s[i] >= '0' && s[i] <= '9'; ++i) v = v * 10 + size_t(s[i] - '0');
  if (i == 0) return 0;
  if (i < s.size()) {
    switch (s[i] | 0x20) {
      case 'k':
        v <<= 10;
        break;
      case 'm':
        v <<= 20;
        break;
      case 'g':
        v <<= 30;
        break;
      default:
        break;
    }
  }
  return v;
}

int RetryOpen(const char* path, int flags) {
  int fd;
  do {
    fd = ::open(path, flags | O_CLOEXEC);
  } while (fd < 0 && errno == EINTR);
  return fd;
}

// Reads a whole (small) file from the current position; false on error.
bool ReadAll(int fd, std::string& out) {
  out.clear();
  char buf[8192];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return false;
    if (n == 0) return true;
    out.append(buf, size_t(n));
  }
}

// Process-wide map from device number to filesystem class. The kernel-internal devices (shm, and
// hugetlbfs per page size) are learned once at construction and never change; the mount table is
// cached and re-read when a device is missing and mountinfo signalled a change.
class DeviceTable {
 public:
  static DeviceTable& Get() {
    static DeviceTable* table = new DeviceTable();  // never destroyed: used from any thread at exit
    return *table;
  }

  DevInfo Lookup(dev_t dev) EXCLUDES(mu_) {
    if (has_shm_dev_ && dev == shm_dev_) return DevInfo{FsClass::kShmem, 0};
    for (const auto& [d, size] : hugetlb_internal_)
      if (d == dev) return DevInfo{FsClass::kHugetlb, size};
    MutexLock lock(mu_);
    if (!loaded_ || (!Find(dev) && MountsChangedLocked())) LoadLocked();
    const DevInfo* info = Find(dev);
    return info ? *info : DevInfo{};
  }

 private:
  DeviceTable() {
    struct stat st;
    int fd = static_cast<int>(memfd_create("hmmkit-shm-probe", MFD_CLOEXEC));
    if (fd >= 0) {
      if (fstat(fd, &st) == 0) {
        shm_dev_ = st.st_dev;
        has_shm_dev_ = true;
      }
      ::close(fd);
    }
    // One internal hugetlbfs mount per huge page size: learn each one's device.
    if (DIR* dir = opendir("/sys/kernel/mm/hugepages")) {
      while (dirent* e = readdir(dir)) {
        std::string_view name(e->d_name);
        if (!StartsWith(name, "hugepages-")) continue;
        size_t size = ParseSize(name.substr(10));  // "2048kB"
        if (size == 0 || (size & (size - 1)) != 0) continue;
        // MFD_HUGE_SHIFT has the value of MAP_HUGE_SHIFT (26); <linux/memfd.h> clashes with glibc.
        unsigned shift = unsigned(__builtin_ctzl(size));
        int hfd = static_cast<int>(memfd_create(
            "hmmkit-hugetlb-probe", MFD_CLOEXEC | MFD_HUGETLB | (shift << MAP_HUGE_SHIFT)));
        if (hfd < 0) continue;
        if (fstat(hfd, &st) == 0) hugetlb_internal_.emplace_back(st.st_dev, size);
        ::close(hfd);
      }
      closedir(dir);
    }
  }

  const DevInfo* Find(dev_t dev) const REQUIRES(mu_) {
    auto it = std::lower_bound(mounts_.begin(), mounts_.end(), dev,
                               [](const auto& e, dev_t d) { return e.first < d; });
    return it != mounts_.end() && it->first == dev ? &it->second : nullptr;
  }

  // True when the mount table may have changed since the last load (or we are a forked child).
  bool MountsChangedLocked() REQUIRES(mu_) {
    if (poll_fd_ < 0 || poll_pid_ != getpid()) return true;
    pollfd p{poll_fd_, POLLPRI, 0};
    int rc;
    do {
      rc = ::poll(&p, 1, 0);
    } while (rc < 0 && errno == EINTR);
    return rc != 0;  // an event, or an error: re-read to be safe
  }

  void LoadLocked() REQUIRES(mu_) {
    loaded_ = true;
    if (poll_fd_ >= 0) ::close(poll_fd_);
    // The descriptor we read stays open: poll() on it reports later changes of the mount table.
    poll_fd_ = RetryOpen("/proc/self/mountinfo", O_RDONLY);
    poll_pid_ = getpid();
    std::string text;
    if (poll_fd_ < 0 || !ReadAll(poll_fd_, text)) return;  // keep the old table
    mounts_.clear();
    std::string_view rest(text);
    while (!rest.empty()) {
      size_t nl = rest.find('\n');
      std::string_view line = rest.substr(0, nl);
      rest = nl == std::string_view::npos ? std::string_view() : rest.substr(nl + 1);
      // "id parent major:minor root mountpoint opts [optional...] - fstype source superopts"
      size_t sp0 = line.find(' ');
      size_t sp1 = sp0 == std::string_view::npos ? sp0 : line.find(' ', sp0 + 1);
      size_t sp2 = sp1 == std::string_view::npos ? sp1 : line.find(' ', sp1 + 1);
      size_t sep = sp2 == std::string_view::npos ? sp2 : line.find(" - ", sp2);
      if (sep == std::string_view::npos) continue;
      std::string_view devfield = line.substr(sp1 + 1, sp2 - sp1 - 1);
      std::string_view tail = line.substr(sep + 3);
      size_t t1 = tail.find(' ');
      std::string_view fstype = tail.substr(0, t1);
      std::string_view superopts;
      if (t1 != std::string_view::npos) {
        size_t t2 = tail.find(' ', t1 + 1);
        if (t2 != std::string_view::npos) superopts = tail.substr(t2 + 1);
      }
      size_t colon = devfield.find(':');
      if (colon == std::string_view::npos) continue;
      unsigned maj = unsigned(ParseSize(devfield.substr(0, colon)));
      unsigned min = unsigned(ParseSize(devfield.substr(colon + 1)));
      DevInfo info{FsClass::kOther, 0};
      if (fstype == "tmpfs" || fstype == "devtmpfs") {
        info.fs = FsClass::kShmem;
      } else if (fstype == "hugetlbfs") {
        info.fs = FsClass::kHugetlb;
        size_t p = superopts.find("pagesize=");
        if (p != std::string_view::npos) info.page_size = ParseSize(superopts.substr(p + 9));
      }
      mounts_.emplace_back(makedev(maj, min), info);
    }
    std::sort(mounts_.begin(), mounts_.end(),
              [](const auto& a, const auto& b) { return a.first < b.first; });
  }

  // Set at construction, then read-only.
  dev_t shm_dev_ = 0;
  bool has_shm_dev_ = false;
  std::vector<std::pair<dev_t, size_t>> hugetlb_internal_;

  Mutex mu_;
  bool loaded_ GUARDED_BY(mu_) = false;
  std::vector<std::pair<dev_t, DevInfo>> mounts_ GUARDED_BY(mu_);  // sorted by device
  int poll_fd_ GUARDED_BY(mu_) = -1;
  pid_t poll_pid_ GUARDED_BY(mu_) = 0;
};

// ---- Classification -------------------------------------------------------------------------

// Bracketed names of private anonymous memory; every other bracketed name is a kernel special
// mapping ([vdso], [vvar], [vvar_vclock], [vsyscall], [uprobes], [sigpage], ...).
bool IsAnonBracketName(std::string_view name) {
  return name == "[heap]" || name == "[stack]" || StartsWith(name, "[stack:") ||
         StartsWith(name, "[anon:");
}

// A char or block device node: the path still names the mapped inode and is a device.
bool IsDeviceNode(const Vma& v) {
  struct stat st;
  if (stat(v.name.c_str(), &st) != 0) return false;
  return (S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode)) && st.st_ino == v.inode &&
         major(st.st_dev) == v.dev_major && minor(st.st_dev) == v.dev_minor;
}

// Sets v.kind (and v.page_size for hugetlb). `query_page_size` is PROCMAP_QUERY's vma_page_size,
// or 0 when the source (/proc/self/maps) does not report it.
void Classify(Vma& v, const KernelFeatures& f, size_t query_page_size) {
  const size_t base = f.page_size;
  v.page_size = base;
  std::string_view name(v.name);
  if (v.inode == 0 && v.dev_major == 0 && v.dev_minor == 0) {
    // No file behind it.
    bool special = !name.empty() && name.front() == '[' && !IsAnonBracketName(name);
    v.kind = special ? VmaKind::kSpecial : VmaKind::kAnon;
    return;
  }
  if (StartsWith(name, "anon_inode:")) {
    v.kind = VmaKind::kSpecial;
    return;
  }
  if (StartsWith(name, "/dev/") && !StartsWith(name, "/dev/shm/") && !EndsWith(name, kDeleted) &&
      IsDeviceNode(v)) {
    // A private /dev/zero mapping is anonymous memory; every other device mapping is special.
    v.kind = (name == "/dev/zero" && !v.shared) ? VmaKind::kAnon : VmaKind::kSpecial;
    return;
  }
  if (query_page_size > base) {
    v.kind = VmaKind::kHugetlb;
    v.page_size = query_page_size;
    return;
  }
  DevInfo dev = DeviceTable::Get().Lookup(makedev(v.dev_major, v.dev_minor));
  switch (dev.fs) {
    case FsClass::kShmem:
      v.kind = VmaKind::kShmem;
      return;
    case FsClass::kHugetlb:
      v.kind = VmaKind::kHugetlb;
      v.page_size = query_page_size > base     ? query_page_size
                    : dev.page_size != 0       ? dev.page_size
                    : f.hugetlb_page_size != 0 ? f.hugetlb_page_size
                                               : base;
      return;
    case FsClass::kOther:
      v.kind = VmaKind::kFile;
      return;
    case FsClass::kUnknown:
      break;
  }
  // Unknown device (outside our mount namespace, or the internal mounts could not be learned).
  if (StartsWith(name, "/anon_hugepage")) {
    v.kind = VmaKind::kHugetlb;
    if (f.hugetlb_page_size != 0) v.page_size = f.hugetlb_page_size;
  } else if (name == "/dev/zero (deleted)" || StartsWith(name, "/memfd:") ||
             StartsWith(name, "/SYSV") || StartsWith(name, "[anon_shmem:")) {
    v.kind = VmaKind::kShmem;
  } else {
    v.kind = VmaKind::kFile;
  }
}

// ---- /proc/self/maps parsing ----------------------------------------------------------------

// A cursor over one line of /proc/self/maps.
struct LineCursor {
  const char* p;
  const char* end;

  bool Hex(uint64_t& out) {
    uint64_t v = 0;
    const char* s = p;
    for (; p < end; ++p) {
      unsigned c = static_cast<unsigned char>(*p);
      unsigned d;
      if (c - '0' < 10) {
        d = c - '0';
      } else if ((c | 0x20) - 'a' < 6) {
        d = (c | 0x20) - 'a' + 10;
      } else {
        break;
      }
      v = (v << 4) | d;
    }
    out = v;
    return p != s;
  }
  bool Dec(uint64_t& out) {
    uint64_t v = 0;
    const char* s = p;
    for (; p < end && unsigned(*p - '0') < 10; ++p) v = v * 10 + uint64_t(*p - '0');
    out = v;
    return p != s;
  }
  bool Char(char c) {
    if (p < end && *p == c) {
      ++p;
      return true;
    }
    return false;
  }
  void Spaces() {
    while (p < end && *p == ' ') ++p;
  }
};

// Per-thread buffers of the query paths: reused so that a query does not allocate.
struct QueryScratch {
  Vma vma;
  std::vector<char> maps;  // /proc/self/maps read buffer
  std::array<char, kNameBufSize> name;
};
QueryScratch& Scratch() {
  thread_local QueryScratch s;
  return s;
}

template <class F>
auto RetryEintr(F&& f) {
  decltype(f()) rc;
  do {
    rc = f();
  } while (rc < 0 && errno == EINTR);
  return rc;
}

class FdCloser {
 public:
  explicit FdCloser(int fd) : fd_(fd) {}
  ~FdCloser() {
    if (fd_ >= 0) ::close(fd_);
  }
  FdCloser(const FdCloser&) = delete;
  FdCloser& operator=(const FdCloser&) = delete;

 private:
  int fd_;
};

}  // namespace

bool VmaReader::use_procmap() const {
  return as_.features().procmap_query && as_.maps_fd_ >= 0;
}

Status VmaReader::QueryProcmap(uintptr_t addr, bool covering_or_next, Vma& out, bool* found) const {
  QueryScratch& s = Scratch();
  procmap_query q{};
  q.size = sizeof q;
  q.query_flags = covering_or_next ? PROCMAP_QUERY_COVERING_OR_NEXT_VMA : 0;
  q.query_addr = addr;
  q.vma_name_addr = reinterpret_cast<uintptr_t>(s.name.data());
  q.vma_name_size = uint32_t(s.name.size());
  int rc = RetryEintr([&] { return as_.sys().Ioctl(as_.maps_fd_, PROCMAP_QUERY, &q); });
  if (rc < 0 && errno == ENAMETOOLONG) {
    // A name longer than PATH_MAX: take the VMA without its name.
    q.vma_name_addr = 0;
    q.vma_name_size = 0;
    rc = RetryEintr([&] { return as_.sys().Ioctl(as_.maps_fd_, PROCMAP_QUERY, &q); });
  }
  if (rc < 0) {
    int err = errno;
    if (err == ENOENT) {
      *found = false;
      return Status::Ok();
    }
    return Status::FromErrno(err, fmt::format("PROCMAP_QUERY at {:#x}: {}", addr, strerror(err)));
  }
  *found = true;
  out.start = q.vma_start;
  out.end = q.vma_end;
  out.read = (q.vma_flags & PROCMAP_QUERY_VMA_READABLE) != 0;
  out.write = (q.vma_flags & PROCMAP_QUERY_VMA_WRITABLE) != 0;
  out.exec = (q.vma_flags & PROCMAP_QUERY_VMA_EXECUTABLE) != 0;
  out.shared = (q.vma_flags & PROCMAP_QUERY_VMA_SHARED) != 0;
  out.offset = q.vma_offset;
  out.inode = q.inode;
  out.dev_major = q.dev_major;
  out.dev_minor = q.dev_minor;
  if (q.vma_name_addr != 0 && q.vma_name_size > 1) {
    out.name.assign(s.name.data(), q.vma_name_size - 1);  // the size counts the NUL
  } else {
    out.name.clear();
  }
  Classify(out, as_.features(), size_t(q.vma_page_size));
  return Status::Ok();
}

Status VmaReader::ForEachProcmap(uintptr_t start, uintptr_t end, void* ctx, Callback cb) const {
  Vma& vma = Scratch().vma;
  uintptr_t addr = start;
  while (addr < end) {
    bool found = false;
    HMMKIT_RETURN_IF_ERROR(QueryProcmap(addr, /*covering_or_next=*/true, vma, &found));
    if (!found || vma.start >= end) break;
    if (!cb(ctx, vma)) break;
    if (vma.end <= addr) break;  // cannot happen; never loop forever
    addr = vma.end;
  }
  return Status::Ok();
}

Status VmaReader::ForEachMaps(uintptr_t start, uintptr_t end, void* ctx, Callback cb) const {
  QueryScratch& s = Scratch();
  if (s.maps.size() < kMapsChunk) s.maps.resize(kMapsChunk);
  int fd = RetryOpen("/proc/self/maps", O_RDONLY);
  if (fd < 0) {
    int err = errno;
    return Status::FromErrno(err, fmt::format("open /proc/self/maps: {}", strerror(err)));
  }
  FdCloser closer(fd);
  Vma& vma = s.vma;

  // Parses one line; returns false to stop (past the range, or the callback said so).
  auto parse_line = [&](const char* b, const char* e) {
    LineCursor c{b, e};
    uint64_t lo, hi, off, maj, min, ino;
    if (!c.Hex(lo) || !c.Char('-') || !c.Hex(hi) || !c.Char(' ')) return true;  // malformed
    if (lo >= end) return false;
    if (hi <= start) return true;
    if (e - c.p < 5) return true;
    vma.start = lo;
    vma.end = hi;
    vma.read = c.p[0] == 'r';
    vma.write = c.p[1] == 'w';
    vma.exec = c.p[2] == 'x';
    vma.shared = c.p[3] == 's';
    c.p += 4;
    if (!c.Char(' ') || !c.Hex(off) || !c.Char(' ') || !c.Hex(maj) || !c.Char(':') || !c.Hex(min) ||
        !c.Char(' ') || !c.Dec(ino)) {
      return true;
    }
    c.Spaces();
    vma.offset = off;
    vma.dev_major = uint32_t(maj);
    vma.dev_minor = uint32_t(min);
    vma.inode = ino;
    vma.name.assign(c.p, size_t(c.end - c.p));
    Classify(vma, as_.features(), 0);
    return cb(ctx, vma);
  };

  size_t have = 0;
  for (;;) {
    if (have == s.maps.size()) s.maps.resize(s.maps.size() * 2);  // a line longer than the buffer
    char* buf = s.maps.data();
    ssize_t n = RetryEintr([&] { return as_.sys().Read(fd, buf + have, s.maps.size() - have); });
    if (n < 0) {
      int err = errno;
      return Status::FromErrno(err, fmt::format("read /proc/self/maps: {}", strerror(err)));
    }
    have += size_t(n);
    size_t pos = 0;
    for (;;) {
      auto* nl = static_cast<char*>(memchr(buf + pos, '\n', have - pos));
      if (!nl) break;
      if (!parse_line(buf + pos, nl)) return Status::Ok();
      pos = size_t(nl - buf) + 1;
    }
    if (n == 0) {
      if (pos < have) (void)parse_line(buf + pos, buf + have);  // last line without '\n'
      return Status::Ok();
    }
    memmove(buf, buf + pos, have - pos);
    have -= pos;
  }
}

Status VmaReader::ForEachImpl(uintptr_t start, uintptr_t end, void* ctx, Callback cb) const {
  if (start >= end) return Status::Ok();
  return use_procmap() ? ForEachProcmap(start, end, ctx, cb) : ForEachMaps(start, end, ctx, cb);
}

Result<std::optional<Vma>> VmaReader::Find(uintptr_t addr) const {
  std::optional<Vma> result;
  if (use_procmap()) {
    Vma vma;
    bool found = false;
    HMMKIT_RETURN_IF_ERROR(QueryProcmap(addr, /*covering_or_next=*/false, vma, &found));
    if (found) result = std::move(vma);
    return result;
  }
  if (addr == UINTPTR_MAX) return result;  // no page there
  HMMKIT_RETURN_IF_ERROR(ForEachMaps(addr, addr + 1, &result, [](void* ctx, const Vma& vma) {
    static_cast<std::optional<Vma>*>(ctx)->emplace(vma);
    return false;
  }));
  return result;
}

Result<std::vector<Vma>> VmaReader::FindRange(uintptr_t start, uintptr_t end) const {
  std::vector<Vma> vmas;
  HMMKIT_RETURN_IF_ERROR(ForEach(start, end, [&](const Vma& vma) {
    vmas.push_back(vma);
    return true;
  }));
  return vmas;
}

}  // namespace hmmkit
