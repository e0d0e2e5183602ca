#include "host_probe.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>

namespace hmmkit::dma {

namespace {

// Pages probed per process_vm_* call on the page-by-page path.
constexpr size_t kIovecs = 256;
// The kernel retries its own faults; EAGAIN reaching user space is rare and transient.
constexpr int kMaxEagain = 1000;

size_t PageSize() {
  static const size_t page = size_t(sysconf(_SC_PAGESIZE));
  return page;
}

// 0, or the errno of madvise(MADV_POPULATE_*) over the pages of [addr, addr + len).
int Populate(uintptr_t addr, size_t len, bool write) {
  const size_t page = PageSize();
  const uintptr_t start = addr & ~(page - 1);
  const uintptr_t end = (addr + len + page - 1) & ~(page - 1);
  const int advice = write ? MADV_POPULATE_WRITE : MADV_POPULATE_READ;
  for (int eagain = 0;;) {
    if (madvise(reinterpret_cast<void*>(start), end - start, advice) == 0) return 0;
    const int err = errno;
    if (err == EINTR) continue;
    if (err == EAGAIN && ++eagain < kMaxEagain) continue;
    return err;
  }
}

// Moves `count` one-byte iovecs with `op` (ReadV or WriteV), continuing after short transfers and
// EINTR. Returns the number moved: count, or the index of the one that failed (errno in *err).
template <class Op>
size_t MoveBytes(Op op, const iovec* local, const iovec* remote, size_t count, int* err) {
  size_t done = 0;
  while (done < count) {
    const ssize_t n =
        op(std::span(local + done, count - done), std::span(remote + done, count - done));
    if (n > 0) {
      done += size_t(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    *err = n == 0 ? EFAULT : errno;
    return done;
  }
  return done;
}

std::optional<ProbeFault> ProbePages(VmAccess& vm, uintptr_t addr, size_t len, bool write) {
  const size_t page = PageSize();
  const uintptr_t first = addr & ~(page - 1);
  const size_t pages = ((addr + len - 1) & ~(page - 1)) / page - first / page + 1;
  std::array<unsigned char, kIovecs> bytes;
  std::array<iovec, kIovecs> local, remote;
  auto read = [&vm](std::span<const iovec> l, std::span<const iovec> r) { return vm.ReadV(l, r); };
  auto write_back = [&vm](std::span<const iovec> l, std::span<const iovec> r) {
    return vm.WriteV(l, r);
  };
  for (size_t i = 0; i < pages; i += kIovecs) {
    const size_t count = std::min(kIovecs, pages - i);
    for (size_t k = 0; k < count; ++k) {
      // The first byte of the range in each page: for a write, a byte the caller is about to
      // overwrite anyway.
      const uintptr_t a = std::max(addr, first + (i + k) * page);
      local[k] = {&bytes[k], 1};
      remote[k] = {reinterpret_cast<void*>(a), 1};
    }
    int err = 0;
    const size_t readable = MoveBytes(read, local.data(), remote.data(), count, &err);
    if (write) {
      int werr = 0;
      const size_t written = MoveBytes(write_back, local.data(), remote.data(), readable, &werr);
      if (written < readable) {
        return ProbeFault{werr, reinterpret_cast<uintptr_t>(remote[written].iov_base)};
      }
    }
    if (readable < count) {
      return ProbeFault{err, reinterpret_cast<uintptr_t>(remote[readable].iov_base)};
    }
  }
  return std::nullopt;
}

}  // namespace

std::optional<ProbeFault> ProbeHostRange(VmAccess& vm, uintptr_t addr, size_t len, bool write,
                                         bool populate) {
  if (populate && Populate(addr, len, write) == 0) return std::nullopt;
  // MADV_POPULATE_* failed (a hole, PROT_NONE, read-only, SIGBUS, out of memory) or is missing:
  // find the page and the reason one page at a time. When every page passes here (madvise missing,
  // or a transient ENOMEM), the range is fine.
  return ProbePages(vm, addr, len, write);
}

}  // namespace hmmkit::dma
