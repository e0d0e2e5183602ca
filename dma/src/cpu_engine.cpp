#include "hmmkit/dma/cpu_engine.hpp"

#include "hmmkit/base/internal_memory.hpp"

#include <fmt/format.h>
#include <sys/uio.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <system_error>
#include <utility>

#include "hmmkit/base/fault_injection.hpp"
#include "hmmkit/base/log.hpp"
#include "hmmkit/base/trace.hpp"

namespace hmmkit::dma {

namespace {

using Clock = std::chrono::steady_clock;

// Waits for shorter than this are spun, longer ones slept (then the last bit spun).
constexpr std::chrono::microseconds kSpinBelow{10};
// Fill of checked system memory: a scratch buffer of the fill byte, written through up to
// kFillIovecs local iovecs per system call.
constexpr size_t kFillChunk = 64 << 10;
constexpr size_t kFillIovecs = 16;
constexpr unsigned kMaxThreads = 256;

unsigned char* Bytes(void* p) {
  return static_cast<unsigned char*>(p);
}
const unsigned char* Bytes(const void* p) {
  return static_cast<const unsigned char*>(p);
}

void WaitUntil(Clock::time_point end) {
  if (end - Clock::now() > kSpinBelow) std::this_thread::sleep_until(end);
  while (Clock::now() < end) std::this_thread::yield();
}

std::string ErrnoName(int err) {
  const char* name = strerrorname_np(err);
  return name ? name : std::to_string(err);
}

// The error of a piece that stopped at `addr` of a system range.
Status SystemFault(int err, size_t index, bool source, const void* addr, const Descriptor& d) {
  const std::string op =
      d.op == Descriptor::Op::kCopy
          ? fmt::format("copy of {:#x} bytes {} -> {}", d.len, d.src.ptr, d.dst.ptr)
          : fmt::format("fill of {:#x} bytes at {}", d.len, d.dst.ptr);
  return Status::FromErrno(err, fmt::format("descriptor {}: system {} {} is not {} ({}); {}", index,
                                            source ? "source" : "destination", addr,
                                            source ? "readable" : "writable", ErrnoName(err), op));
}

trace::DmaDir DirOf(const Descriptor& d) {
  const bool from_dev =
      (d.op == Descriptor::Op::kCopy ? d.src.memory : d.dst.memory) == Memory::kDevice;
  const bool to_dev = d.dst.memory == Memory::kDevice;
  if (from_dev) return to_dev ? trace::DmaDir::kD2D : trace::DmaDir::kD2H;
  return to_dev ? trace::DmaDir::kH2D : trace::DmaDir::kH2H;
}

}  // namespace

// One accepted batch: its fence and a private copy of its descriptors. Shared by its pieces.
struct CpuDmaEngine::Batch {
  Batch(std::span<const Descriptor> batch, size_t units)
      : signal(batch.size(), units),
        descs(batch.begin(), batch.end()),
        latency_charged(batch.size()),
        failed(batch.size()) {}

  FenceSignal signal;
  const std::vector<Descriptor> descs;
  std::vector<std::atomic<bool>> latency_charged;  // the descriptor's latency is on the link
  std::vector<std::atomic<bool>> failed;           // counted in failed_descriptors
  // Tracing: set at Submit when it is on (trace_begin 0: not traced). The last piece to finish
  // records the batch's "dma_copy".
  uint64_t trace_begin = 0;
  uint16_t trace_track = 0;
  uint64_t trace_bytes = 0;
  size_t trace_units = 0;
  std::atomic<size_t> pieces_left{0};

