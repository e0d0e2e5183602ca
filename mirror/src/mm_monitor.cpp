// MmMonitor: userfaultfd open, registration in granules, and the reader/event/fault threads.
// Thread roles and lock order are in mm_monitor.hpp and docs/locking.md.
#include "hmmkit/mirror/mm_monitor.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <new>
#include <thread>

#include <fmt/format.h>

#include "hmmkit/base/fault_injection.hpp"
#include "hmmkit/base/internal_memory.hpp"
#include "hmmkit/base/log.hpp"
#include "hmmkit/mirror/address_space.hpp"
#include "hmmkit/mirror/notifier.hpp"
#include "hmmkit/mirror/uapi.hpp"
#include "hmmkit_interpose.h"
#include "uffd_ops.hpp"

namespace hmmkit {

namespace {

constexpr uint64_t kWantedFeatures =
    UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_REMAP |
    UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_THREAD_ID | UFFD_FEATURE_PAGEFAULT_FLAG_WP |
    UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MISSING_HUGETLBFS |
    UFFD_FEATURE_MOVE | UFFD_FEATURE_POISON;

uintptr_t AlignDown(uintptr_t v, uintptr_t a) {
  return v & ~(a - 1);
}
uintptr_t AlignUp(uintptr_t v, uintptr_t a) {
  return (v + a - 1) & ~(a - 1);
}

// Opens a userfaultfd the way the probe found best. Returns -1 with errno on failure.
int OpenUffd(UffdOpenMode mode) {
  constexpr int kFlags = O_CLOEXEC | O_NONBLOCK;
  switch (mode) {
    case UffdOpenMode::kDevNode: {
      int dev = ::open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
      if (dev < 0) return -1;
      int fd = ::ioctl(dev, USERFAULTFD_IOC_NEW, kFlags);
      int saved = errno;
      ::close(dev);
      errno = saved;
      return fd;
    }
    case UffdOpenMode::kSyscall:
      return int(::syscall(SYS_userfaultfd, kFlags));
    case UffdOpenMode::kSyscallUserOnly:
      return int(::syscall(SYS_userfaultfd, kFlags | UFFD_USER_MODE_ONLY));
    case UffdOpenMode::kNone:
      break;
  }
  errno = ENOSYS;
  return -1;
}

// Interval-set helpers over a map start -> end of disjoint, merged ranges.
using IntervalMap = std::map<uintptr_t, uintptr_t>;

void IntervalAdd(IntervalMap& m, uintptr_t start, uintptr_t end) {
  auto it = m.upper_bound(start);
  if (it != m.begin()) {
    auto prev = std::prev(it);
    if (prev->second >= start) {
      start = prev->first;
      end = std::max(end, prev->second);
      it = m.erase(prev);
    }
  }
  while (it != m.end() && it->first <= end) {
    end = std::max(end, it->second);
    it = m.erase(it);
  }
  m.emplace(start, end);
}

void IntervalSubtract(IntervalMap& m, uintptr_t start, uintptr_t end) {
  auto it = m.upper_bound(start);
  if (it != m.begin()) --it;
  while (it != m.end() && it->first < end) {
    uintptr_t s = it->first, e = it->second;
    if (e <= start) {
      ++it;
      continue;
    }
    it = m.erase(it);
    if (s < start) m.emplace(s, start);
    if (e > end) it = m.emplace(end, e).first, ++it;
  }
}

bool IntervalCovers(const IntervalMap& m, uintptr_t start, uintptr_t end) {
  auto it = m.upper_bound(start);
  if (it == m.begin()) return false;
  --it;
  while (start < end) {
    if (it == m.end() || it->first > start || it->second <= start) return false;
    start = it->second;
    ++it;
  }
  return true;
}

// The parts of [start, end) not covered by m.
std::vector<std::pair<uintptr_t, uintptr_t>> IntervalGaps(const IntervalMap& m, uintptr_t start,
                                                          uintptr_t end) {
  std::vector<std::pair<uintptr_t, uintptr_t>> gaps;
  auto it = m.upper_bound(start);
  if (it != m.begin() && std::prev(it)->second > start) --it;
  uintptr_t cur = start;
  for (; it != m.end() && it->first < end; ++it) {
    if (it->first > cur) gaps.emplace_back(cur, it->first);
    cur = std::max(cur, it->second);
  }
  if (cur < end) gaps.emplace_back(cur, end);
  return gaps;
}

}  // namespace

struct MmMonitor::Message {
  enum class Kind : uint8_t { kUffd, kBarrier } kind = Kind::kUffd;
  alignas(8) uffd_msg msg{};  // the uAPI struct is packed: keep its u64 fields aligned
  bool done = false;          // barrier: set by the event thread; guarded by queue_mu_
  Message* next = nullptr;
};

void MmMonitor::MessageQueue::Push(Message* m) {
  m->next = nullptr;
  if (tail)
    tail->next = m;
  else
    head = m;
  tail = m;
}

MmMonitor::Message* MmMonitor::MessageQueue::Pop() {
  Message* m = head;
  if (m) {
    head = m->next;
    if (!head) tail = nullptr;
  }
  return m;
}

namespace {
constexpr size_t kSlabBytes = 64 << 10;
}

// Takes a node from the pool, growing it with mmap (never malloc: see MessageQueue).
MmMonitor::Message* MmMonitor::AllocMessageLocked() {
  if (!free_messages_) {
    void* slab = MapInternal(kSlabBytes);  // no malloc; never the target of a migration
    if (!slab) return nullptr;
    *static_cast<void**>(slab) = slabs_;
    slabs_ = slab;
    auto* first = reinterpret_cast<Message*>(
        static_cast<char*>(slab) +
        alignof(Message) * ((sizeof(void*) + alignof(Message) - 1) / alignof(Message)));
    auto* end = reinterpret_cast<Message*>(static_cast<char*>(slab) + kSlabBytes);
    for (Message* m = first; m + 1 <= end; ++m) FreeMessageLocked(new (m) Message());
  }
  Message* m = free_messages_;
  free_messages_ = m->next;
  *m = Message();
  return m;
}

void MmMonitor::FreeMessageLocked(Message* m) {
  m->next = free_messages_;
  free_messages_ = m;
}

MmMonitor::MmMonitor(AddressSpace& as) : as_(as) {}

Result<std::unique_ptr<MmMonitor>> MmMonitor::Create(AddressSpace& as) {
  std::unique_ptr<MmMonitor> m(new MmMonitor(as));
  HMMKIT_RETURN_IF_ERROR(m->Open());
  m->Start();
  return m;
}

Status MmMonitor::Open() {
  const KernelFeatures& f = as_.features();
  if (f.uffd_mode == UffdOpenMode::kNone)
    return Status::FromErrno(ENOTSUP, "userfaultfd unavailable: " + f.uffd_error);

  // HMMKIT_DISABLE has already cleared the features it names from f.uffd_features.
  uint64_t want = kWantedFeatures & f.uffd_features;
  // EVENT_FORK needs CAP_SYS_PTRACE on recent kernels: retry without it on EPERM.
  for (int attempt = 0; attempt < 2; ++attempt) {
    uffd_ = OpenUffd(f.uffd_mode);
    if (uffd_ < 0)
      return Status::FromErrno(errno,
                               std::string("open userfaultfd (") + ToString(f.uffd_mode) + ")");
    uffdio_api api{};
    api.api = UFFD_API;
    api.features = want;
    if (uffd::IoctlRetry(as_.sys(), uffd_, UFFDIO_API, &api) == 0) {
      features_ = want;
      break;
    }
    int err = errno;
    ::close(uffd_);
    uffd_ = -1;
    if (err == EPERM && (want & UFFD_FEATURE_EVENT_FORK)) {
      Log().warn("userfaultfd EVENT_FORK refused (needs CAP_SYS_PTRACE): raw forks are not seen");
      want &= ~uint64_t(UFFD_FEATURE_EVENT_FORK);
      continue;
    }
    return Status::FromErrno(err, "UFFDIO_API handshake");
  }
  if (uffd_ < 0) return Status::FromErrno(EPERM, "UFFDIO_API handshake");
  open_mode_ = f.uffd_mode;
  wp_anon_ = (features_ & UFFD_FEATURE_PAGEFAULT_FLAG_WP) != 0;
  wp_shmem_ = wp_anon_ && (features_ & UFFD_FEATURE_WP_HUGETLBFS_SHMEM) != 0;
  wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wake_fd_ < 0) return Status::FromErrno(errno, "eventfd for the monitor");
  Log().info("monitor: userfaultfd via {}, features {:#x}, registration mode {}",
             ToString(open_mode_), features_,
             wp_anon_ ? "write-protect (no first-touch faults)"
                      : "missing (first touch faults through the monitor)");
  return Status::Ok();
}

