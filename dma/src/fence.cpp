#include "hmmkit/dma/fence.hpp"

#include <atomic>
#include <cstdlib>
#include <utility>
#include <vector>

#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/prefer.hpp>

#include "hmmkit/base/log.hpp"
#include "hmmkit/base/mutex.hpp"

namespace hmmkit::dma {

// Shared completion state. Fields are grouped by how they are protected.
struct Fence::State {
  State(size_t descriptors, size_t units) : results(descriptors), pending(units) {}

  struct Waiter {
    boost::asio::any_io_executor ex;  // tracks outstanding work until the handler is posted
    std::function<void(const Fence&)> handler;
  };

  Mutex mu;
  CondVar cv;
  // Written under mu while pending > 0; immutable once `done` is set (then read without mu: the
  // acquire load of `done` orders those reads after the last write).
  std::vector<Status> results;
  size_t pending GUARDED_BY(mu);
  std::vector<Waiter> waiters GUARDED_BY(mu);
  // Set once, under mu, with release order, when pending reaches zero.
  std::atomic<bool> done{false};
};

namespace {

void PostHandler(const boost::asio::any_io_executor& ex, std::function<void(const Fence&)> handler,
                 const Fence& fence) {
  boost::asio::post(ex, [handler = std::move(handler), fence]() { handler(fence); });
}

}  // namespace

bool Fence::Poll() const {
  return !state_ || state_->done.load(std::memory_order_acquire);
}

Status Fence::Wait() const {
  if (!state_) return Status::Ok();
  if (!Poll()) {
    MutexLock lock(state_->mu);
    state_->cv.Wait(state_->mu, [this] { return state_->done.load(std::memory_order_relaxed); });
  }
  for (const Status& st : results()) {
    if (!st.ok()) return st;
  }
  return Status::Ok();
}

bool Fence::WaitFor(std::chrono::nanoseconds timeout) const {
  if (Poll()) return true;
  using Clock = std::chrono::steady_clock;
  const Clock::time_point now = Clock::now();
  if (timeout >= Clock::time_point::max() - now) {  // "forever" without overflowing the deadline
    Wait().IgnoreError();
    return true;
  }
  const Clock::time_point deadline = now + std::chrono::ceil<Clock::duration>(timeout);
  MutexLock lock(state_->mu);
  return state_->cv.WaitUntil(state_->mu, deadline,
                              [this] { return state_->done.load(std::memory_order_relaxed); });
}

std::span<const Status> Fence::results() const {
  if (!state_ || !state_->done.load(std::memory_order_acquire)) return {};
  return state_->results;
}

size_t Fence::size() const {
  return state_ ? state_->results.size() : 0;
}

void Fence::OnComplete(boost::asio::any_io_executor ex,
                       std::function<void(const Fence&)> handler) const {
  if (state_ && !Poll()) {
    auto tracked = boost::asio::prefer(ex, boost::asio::execution::outstanding_work.tracked);
    MutexLock lock(state_->mu);
    if (!state_->done.load(std::memory_order_relaxed)) {
      state_->waiters.push_back({std::move(tracked), std::move(handler)});
      return;
    }
  }
  PostHandler(ex, std::move(handler), *this);
}

FenceSignal::FenceSignal(size_t descriptors, size_t units) {
  if (descriptors == 0 && units == 0) return;  // the default fence: complete, no descriptors
  fence_ = Fence(std::make_shared<Fence::State>(descriptors, units));
  if (units == 0) fence_.state_->done.store(true, std::memory_order_release);
}

void FenceSignal::Finish(size_t index, Status status) const {
  Fence::State* s = fence_.state_.get();
  if (!s || index >= s->results.size()) {
    Log().critical("FenceSignal::Finish: descriptor {} of a fence of {}", index, fence_.size());
    std::abort();
  }
  std::vector<Fence::State::Waiter> waiters;
  {
    MutexLock lock(s->mu);
    if (s->pending == 0) {
      Log().critical("FenceSignal::Finish called after the fence completed");
      std::abort();
    }
    if (!status.ok() && s->results[index].ok()) s->results[index] = std::move(status);
    if (--s->pending > 0) return;
    waiters.swap(s->waiters);
    s->done.store(true, std::memory_order_release);
  }
  s->cv.NotifyAll();
  for (Fence::State::Waiter& w : waiters) PostHandler(w.ex, std::move(w.handler), fence_);
}

}  // namespace hmmkit::dma
