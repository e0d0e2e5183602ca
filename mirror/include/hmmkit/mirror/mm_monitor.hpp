/// @file
/// MmMonitor: turns changes of the real address space into notifier invalidations, and dispatches
/// userfaultfd page faults to the handlers that own the faulting range.
///
/// One userfaultfd per AddressSpace. Mirrored ranges are registered in aligned granules (Options::
/// granule, 2 MiB by default), clipped to the mirrored VMAs, so that registrations merge instead of
/// splitting VMAs into thousands (vm.max_map_count). Registration uses write-protect mode where the
/// kernel has it, so that ordinary first-touch faults never reach the monitor; MISSING mode is
/// added only where a handler asks for it.
///
/// Threads (all owned by the monitor, started by Start, joined by the destructor):
///   reader   reads userfaultfd messages as soon as they arrive and queues them. It takes only the
///            monitor's queue lock (held for nanoseconds, never across a callback), so a thread
///            blocked in munmap/madvise/mremap/fork waiting for its event to be read is released at
///            once, whatever locks that thread holds. It never calls application code.
///   events   runs the invalidations (NotifierTree::Invalidate) for UNMAP, REMOVE and REMAP events,
///            in the order the kernel delivered them. Callbacks run here and may block.
///   faults   runs FaultHandler::HandleFault for MISSING and WP faults. A fault with no handler is
///            resolved (zero page or write-unprotect) and counted, never left hanging.
///
/// Events and what they become (kernel counterpart in brackets):
///   UFFD_EVENT_UNMAP  [munmap, after the change]        kUnmap over the unmapped range
///   UFFD_EVENT_REMOVE [MADV_DONTNEED/REMOVE, before]   kClear, unless it is one of hmmkit's own
///                                                      zaps announced with ExpectRemove
///   UFFD_EVENT_REMAP  [mremap, after]                  kUnmap over the old range
///   UFFD_EVENT_FORK   [fork]                           no invalidation; counted, child's uffd
///   closed
/// What userfaultfd cannot see (mprotect, regular file mappings, ranges registered on another
/// userfaultfd) is listed in docs/architecture.md; interposition covers the first two.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <thread>
#include <vector>

#include "hmmkit/base/mutex.hpp"
#include "hmmkit/base/status.hpp"
#include "hmmkit/mirror/kernel_features.hpp"
#include "hmmkit/mirror/vma.hpp"

struct uffd_msg;

namespace hmmkit {

class AddressSpace;
class MmMonitor;

/// A CPU page fault caught by userfaultfd.
struct CpuFault {
  uintptr_t address = 0;  ///< page-aligned unless the kernel gave the exact address
  bool write = false;     ///< the access was a write
  bool wp = false;        ///< a write-protect fault (else a missing-page fault)
  pid_t tid = 0;          ///< faulting thread, when UFFD_FEATURE_THREAD_ID is on
};

/// Resolves faults in a range the handler registered with AddFaultHandler.
class FaultHandler {
 public:
  virtual ~FaultHandler() = default;
  /// Required. Must resolve the fault before returning, with MmMonitor::Copy/ZeroPage/WriteProtect/
  /// Move/Wake (the faulting thread sleeps until then). Context: the monitor's fault thread; no
  /// hmmkit lock held; may block on driver locks, but must never touch mirrored CPU memory that
  /// could fault into this same thread. Returns an error only when it could not resolve: the
  /// monitor then wakes the thread with the page left as the kernel has it and logs the error.
  virtual Status HandleFault(MmMonitor& monitor, const CpuFault& fault) = 0;
};

class MmMonitor {
 public:
  struct Stats {
    uint64_t events_unmap = 0;
    uint64_t events_remove = 0;
    uint64_t events_remove_expected = 0;  ///< hmmkit's own removals, filtered
    uint64_t events_remap = 0;
    uint64_t events_fork = 0;
    uint64_t faults = 0;
    uint64_t faults_unhandled = 0;
    uint64_t registrations = 0;  ///< successful UFFDIO_REGISTER calls
    uint64_t registration_failures = 0;
    uint64_t interposed = 0;  ///< synchronous notifications from interposition
  };

