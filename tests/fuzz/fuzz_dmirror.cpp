// libFuzzer harness for the test_hmm-compatible command interface (hmmkit/dmirror.h).
//
// An input decodes into a sequence of operations on one DmirrorArena (dmirror_arena.hpp): device
// commands (every request, unknown ones too; device handles 0..3, closed and bogus handles;
// addresses in the arena or invalid ones: unaligned, page 0, past the user half, overflowing;
// npages 0, in range or huge) mixed with remaps, mprotects, CPU stores and full verifications.
// Each command is checked against the documented contract (../shared/design/DMIRROR.md); any
// difference aborts:
//   - the result is 0 or -1 with an errno the request may return for that range;
//   - on failure the command struct is untouched; on success cpages is what the request reports;
//   - the bounce buffer is written only where the request writes (canary bytes after it);
//   - READ, MIGRATE_TO_DEV and EXCLUSIVE return the data last written to each page, by the CPU
//     or by a device WRITE;
//   - memory outside the target range, and the canaries around the arena, never change.
// Everything an input maps it unmaps; every handle it opens it closes.
#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

#include "byte_reader.hpp"
#include "dmirror_arena.hpp"
#include "hmmkit/dmirror.h"
#include "known_bugs.hpp"

namespace hmmkit::fuzz {
namespace {

constexpr unsigned kDevices = 4;
constexpr uint64_t kVaLimit = uint64_t{1} << 47;
constexpr uint8_t kBounceCanary = 0xA5;
// The bounce buffer backs every range the harness builds within the arena, plus a canary page.
constexpr size_t kBouncePages = DmirrorArena::kTargetPages + 1;

constexpr unsigned long kRequests[] = {HMM_DMIRROR_READ,
                                       HMM_DMIRROR_WRITE,
                                       HMM_DMIRROR_MIGRATE_TO_DEV,
                                       HMM_DMIRROR_MIGRATE_TO_SYS,
                                       HMM_DMIRROR_SNAPSHOT,
                                       HMM_DMIRROR_EXCLUSIVE,
                                       HMM_DMIRROR_CHECK_EXCLUSIVE,
                                       HMM_DMIRROR_RELEASE,
                                       HMM_DMIRROR_FLAGS};

bool Known(unsigned long r) {
  for (unsigned long k : kRequests)
    if (k == r) return true;
  return false;
}

bool WritesBounce(unsigned long r) {
  return r == HMM_DMIRROR_READ || r == HMM_DMIRROR_MIGRATE_TO_DEV || r == HMM_DMIRROR_EXCLUSIVE;
}
bool NeedsPtr(unsigned long r) {
  return WritesBounce(r) || r == HMM_DMIRROR_WRITE || r == HMM_DMIRROR_SNAPSHOT;
}

unsigned ErrnoBit(int e) {
  switch (e) {
    case EINVAL:
      return 1u << 0;
    case EFAULT:
      return 1u << 1;
    case EPERM:
      return 1u << 2;
    case ENOENT:
      return 1u << 3;
    case ENOMEM:
      return 1u << 4;
    default:
      return 1u << 31;  // undocumented (ENOTSUP only at open)
  }
}
constexpr unsigned kOk = 1u << 30;
constexpr unsigned kEINVAL = 1u << 0, kEFAULT = 1u << 1, kEPERM = 1u << 2, kENOENT = 1u << 3,
                   kENOMEM = 1u << 4;

const char* Name(unsigned long r) {
  switch (r) {
    case HMM_DMIRROR_READ:
      return "READ";
    case HMM_DMIRROR_WRITE:
      return "WRITE";
    case HMM_DMIRROR_MIGRATE_TO_DEV:
      return "MIGRATE_TO_DEV";
    case HMM_DMIRROR_MIGRATE_TO_SYS:
      return "MIGRATE_TO_SYS";
    case HMM_DMIRROR_SNAPSHOT:
      return "SNAPSHOT";
    case HMM_DMIRROR_EXCLUSIVE:
      return "EXCLUSIVE";
    case HMM_DMIRROR_CHECK_EXCLUSIVE:
      return "CHECK_EXCLUSIVE";
    case HMM_DMIRROR_RELEASE:
      return "RELEASE";
    case HMM_DMIRROR_FLAGS:
      return "FLAGS";
    default:
      return "unknown";
  }
}

// The allowed outcomes of one command and how far it may write the bounce buffer.
struct Expectation {
  unsigned allowed = 0;     // kOk and errno bits
  size_t bounce_limit = 0;  // bytes from the start of ptr a command may write
  bool stale = false;       // known bug: the device may still see what was unmapped
};

struct Harness {
  explicit Harness(ByteReader& input) : in(input) {
    void* p = ::mmap(nullptr, kBouncePages * kPage, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) Violation("mmap bounce: %d", errno);
    bounce = static_cast<uint8_t*>(p);
    for (int& h : handles) h = -1;
  }
  ~Harness() {
    for (int& h : handles)
      if (h >= 0 && hmm_dmirror_close(h) != 0) Violation("close %d: errno %d", h, errno);
    ::munmap(bounce, kBouncePages * kPage);
  }

