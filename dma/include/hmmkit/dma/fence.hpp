/// @file
/// Fence: the completion of one submitted DMA batch, and FenceSignal, the engine's side of it.
///
/// A Fence is a copyable handle to shared completion state (refcounted: every copy, every engine
/// work item and every pending OnComplete handler holds a reference; the state lives until the last
/// one is gone). It completes exactly once, when the engine has finished every descriptor of the
/// batch, successfully or not; after that its results never change.
///
/// Thread-safety: every method may be called from any thread, concurrently.
#pragma once

#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <span>

#include <boost/asio/any_io_executor.hpp>

#include "hmmkit/base/status.hpp"

namespace hmmkit::dma {

class FenceSignal;

class Fence {
 public:
  /// A fence that is already complete, with no descriptors. Does not allocate.
  Fence() = default;

  /// True when the batch has completed. Never blocks. After it returned true once, results() is
  /// valid and stays unchanged.
  bool Poll() const;

  /// Blocks the calling thread until the batch completes. Returns Ok when every descriptor
  /// succeeded, else the error of the lowest-numbered descriptor that failed (all errors are in
  /// results()). Must not be called from a context that the engine needs in order to complete the
  /// batch (for example from a userfaultfd monitor that must resolve a fault the copy is waiting
  /// on).
  Status Wait() const;

  /// Like Wait, but gives up after `timeout`. Returns true when the batch completed (then Wait()
  /// returns at once), false on timeout.
  bool WaitFor(std::chrono::nanoseconds timeout) const;

  /// One Status per descriptor of the batch, in submission order, once Poll() is true; empty before
  /// (and for a default-constructed fence). The span stays valid while this Fence (or a copy)
  /// lives.
  std::span<const Status> results() const;

  /// Number of descriptors the fence covers (known from submission on, before completion).
  size_t size() const;

  /// Posts `handler(fence)` to `ex` once the batch completes; at once when it already has. The
  /// handler never runs inline in this call nor on an engine worker: it runs where `ex` runs its
  /// work (for an io_context executor, on a thread inside io_context::run). Until the handler has
  /// been posted, the executor's context counts it as outstanding work, so io_context::run() does
  /// not return early while a fence it waits for is pending. Any number of handlers may be added;
  /// each runs once. The execution context must outlive the fence's completion (destroy or drain
  /// the engine first).
  void OnComplete(boost::asio::any_io_executor ex, std::function<void(const Fence&)> handler) const;

 private:
  friend class FenceSignal;
  struct State;
  explicit Fence(std::shared_ptr<State> state) : state_(std::move(state)) {}

  std::shared_ptr<State> state_;  ///< null: complete, no descriptors
};

/// The engine's side of a fence. Created by an engine's Submit with the number of descriptors and
/// the number of work units (descriptors, or pieces of them) that must finish before the fence
/// completes. A copyable handle to the same state as the Fence; an engine may give a copy to each
/// work unit. Thread-safe.
///
/// Contract for engines: call Finish exactly `units` times in total; the call that brings the count
/// to zero completes the fence (wakes waiters, posts OnComplete handlers) on the calling thread,
/// with no engine lock held by the fence code. Calling it more often, or with an index out of
/// range, is a bug and aborts.
class FenceSignal {
 public:
  /// A pending fence of `descriptors` results (all Ok until reported otherwise) that completes
  /// after `units` calls to Finish. With units == 0 the fence is complete at once.
  FenceSignal(size_t descriptors, size_t units);

  const Fence& fence() const { return fence_; }

  /// Records that one work unit of descriptor `index` finished with `status`. The first error
  /// reported for a descriptor is kept; later errors and successes do not overwrite it.
  void Finish(size_t index, Status status) const;

 private:
  Fence fence_;
};

}  // namespace hmmkit::dma