void MmMonitor::Start() {
  auto running = [this](void (MmMonitor::*loop)(), const char* name) {
    return std::thread([this, loop, name] {
      InternalThreadScope internal(name);  // a migration never takes this thread's stack
      {
        MutexLock lock(start_mu_);
        ++started_;
      }
      start_cv_.NotifyAll();
      (this->*loop)();
    });
  };
  reader_ = running(&MmMonitor::ReaderLoop, "hmmkit-uffd-rd");
  event_thread_ = running(&MmMonitor::EventLoop, "hmmkit-events");
  fault_thread_ = running(&MmMonitor::FaultLoop, "hmmkit-cpufault");
  MutexLock lock(start_mu_);
  start_cv_.Wait(start_mu_, [this]() REQUIRES(start_mu_) { return started_ == 3; });
}

MmMonitor::~MmMonitor() {
  // Order matters. Any thread (our own dispatch threads included: glibc trims a thread's malloc
  // arena with MADV_DONTNEED when it exits) that changes a registered range sleeps until the reader
  // reads its event. So: drop every registration first, stop the dispatch threads while the reader
  // still reads, and stop the reader last.
  if (uffd_ >= 0) {
    MutexLock lock(reg_mu_);
    for (const auto& [start, end] : registered_)
      uffd::Unregister(as_.sys(), uffd_, start, end).IgnoreError();
    registered_.clear();
    handlers_.clear();
  }
  {
    MutexLock lock(queue_mu_);
    stopping_ = true;
  }
  queue_cv_.NotifyAll();
  fault_cv_.NotifyAll();
  if (event_thread_.joinable()) event_thread_.join();
  if (fault_thread_.joinable()) fault_thread_.join();
  if (wake_fd_ >= 0) {
    uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(wake_fd_, &one, sizeof one);
  }
  if (reader_.joinable()) reader_.join();
  // Closing the userfaultfd wakes any thread still waiting on a fault; the kernel then handles it.
  if (uffd_ >= 0) ::close(uffd_);
  if (wake_fd_ >= 0) ::close(wake_fd_);
  MutexLock lock(queue_mu_);
  while (slabs_) {
    void* next = *static_cast<void**>(slabs_);
    UnmapInternal(slabs_, kSlabBytes);
    slabs_ = next;
  }
}

