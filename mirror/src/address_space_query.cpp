// AddressSpace queries: VMAs (VmaReader), page snapshots (PageReader) and the CPU fault path
// (MADV_POPULATE_READ/WRITE).
#include <sys/mman.h>

#include <cerrno>
#include <cstring>

#include <fmt/format.h>

#include "hmmkit/mirror/address_space.hpp"
#include "hmmkit/mirror/uapi.hpp"
#include "page_reader.hpp"
#include "vma_reader.hpp"

namespace hmmkit {

Result<std::optional<Vma>> AddressSpace::FindVma(uintptr_t addr) const {
  return VmaReader(*this).Find(addr);
}

Result<std::vector<Vma>> AddressSpace::FindVmas(uintptr_t start, uintptr_t end) const {
  return VmaReader(*this).FindRange(start, end);
}

Status AddressSpace::Snapshot(uintptr_t start, uintptr_t end, std::span<PageState> out) const {
  return PageReader(*this).Snapshot(start, end, out);
}

Status AddressSpace::SnapshotInVma(const Vma& vma, uintptr_t start, uintptr_t end,
                                   std::span<PageState> out) const {
  return PageReader(*this).SnapshotInVma(vma, start, end, out);
}

namespace {

// Bounds the EAGAIN retries of one Populate; the kernel retries its own faults, so EAGAIN reaching
// user space is rare and transient.
constexpr int kMaxEagainRetries = 1000;

}  // namespace

Status AddressSpace::Populate(uintptr_t start, uintptr_t end, bool write) const {
  const char* what = write ? "populate-write" : "populate-read";
  const size_t page = features().page_size;
  if ((start & (page - 1)) != 0 || end <= start) {
    return Status::FromErrno(
        EINVAL, fmt::format("{} {:#x}-{:#x}: unaligned start or empty range", what, start, end));
  }
  if (!features().madv_populate) {
    return Status::FromErrno(
        ENOTSUP, fmt::format("{} {:#x}-{:#x}: the kernel lacks MADV_POPULATE_READ/WRITE "
                             "(Linux 5.14+)",
                             what, start, end));
  }
  const int advice = write ? MADV_POPULATE_WRITE : MADV_POPULATE_READ;
  int err = 0;
  for (int eagain = 0;;) {
    if (sys().Madvise(reinterpret_cast<void*>(start), end - start, advice) == 0)
      return Status::Ok();
    err = errno;
    if (err == EINTR) continue;
    if (err == EAGAIN && ++eagain < kMaxEagainRetries) continue;
    break;
  }

  auto fail = [&](int code, std::string_view reason) {
    return Status::FromErrno(code, fmt::format("{} {:#x}-{:#x}: {}", what, start, end, reason));
  };
  switch (err) {
    case EINVAL:
    case ENOMEM: {
      // EINVAL: a VMA the fault cannot serve (PROT_NONE, read-only for a write, VM_IO/VM_PFNMAP).
      // ENOMEM: a hole in the range, or out of memory. Look at the VMAs to tell which.
      auto vmas = FindVmas(start, end);
      if (!vmas.ok()) return fail(err == EINVAL ? EFAULT : err, vmas.status().message());
      uintptr_t next = start;
      for (const Vma& v : *vmas) {
        if (v.start > next) {
          return fail(EFAULT, fmt::format("not mapped at {:#x}-{:#x}", next, v.start));
        }
        if (!v.accessible()) {
          return fail(EFAULT, fmt::format("VMA {:#x}-{:#x} is PROT_NONE", v.start, v.end));
        }
        if (write && !v.write) {
          return fail(EPERM, fmt::format("VMA {:#x}-{:#x} is read-only", v.start, v.end));
        }
        if (v.kind == VmaKind::kSpecial) {
          return fail(EFAULT, fmt::format("VMA {:#x}-{:#x} is a special mapping ({})", v.start,
                                          v.end, v.name.empty() ? "device" : v.name));
        }
        next = v.end;
      }
      if (next < end) return fail(EFAULT, fmt::format("not mapped at {:#x}-{:#x}", next, end));
      if (err == ENOMEM) return fail(ENOMEM, "out of memory");
      return fail(EFAULT, "the mapping cannot be faulted (VM_IO/VM_PFNMAP, or it changed)");
    }
    case EFAULT:
      return fail(EFAULT,
                  "the fault failed (SIGBUS/SIGSEGV: beyond the end of a file, or a "
                  "userfaultfd that cannot serve it)");
    case EHWPOISON:
      return fail(EFAULT, "hardware-poisoned page");
    case EAGAIN:
      return fail(EAGAIN, "kept failing with EAGAIN");
    default:
      return fail(err, strerror(err));
  }
}

}  // namespace hmmkit
