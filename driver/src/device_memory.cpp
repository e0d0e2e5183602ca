// DeviceMemory: the arena, creation and teardown, per-page data, poison and statistics.
// Allocation and eviction are in device_memory_alloc.cpp, references and folios in
// device_memory_refs.cpp. The header has the contract and the locking rules.
#include "hmmkit/driver/device_memory.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>

#include "hmmkit/base/internal_memory.hpp"
#include "hmmkit/base/log.hpp"

namespace hmmkit::driver {

namespace {

constexpr size_t kHugePageSize = size_t{2} << 20;
constexpr size_t kMiB = size_t{1} << 20;
// MFD_HUGE_2MB from <linux/memfd.h>: log2(2 MiB) << MFD_HUGE_SHIFT.
constexpr unsigned kMfdHuge2MB = 21u << 26;

// Free 2 MiB hugetlb pages in the system pool, or 0 when unknown.
uint64_t FreeHugePages() {
  FILE* f = std::fopen("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages", "re");
  if (f == nullptr) return 0;
  unsigned long long n = 0;
  if (std::fscanf(f, "%llu", &n) != 1) n = 0;
  std::fclose(f);
  return n;
}

// The arena: a memfd (or the driver's fd) of `size` bytes mapped MAP_SHARED read/write.
struct Arena {
  int fd = -1;
  uint64_t offset = 0;
  void* base = nullptr;
  bool hugetlb = false;
};

// Creates a memfd with `flags`, sizes it and maps it. On failure nothing is left open.
Status MapMemfd(const std::string& name, unsigned flags, size_t size, Arena* out) {
  const int fd = memfd_create(name.c_str(), MFD_CLOEXEC | flags);
  if (fd < 0) return Status::FromErrno(errno, "memfd_create(" + name + ")");
  if (ftruncate(fd, off_t(size)) != 0) {
    const int err = errno;
    close(fd);
    return Status::FromErrno(err, "ftruncate of the device arena to " + std::to_string(size));
  }
  void* base = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) {
    const int err = errno;
    close(fd);
    return Status::FromErrno(err, "mmap of the device arena (" + std::to_string(size) + " bytes)");
  }
  out->fd = fd;
  out->base = base;
  return Status::Ok();
}

// Does a one-page mapping of `fd` at offset + 4096 show the arena's second page? Drivers that
// ignore the offset of a partial mapping show the first one instead.
bool PagesMapAtTheirOffset(int fd, uint64_t offset, void* base, size_t capacity) {
  if (capacity < 2 * kDevicePageSize) return true;
  auto* page1 = static_cast<volatile uint64_t*>(
      static_cast<void*>(static_cast<char*>(base) + kDevicePageSize));
  auto* page0 = static_cast<volatile uint64_t*>(base);
  const uint64_t saved0 = *page0, saved1 = *page1;
  *page0 = 0x1111111111111111ull;
  *page1 = 0x2222222222222222ull;
  void* p =
      mmap(nullptr, kDevicePageSize, PROT_READ, MAP_SHARED, fd, off_t(offset + kDevicePageSize));
  bool ok = false;
  if (p != MAP_FAILED) {
    ok = *static_cast<volatile uint64_t*>(p) == 0x2222222222222222ull;
    munmap(p, kDevicePageSize);
  }
  *page0 = saved0;
  *page1 = saved1;
  return ok;
}

Status MapExternal(const DeviceMemory::Options& o, Arena* out) {
  const DeviceMemory::Options::External& e = *o.external;
  const int fd = fcntl(e.fd, F_DUPFD_CLOEXEC, 0);
  if (fd < 0)
    return Status::FromErrno(errno, "dup of the external arena fd " + std::to_string(e.fd));
  void* base = mmap(nullptr, o.capacity, PROT_READ | PROT_WRITE, MAP_SHARED, fd, off_t(e.offset));
  if (base == MAP_FAILED) {
    const int err = errno;
    close(fd);
    return Status::FromErrno(err, "mmap of the external device arena " + e.what + " (" +
                                      std::to_string(o.capacity) + " bytes)");
  }
  if (o.kind == PageKind::kDeviceCoherent &&
      !PagesMapAtTheirOffset(fd, e.offset, base, o.capacity)) {
    munmap(base, o.capacity);
    close(fd);
    return Status::FromErrno(ENOTSUP, "device-coherent memory in " + e.what +
                                          ": a one-page mapping at an offset does not show that "
                                          "page (the driver ignores the offset); use "
                                          "device-private memory");
  }
  out->fd = fd;
  out->offset = e.offset;
  out->base = base;
  Log().info("device memory '{}': {} MiB arena in {}", o.name, o.capacity / kMiB, e.what);
  return Status::Ok();
}

// hugetlb when asked, allowed and available, else a plain memfd (with MADV_HUGEPAGE when asked).
Status CreateArena(const DeviceMemory::Options& o, Arena* out) {
  if (o.external) return MapExternal(o, out);
  std::string name = "hmmkit-devmem";
  if (!o.name.empty()) name += ":" + o.name.substr(0, 200);
  const std::string& label = o.name.empty() ? name : o.name;
  const uint64_t huge_needed = o.capacity / kHugePageSize;
  // Coherent pages are mapped one 4 KiB page at a time from the memfd (ArenaOffset), which a
  // hugetlbfs file does not allow.
  if (o.hugetlb && o.kind == PageKind::kDevicePrivate && o.capacity % kHugePageSize == 0) {
    const uint64_t free_huge = FreeHugePages();
    if (free_huge >= huge_needed) {
      Status st = MapMemfd(name, MFD_HUGETLB | kMfdHuge2MB, o.capacity, out);
      if (st.ok()) {
        out->hugetlb = true;
        Log().info("device memory '{}': {} MiB arena on hugetlb 2 MiB pages (MFD_HUGETLB)", label,
                   o.capacity / kMiB);
        return st;
      }
      Log().info("device memory '{}': hugetlb arena failed ({}); using a plain memfd", label,
                 st.ToString());
    } else {
      Log().info("device memory '{}': {} free hugetlb pages, {} needed; using a plain memfd", label,
                 free_huge, huge_needed);
    }
  }
  HMMKIT_RETURN_IF_ERROR(MapMemfd(name, 0, o.capacity, out));
  if (o.huge_pages) {
    if (madvise(out->base, o.capacity, MADV_HUGEPAGE) == 0) {
      Log().info("device memory '{}': {} MiB arena on a memfd with MADV_HUGEPAGE (shmem THP)",
                 label, o.capacity / kMiB);
    } else {
      Log().info("device memory '{}': {} MiB arena on a memfd, 4 KiB pages (MADV_HUGEPAGE: {})",
                 label, o.capacity / kMiB, std::strerror(errno));
    }
  } else {
    Log().info("device memory '{}': {} MiB arena on a memfd, 4 KiB pages", label,
               o.capacity / kMiB);
  }
  return Status::Ok();
}

void NoFree(uint64_t /*id*/, void* /*driver_data*/) {}

Status NoEvict(DeviceMemory& /*mem*/, std::span<const uint64_t> /*ids*/) {
  return Status::FromErrno(ENOTSUP, "no evict hook: this device memory cannot be evicted");
}

}  // namespace