// ---- registration ------------------------------------------------------------------------------

Status MmMonitor::EnsureWatched(uintptr_t start, uintptr_t end) {
  MutexLock lock(reg_mu_);
  if (IntervalCovers(registered_, start, end)) return Status::Ok();
  const uintptr_t g = as_.options().granule;
  const uintptr_t gstart = AlignDown(start, g);
  const uintptr_t gend = end > UINTPTR_MAX - g ? end : AlignUp(end, g);
  // Expand to the granule only inside the VMAs the caller mirrors: a neighbouring VMA in the same
  // granule belongs to someone else (a malloc arena, a thread stack), and registering it would make
  // its owner's munmap/madvise wait on this monitor.
  auto vmas = as_.FindVmas(start, end);
  if (!vmas.ok()) return vmas.status();
  for (const Vma& vma : *vmas) {
    if (!vma.registrable()) {
      Log().debug("monitor: {:#x}-{:#x} ({}) cannot be registered with userfaultfd: not watched",
                  vma.start, vma.end, ToString(vma.kind));
      continue;
    }
    uintptr_t s = std::max(vma.start, gstart), e = std::min(vma.end, gend);
    if (vma.kind == VmaKind::kHugetlb) {
      s = std::max(vma.start, AlignDown(s, vma.page_size));
      e = std::min(vma.end, AlignUp(e, vma.page_size));
    }
    for (auto [gs, ge] : IntervalGaps(registered_, s, e)) {
      Status st = RegisterLocked(gs, ge, vma.kind, /*missing=*/false);
      if (st.errno_value() == ENOMEM) return st;  // vm.max_map_count: the caller must know
      if (!st.ok() && gs < end && ge > start && warned_.insert(gs).second) {
        Log().warn("monitor: range {:#x}-{:#x} ({}) is not watched: {}", gs, ge, ToString(vma.kind),
                   st.ToString());
      }
    }
  }
  return Status::Ok();
}

bool MmMonitor::IsWatched(uintptr_t start, uintptr_t end) const {
  MutexLock lock(reg_mu_);
  return IntervalCovers(registered_, start, end);
}

uint64_t MmMonitor::RegisterModes(VmaKind kind, bool missing) const {
  // Write-protect mode watches a range without taking its first-touch faults; MISSING is added
  // where a handler wants those faults, or where the kernel has no WP mode for this kind.
  const bool wp = kind == VmaKind::kAnon ? wp_anon_ : wp_shmem_;
  uint64_t modes = wp ? UFFDIO_REGISTER_MODE_WP : 0;
  if (missing || !wp) modes |= UFFDIO_REGISTER_MODE_MISSING;
  return modes;
}

Status MmMonitor::RegisterLocked(uintptr_t start, uintptr_t end, VmaKind kind, bool missing) {
  Status st = uffd::Register(as_.sys(), uffd_, start, end, RegisterModes(kind, missing));
  MutexLock lock(stats_mu_);
  if (!st.ok()) {
    stats_.registration_failures++;
    return st;
  }
  stats_.registrations++;
  IntervalAdd(registered_, start, end);
  return st;
}