  /// Opens a userfaultfd the best way the kernel allows and handshakes the features the monitor
  /// uses. Errors: ENOTSUP with the reason when no userfaultfd can be opened.
  static Result<std::unique_ptr<MmMonitor>> Create(AddressSpace& as);
  ~MmMonitor();  ///< stops and joins the threads, closes the descriptor
  MmMonitor(const MmMonitor&) = delete;
  MmMonitor& operator=(const MmMonitor&) = delete;

  UffdOpenMode open_mode() const { return open_mode_; }
  /// True when anonymous ranges are watched in write-protect mode: the first touch of a watched
  /// page does not fault (only routed ranges take missing-page faults).
  bool watches_anon_with_wp() const { return wp_anon_; }
  int fd() const { return uffd_; }
  uint64_t features() const { return features_; }

  /// Makes sure every registrable VMA intersecting [start, end) is registered, expanded to the
  /// granule but never past that VMA (a neighbour in the same granule belongs to someone else: a
  /// malloc arena, a thread stack), so its changes raise invalidations. Called by range_fault
  /// before it snapshots. Cheap when already done. Regular-file and special VMAs are skipped: not
  /// an error (see "what the monitor cannot see"). Errors: only unexpected registration failures
  /// (EBUSY: the range is registered on another userfaultfd; ENOMEM: vm.max_map_count reached).
  Status EnsureWatched(uintptr_t start, uintptr_t end) EXCLUDES(reg_mu_);
  /// True when every page of [start, end) lies in a registered range.
  bool IsWatched(uintptr_t start, uintptr_t end) const EXCLUDES(reg_mu_);

  /// Routes MISSING and WP faults in [start, end) to `handler` and registers the range with MISSING
  /// (and WP where available). Ranges of two handlers must not overlap (EEXIST). The handler must
  /// outlive its registration. Errors: EINVAL (unaligned, empty, or not starting in an anon, shmem
  /// or hugetlb VMA), EEXIST, registration errors.
  Status AddFaultHandler(uintptr_t start, uintptr_t end, FaultHandler& handler) EXCLUDES(reg_mu_);
  /// Removes the routing; after return the handler is not running and will not be called.
  void RemoveFaultHandler(FaultHandler& handler) EXCLUDES(reg_mu_);
  /// Routes [start, end) to `handler` where it is not routed already (the parts covered by other
  /// handlers are left alone), clipped to the VMA containing `start`. Handler ranges follow their
  /// VMA: an unmap drops them, an mremap moves them. Errors: as AddFaultHandler.
  Status RouteFaults(uintptr_t start, uintptr_t end, FaultHandler& handler) EXCLUDES(reg_mu_);
  /// UNMAP/REMOVE/REMAP events read but not yet dispatched. State keyed by address (device
  /// entries, fault routing) is stale while this is non-zero: callers that look it up Sync first.
  /// Taken under the queue lock: the reader holds it from read() until the event is queued and
  /// counted, so an event whose system call has returned is always seen.
  /// For application threads only (RangeFault, migrations): the fault thread must not wait for
  /// the event thread in general, because an invalidation callback may wait on a device that is
  /// itself blocked in a CPU fault (a device reading a page the application just cleared).
  uint64_t pending_changes() const EXCLUDES(queue_mu_);
  /// Whether an unmap, clear or mremap (its old range) of the application that overlaps
  /// [start, end) has been read but its invalidation has not finished yet. With the notifier
  /// subscription (which sees the change once dispatched), a migration knows of every change read
  /// so far without waiting for the event thread: it checks right before it zaps, so that it never
  /// zaps a mapping that replaced an unmapped one at the same address. Any thread; never blocks
  /// beyond queue_mu_.
  bool ChangePending(uintptr_t start, uintptr_t end) const EXCLUDES(queue_mu_);
  /// mremap events not yet dispatched. The one wait the fault thread takes: a fault at the
  /// destination of an mremap needs the moved routing and device entries, and no device holds a
  /// translation for an address it has never faulted.
  uint64_t pending_remaps() const EXCLUDES(queue_mu_);