  // Called once per finished piece of a traced batch.
  void TracePieceDone() {
    if (pieces_left.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
    trace::Event e;
    e.ts_ns = trace_begin;
    e.dur_ns = trace::NowNs() - trace_begin;
    e.track = trace_track;
    e.name = trace::Name::kDmaCopy;
    e.a[0] = trace_bytes;
    e.a[1] = trace_units;
    e.small = uint32_t(DirOf(descs.front()));
    trace::Record(e);
  }
};

Result<std::unique_ptr<CpuDmaEngine>> CpuDmaEngine::Create(const Options& options) {
  if (options.threads == 0 || options.threads > kMaxThreads) {
    return Status::FromErrno(EINVAL, fmt::format("CpuDmaEngine: threads must be 1..{}, not {}",
                                                 kMaxThreads, options.threads));
  }
  if (options.split_bytes == 0) {
    return Status::FromErrno(EINVAL, "CpuDmaEngine: split_bytes must be > 0");
  }
  if (options.link && !options.link->valid()) {
    return Status::FromErrno(
        EINVAL, fmt::format("CpuDmaEngine: invalid link model ({} B/s, {} ns latency)",
                            options.link->bytes_per_second, options.link->latency.count()));
  }
  if (options.checked_system_access) {
    // process_vm_readv may be filtered (seccomp) or missing: say so now rather than failing every
    // system-memory descriptor later.
    VmAccess& vm = options.vm ? *options.vm : VmAccess::Real();
    unsigned char from = 0x5a, to = 0;
    const iovec local{&to, 1}, remote{&from, 1};
    ssize_t n;
    do {
      n = vm.ReadV(std::span(&local, 1), std::span(&remote, 1));
    } while (n < 0 && errno == EINTR);
    if (n != 1 || to != from) {
      int err = n < 0 ? errno : EIO;
      return Status::FromErrno(
          ENOTSUP, fmt::format("CpuDmaEngine: checked system access needs process_vm_readv on this "
                               "process, which failed here ({}); set checked_system_access = "
                               "false to use unchecked memcpy",
                               ErrnoName(err)));
    }
  }
  std::unique_ptr<CpuDmaEngine> engine(new CpuDmaEngine(options));
  try {
    engine->workers_.reserve(options.threads);
    for (unsigned i = 0; i < options.threads; ++i) {
      engine->workers_.emplace_back([e = engine.get()] {
        InternalThreadScope internal("hmmkit-dma");  // a migration never takes this thread's stack
        e->WorkerLoop();
      });
    }
  } catch (const std::system_error& e) {
    // The destructor joins the workers that did start.
    return Status::FromErrno(e.code().value(),
                             fmt::format("CpuDmaEngine: cannot start worker: {}", e.what()));
  }
  Log().debug("CpuDmaEngine: {} workers, split {:#x} bytes, link {}, {} system access",
              options.threads, options.split_bytes,
              options.link ? fmt::format("{} B/s + {} ns", options.link->bytes_per_second,
                                         options.link->latency.count())
                           : std::string("none"),
              options.checked_system_access ? "checked" : "unchecked");
  return engine;
}

CpuDmaEngine::CpuDmaEngine(const Options& options)
    : options_(options), vm_(options.vm ? *options.vm : VmAccess::Real()) {}

CpuDmaEngine::~CpuDmaEngine() {
  {
    MutexLock lock(queue_mu_);
    stopping_ = true;
  }
  queue_cv_.NotifyAll();
  for (std::thread& t : workers_) t.join();  // each worker drains the queue before it exits
  trace::ForgetTrackKey(this);
}

Result<Fence> CpuDmaEngine::Submit(std::span<const Descriptor> batch) {
  HMMKIT_RETURN_IF_ERROR(ValidateBatch(batch));
  if (batch.empty()) return Fence();

  const size_t split = options_.split_bytes;
  size_t units = 0;
  uint64_t bytes = 0;
  for (const Descriptor& d : batch) {
    units += d.len / split + (d.len % split != 0);
    bytes += d.len;
  }
  auto shared = std::make_shared<Batch>(batch, units);
  if (trace::Enabled()) {
    shared->trace_begin = trace::NowNs();
    shared->trace_track = trace::TrackFor(this, trace::TrackKind::kDma, name());
    shared->trace_bytes = bytes;
    shared->trace_units = units;
    shared->pieces_left.store(units, std::memory_order_relaxed);
  }
  std::vector<Piece> pieces;
  pieces.reserve(units);
  for (size_t i = 0; i < batch.size(); ++i) {
    for (size_t off = 0; off < batch[i].len; off += split) {
      pieces.push_back(Piece{shared, i, off, std::min(split, batch[i].len - off)});
    }
  }
  Fence fence = shared->signal.fence();
  {
    MutexLock lock(stats_mu_);
    stats_.batches++;
    stats_.descriptors += batch.size();
    stats_.bytes += bytes;
  }
  {
    MutexLock lock(queue_mu_);
    for (Piece& p : pieces) queue_.push_back(std::move(p));
  }
  if (units > 1) {
    queue_cv_.NotifyAll();
  } else {
    queue_cv_.NotifyOne();
  }
  return fence;
}

DmaEngine::Stats CpuDmaEngine::stats() const {
  MutexLock lock(stats_mu_);
  return stats_;
}

CpuDmaEngine::CpuStats CpuDmaEngine::cpu_stats() const {
  MutexLock lock(stats_mu_);
  return cpu_stats_;
}

void CpuDmaEngine::WorkerLoop() {
  std::vector<unsigned char> scratch;  // fill buffer for checked system fills
  for (;;) {
    Piece piece;
    {
      MutexLock lock(queue_mu_);
      queue_cv_.Wait(queue_mu_, [&]() REQUIRES(queue_mu_) { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, and everything queued has been taken
      piece = std::move(queue_.front());
      queue_.pop_front();
    }
    Status status = RunPiece(piece, scratch);
    if (piece.batch->trace_begin != 0) piece.batch->TracePieceDone();
    // The fence may complete here: waiters wake, handlers are posted. No engine lock is held.
    piece.batch->signal.Finish(piece.index, std::move(status));
  }
}

Status CpuDmaEngine::RunPiece(const Piece& piece, std::vector<unsigned char>& scratch) {
  const Descriptor& whole = piece.batch->descs[piece.index];
  Descriptor d = whole;
  d.len = piece.len;
  d.dst.ptr = Bytes(whole.dst.ptr) + piece.offset;
  const bool copy = d.op == Descriptor::Op::kCopy;
  if (copy) d.src.ptr = Bytes(whole.src.ptr) + piece.offset;

  // A copy between the two memories, or a fill of system memory (the engine sits on the device
  // side of the link), crosses the link.
  const bool crosses = copy ? d.src.memory != d.dst.memory : d.dst.memory == Memory::kSystem;
  const bool throttled = options_.link.has_value() && crosses;
  Clock::time_point slot_end{};
  if (throttled) {
    const bool first = !piece.batch->latency_charged[piece.index].exchange(true);
    slot_end = ReserveLink(d.len, first);
  }

  const bool checked = options_.checked_system_access;
  const bool src_checked = copy && checked && d.src.memory == Memory::kSystem;
  const bool dst_checked = checked && d.dst.memory == Memory::kSystem;
  Status status;
  if (const int injected = inject::Check(inject::Site::kDmaDescriptor)) {
    // The piece does not run: its descriptor fails as a real engine error would leave it.
    status = Status::FromErrno(
        injected, fmt::format("descriptor {}: injected failure (dma_descriptor)", piece.index));
  } else if (!copy) {
    if (dst_checked) {
      status = FillChecked(d, piece.index, scratch);
    } else {
      std::memset(d.dst.ptr, d.fill, d.len);
    }
  } else if (src_checked || dst_checked) {
    status = CopyChecked(d, piece.index);
  } else {
    std::memcpy(d.dst.ptr, d.src.ptr, d.len);
  }
  if (status.ok() && throttled) WaitUntil(slot_end);

  bool newly_failed = !status.ok() && !piece.batch->failed[piece.index].exchange(true);
  if (newly_failed && Log().should_log(spdlog::level::debug)) {
    Log().debug("dma {}: {}", name(), status.ToString());
  }
  MutexLock lock(stats_mu_);
  cpu_stats_.pieces++;
  if (throttled) cpu_stats_.throttled_bytes += d.len;
  if (newly_failed) cpu_stats_.failed_descriptors++;
  return status;
}

Status CpuDmaEngine::CopyChecked(const Descriptor& d, size_t index) {
  const bool read = d.src.memory == Memory::kSystem;  // else only the destination is system
  const unsigned char* src = Bytes(d.src.ptr);
  unsigned char* dst = Bytes(d.dst.ptr);
  size_t done = 0;
  while (done < d.len) {
    // Reading: the system source is the "remote" side, the destination (system or device) local.
    // Writing: the device source is local, the system destination remote.
    const size_t left = d.len - done;
    iovec local{}, remote{};
    ssize_t n;
    if (read) {
      local = {dst + done, left};
      remote = {const_cast<unsigned char*>(src + done), left};
      n = vm_.ReadV(std::span(&local, 1), std::span(&remote, 1));
    } else {
      local = {const_cast<unsigned char*>(src + done), left};
      remote = {dst + done, left};
      n = vm_.WriteV(std::span(&local, 1), std::span(&remote, 1));
    }
    if (n > 0) {
      done += static_cast<size_t>(n);
      continue;
    }
    const int err = n == 0 ? EFAULT : errno;
    if (n < 0 && err == EINTR) continue;
    // Which side stopped the copy? Only a system side can fault. With both sides in system memory,
    // probe the first source byte not copied.
    bool source = read;
    if (read && d.dst.memory == Memory::kSystem && err == EFAULT) {
      unsigned char probe;
      const iovec pl{&probe, 1}, pr{const_cast<unsigned char*>(src + done), 1};
      ssize_t r;
      do {
        r = vm_.ReadV(std::span(&pl, 1), std::span(&pr, 1));
      } while (r < 0 && errno == EINTR);
      source = r != 1;
    }
    return SystemFault(err, index, source,
                       source ? static_cast<const void*>(src + done) : dst + done, d);
  }
  return Status::Ok();
}

Status CpuDmaEngine::FillChecked(const Descriptor& d, size_t index,
                                 std::vector<unsigned char>& scratch) {
  scratch.resize(kFillChunk);
  std::memset(scratch.data(), d.fill, scratch.size());
  unsigned char* dst = Bytes(d.dst.ptr);
  std::array<iovec, kFillIovecs> local;
  size_t done = 0;
  while (done < d.len) {
    const size_t chunk = std::min(d.len - done, kFillChunk * kFillIovecs);
    size_t count = 0;
    for (size_t covered = 0; covered < chunk; covered += kFillChunk) {
      local[count++] = {scratch.data(), std::min(kFillChunk, chunk - covered)};
    }
    const iovec remote{dst + done, chunk};
    const ssize_t n = vm_.WriteV(std::span(local.data(), count), std::span(&remote, 1));
    if (n > 0) {
      done += static_cast<size_t>(n);
      continue;
    }
    const int err = n == 0 ? EFAULT : errno;
    if (n < 0 && err == EINTR) continue;
    return SystemFault(err, index, false, dst + done, d);
  }
  return Status::Ok();
}

Clock::time_point CpuDmaEngine::ReserveLink(size_t bytes, bool with_latency) {
  const LinkModel& link = *options_.link;
  const std::chrono::nanoseconds cost =
      (with_latency ? link.latency : std::chrono::nanoseconds(0)) + link.WireTime(bytes);
  MutexLock lock(link_mu_);
  const Clock::time_point start = std::max(Clock::now(), link_busy_until_);
  link_busy_until_ = start + cost;
  return link_busy_until_;
}

}  // namespace hmmkit::dma