  // Returns false when the device cannot run here (no userfaultfd): the input is skipped.
  bool Handle(unsigned d, int* out) {
    if (handles[d] < 0) {
      handles[d] = hmm_dmirror_open(d);
      if (handles[d] < 0) {
        if (errno == ENOTSUP) return false;
        Violation("open device %u: errno %d", d, errno);
      }
      if (handles[d] == closed_handle) closed_handle = -1;  // its number is in use again
    }
    *out = handles[d];
    return true;
  }

  bool Step();
  bool Command();
  void ChooseRange(unsigned long req, hmm_dmirror_cmd& cmd, bool* in_arena);
  Expectation Expect(unsigned long req, const hmm_dmirror_cmd& cmd, bool in_arena);
  void CheckData(unsigned long req, const hmm_dmirror_cmd& cmd, int rc, const Expectation& ex);
  void CheckSnapshot(const hmm_dmirror_cmd& cmd);
  void CloseOne(unsigned d);

  ByteReader& in;
  DmirrorArena arena;
  uint8_t* bounce = nullptr;
  int handles[kDevices];
  int closed_handle = -1;  // a handle number closed in this input and not reopened
};

// Addresses: most inside the arena (a guard, a slot page); some invalid by construction.
void Harness::ChooseRange(unsigned long req, hmm_dmirror_cmd& cmd, bool* in_arena) {
  *in_arena = false;
  const uint8_t mode = in.U8() % 16;
  if (mode < 11) {
    const size_t first = in.Below(DmirrorArena::kTargetPages);
    cmd.addr = arena.TargetPage(first);
    cmd.npages = 1 + in.Below(DmirrorArena::kTargetPages - first);
    *in_arena = true;
    return;
  }
  switch (mode) {
    case 11:  // unaligned
      cmd.addr = arena.TargetPage(in.Below(DmirrorArena::kTargetPages)) + 1 + in.Below(kPage - 1);
      cmd.npages = 1 + in.Below(4);
      break;
    case 12:  // npages 0
      cmd.addr = arena.TargetPage(in.Below(DmirrorArena::kTargetPages));
      cmd.npages = 0;
      *in_arena = true;  // (FLAGS may replace npages: then the range is valid)
      break;
    case 13:  // past the user half, or wrapping around
      cmd.addr = (in.Bool() ? kVaLimit : ~uint64_t{0} - 64 * kPage + 1) & ~(kPage - 1);
      cmd.addr += in.Below(64) * kPage;
      cmd.npages = 1 + in.Below(64);
      break;
    case 14:  // a range that overflows 64 bits or the user half
      cmd.addr = arena.TargetPage(in.Below(DmirrorArena::kTargetPages));
      cmd.npages = in.Bool() ? ~uint64_t{0} - in.Below(8) : (kVaLimit / kPage) - in.Below(4);
      *in_arena = true;
      break;
    default:  // huge but in the user half: the upper guard stops READ/WRITE/MIGRATE_TO_DEV early
      cmd.addr = arena.TargetPage(in.Below(DmirrorArena::kTargetPages));
      cmd.npages = (uint64_t{1} << (16 + in.Below(16))) + in.Below(256);
      *in_arena = true;
      // SNAPSHOT writes npages bytes and EXCLUSIVE/MIGRATE_TO_SYS walk every VMA above the arena:
      // only with a NULL ptr, which must fail before any work. (Others keep the real bounce.)
      if (req == HMM_DMIRROR_SNAPSHOT || req == HMM_DMIRROR_EXCLUSIVE ||
          req == HMM_DMIRROR_MIGRATE_TO_SYS || !Known(req)) {
        cmd.npages = ~uint64_t{0} / kPage;  // -> overflow: EINVAL
        *in_arena = false;
      }
      break;
  }
}

Expectation Harness::Expect(unsigned long req, const hmm_dmirror_cmd& cmd, bool in_arena) {
  Expectation ex;
  const uint64_t addr = cmd.addr, n = cmd.npages;
  const bool valid =
      (addr & (kPage - 1)) == 0 && n != 0 && addr < kVaLimit && n <= (kVaLimit - addr) / kPage;
  if (!valid || !Known(req)) {
    ex.allowed = kEINVAL;
    // Mirror::Command checks addr + npages * 4096 <= 2^47 after the sum wrapped past 2^64, so
    // such a range passes as an empty one.
    const bool wraps =
        (addr & (kPage - 1)) == 0 && n <= kVaLimit / kPage && addr + n * kPage < addr;
    if (wraps && Known(req) && KnownBugTolerated("dmirror-wrapping-range-accepted"))
      ex.allowed |= kOk | kEFAULT;
    return ex;
  }
  if (NeedsPtr(req) && cmd.ptr == 0) {
    ex.allowed = kEFAULT;
    return ex;
  }
  // Pages the harness models: the arena range, cut at the upper guard for huge ranges.
  const uint64_t modeled_end = std::min<uint64_t>(addr + n * kPage, arena.target_end());
  uintptr_t first_unreadable = 0, first_unwritable = 0;
  bool any_hole = false, any_none = false, any_shared = false, any_ro = false;
  int unwritable_err = 0;
  for (uint64_t p = addr; in_arena && p < modeled_end; p += kPage) {
    const auto c = arena.Classify(p);
    any_hole |= !c.mapped;
    any_none |= c.mapped && !c.readable;
    any_shared |= c.shared;
    any_ro |= c.readable && !c.writable;
    if (!c.readable && !first_unreadable) first_unreadable = p;
    if (!c.writable && !first_unwritable) {
      first_unwritable = p;
      unwritable_err = c.readable ? kEPERM : kEFAULT;
    }
  }
  const bool huge = addr + n * kPage > arena.target_end();
  bool replaced = false;
  for (uint64_t p = addr; in_arena && p < modeled_end; p += kPage)
    replaced |= arena.Classify(p).replaced;
  // munmap returns before the monitor has told the mirror (the kernel invalidates synchronously).
  ex.stale = replaced && KnownBugTolerated("dmirror-device-read-after-munmap");
  const size_t range_bytes = size_t(modeled_end - addr);
  switch (req) {
    case HMM_DMIRROR_READ:
      ex.allowed = first_unreadable ? kEFAULT | kENOMEM : kOk | kENOMEM;
      if (huge) ex.allowed |= kENOMEM;  // the kernel cannot allocate such a bounce buffer either
      ex.bounce_limit = first_unreadable ? first_unreadable - addr : range_bytes;
      break;
    case HMM_DMIRROR_WRITE:
      ex.allowed = first_unwritable ? unsigned(unwritable_err) | kENOMEM : kOk | kENOMEM;
      break;
    case HMM_DMIRROR_MIGRATE_TO_DEV:
      // Per VMA: a hole or an unreadable VMA anywhere fails before anything moves.
      if (any_hole || any_none || huge)
        ex.allowed = kEINVAL | (huge ? kENOMEM : 0);
      else
        ex.allowed = (any_shared ? 0 : kOk) | kENOENT | kENOMEM;
      ex.bounce_limit = range_bytes;
      break;
    case HMM_DMIRROR_MIGRATE_TO_SYS:
    case HMM_DMIRROR_RELEASE:
      ex.allowed = kOk | kENOMEM;
      break;
    case HMM_DMIRROR_SNAPSHOT:
      ex.allowed = kOk | kENOMEM;
      ex.bounce_limit = size_t(n);
      break;
    case HMM_DMIRROR_EXCLUSIVE:
      if (any_hole)
        ex.allowed = kEINVAL;
      else if (any_none || any_ro || any_shared)
        ex.allowed = kOk | kEINVAL | kEFAULT | kEPERM | kENOENT | kENOMEM;
      else
        ex.allowed = kOk | kENOMEM;
      ex.bounce_limit = range_bytes;
      break;
    case HMM_DMIRROR_CHECK_EXCLUSIVE:
      ex.allowed = kOk | kEPERM;
      break;
    case HMM_DMIRROR_FLAGS:
      ex.allowed = kOk;
      break;
  }
  if (!in_arena) ex.allowed = kEINVAL | kEFAULT;  // page 0 and friends: never mapped
  if (ex.stale) {
    ex.allowed |= kOk | kEINVAL | kEFAULT | kEPERM | kENOENT;
    if (WritesBounce(req)) ex.bounce_limit = range_bytes;
  }
  return ex;
}

void Harness::CheckData(unsigned long req, const hmm_dmirror_cmd& cmd, int rc,
                        const Expectation& ex) {
  // The bounce buffer beyond what the request may write is untouched (WRITE only reads it).
  const size_t limit = rc == 0 || WritesBounce(req) || req == HMM_DMIRROR_SNAPSHOT
                           ? (req == HMM_DMIRROR_WRITE ? 0 : ex.bounce_limit)
                           : 0;
  if (cmd.ptr == reinterpret_cast<uint64_t>(bounce)) {
    // WRITE's bounce holds data up to the last page: only that canary page is checked.
    const size_t from = req == HMM_DMIRROR_WRITE ? (kBouncePages - 1) * kPage : limit;
    for (size_t i = from; i < kBouncePages * kPage; ++i)
      if (bounce[i] != kBounceCanary)
        Violation("%s wrote bounce byte %zu (limit %zu, npages %llu, rc %d)", Name(req), i, limit,
                  static_cast<unsigned long long>(cmd.npages), rc);
  }
  if (rc != 0) return;
  if (ex.stale) {  // where the data went (or came from) is unknown
    for (uint64_t i = 0; req == HMM_DMIRROR_WRITE && i < cmd.npages; ++i)
      arena.Forget(cmd.addr + i * kPage);
    return;
  }
  if (req == HMM_DMIRROR_WRITE) {
    for (uint64_t i = 0; i < cmd.npages; ++i)
      arena.SetExpected(cmd.addr + i * kPage, bounce + i * kPage);
    return;
  }
  if (!WritesBounce(req)) return;
  for (uint64_t i = 0; i < cmd.npages; ++i) {
    const uint8_t* want = arena.Expected(cmd.addr + i * kPage);
    if (want && std::memcmp(want, bounce + i * kPage, kPage) != 0)
      Violation("%s: page %#llx differs from the data last written to it", Name(req),
                static_cast<unsigned long long>(cmd.addr + i * kPage));
  }
}

bool Harness::Command() {
  const uint8_t r = in.U8();
  unsigned long req;
  if (r < 200) {
    req = kRequests[r % std::size(kRequests)];
  } else {
    switch (r % 4) {
      case 0:
        req = _IOWR('H', 0x09 + in.Below(0xF7), struct hmm_dmirror_cmd);
        break;
      case 1:
        req = _IOR('H', in.Below(9), struct hmm_dmirror_cmd);
        break;
      case 2:
        req = _IOWR('H', in.Below(9), uint64_t);
        break;
      default:
        req = in.U64();
        break;
    }
  }
  // Device handle: mostly an open device, sometimes a closed or never-valid one.
  const uint8_t d = in.U8() % 20;
  int h;
  bool bad_handle = false;
  if (d < 16) {
    if (!Handle(d % kDevices, &h)) return false;
  } else {
    static constexpr int kBogus[] = {-1, 4096, 1 << 30};
    h = d == 16 && closed_handle >= 0 ? closed_handle : kBogus[d % 3];
    bad_handle = true;
  }

  hmm_dmirror_cmd cmd{};
  bool in_arena;
  ChooseRange(req, cmd, &in_arena);
  const uint8_t ptr_mode = in.U8() % 16;
  cmd.ptr = ptr_mode == 0 ? 0 : reinterpret_cast<uint64_t>(bounce);
  if (req == HMM_DMIRROR_FLAGS) cmd.npages = in.Bool() ? HMM_DMIRROR_FLAG_FAIL_ALLOC : cmd.npages;
  cmd.cpages = 0xC0FFEE;
  cmd.faults = 0xFA17;

  std::memset(bounce, kBounceCanary, kBouncePages * kPage);
  if (req == HMM_DMIRROR_WRITE) {
    const uint8_t seed = in.U8();
    for (size_t i = 0; i < (kBouncePages - 1) * kPage; i += 8) {
      const uint64_t v = (i + 1) * 0x2545F4914F6CDD1Dull + seed;
      std::memcpy(bounce + i, &v, sizeof(v));
    }
  }
  Expectation ex = Expect(req, cmd, in_arena);
  if (bad_handle) ex = Expectation{kEINVAL, 0};
  // A lost slot may hold another thread's memory: never point a command at it.
  for (uint64_t p = cmd.addr;
       in_arena && p < std::min<uint64_t>(cmd.addr + cmd.npages * kPage, arena.target_end());
       p += kPage)
    if (arena.Classify(p).lost) return true;

  const hmm_dmirror_cmd before = cmd;
  errno = 0;
  const int rc = hmm_dmirror_ioctl(h, req, &cmd);
  const int err = errno;
  static const bool trace = std::getenv("HMMKIT_FUZZ_TRACE") != nullptr;  // to read a reproducer
  if (trace)
    std::fprintf(stderr, "fuzz_dmirror: %s dev-handle %d page %lld npages %llu -> %d %s\n",
                 Name(req), h,
                 in_arena ? static_cast<long long>((cmd.addr - arena.target_begin()) / kPage) : -1,
                 static_cast<unsigned long long>(cmd.npages), rc, rc ? std::strerror(err) : "");
  if (rc != 0 && rc != -1) Violation("%s returned %d", Name(req), rc);
  const unsigned got = rc == 0 ? kOk : ErrnoBit(err);
  if (!(got & ex.allowed))
    Violation("%s addr %#llx npages %llu ptr %s handle %d: rc %d errno %d (%s), allowed mask %#x",
              Name(req), static_cast<unsigned long long>(cmd.addr),
              static_cast<unsigned long long>(cmd.npages), cmd.ptr ? "bounce" : "NULL", h, rc, err,
              std::strerror(err), ex.allowed);
  if (rc != 0 && std::memcmp(&before, &cmd, sizeof(cmd)) != 0)
    Violation("%s failed but changed the command struct", Name(req));
  if (rc == 0) {
    if (cmd.addr != before.addr || cmd.ptr != before.ptr || cmd.npages != before.npages)
      Violation("%s changed addr, ptr or npages", Name(req));
    const bool full = req == HMM_DMIRROR_READ || req == HMM_DMIRROR_WRITE ||
                      req == HMM_DMIRROR_MIGRATE_TO_DEV || req == HMM_DMIRROR_SNAPSHOT ||
                      req == HMM_DMIRROR_EXCLUSIVE;
    if (full && cmd.cpages != cmd.npages)
      Violation("%s: cpages %llu != npages %llu", Name(req),
                static_cast<unsigned long long>(cmd.cpages),
                static_cast<unsigned long long>(cmd.npages));
    if (req == HMM_DMIRROR_MIGRATE_TO_SYS && cmd.cpages > cmd.npages)
      Violation("MIGRATE_TO_SYS: cpages %llu > npages",
                static_cast<unsigned long long>(cmd.cpages));
  }
  // A failed WRITE may have stored some pages before it stopped: their data is unknown now.
  if (req == HMM_DMIRROR_WRITE && rc != 0 && in_arena)
    for (uint64_t p = cmd.addr;
         p < std::min<uint64_t>(cmd.addr + cmd.npages * kPage, arena.target_end()); p += kPage)
      arena.Forget(p);
  if (!bad_handle) CheckData(req, cmd, rc, ex);
  if (req == HMM_DMIRROR_SNAPSHOT && rc == 0 && !ex.stale) CheckSnapshot(cmd);
  return true;
}

// Each byte is one documented value: ERROR exactly for pages without a readable VMA, else a kind
// (NONE, ZERO, device private or coherent) with READ or WRITE, never WRITE for a read-only VMA.
void Harness::CheckSnapshot(const hmm_dmirror_cmd& cmd) {
  for (uint64_t i = 0; i < cmd.npages; ++i) {
    const uint8_t b = bounce[i];
    const auto c = arena.Classify(cmd.addr + i * kPage);
    if (!c.readable) {
      if (b != HMM_DMIRROR_PROT_ERROR)
        Violation("SNAPSHOT page %llu (no readable VMA): %#x, not ERROR",
                  static_cast<unsigned long long>(i), b);
      continue;
    }
    const uint8_t kind = b & 0xF0, perm = b & 0x03, size = b & 0x0C;
    const bool kind_ok =
        kind == HMM_DMIRROR_PROT_NONE || kind == HMM_DMIRROR_PROT_ZERO ||
        kind == HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL || kind == HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE ||
        kind == HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL || kind == HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE;
    const bool none = b == HMM_DMIRROR_PROT_NONE;
    if (!kind_ok || (!none && perm != HMM_DMIRROR_PROT_READ && perm != HMM_DMIRROR_PROT_WRITE) ||
        size == 0x0C || (perm == HMM_DMIRROR_PROT_WRITE && !c.writable) ||
        (kind == HMM_DMIRROR_PROT_ZERO && perm == HMM_DMIRROR_PROT_WRITE))
      Violation("SNAPSHOT page %llu: %#x is not a valid entry for a %s page",
                static_cast<unsigned long long>(i), b, c.writable ? "writable" : "read-only");
  }
}

void Harness::CloseOne(unsigned d) {
  if (handles[d] < 0) return;
  if (hmm_dmirror_close(handles[d]) != 0) Violation("close: errno %d", errno);
  closed_handle = handles[d];
  handles[d] = -1;
  // Closing twice is EINVAL.
  if (hmm_dmirror_close(closed_handle) != -1 || errno != EINVAL)
    Violation("second close of handle %d did not fail with EINVAL", closed_handle);
  for (int other : handles)
    if (other == closed_handle) closed_handle = -1;
}

// One operation; false stops the input (the device is unavailable here).
bool Harness::Step() {
  const uint8_t op = in.U8() % 16;
  if (op < 9) return Command();
  const size_t slot = in.Below(DmirrorArena::kSlots);
  switch (op) {
    case 9:
    case 10: {
      static constexpr DmirrorArena::Kind kKinds[] = {
          DmirrorArena::Kind::kPrivate, DmirrorArena::Kind::kPrivate, DmirrorArena::Kind::kShared,
          DmirrorArena::Kind::kHole};
      static constexpr int kProts[] = {PROT_READ | PROT_WRITE, PROT_READ | PROT_WRITE, PROT_READ,
                                       PROT_NONE};
      const auto kind = kKinds[in.Below(4)];
      const int prot = kProts[in.Below(4)];
      const uint8_t fill = in.Bool() ? in.U8() : 0;
      arena.Remap(slot, kind, prot, fill);
      break;
    }
    case 11: {
      static constexpr int kProts[] = {PROT_READ | PROT_WRITE, PROT_READ, PROT_NONE};
      arena.Protect(slot, kProts[in.Below(3)]);
      break;
    }
    case 12:
    case 13:
      arena.CpuWrite(slot, in.Below(DmirrorArena::kSlotPages), in.U8() | 1);
      break;
    case 14:
      arena.VerifyAll();
      break;
    default:
      CloseOne(in.Below(kDevices));
      break;
  }
  return true;
}

}  // namespace
}  // namespace hmmkit::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace hmmkit::fuzz;
  static bool unsupported = false;
  if (unsupported) return 0;
  ByteReader in(data, size);
  Harness h(in);
  if (!h.arena.ok()) Violation("cannot map the arena: %d", errno);
  // Bounded work per input: at most 64 operations.
  for (int i = 0; i < 64 && !in.empty(); ++i) {
    if (!h.Step()) {
      std::fprintf(stderr, "fuzz_dmirror: no userfaultfd here; inputs are not run\n");
      unsupported = true;
      return 0;
    }
  }
  h.arena.VerifyAll();
  return 0;
}