  /// What hmmkit itself is about to do to a range, and so which event it will cause.
  enum class OwnChange : uint8_t {
    kZap,      ///< MADV_DONTNEED: a REMOVE event
    kReplace,  ///< mmap MAP_FIXED or mremap over the range: an UNMAP event
  };
  /// Announces that hmmkit itself is about to make `change` to [start, end) (after raising
  /// kMigrate), so that the event it causes is not reported again as kClear/kUnmap. Only that
  /// event kind is swallowed: the application's own munmap of the range, racing a zap, is still
  /// an unmap. After replacing a mapping, the caller calls ForgetRange (the old registration died
  /// with it). Returns a token for EndExpect.
  uint64_t ExpectRemove(uintptr_t start, uintptr_t end, OwnChange change) EXCLUDES(queue_mu_);
  void EndExpect(uint64_t token) EXCLUDES(queue_mu_);
  /// hmmkit replaced the mapping of [start, end) itself (mmap MAP_FIXED, mremap): forget its
  /// registration and fault routing now, synchronously.
  void ForgetRange(uintptr_t start, uintptr_t end) EXCLUDES(reg_mu_);

  /// Waits until every event of an operation that returned before this call has been dispatched
  /// (its invalidations have run). Called from a callback on the event thread it returns at once.
  void Sync() EXCLUDES(queue_mu_);
  /// Sync, after the reader has read every message the userfaultfd holds now: also covers an
  /// munmap or mremap still inside the kernel, whose mapping change is visible but whose event was
  /// queued after this call began. Returns false, having waited up to `limit`, when messages keep
  /// arriving (faults under load): the caller cannot tell then. Any thread but the fault thread.
  bool SyncUnread(std::chrono::milliseconds limit) EXCLUDES(queue_mu_);

  // ---- Resolving faults (FaultHandler) and driving migrations (driver/) -----------------------
  /// Thin wrappers of the UFFDIO_* ioctls; EAGAIN (the mm is changing) and EEXIST (someone else
  /// filled the page) are returned to the caller, which decides; EINTR is retried.
  /// wake = false leaves threads faulting on [dst, dst + len) asleep until Wake (so state that
  /// describes the page can change first).
  /// `copied` (optional) receives the bytes in place, also on an error: a failed copy may have
  /// installed its first pages (the caller must account for them; without `copied` an error means
  /// the caller cannot tell, so only whole-page single copies should omit it).
  Status Copy(uintptr_t dst, const void* src, size_t len, bool write_protect = false,
              bool wake = true, size_t* copied = nullptr);
  Status ZeroPage(uintptr_t dst, size_t len);
  /// Write-protects (or unprotects) [start, start + len), which may span several VMAs, each
  /// registered in write-protect mode. Kernels that take one VMA per call (Debian 12's 6.1 refuses
  /// more with ENOENT) are served VMA by VMA. Errors: ENOENT (a hole, or a VMA not registered),
  /// and the ioctl's own.
  Status WriteProtect(uintptr_t start, size_t len, bool protect);
  Status Wake(uintptr_t start, size_t len);
  Status Move(uintptr_t dst, uintptr_t src, size_t len);  ///< ENOTSUP without UFFDIO_MOVE
  /// Marks [start, start + len) poisoned: a CPU access raises SIGBUS. ENOTSUP without
  /// UFFDIO_POISON.
  Status Poison(uintptr_t start, size_t len);

  /// Synchronous notification from the interposer, called on the application thread before the
  /// change. Public for the interposition glue; drivers do not call it.
  void NotifyBeforeChange(uintptr_t start, uintptr_t end, int event_kind);

  Stats stats() const;

 private:
  explicit MmMonitor(AddressSpace& as);
  Status Open();
  void Start();
  void ReaderLoop();
  void EventLoop();
  void FaultLoop();
  uint64_t RegisterModes(VmaKind kind, bool missing) const;
  Status RegisterLocked(uintptr_t start, uintptr_t end, VmaKind kind, bool missing)
      REQUIRES(reg_mu_);
  void TrimHandlersLocked(uintptr_t start, uintptr_t end) REQUIRES(reg_mu_);
  void MoveHandlersLocked(uintptr_t from, uintptr_t to, size_t len) REQUIRES(reg_mu_);