Status MmMonitor::AddFaultHandler(uintptr_t start, uintptr_t end, FaultHandler& handler) {
  const uintptr_t page = as_.features().page_size;
  if (start >= end || (start | end) & (page - 1))
    return Status::FromErrno(EINVAL, "AddFaultHandler: unaligned or empty range");
  auto vma = as_.FindVma(start);
  if (!vma.ok()) return vma.status();
  if (!*vma || !(*vma)->registrable())
    return Status::FromErrno(EINVAL,
                             "AddFaultHandler: the range does not start in a VMA that "
                             "userfaultfd can register (anon, shmem, hugetlb)");
  const VmaKind kind = (*vma)->kind;
  MutexLock lock(reg_mu_);
  for (const HandlerRange& h : handlers_)
    if (h.start < end && start < h.end)
      return Status::FromErrno(EEXIST, "AddFaultHandler: range overlaps another handler");
  HMMKIT_RETURN_IF_ERROR(RegisterLocked(start, end, kind, /*missing=*/true));
  handlers_.push_back(HandlerRange{start, end, kind, &handler});
  return Status::Ok();
}

void MmMonitor::RemoveFaultHandler(FaultHandler& handler) {
  MutexLock lock(reg_mu_);
  for (auto it = handlers_.begin(); it != handlers_.end();) {
    if (it->handler != &handler) {
      ++it;
      continue;
    }
    // Back to the base mode: later missing faults are the kernel's again.
    const uint64_t modes = RegisterModes(it->kind, /*missing=*/false);
    if (!uffd::Register(as_.sys(), uffd_, it->start, it->end, modes).ok()) {
      uffd::Unregister(as_.sys(), uffd_, it->start, it->end).IgnoreError();
      IntervalSubtract(registered_, it->start, it->end);
    }
    it = handlers_.erase(it);
  }
  // The fault thread may be inside this handler right now: wait, unless we are that thread.
  if (std::this_thread::get_id() != fault_thread_.get_id())
    handler_cv_.Wait(reg_mu_, [&]() REQUIRES(reg_mu_) { return running_handler_ != &handler; });
}

uint64_t MmMonitor::pending_changes() const {
  MutexLock lock(queue_mu_);
  return pending_changes_.load(std::memory_order_acquire);
}

uint64_t MmMonitor::pending_remaps() const {
  MutexLock lock(queue_mu_);
  return pending_remaps_.load(std::memory_order_acquire);
}

Status MmMonitor::RouteFaults(uintptr_t start, uintptr_t end, FaultHandler& handler) {
  const uintptr_t page = as_.features().page_size;
  if (start >= end || (start | end) & (page - 1))
    return Status::FromErrno(EINVAL, "RouteFaults: unaligned or empty range");
  auto vma = as_.FindVma(start);
  if (!vma.ok()) return vma.status();
  if (!*vma || !(*vma)->registrable())
    return Status::FromErrno(EINVAL,
                             "RouteFaults: the range does not start in a VMA that userfaultfd "
                             "can register (anon, shmem, hugetlb)");
  end = std::min(end, (*vma)->end);
  const VmaKind kind = (*vma)->kind;
  MutexLock lock(reg_mu_);
  IntervalMap covered;
  for (const HandlerRange& h : handlers_)
    if (h.start < end && start < h.end) IntervalAdd(covered, h.start, h.end);
  for (auto [gs, ge] : IntervalGaps(covered, start, end)) {
    HMMKIT_RETURN_IF_ERROR(RegisterLocked(gs, ge, kind, /*missing=*/true));
    handlers_.push_back(HandlerRange{gs, ge, kind, &handler});
  }
  return Status::Ok();
}

void MmMonitor::ForgetRange(uintptr_t start, uintptr_t end) {
  MutexLock lock(reg_mu_);
  IntervalSubtract(registered_, start, end);
  TrimHandlersLocked(start, end);
}

void MmMonitor::TrimHandlersLocked(uintptr_t start, uintptr_t end) {
  std::vector<HandlerRange> kept;
  for (const HandlerRange& h : handlers_) {
    if (h.end <= start || end <= h.start) {
      kept.push_back(h);
      continue;
    }
    if (h.start < start) kept.push_back(HandlerRange{h.start, start, h.kind, h.handler});
    if (end < h.end) kept.push_back(HandlerRange{end, h.end, h.kind, h.handler});
  }
  handlers_ = std::move(kept);
}

void MmMonitor::MoveHandlersLocked(uintptr_t from, uintptr_t to, size_t len) {
  std::vector<HandlerRange> moved;
  for (const HandlerRange& h : handlers_) {
    const uintptr_t s = std::max(h.start, from), e = std::min(h.end, from + len);
    if (s < e) moved.push_back(HandlerRange{s - from + to, e - from + to, h.kind, h.handler});
  }
  TrimHandlersLocked(from, from + len);
  TrimHandlersLocked(to, to + len);  // whatever was there was unmapped by the mremap
  handlers_.insert(handlers_.end(), moved.begin(), moved.end());
}

// ---- self-inflicted removals -------------------------------------------------------------------

uint64_t MmMonitor::ExpectRemove(uintptr_t start, uintptr_t end, OwnChange change) {
  MutexLock lock(queue_mu_);
  uint64_t token = next_token_++;
  expects_.push_back(
      Expect{token, start, end,
             change == OwnChange::kZap ? uint8_t(UFFD_EVENT_REMOVE) : uint8_t(UFFD_EVENT_UNMAP)});
  return token;
}

