/// @file
/// CpuDmaEngine: a DmaEngine whose copies are done by a pool of worker threads.
///
/// Work: Submit validates the batch, splits every descriptor longer than Options::split_bytes into
/// pieces of at most split_bytes, and queues the pieces (FIFO across batches). Each worker takes
/// one piece at a time, so the pieces of one large descriptor run on different workers in parallel.
/// A descriptor's result is its first failed piece's error; the fence completes when every piece of
/// every descriptor is done. Descriptors of one batch, and pieces of one descriptor, run in any
/// order and concurrently.
///
/// Memory access:
///   kDevice endpoints are always-mapped memory: plain memcpy/memset.
///   kSystem endpoints, when Options::checked_system_access is true (the default), go through
///     process_vm_readv/process_vm_writev on this process (VmAccess), so an unmapped or PROT_NONE
///     address fails that descriptor with EFAULT and a message naming the address, while the other
///     descriptors of the batch complete. A system page registered with userfaultfd blocks the
///     worker that touches it until the monitor resolves the fault (expected; other workers go on).
///     With checked_system_access false, system endpoints use memcpy/memset too: faster, but a bad
///     address crashes the process.
///
/// Link model (optional): every piece that crosses system <-> device reserves its slot on one link
/// clock shared by the engine (LinkModel: latency once per descriptor, bandwidth per byte) and its
/// worker waits until the end of the slot before completing it (sleep, or a short spin below 10
/// us). device <-> device and system <-> system pieces are not throttled. A piece that fails keeps
/// the slot it reserved. While a worker waits for the link it runs nothing else.
///
/// Threads and locks (docs/dma.md has the table): `threads` workers owned by the engine, started by
/// Create, drained and joined by the destructor (queued work runs to the end first, so every fence
/// handed out completes). Workers complete fences: waiters wake and OnComplete handlers are posted
/// from a worker thread with no engine lock held; the handlers themselves run on their executor.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <span>
#include <string_view>
#include <thread>
#include <vector>

#include "hmmkit/base/mutex.hpp"
#include "hmmkit/base/status.hpp"
#include "hmmkit/dma/dma_engine.hpp"
#include "hmmkit/dma/link_model.hpp"
#include "hmmkit/dma/vm_access.hpp"

namespace hmmkit::dma {

/// Owned by its creator (unique_ptr from Create); not copyable.
class CpuDmaEngine final : public DmaEngine {
 public:
  struct Options {
    unsigned threads = 2;               ///< workers; 1..256
    size_t split_bytes = 1 << 20;       ///< descriptors longer than this are split; > 0
    std::optional<LinkModel> link{};    ///< throttle system <-> device transfers; none: full speed
    bool checked_system_access = true;  ///< EFAULT instead of a crash on bad system addresses
    VmAccess* vm = nullptr;  ///< checked access; null: VmAccess::Real(). Must outlive the engine
  };

  /// Counters beyond DmaEngine::Stats.
  struct CpuStats {
    uint64_t pieces = 0;              ///< work items run (a descriptor is 1 or more pieces)
    uint64_t failed_descriptors = 0;  ///< descriptors whose result is an error
    uint64_t throttled_bytes = 0;     ///< bytes that went through the link model
  };

  /// Starts the workers. Errors: EINVAL for bad options (threads 0 or > 256, split_bytes 0, an
  /// invalid LinkModel); ENOTSUP when checked access is asked for and process_vm_readv does not
  /// work here (a seccomp filter, for example): the message says so; ENOMEM/EAGAIN when a thread
  /// cannot be started.
  static Result<std::unique_ptr<CpuDmaEngine>> Create(const Options& options);

  /// Drains: runs every queued piece, then joins the workers. Every fence handed out is complete
  /// when this returns. May be called from an OnComplete handler (those never run on a worker).
  ~CpuDmaEngine() override;

  Result<Fence> Submit(std::span<const Descriptor> batch) override EXCLUDES(queue_mu_, stats_mu_);
  std::string_view name() const override { return "cpu"; }
  Stats stats() const override EXCLUDES(stats_mu_);
  CpuStats cpu_stats() const EXCLUDES(stats_mu_);
  const Options& options() const { return options_; }

 private:
  struct Batch;
  struct Piece {
    std::shared_ptr<Batch> batch;
    size_t index = 0;   ///< descriptor index in the batch
    size_t offset = 0;  ///< byte offset of the piece in the descriptor
    size_t len = 0;
  };

  explicit CpuDmaEngine(const Options& options);
  void WorkerLoop() EXCLUDES(queue_mu_);
  /// Runs one piece; returns its status. May wait for the link. No engine lock held.
  Status RunPiece(const Piece& piece, std::vector<unsigned char>& scratch)
      EXCLUDES(queue_mu_, link_mu_, stats_mu_);
  Status CopyChecked(const Descriptor& d, size_t index);
  Status FillChecked(const Descriptor& d, size_t index, std::vector<unsigned char>& scratch);
  /// Reserves the link for `bytes` (plus latency when asked); returns the end of the slot.
  std::chrono::steady_clock::time_point ReserveLink(size_t bytes, bool with_latency)
      EXCLUDES(link_mu_);

  /// Set at creation, read-only after.
  const Options options_;
  VmAccess& vm_;

  Mutex queue_mu_;
  CondVar queue_cv_;
  std::deque<Piece> queue_ GUARDED_BY(queue_mu_);
  bool stopping_ GUARDED_BY(queue_mu_) = false;

  Mutex link_mu_;
  std::chrono::steady_clock::time_point link_busy_until_ GUARDED_BY(link_mu_){};

  mutable Mutex stats_mu_;
  Stats stats_ GUARDED_BY(stats_mu_);
  CpuStats cpu_stats_ GUARDED_BY(stats_mu_);

  std::vector<std::thread> workers_;  ///< started by Create, joined by the destructor
};

}  // namespace hmmkit::dma