  struct Message;  ///< a queued userfaultfd message or a Sync barrier
  /// Intrusive FIFO of messages; nodes come from the monitor's mmap-backed pool, so the reader
  /// never calls malloc (glibc may trim an arena with MADV_DONTNEED while holding its lock: a
  /// reader blocked on that lock could never read the event the trimming thread waits for).
  struct MessageQueue {
    Message* head = nullptr;
    Message* tail = nullptr;
    bool empty() const { return head == nullptr; }
    void Push(Message* m);
    Message* Pop();
  };
  Message* AllocMessageLocked() REQUIRES(queue_mu_);
  Message* QueueLocked(const ::uffd_msg& m) REQUIRES(queue_mu_);
  void FreeMessageLocked(Message* m) REQUIRES(queue_mu_);

  AddressSpace& as_;
  int uffd_ = -1;
  int wake_fd_ = -1;  ///< eventfd that stops the reader
  UffdOpenMode open_mode_ = UffdOpenMode::kNone;
  uint64_t features_ = 0;
  bool wp_anon_ = false;
  bool wp_shmem_ = false;

  /// Registration state. Order: reg_mu_ before queue_mu_; neither is held across a callback.
  mutable Mutex reg_mu_;
  std::map<uintptr_t, uintptr_t> registered_ GUARDED_BY(reg_mu_);  ///< start -> end, merged
  std::set<uintptr_t> warned_ GUARDED_BY(reg_mu_);  ///< ranges already reported as not watchable
  struct HandlerRange {
    uintptr_t start;
    uintptr_t end;
    VmaKind kind;  ///< decides the registration mode
    FaultHandler* handler;
  };
  std::vector<HandlerRange> handlers_ GUARDED_BY(reg_mu_);
  FaultHandler* running_handler_ GUARDED_BY(reg_mu_) = nullptr;
  CondVar handler_cv_;

  /// Queues between the reader and the dispatch threads.
  mutable Mutex queue_mu_ ACQUIRED_AFTER(reg_mu_);
  CondVar queue_cv_;  ///< events_ and barriers: the event thread and Sync callers wait here
  CondVar fault_cv_;  ///< faults_: the fault thread alone (a fault wakes no other thread)
  MessageQueue events_ GUARDED_BY(queue_mu_);
  /// The change the event thread is dispatching (popped from events_), until its invalidation and
  /// entry drop are done; {0, 0} when none.
  std::pair<uintptr_t, uintptr_t> dispatching_ GUARDED_BY(queue_mu_){0, 0};
  MessageQueue faults_ GUARDED_BY(queue_mu_);
  Message* free_messages_ GUARDED_BY(queue_mu_) = nullptr;
  void* slabs_ GUARDED_BY(queue_mu_) = nullptr;  ///< mmap'ed slabs, linked through their first word
  struct Expect {
    uint64_t token;
    uintptr_t start;
    uintptr_t end;
    uint8_t event;  ///< UFFD_EVENT_REMOVE or UFFD_EVENT_UNMAP
  };
  std::vector<Expect> expects_ GUARDED_BY(queue_mu_);
  uint64_t next_token_ GUARDED_BY(queue_mu_) = 1;
  uint64_t read_failures_ GUARDED_BY(queue_mu_) = 0;  ///< consecutive failed reads (log once)
  bool stopping_ GUARDED_BY(queue_mu_) = false;

  mutable Mutex stats_mu_;
  Stats stats_ GUARDED_BY(stats_mu_);

  std::atomic<uint64_t> pending_changes_{0};
  std::atomic<uint64_t> pending_remaps_{0};

  /// Start() returns only once all three threads run their loops: a thread still in its start-up
  /// (a sanitizer's stack unwinder, a lazy TLS allocation) may read memory we have registered,
  /// and the fault thread must never wait on a fault that only it can resolve.
  Mutex start_mu_;
  CondVar start_cv_;
  int started_ GUARDED_BY(start_mu_) = 0;

  std::thread reader_;
  std::thread event_thread_;
  std::thread fault_thread_;
};

}  // namespace hmmkit
