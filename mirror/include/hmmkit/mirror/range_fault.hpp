/// @file
/// range_fault: hmm_range_fault over the real address space, and the retry loop around it.
///
/// A caller describes [start, end) and what it needs per page; RangeFault fills one 64-bit entry
/// per page saying what the CPU page tables hold, faulting pages in first where asked:
///
///   req = (entry[i] & pfn_flags_mask) | default_flags     // kReqFault, kReqWrite
///   no kReqFault      pure snapshot: nothing is faulted, missing pages read as 0
///   kReqFault         the page is made present (MADV_POPULATE_READ)
///   kReqWrite         ... and writable (MADV_POPULATE_WRITE); a read-only mapping gives EPERM
///
/// Output entry layout (bits of the kernel's hmm_pfn where they exist):
///   63 kValid   62 kWrite   61 kError   56..60 map order   52..55 PageKind   0..51 payload
/// The payload is the device page id for device pages and 0 for system pages: a device reaches
/// system memory through the virtual address itself. Request bits share the positions of
/// kValid/kWrite.
///
/// Errors (the entries are undefined after an error):
///   EBUSY   the notifier's sequence moved (an invalidation ran); call ReadBegin and retry
///   EFAULT  a page that had to be faulted lies in no VMA or in a PROT_NONE VMA, or the fault
///   failed EPERM   kReqWrite on a read-only mapping EINVAL  unaligned start/end, end <= start,
///   entries too short, no notifier
/// Entries of pages that need no fault and lie in no VMA (or PROT_NONE) are kError, not an error.
#pragma once

#include <chrono>
#include <cstdint>
#include <span>

#include "hmmkit/base/status.hpp"
#include "hmmkit/mirror/address_space.hpp"
#include "hmmkit/mirror/device_pages.hpp"
#include "hmmkit/mirror/notifier.hpp"

namespace hmmkit {

namespace hmm_pfn {
inline constexpr uint64_t kValid = 1ULL << 63;
inline constexpr uint64_t kWrite = 1ULL << 62;
inline constexpr uint64_t kError = 1ULL << 61;
inline constexpr unsigned kOrderShift = 56;
inline constexpr uint64_t kOrderMask = 0x1FULL << kOrderShift;
inline constexpr unsigned kKindShift = 52;
inline constexpr uint64_t kKindMask = 0xFULL << kKindShift;
inline constexpr uint64_t kPayloadMask = (1ULL << kKindShift) - 1;
/// Input flags.
inline constexpr uint64_t kReqFault = kValid;
inline constexpr uint64_t kReqWrite = kWrite;
inline constexpr uint64_t kReqMask = kReqFault | kReqWrite;

inline unsigned MapOrder(uint64_t e) {
  return unsigned((e & kOrderMask) >> kOrderShift);
}
inline PageKind Kind(uint64_t e) {
  return PageKind((e & kKindMask) >> kKindShift);
}
inline uint64_t Payload(uint64_t e) {
  return e & kPayloadMask;
}
inline uint64_t Make(uint64_t flags, unsigned order, PageKind kind, uint64_t payload) {
  return flags | (uint64_t(order) << kOrderShift) | (uint64_t(kind) << kKindShift) |
         (payload & kPayloadMask);
}
}  // namespace hmm_pfn

struct Range {
  IntervalNotifier* notifier = nullptr;  ///< required: the subscription covering [start, end)
  uint64_t notifier_seq = 0;             ///< from notifier->ReadBegin()
  uintptr_t start = 0;
  uintptr_t end = 0;             ///< exclusive
  std::span<uint64_t> hmm_pfns;  ///< (end - start) / page size entries: requests in, results out
  uint64_t default_flags = 0;
  uint64_t pfn_flags_mask = 0;
  /// Device-private pages of this owner are reported as kDevicePrivate entries; those of any other
  /// owner read as not present, and are migrated back to system memory when a fault is requested.
  const void* dev_private_owner = nullptr;
};

/// Snapshots and faults range.hmm_pfns. Thread-safe; takes no lock a notifier callback can hold.
/// Before reading, makes sure the range is watched by the monitor (so later changes raise
/// invalidations). Errors: see the file comment.
Status RangeFault(AddressSpace& as, Range& range);

struct RetryOptions {
  std::chrono::milliseconds timeout{1000};  ///< the kernel's HMM_RANGE_DEFAULT_TIMEOUT
};

/// The retry loop every driver writes around RangeFault (see notifier.hpp):
///   ReadBegin -> RangeFault (EBUSY: again) -> lock driver_lock -> ReadRetry (true: unlock, again)
///   -> commit(range) with driver_lock held -> unlock.
/// `commit` is called exactly once on success, with the driver lock held and the entries valid; it
/// returns a Status that RetryLoop returns. Request flags in hmm_pfns are restored before each
/// retry. Errors: ETIMEDOUT when the deadline passed while invalidations kept racing, RangeFault's
/// EFAULT/ EPERM/EINVAL, or commit's error. Lock is any BasicLockable (hmmkit::Mutex, std::mutex).
template <class Lock, class Commit>
Status RetryLoop(AddressSpace& as, Range& range, Lock& driver_lock, Commit&& commit,
                 const RetryOptions& options = {});

namespace detail {
/// Saves and restores the request bits of hmm_pfns across retries (only when pfn_flags_mask != 0).
class RequestSaver {
 public:
  explicit RequestSaver(const Range& range);
  void Restore(Range& range) const;

 private:
  std::vector<uint64_t> saved_;
};
Status RetryTimedOut(const Range& range, std::chrono::milliseconds timeout, unsigned attempts);
}  // namespace detail

template <class Lock, class Commit>
Status RetryLoop(AddressSpace& as, Range& range, Lock& driver_lock, Commit&& commit,
                 const RetryOptions& options) {
  if (range.notifier == nullptr)
    return Status::FromErrno(EINVAL, "RetryLoop: range has no notifier");
  const auto deadline = std::chrono::steady_clock::now() + options.timeout;
  detail::RequestSaver saver(range);
  for (unsigned attempt = 1;; ++attempt) {
    if (attempt > 1) {
      if (std::chrono::steady_clock::now() >= deadline)
        return detail::RetryTimedOut(range, options.timeout, attempt - 1);
      saver.Restore(range);
    }
    range.notifier_seq = range.notifier->ReadBegin();
    Status st = RangeFault(as, range);
    if (st.errno_value() == EBUSY) continue;
    if (!st.ok()) return st;
    driver_lock.lock();
    if (range.notifier->ReadRetry(range.notifier_seq)) {
      driver_lock.unlock();
      continue;
    }
    Status committed = commit(static_cast<const Range&>(range));
    driver_lock.unlock();
    return committed;
  }
}

}  // namespace hmmkit