Result<std::shared_ptr<DeviceMemory>> DeviceMemory::Create(const Options& options) {
  const size_t chunk = options.chunk_size;
  if (chunk < kDevicePageSize || !std::has_single_bit(chunk)) {
    return Status::FromErrno(EINVAL, "device memory chunk_size " + std::to_string(chunk) +
                                         " is not a power of two >= 4096");
  }
  if (options.capacity == 0 || options.capacity % chunk != 0) {
    return Status::FromErrno(EINVAL, "device memory capacity " + std::to_string(options.capacity) +
                                         " is not a non-zero multiple of the chunk size " +
                                         std::to_string(chunk));
  }
  if (options.capacity / kDevicePageSize > kCountMask) {
    return Status::FromErrno(
        EINVAL, "device memory capacity " + std::to_string(options.capacity) + " is too large");
  }
  if (options.kind != PageKind::kDevicePrivate && options.kind != PageKind::kDeviceCoherent) {
    return Status::FromErrno(EINVAL, std::string("device memory kind must be device-private or "
                                                 "device-coherent, not ") +
                                         ToString(options.kind));
  }
  if (options.evict_rounds < 1) {
    return Status::FromErrno(EINVAL, "device memory evict_rounds must be at least 1");
  }
  Options o = options;
  if (!o.on_free) o.on_free = NoFree;
  if (!o.evict) o.evict = NoEvict;
  Arena arena;
  HMMKIT_RETURN_IF_ERROR(CreateArena(o, &arena));
  return std::shared_ptr<DeviceMemory>(
      new DeviceMemory(o, arena.fd, arena.offset, arena.base, arena.hugetlb));
}

