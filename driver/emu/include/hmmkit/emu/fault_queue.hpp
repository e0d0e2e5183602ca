/// @file
/// The emulated device's fault queue: compute units that miss a translation raise a device fault
/// and wait; the driver pops faults in batches, services them (range_fault, migration, Map) and
/// completes them, which wakes the compute units to replay their access or report the error.
///
/// Semantics (UVM-like):
///   - Deduplication: a fault on a page that already has a pending (raised, not yet popped) fault
///     joins it; the stronger access wins (kAtomic > kWrite > kRead); the record keeps the address
///     and compute unit of the first raise. Every raiser waits for the same result. A fault on a
///     page whose fault is already being serviced (popped, not completed) is a new fault: the
///     servicing may not cover the new access, and the replay is cheap if it does.
///   - Bounded: at most `capacity` distinct pending faults. Raise blocks while the buffer is full
///     until the driver pops (a raise that joins a pending fault never blocks). Faults are never
///     dropped.
///   - Batches: PopBatch takes up to `max` pending faults, oldest first, and returns them sorted by
///     address, so that the driver services neighbouring pages together.
///   - Shutdown: every pending and in-service fault completes with ECANCELED, later raises complete
///     with ECANCELED at once, and PopBatch returns an empty batch.
///
/// Life of a fault: Raise -> FaultTicket -> (PopBatch -> handler -> Complete) -> Wait returns the
/// Status passed to Complete. Every ticket must be waited for exactly once (the record is freed
/// when its last ticket is collected).
///
/// Locking: one leaf Mutex inside; no callback runs under it (ServiceLoop calls the handler with no
/// lock held). A compute unit must not hold an MMU AccessGuard while it waits here (mmu.hpp).
///
/// Owned by the emulated device (one per device); not copyable. Destroy it only after every thread
/// has returned from its calls (call Shutdown and join the compute units and the service thread).
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <span>
#include <unordered_map>
#include <vector>

#include "hmmkit/base/mutex.hpp"
#include "hmmkit/base/status.hpp"
#include "hmmkit/base/thread_annotations.hpp"
#include "hmmkit/emu/device_page_table.hpp"

namespace hmmkit::emu {

struct DeviceFault {
  uint64_t va = 0;                ///< the faulting device address
  Access access = Access::kRead;  ///< after deduplication: the strongest access on the page
  unsigned cu = 0;                ///< the compute unit that raised it first
  /// Set by PopBatch: identifies the fault for Complete. Ignored by Raise.
  uint64_t serial = 0;

  uint64_t page() const { return va & ~(kPageSize - 1); }
};

/// What Raise hands back; pass it to Wait exactly once.
struct [[nodiscard]] FaultTicket {
  uint64_t serial = 0;  ///< 0: the queue was shut down; Wait returns ECANCELED
};

class FaultQueue {
 public:
  static constexpr size_t kDefaultCapacity = 4096;
  static constexpr size_t kDefaultBatch = 256;

  struct Options {
    size_t capacity = kDefaultCapacity;  ///< distinct pending faults; >= 1
  };

  struct Stats {
    uint64_t raised = 0;        ///< Raise calls
    uint64_t deduplicated = 0;  ///< raises that joined a pending fault
    uint64_t upgraded = 0;      ///< of those, raises that made the pending access stronger
    uint64_t raise_waits = 0;   ///< raises that blocked because the buffer was full
    uint64_t batches = 0;       ///< non-empty batches popped
    uint64_t max_batch = 0;     ///< largest batch popped
    uint64_t completed = 0;     ///< faults completed by the driver
    uint64_t canceled = 0;      ///< faults completed by Shutdown
    uint64_t pending = 0;       ///< now: raised, not popped
    uint64_t in_service = 0;    ///< now: popped, not completed
  };

  /// The driver's servicing function for ServiceLoop: one Status per fault, in the same order.
  /// Called on the ServiceLoop thread with no queue lock held; may block and allocate.
  using Handler = std::function<std::vector<Status>(std::span<const DeviceFault> batch)>;

  FaultQueue();  ///< default Options
  explicit FaultQueue(const Options& options);
  ~FaultQueue();  ///< calls Shutdown()
  FaultQueue(const FaultQueue&) = delete;
  FaultQueue& operator=(const FaultQueue&) = delete;

  /// Compute-unit side. Raises a fault (deduplicated with a pending fault on the same page). Blocks
  /// while the buffer is full. After Shutdown it returns at once with a ticket that fails.
  FaultTicket Raise(const DeviceFault& fault) EXCLUDES(mu_);
  /// Blocks until the fault of `ticket` is completed; returns the driver's Status for it (Ok:
  /// replay the access), or ECANCELED when the queue was shut down first. EINVAL for a ticket that
  /// is unknown or was already waited for.
  Status Wait(FaultTicket ticket) EXCLUDES(mu_);
  /// Raise + Wait.
  Status RaiseAndWait(const DeviceFault& fault) EXCLUDES(mu_);

  /// Driver side. Blocks until a fault is pending or the queue is shut down; returns up to max
  /// (>= 1; 0 counts as 1) pending faults, oldest first, sorted by address; empty only after
  /// Shutdown. The faults are in service until completed.
  std::vector<DeviceFault> PopBatch(size_t max = kDefaultBatch) EXCLUDES(mu_);
  /// Completes popped faults: results[i] goes to every waiter of batch[i]. The spans must have the
  /// same size (aborts otherwise). Faults already canceled by Shutdown, or unknown, are skipped.
  void Complete(std::span<const DeviceFault> batch, std::span<const Status> results) EXCLUDES(mu_);
  void Complete(const DeviceFault& fault, const Status& result) EXCLUDES(mu_);
  /// Pops batches of up to max_batch faults, calls handler, completes the batch with its results,
  /// until Shutdown. A handler that returns the wrong number of results completes the whole batch
  /// with EIO (logged as an error).
  void ServiceLoop(const Handler& handler, size_t max_batch = kDefaultBatch) EXCLUDES(mu_);

  /// Cancels every pending and in-service fault with ECANCELED and wakes everyone: waiters, raisers
  /// blocked on a full buffer, PopBatch. Idempotent.
  void Shutdown() EXCLUDES(mu_);
  bool is_shut_down() const EXCLUDES(mu_);

  Stats stats() const EXCLUDES(mu_);

 private:
  enum class State : uint8_t { kPending, kInService, kDone };
  struct Record {
    DeviceFault fault;
    State state = State::kPending;
    Status result;
    unsigned tickets = 0;  ///< raises not yet collected by Wait
  };

  void CompleteLocked(uint64_t serial, const Status& result) REQUIRES(mu_);

  const size_t capacity_;
  mutable Mutex mu_;
  CondVar space_cv_;    ///< a pending slot freed, or shutdown
  CondVar pending_cv_;  ///< a fault became pending, or shutdown
  CondVar done_cv_;     ///< a fault completed, or shutdown
  std::unordered_map<uint64_t, Record> records_ GUARDED_BY(mu_);            ///< by serial
  std::unordered_map<uint64_t, uint64_t> pending_by_page_ GUARDED_BY(mu_);  ///< page -> serial
  std::deque<uint64_t> pending_fifo_ GUARDED_BY(mu_);  ///< serials, oldest first
  uint64_t next_serial_ GUARDED_BY(mu_) = 1;
  bool shutdown_ GUARDED_BY(mu_) = false;
  Stats stats_ GUARDED_BY(mu_);
};

}  // namespace hmmkit::emu
