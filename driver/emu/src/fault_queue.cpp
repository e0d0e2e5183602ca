// FaultQueue: records keyed by serial, a page index of the pending ones for deduplication, and a
// FIFO of pending serials so that PopBatch serves the oldest faults first (no page starves under
// a stream of faults at lower addresses). Three condition variables on one mutex: space (raisers),
// pending (the driver), done (waiters). done_cv_ wakes every waiter on each completion; each one
// checks its own record. Good enough for the tens of compute units of the emulator.
#include "hmmkit/emu/fault_queue.hpp"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>

#include "hmmkit/base/log.hpp"

namespace hmmkit::emu {

FaultQueue::FaultQueue() : FaultQueue(Options{}) {}

FaultQueue::FaultQueue(const Options& options)
    : capacity_(options.capacity == 0 ? 1 : options.capacity) {}

FaultQueue::~FaultQueue() {
  Shutdown();
}

FaultTicket FaultQueue::Raise(const DeviceFault& fault) {
  const uint64_t page = fault.page();
  MutexLock lock(mu_);
  ++stats_.raised;
  bool waited = false;
  for (;;) {
    if (shutdown_) return FaultTicket{0};
    if (auto it = pending_by_page_.find(page); it != pending_by_page_.end()) {
      Record& r = records_.at(it->second);
      ++r.tickets;
      ++stats_.deduplicated;
      if (fault.access > r.fault.access) {
        r.fault.access = fault.access;
        ++stats_.upgraded;
      }
      return FaultTicket{it->second};
    }
    if (pending_fifo_.size() < capacity_) break;
    if (!waited) {
      ++stats_.raise_waits;
      waited = true;
    }
    space_cv_.Wait(mu_, [&]() REQUIRES(mu_) {
      return shutdown_ || pending_fifo_.size() < capacity_ || pending_by_page_.count(page) != 0;
    });
  }
  const uint64_t serial = next_serial_++;
  Record& r = records_[serial];
  r.fault = fault;
  r.fault.serial = serial;
  r.tickets = 1;
  pending_by_page_.emplace(page, serial);
  pending_fifo_.push_back(serial);
  ++stats_.pending;
  pending_cv_.NotifyOne();
  return FaultTicket{serial};
}

Status FaultQueue::Wait(FaultTicket ticket) {
  if (ticket.serial == 0) return Status::FromErrno(ECANCELED, "device fault queue shut down");
  MutexLock lock(mu_);
  auto it = records_.find(ticket.serial);
  if (it == records_.end() || it->second.tickets == 0) {
    return Status::FromErrno(EINVAL, "unknown or already collected fault ticket");
  }
  // Elements of an unordered_map keep their address across rehashing; iterators do not.
  Record& r = it->second;
  done_cv_.Wait(mu_, [&] { return r.state == State::kDone; });
  Status result = r.result;
  if (--r.tickets == 0) records_.erase(ticket.serial);
  return result;
}

Status FaultQueue::RaiseAndWait(const DeviceFault& fault) {
  return Wait(Raise(fault));
}

std::vector<DeviceFault> FaultQueue::PopBatch(size_t max) {
  if (max == 0) max = 1;
  std::vector<DeviceFault> batch;
  MutexLock lock(mu_);
  pending_cv_.Wait(mu_, [&]() REQUIRES(mu_) { return shutdown_ || !pending_fifo_.empty(); });
  if (shutdown_) return batch;
  const size_t n = std::min(max, pending_fifo_.size());
  batch.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const uint64_t serial = pending_fifo_.front();
    pending_fifo_.pop_front();
    Record& r = records_.at(serial);
    pending_by_page_.erase(r.fault.page());
    r.state = State::kInService;
    batch.push_back(r.fault);
  }
  stats_.pending -= n;
  stats_.in_service += n;
  ++stats_.batches;
  stats_.max_batch = std::max<uint64_t>(stats_.max_batch, n);
  if (!pending_fifo_.empty()) pending_cv_.NotifyOne();  // another popper may take the rest
  space_cv_.NotifyAll();
  std::sort(batch.begin(), batch.end(),
            [](const DeviceFault& a, const DeviceFault& b) { return a.va < b.va; });
  return batch;
}

void FaultQueue::CompleteLocked(uint64_t serial, const Status& result) {
  auto it = records_.find(serial);
  if (it == records_.end() || it->second.state != State::kInService) return;
  it->second.state = State::kDone;
  it->second.result = result;
  --stats_.in_service;
  ++stats_.completed;
}

void FaultQueue::Complete(std::span<const DeviceFault> batch, std::span<const Status> results) {
  if (batch.size() != results.size()) {
    std::fprintf(stderr, "hmmkit: FaultQueue::Complete: %zu faults but %zu results\n", batch.size(),
                 results.size());
    std::abort();
  }
  {
    MutexLock lock(mu_);
    for (size_t i = 0; i < batch.size(); ++i) CompleteLocked(batch[i].serial, results[i]);
  }
  done_cv_.NotifyAll();
}

void FaultQueue::Complete(const DeviceFault& fault, const Status& result) {
  {
    MutexLock lock(mu_);
    CompleteLocked(fault.serial, result);
  }
  done_cv_.NotifyAll();
}

void FaultQueue::ServiceLoop(const Handler& handler, size_t max_batch) {
  for (;;) {
    std::vector<DeviceFault> batch = PopBatch(max_batch);
    if (batch.empty()) return;
    std::vector<Status> results = handler(batch);
    if (results.size() != batch.size()) {
      Log().error("device fault handler returned {} results for {} faults; failing the batch",
                  results.size(), batch.size());
      results.assign(batch.size(),
                     Status::FromErrno(EIO, "device fault handler returned a wrong result count"));
    }
    Complete(batch, results);
  }
}

void FaultQueue::Shutdown() {
  {
    MutexLock lock(mu_);
    if (shutdown_) return;
    shutdown_ = true;
    const Status canceled = Status::FromErrno(ECANCELED, "device fault queue shut down");
    for (auto& [serial, r] : records_) {
      if (r.state == State::kDone) continue;
      r.state = State::kDone;
      r.result = canceled;
      ++stats_.canceled;
    }
    pending_fifo_.clear();
    pending_by_page_.clear();
    stats_.pending = 0;
    stats_.in_service = 0;
  }
  space_cv_.NotifyAll();
  pending_cv_.NotifyAll();
  done_cv_.NotifyAll();
}

bool FaultQueue::is_shut_down() const {
  MutexLock lock(mu_);
  return shutdown_;
}

FaultQueue::Stats FaultQueue::stats() const {
  MutexLock lock(mu_);
  return stats_;
}

}  // namespace hmmkit::emu
