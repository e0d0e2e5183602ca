// Streams and fences (svm.hpp): one thread per stream runs its operations in order; each fence is
// a small shared state signalled with the operation's status.
//
// Locks: FenceState::mu (leaf), Stream::Impl::mu (leaf; never held while an operation runs).
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include "hmmkit/base/internal_memory.hpp"
#include "hmmkit/svm.hpp"

namespace hmmkit::svm {

namespace detail {
struct FenceState {
  std::mutex mu;
  std::condition_variable cv;
  bool signalled = false;
  Status status = Status::Ok();

  void Signal(Status st) {
    {
      std::lock_guard lock(mu);
      status = std::move(st);
      signalled = true;
    }
    cv.notify_all();
  }
};
}  // namespace detail

bool Fence::Ready() const {
  if (!state_) return true;
  std::lock_guard lock(state_->mu);
  return state_->signalled;
}

Status Fence::Wait() const {
  if (!state_) return Status::Ok();
  std::unique_lock lock(state_->mu);
  state_->cv.wait(lock, [&] { return state_->signalled; });
  return state_->status;
}

Status Fence::WaitFor(std::chrono::milliseconds timeout) const {
  if (!state_) return Status::Ok();
  std::unique_lock lock(state_->mu);
  if (!state_->cv.wait_for(lock, timeout, [&] { return state_->signalled; }))
    return Status::FromErrno(ETIMEDOUT, "fence not signalled in time");
  return state_->status;
}

struct Stream::Impl {
  struct Op {
    std::function<Status()> run;
    std::shared_ptr<detail::FenceState> fence;
  };

  explicit Impl(Device& d)
      : dev(d), worker([this] {
          InternalThreadScope internal(
              "hmmkit-stream");  // a migration never takes this thread's stack
          Loop();
        }) {}

  Fence Push(std::function<Status()> run) {
    auto fence = std::make_shared<detail::FenceState>();
    {
      std::lock_guard lock(mu);
      queue.push_back({std::move(run), fence});
      pending++;
    }
    cv.notify_all();
    return Fence(fence);
  }

  void Loop() {
    for (;;) {
      Op op;
      {
        std::unique_lock lock(mu);
        cv.wait(lock, [&] { return stop || !queue.empty(); });
        if (queue.empty()) return;  // stop, and everything queued has run
        op = std::move(queue.front());
        queue.pop_front();
      }
      Status st = op.run ? op.run() : Status::Ok();
      {
        std::lock_guard lock(mu);
        if (!st.ok() && first_error.ok()) first_error = st;
        pending--;
      }
      op.fence->Signal(std::move(st));
      cv.notify_all();
    }
  }

  Device& dev;
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Op> queue;
  size_t pending = 0;
  bool stop = false;
  Status first_error = Status::Ok();
  std::thread worker;  // last: starts after the members it uses
};

Stream::Stream(Device& dev) : impl_(std::make_unique<Impl>(dev)) {}

Stream::~Stream() {
  {
    std::lock_guard lock(impl_->mu);
    impl_->stop = true;
  }
  impl_->cv.notify_all();
  impl_->worker.join();
}

Fence Stream::Launch(size_t n, Kernel kernel) {
  return impl_->Push([this, n, k = std::move(kernel)] { return impl_->dev.Launch(n, k); });
}

Fence Stream::Prefetch(const void* p, size_t len, Location to) {
  return impl_->Push([this, p, len, to] { return impl_->dev.Prefetch(p, len, to); });
}

Fence Stream::Signal() {
  return impl_->Push(nullptr);
}

Status Stream::Synchronize() {
  std::unique_lock lock(impl_->mu);
  impl_->cv.wait(lock, [&] { return impl_->pending == 0; });
  Status st = std::move(impl_->first_error);
  impl_->first_error = Status::Ok();
  return st;
}

}  // namespace hmmkit::svm