DeviceMemory::DeviceMemory(const Options& options, int fd, uint64_t arena_offset, void* base,
                           bool hugetlb)
    : options_(options),
      fd_(fd),
      arena_offset_(arena_offset),
      base_(base),
      hugetlb_(hugetlb),
      page_count_(options.capacity / kDevicePageSize),
      chunk_count_(options.capacity / options.chunk_size),
      pages_per_chunk_(uint32_t(options.chunk_size / kDevicePageSize)),
      folio_order_(unsigned(std::countr_zero(options.chunk_size / kDevicePageSize))),
      refs_(std::make_unique<PageRef[]>(page_count_)),
      hot_(std::make_unique<ChunkHot[]>(chunk_count_)) {
  // Constructors are not checked by the lock analysis; nothing else can see the object yet.
  pages_.resize(page_count_);
  chunks_.resize(chunk_count_);
  whole_.reserve(chunk_count_);
  partial_.reserve(chunk_count_);
  for (uint64_t c = 0; c < chunk_count_; ++c) {
    ChunkMeta& cm = chunks_[c];
    cm.free.reserve(pages_per_chunk_);
    // A stack: lower offsets are handed out first.
    for (uint32_t off = pages_per_chunk_; off-- > 0;) cm.free.push_back(off);
  }
  // whole_ is also used as a stack: chunk 0 first.
  for (uint64_t c = chunk_count_; c-- > 0;) {
    chunks_[c].list = ChunkList::kWhole;
    chunks_[c].list_pos = uint32_t(whole_.size());
    whole_.push_back(c);
  }
  pages_free_ = page_count_;
  counters_.capacity = options_.capacity;
  counters_.pages_total = page_count_;
  counters_.chunks_total = chunk_count_;
  // The page map is touched while pages migrate (GetPage/PutPage from the fault thread): at this
  // size malloc takes it from its own mmap, which may merge with user memory. Never migrate it.
  for (auto [p, len] : MetadataSpans()) InternalMemory::Add(p, p + len);
}

std::vector<std::pair<uintptr_t, size_t>> DeviceMemory::MetadataSpans() const
    NO_THREAD_SAFETY_ANALYSIS {
  // Sized once in the constructor; only the addresses are read.
  return {{reinterpret_cast<uintptr_t>(refs_.get()), page_count_ * sizeof(PageRef)},
          {reinterpret_cast<uintptr_t>(hot_.get()), chunk_count_ * sizeof(ChunkHot)},
          {reinterpret_cast<uintptr_t>(pages_.data()), pages_.size() * sizeof(PageMeta)},
          {reinterpret_cast<uintptr_t>(chunks_.data()), chunks_.size() * sizeof(ChunkMeta)}};
}

DeviceMemory::~DeviceMemory() {
  for (auto [p, len] : MetadataSpans()) InternalMemory::Remove(p, p + len);
  bool done;
  {
    MutexLock lock(mu_);
    done = shut_down_;
  }
  if (!done) Shutdown(options_.shutdown_timeout).IgnoreError();  // logged by Shutdown
  bool leak;
  {
    MutexLock lock(mu_);
    leak = leak_arena_;
  }
  if (leak) {
    Log().error(
        "device memory '{}': destroyed with pages still referenced; leaking its {} byte arena "
        "mapping at {} instead of unmapping memory that may still be used",
        options_.name, options_.capacity, base_);
  } else {
    munmap(base_, options_.capacity);
  }
  close(fd_);
}

Status DeviceMemory::Shutdown(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::vector<std::pair<uint64_t, std::vector<uint64_t>>> work;
  {
    MutexLock lock(mu_);
    if (shut_down_) return Status::Ok();
    closing_ = true;
    for (uint64_t c = 0; c < chunk_count_; ++c) {
      ChunkMeta& cm = chunks_[c];
      if (cm.evicting || cm.in_use <= cm.reserved) continue;  // another thread evicts it
      cm.evicting = true;
      ReclassifyLocked(c);
      work.emplace_back(c, EvictableIdsLocked(c));
      ++evictions_in_flight_;
      ++counters_.evictions;
      counters_.evicted_pages += work.back().second.size();
    }
  }
  // The hook runs without mu_: it drops references, which frees pages (mu_).
  uint64_t failures = 0;
  for (const auto& [c, ids] : work) {
    Status st = CallEvict(ids);
    if (!st.ok()) {
      ++failures;
      if (st.errno_value() != ENOTSUP) {
        Log().warn("device memory '{}': evicting chunk {} at shutdown failed: {}", options_.name, c,
                   st.ToString());
      }
    }
  }
  MutexLock lock(mu_);
  counters_.evict_failures += failures;
  for (const auto& [c, ids] : work) {
    chunks_[c].evicting = false;
    ReclassifyLocked(c);
    --evictions_in_flight_;
  }
  ++evict_generation_;
  cv_.NotifyAll();
  const bool drained =
      cv_.WaitUntil(mu_, deadline, [&]() REQUIRES(mu_) { return pages_in_use_ == 0; });
  if (!drained) {
    leak_arena_ = true;
    const std::string msg = "device memory '" + options_.name +
                            "': " + std::to_string(pages_in_use_) +
                            " pages still referenced after " + std::to_string(timeout.count()) +
                            " ms; the arena stays mapped (leaked) until they are released";
    Log().error("{}", msg);
    return Status::FromErrno(ETIMEDOUT, msg);
  }
  leak_arena_ = false;
  shut_down_ = true;
  return Status::Ok();
}