void MmMonitor::EndExpect(uint64_t token) {
  MutexLock lock(queue_mu_);
  std::erase_if(expects_, [&](const Expect& e) { return e.token == token; });
}

// ---- threads -----------------------------------------------------------------------------------

// A pool node holding `m`, or nullptr (logged) when even mmap fails: the event is then lost, which
// only costs a missed invalidation, never a hang (the kernel already counts the event as read).
MmMonitor::Message* MmMonitor::QueueLocked(const uffd_msg& m) {
  Message* q = AllocMessageLocked();
  if (!q) {
    Log().error("monitor: out of memory for userfaultfd event {}: dropped", int(m.event));
    return nullptr;
  }
  q->msg = m;
  return q;
}

void MmMonitor::ReaderLoop() {
  pollfd fds[2] = {{uffd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
  alignas(8) uffd_msg msgs[32];
  for (;;) {
    int n = ::poll(fds, 2, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      Log().error("monitor: poll failed: {}", strerror(errno));
      return;
    }
    if (fds[1].revents) return;
    if (fds[0].revents & (POLLERR | POLLHUP)) {
      Log().error("monitor: userfaultfd reports an error; stopping the reader");
      return;
    }
    // Read under the queue lock: an operation that returned (its event was read) is then queued
    // before any later Sync() can place its barrier.
    bool queued_event = false, queued_fault = false;
    {
      MutexLock lock(queue_mu_);
      for (;;) {
        ssize_t got = -1;
        if (const int injected = inject::Check(inject::Site::kMonitorRead)) {
          errno = injected;
        } else {
          got = as_.sys().Read(uffd_, msgs, sizeof msgs);
        }
        if (got < 0) {
          if (errno == EINTR) continue;
          // The messages stay queued in the kernel: poll reports them again and the next read
          // takes them. Logged once per run of failures, or a persistent error floods the log.
          if (errno != EAGAIN && read_failures_++ == 0)
            Log().error("monitor: read(userfaultfd): {} (retrying)", strerror(errno));
          break;
        }
        read_failures_ = 0;
        for (size_t i = 0; i < size_t(got) / sizeof(uffd_msg); ++i) {
          const uffd_msg& m = msgs[i];
          MutexLock slock(stats_mu_);
          switch (m.event) {
            case UFFD_EVENT_PAGEFAULT:
              if (Message* q = QueueLocked(m)) {
                faults_.Push(q);
                queued_fault = true;
              }
              stats_.faults++;
              break;
            case UFFD_EVENT_FORK:
              // The child's userfaultfd arrives in our fd table; closing it drops the child's
              // registrations (it handles its own mirroring). Forked pages are now shared COW.
              ::close(int(m.arg.fork.ufd));
              AddressSpace::NoteFork();
              stats_.events_fork++;
              break;
            case UFFD_EVENT_REMOVE:
            case UFFD_EVENT_UNMAP: {
              // hmmkit's own zaps and remaps (announced with ExpectRemove) are not the
              // application's change: for a remap, the caller calls ForgetRange itself. Matched
              // by kind too: an munmap racing one of our zaps of the same range is the
              // application's (swallowed, its device pages would outlive the mapping).
              const uintptr_t s = m.arg.remove.start, e = m.arg.remove.end;
              bool expected = std::any_of(expects_.begin(), expects_.end(), [&](const Expect& x) {
                return x.event == m.event && x.start <= s && e <= x.end;
              });
              if (expected) {
                stats_.events_remove_expected++;
                break;
              }
              (m.event == UFFD_EVENT_REMOVE ? stats_.events_remove : stats_.events_unmap)++;
              pending_changes_.fetch_add(1, std::memory_order_acq_rel);
              if (Message* q = QueueLocked(m)) events_.Push(q);
              queued_event = true;
              break;
            }
            case UFFD_EVENT_REMAP:
              stats_.events_remap++;
              pending_changes_.fetch_add(1, std::memory_order_acq_rel);
              pending_remaps_.fetch_add(1, std::memory_order_acq_rel);
              if (Message* q = QueueLocked(m)) events_.Push(q);
              queued_event = true;
              break;
            default:
              Log().warn("monitor: unknown userfaultfd event {}", int(m.event));
          }
        }
      }
    }
    if (queued_event) queue_cv_.NotifyAll();
    if (queued_fault) fault_cv_.NotifyOne();
  }
}

namespace {
// The application range a queued change event covers ({0, 0}: none).
std::pair<uintptr_t, uintptr_t> ChangedRange(const uffd_msg& m) {
  switch (m.event) {
    case UFFD_EVENT_UNMAP:
    case UFFD_EVENT_REMOVE:
      return {uintptr_t(m.arg.remove.start), uintptr_t(m.arg.remove.end)};
    case UFFD_EVENT_REMAP:
      return {uintptr_t(m.arg.remap.from), uintptr_t(m.arg.remap.from + m.arg.remap.len)};
    default:
      return {0, 0};
  }
}
}  // namespace

bool MmMonitor::ChangePending(uintptr_t start, uintptr_t end) const {
  auto overlaps = [&](std::pair<uintptr_t, uintptr_t> r) {
    return r.first < end && start < r.second;
  };
  MutexLock lock(queue_mu_);
  if (overlaps(dispatching_)) return true;
  for (const Message* q = events_.head; q != nullptr; q = q->next)
    if (q->kind == Message::Kind::kUffd && overlaps(ChangedRange(q->msg))) return true;
  return false;
}

void MmMonitor::EventLoop() {
  NotifierTree& tree = as_.notifiers();
  for (;;) {
    alignas(8) uffd_msg m;
    {
      MutexLock lock(queue_mu_);
      queue_cv_.Wait(queue_mu_,
                     [&]() REQUIRES(queue_mu_) { return stopping_ || !events_.empty(); });
      if (events_.empty()) return;  // stopping with nothing left
      Message* msg = events_.Pop();
      if (msg->kind == Message::Kind::kBarrier) {
        msg->done = true;  // the barrier lives on the Sync caller's stack
        queue_cv_.NotifyAll();
        continue;
      }
      m = msg->msg;
      FreeMessageLocked(msg);
      dispatching_ = ChangedRange(m);
    }
    switch (m.event) {
      case UFFD_EVENT_UNMAP: {
        const uintptr_t s = m.arg.remove.start, e = m.arg.remove.end;
        {
          MutexLock lock(reg_mu_);
          IntervalSubtract(registered_, s, e);
          TrimHandlersLocked(s, e);
        }
        tree.Invalidate(NotifierRange{s, e, InvalidateEvent::kUnmap, nullptr});
        as_.OnCpuPagesGone(s, e);
        pending_changes_.fetch_sub(1, std::memory_order_acq_rel);
        break;
      }
      case UFFD_EVENT_REMOVE:
        tree.Invalidate(NotifierRange{uintptr_t(m.arg.remove.start), uintptr_t(m.arg.remove.end),
                                      InvalidateEvent::kClear, nullptr});
        as_.OnCpuPagesGone(m.arg.remove.start, m.arg.remove.end);
        pending_changes_.fetch_sub(1, std::memory_order_acq_rel);
        break;
      case UFFD_EVENT_REMAP: {
        const uintptr_t from = m.arg.remap.from, to = m.arg.remap.to, len = m.arg.remap.len;
        {
          // The registration moved with the VMA.
          MutexLock lock(reg_mu_);
          IntervalSubtract(registered_, from, from + len);
          IntervalAdd(registered_, to, to + len);
          MoveHandlersLocked(from, to, len);
        }
        tree.Invalidate(NotifierRange{from, from + len, InvalidateEvent::kUnmap, nullptr});
        as_.OnCpuPagesMoved(from, to, len);
        pending_remaps_.fetch_sub(1, std::memory_order_acq_rel);
        pending_changes_.fetch_sub(1, std::memory_order_acq_rel);
        break;
      }
      default:
        break;
    }
    MutexLock lock(queue_mu_);
    dispatching_ = {0, 0};
  }
}

void MmMonitor::FaultLoop() {
  const uintptr_t page = as_.features().page_size;
  for (;;) {
    alignas(8) uffd_msg msg;
    {
      MutexLock lock(queue_mu_);
      fault_cv_.Wait(queue_mu_,
                     [&]() REQUIRES(queue_mu_) { return stopping_ || !faults_.empty(); });
      if (stopping_) return;  // closing the userfaultfd releases the waiting threads
      Message* q = faults_.Pop();
      msg = q->msg;
      FreeMessageLocked(q);
    }
    const auto& pf = msg.arg.pagefault;
    CpuFault fault;
    fault.address = uintptr_t(pf.address);
    fault.write = (pf.flags & UFFD_PAGEFAULT_FLAG_WRITE) != 0;
    fault.wp = (pf.flags & UFFD_PAGEFAULT_FLAG_WP) != 0;
    fault.tid = pid_t(pf.feat.ptid);

    FaultHandler* handler = nullptr;
    auto find_handler = [&]() EXCLUDES(reg_mu_) {
      MutexLock lock(reg_mu_);
      for (const HandlerRange& h : handlers_)
        if (fault.address >= h.start && fault.address < h.end) handler = h.handler;
      running_handler_ = handler;
    };
    find_handler();
    // A fault at the destination of an mremap can overtake the REMAP event that moves the
    // handler's range there: let the event thread catch up, then look again.
    if (!handler && pending_remaps() != 0) {
      Sync();
      find_handler();
    }
    const uintptr_t pg = fault.address & ~(page - 1);
    if (handler) {
      Status st = handler->HandleFault(*this, fault);
      if (!st.ok()) {
        Log().error("monitor: fault handler failed at {:#x}: {}", fault.address, st.ToString());
        Wake(pg, page).IgnoreError();
      }
    } else {
      // Nobody owns this range: resolve as the kernel would have, so the thread never hangs.
      {
        MutexLock slock(stats_mu_);
        stats_.faults_unhandled++;
      }
      Status st = fault.wp ? WriteProtect(pg, page, false) : ZeroPage(pg, page);
      if (st.errno_value() == EEXIST || !st.ok()) Wake(pg, page).IgnoreError();
    }
    {
      MutexLock lock(reg_mu_);
      running_handler_ = nullptr;
    }
    handler_cv_.NotifyAll();
  }
}

void MmMonitor::Sync() {
  // On the event thread the barrier would wait behind the callback that is waiting for it.
  if (std::this_thread::get_id() == event_thread_.get_id()) return;
  Message barrier;
  barrier.kind = Message::Kind::kBarrier;
  MutexLock lock(queue_mu_);
  if (stopping_) return;
  events_.Push(&barrier);
  queue_cv_.NotifyAll();
  // Not woken by stopping_: the event thread drains the queue (and this barrier) before it exits.
  queue_cv_.Wait(queue_mu_, [&]() REQUIRES(queue_mu_) { return barrier.done; });
}

bool MmMonitor::SyncUnread(std::chrono::milliseconds limit) {
  const auto until = std::chrono::steady_clock::now() + limit;
  for (;;) {
    pollfd p{uffd_, POLLIN, 0};
    int n = 0;
    {
      // The reader reads under this lock: a message it is taking now is queued when we get it.
      MutexLock lock(queue_mu_);
      n = ::poll(&p, 1, 0);
    }
    if (n == 0) break;
    if (n < 0 && errno != EINTR) return false;
    if (std::chrono::steady_clock::now() >= until) return false;
    std::this_thread::yield();
  }
  Sync();
  return true;
}

// ---- interposition -----------------------------------------------------------------------------

void MmMonitor::NotifyBeforeChange(uintptr_t start, uintptr_t end, int event_kind) {
  InvalidateEvent ev = InvalidateEvent::kUnmap;
  switch (event_kind) {
    case HMMKIT_INTERPOSE_UNMAP:
      ev = InvalidateEvent::kUnmap;
      break;
    case HMMKIT_INTERPOSE_CLEAR:
      ev = InvalidateEvent::kClear;
      break;
    case HMMKIT_INTERPOSE_PROTECT:
      ev = InvalidateEvent::kProtectionVma;
      break;
    default:
      return;
  }
  {
    MutexLock slock(stats_mu_);
    stats_.interposed++;
  }
  as_.notifiers().Invalidate(NotifierRange{start, end, ev, nullptr});
}

MmMonitor::Stats MmMonitor::stats() const {
  MutexLock lock(stats_mu_);
  return stats_;
}

// ---- UFFDIO wrappers ---------------------------------------------------------------------------

Status MmMonitor::Copy(uintptr_t dst, const void* src, size_t len, bool write_protect, bool wake,
                       size_t* copied) {
  if (copied) *copied = 0;
  uffdio_copy c{};
  c.dst = dst;
  c.src = reinterpret_cast<uintptr_t>(src);
  c.len = len;
  c.mode = (write_protect ? UFFDIO_COPY_MODE_WP : 0) | (wake ? 0 : UFFDIO_COPY_MODE_DONTWAKE);
  if (const int injected = inject::Check(inject::Site::kUffdCopy)) {
    // An injected race. A caller that can account for a partial copy gets one (the first half
    // of the pages lands, as a real EAGAIN can leave it); the others get nothing copied.
    const size_t page = as_.features().page_size;
    c.len = copied ? (len / 2) & ~(page - 1) : 0;
    if (c.len > 0 && uffd::IoctlRetry(as_.sys(), uffd_, UFFDIO_COPY, &c) == 0) *copied = c.len;
    return Status::FromErrno(injected, "UFFDIO_COPY (injected failure)");
  }
  if (uffd::IoctlRetry(as_.sys(), uffd_, UFFDIO_COPY, &c) != 0) {
    const int err = errno;
    // The kernel reports how far it got: those pages are in place, whatever the error.
    if (copied && c.copy > 0) *copied = size_t(c.copy);
    return Status::FromErrno(err, "UFFDIO_COPY");
  }
  if (copied) *copied = len;
  return Status::Ok();
}

Status MmMonitor::ZeroPage(uintptr_t dst, size_t len) {
  uffdio_zeropage z{};
  z.range.start = dst;
  z.range.len = len;
  if (uffd::IoctlRetry(as_.sys(), uffd_, UFFDIO_ZEROPAGE, &z) != 0)
    return Status::FromErrno(errno, "UFFDIO_ZEROPAGE");
  return Status::Ok();
}

namespace {

int WriteProtectCall(Sys& sys, int uffd, uintptr_t start, size_t len, bool protect) {
  uffdio_writeprotect w{};
  w.range.start = start;
  w.range.len = len;
  w.mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0;
  return uffd::IoctlRetry(sys, uffd, UFFDIO_WRITEPROTECT, &w) != 0 ? errno : 0;
}

}  // namespace

Status MmMonitor::WriteProtect(uintptr_t start, size_t len, bool protect) {
  const int err = WriteProtectCall(as_.sys(), uffd_, start, len, protect);
  if (err == 0) return Status::Ok();
  if (err != ENOENT) return Status::FromErrno(err, "UFFDIO_WRITEPROTECT");
  // Older kernels (Debian 12's 6.1) take a range inside one VMA only (ENOENT otherwise, even when
  // every VMA is registered): do it one VMA at a time. Costs a VMA query on that path only.
  auto vmas = as_.FindVmas(start, start + len);
  if (!vmas.ok() || vmas->size() < 2) return Status::FromErrno(ENOENT, "UFFDIO_WRITEPROTECT");
  static std::once_flag logged;
  std::call_once(logged, [] {
    Log().info(
        "monitor: UFFDIO_WRITEPROTECT takes one VMA per call on this kernel: ranges over "
        "several VMAs are protected one VMA at a time");
  });
  uintptr_t at = start;
  for (const Vma& v : *vmas) {
    if (v.start > at) break;  // a hole
    const uintptr_t to = std::min<uintptr_t>(v.end, start + len);
    if (const int e = WriteProtectCall(as_.sys(), uffd_, at, to - at, protect); e != 0)
      return Status::FromErrno(e, fmt::format("UFFDIO_WRITEPROTECT {:#x}-{:#x}", at, to));
    at = to;
  }
  if (at < start + len)
    return Status::FromErrno(ENOENT,
                             fmt::format("UFFDIO_WRITEPROTECT: nothing mapped at {:#x}", at));
  return Status::Ok();
}

Status MmMonitor::Wake(uintptr_t start, size_t len) {
  uffdio_range r{};
  r.start = start;
  r.len = len;
  if (uffd::IoctlRetry(as_.sys(), uffd_, UFFDIO_WAKE, &r) != 0)
    return Status::FromErrno(errno, "UFFDIO_WAKE");
  return Status::Ok();
}

Status MmMonitor::Move(uintptr_t dst, uintptr_t src, size_t len) {
  if (!(features_ & UFFD_FEATURE_MOVE))
    return Status::FromErrno(ENOTSUP, "UFFDIO_MOVE needs Linux 6.8");
  uffdio_move mv{};
  mv.dst = dst;
  mv.src = src;
  mv.len = len;
  if (const int injected = inject::Check(inject::Site::kUffdMove))
    return Status::FromErrno(injected, "UFFDIO_MOVE (injected failure)");
  if (uffd::IoctlRetry(as_.sys(), uffd_, UFFDIO_MOVE, &mv) != 0)
    return Status::FromErrno(errno, "UFFDIO_MOVE");
  return Status::Ok();
}

Status MmMonitor::Poison(uintptr_t start, size_t len) {
  if (!(features_ & UFFD_FEATURE_POISON))
    return Status::FromErrno(ENOTSUP, "UFFDIO_POISON needs Linux 6.6");
  uffdio_poison p{};
  p.range.start = start;
  p.range.len = len;
  if (uffd::IoctlRetry(as_.sys(), uffd_, UFFDIO_POISON, &p) != 0)
    return Status::FromErrno(errno, "UFFDIO_POISON");
  return Status::Ok();
}

// ---- uffd helpers ------------------------------------------------------------------------------

namespace uffd {

int IoctlRetry(Sys& sys, int fd, unsigned long request, void* arg) {
  int rc;
  do {
    rc = sys.Ioctl(fd, request, arg);
  } while (rc < 0 && errno == EINTR);
  return rc;
}

Status Register(Sys& sys, int fd, uintptr_t start, uintptr_t end, uint64_t modes) {
  uffdio_register reg{};
  reg.range.start = start;
  reg.range.len = end - start;
  reg.mode = modes;
  if (const int injected = inject::Check(inject::Site::kUffdRegister))
    return Status::FromErrno(injected, "UFFDIO_REGISTER (injected failure)");
  if (IoctlRetry(sys, fd, UFFDIO_REGISTER, &reg) != 0)
    return Status::FromErrno(errno, "UFFDIO_REGISTER");
  return Status::Ok();
}

Status Unregister(Sys& sys, int fd, uintptr_t start, uintptr_t end) {
  uffdio_range r{};
  r.start = start;
  r.len = end - start;
  if (IoctlRetry(sys, fd, UFFDIO_UNREGISTER, &r) != 0)
    return Status::FromErrno(errno, "UFFDIO_UNREGISTER");
  return Status::Ok();
}

}  // namespace uffd

}  // namespace hmmkit