Status DeviceMemory::CallEvict(std::span<const uint64_t> ids) noexcept {
  return options_.evict(*this, ids);
}

void* DeviceMemory::PageData(uint64_t id) {
  if (!CheckId(id, "PageData")) return nullptr;
  return static_cast<char*>(base_) + id * kDevicePageSize;
}

void DeviceMemory::SetDriverData(uint64_t id, void* data) {
  if (!CheckId(id, "SetDriverData")) return;
  refs_[id].driver_data.store(data, std::memory_order_release);
}

void* DeviceMemory::DriverData(uint64_t id) const {
  if (!CheckId(id, "DriverData")) return nullptr;
  return refs_[id].driver_data.load(std::memory_order_acquire);
}

void DeviceMemory::SetMapping(uint64_t id, Mapping mapping) {
  if (!CheckId(id, "SetMapping")) return;
  MutexLock lock(mu_);
  pages_[id].mapping = mapping;
}

void DeviceMemory::ClearMapping(uint64_t id) {
  SetMapping(id, Mapping{});
}

DeviceMemory::Mapping DeviceMemory::GetMapping(uint64_t id) const {
  if (!CheckId(id, "GetMapping")) return Mapping{};
  MutexLock lock(mu_);
  return pages_[id].mapping;
}

void DeviceMemory::Touch(uint64_t id) {
  if (id >= page_count_) return;
  Stamp(ChunkOf(id));
}

void DeviceMemory::Stamp(uint64_t chunk) {
  hot_[chunk].last_use.store(clock_.fetch_add(1, std::memory_order_relaxed) + 1,
                             std::memory_order_relaxed);
}

void DeviceMemory::MarkPoisoned(uint64_t id) {
  if (!CheckId(id, "MarkPoisoned")) return;
  const uint64_t c = ChunkOf(id);
  MutexLock lock(mu_);
  PageMeta& pm = pages_[id];
  if (pm.poisoned) return;
  pm.poisoned = true;
  ++chunks_[c].poisoned;
  ++counters_.poisoned_pages;
  if (pm.state == PageState::kFree) {
    std::vector<uint32_t>& free = chunks_[c].free;
    const auto it = std::find(free.begin(), free.end(), uint32_t(id - c * pages_per_chunk_));
    if (it != free.end()) free.erase(it);
    pm.state = PageState::kRetired;
    --pages_free_;
    ReclassifyLocked(c);
  }
  Log().warn("device memory '{}': page {} poisoned and retired ({} poisoned in all)", options_.name,
             id, counters_.poisoned_pages);
}

bool DeviceMemory::IsPoisoned(uint64_t id) const {
  if (id >= page_count_) return false;
  MutexLock lock(mu_);
  return pages_[id].poisoned;
}

void DeviceMemory::FailNextAlloc() {
  MutexLock lock(mu_);
  fail_next_alloc_ = true;
}

Status DeviceMemory::CopyToRam(std::span<const uint64_t> ids, std::span<void* const> dst) {
  HMMKIT_RETURN_IF_ERROR(DevicePagemap::CopyToRam(ids, dst));
  MutexLock lock(mu_);
  counters_.pages_copied_to_ram += ids.size();
  return Status::Ok();
}

void DeviceMemory::CopiedToRam(size_t pages) {
  MutexLock lock(mu_);
  counters_.pages_copied_to_ram += pages;
}

DeviceMemory::Stats DeviceMemory::stats() const {
  MutexLock lock(mu_);
  Stats s = counters_;
  s.pages_in_use = pages_in_use_;
  s.pages_free = pages_free_;
  s.chunks_in_use = chunks_in_use_;
  return s;
}

std::string DeviceMemory::DescribeLocked() const {
  return "capacity " + std::to_string(page_count_) + " pages (" + std::to_string(chunk_count_) +
         " chunks of " + std::to_string(pages_per_chunk_) + "), " + std::to_string(pages_in_use_) +
         " in use in " + std::to_string(chunks_in_use_) + " chunks, " +
         std::to_string(pages_free_) + " free, " + std::to_string(counters_.poisoned_pages) +
         " poisoned";
}

}  // namespace hmmkit::driver
