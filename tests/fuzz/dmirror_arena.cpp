#include "dmirror_arena.hpp"

#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace hmmkit::fuzz {

namespace {

constexpr uint8_t kCanary = 0xC3;
constexpr size_t kTotalPages = DmirrorArena::kTargetPages + 2;

void Pattern(uint8_t* p, uint8_t seed, uintptr_t addr) {
  // Differs per page and per seed, so a page copied to the wrong place is noticed.
  for (size_t i = 0; i < kPage; i += 8) {
    const uint64_t v = (uint64_t(addr + i) * 0x9E3779B97F4A7C15ull) ^ (uint64_t(seed) << 56);
    std::memcpy(p + i, &v, sizeof(v));
  }
}

}  // namespace

void Violation(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::fputs("fuzz invariant violated: ", stderr);
  std::vfprintf(stderr, fmt, ap);
  std::fputc('\n', stderr);
  va_end(ap);
  std::abort();
}

DmirrorArena::DmirrorArena() : shadow_(kTargetPages * kPage), known_(kTargetPages, false) {
  void* p = ::mmap(nullptr, kTotalPages * kPage, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return;
  base_ = static_cast<uint8_t*>(p);
  target_ = reinterpret_cast<uintptr_t>(base_) + kPage;
  for (uint8_t* c : {base_, base_ + (kTotalPages - 1) * kPage}) {
    if (::mprotect(c, kPage, PROT_READ | PROT_WRITE) != 0) Violation("mprotect canary: %d", errno);
    std::memset(c, kCanary, kPage);
  }
  // Slots start as holes inside the reservation: PROT_NONE private memory until remapped.
  for (Slot& s : slots_) s = Slot{Kind::kPrivate, PROT_NONE, false};
}

DmirrorArena::~DmirrorArena() {
  if (!base_) return;
  CheckCanaries();
  // A lost slot belongs to someone else: unmap around it.
  uintptr_t from = reinterpret_cast<uintptr_t>(base_);
  const uintptr_t end = from + kTotalPages * kPage;
  for (size_t s = 0; s < kSlots; ++s) {
    if (!slots_[s].lost) continue;
    ::munmap(reinterpret_cast<void*>(from), SlotAddr(s) - from);
    from = SlotAddr(s) + kSlotPages * kPage;
  }
  ::munmap(reinterpret_cast<void*>(from), end - from);
}

DmirrorArena::PageClass DmirrorArena::Classify(uintptr_t page) const {
  PageClass c;
  if (page < target_ || page >= target_end()) return c;  // not ours: treated as a hole
  const size_t t = (page - target_) / kPage;
  if (t == 0 || t == kTargetPages - 1) {
    c.mapped = true;  // a guard: PROT_NONE
    return c;
  }
  const Slot& s = slots_[SlotOf(page)];
  c.lost = s.lost;
  c.replaced = s.replaced;
  if (s.kind == Kind::kHole) return c;
  c.mapped = true;
  c.shared = s.kind == Kind::kShared;
  c.readable = (s.prot & PROT_READ) != 0;
  c.writable = (s.prot & PROT_WRITE) != 0;
  return c;
}

void DmirrorArena::Remap(size_t s, Kind kind, int prot, uint8_t fill) {
  Slot& slot = slots_[s];
  if (slot.lost) return;
  void* addr = reinterpret_cast<void*>(SlotAddr(s));
  const size_t len = kSlotPages * kPage;
  const size_t first = 1 + s * kSlotPages;
  for (size_t i = 0; i < kSlotPages; ++i) known_[first + i] = false;
  if (kind == Kind::kHole) {
    if (slot.kind != Kind::kHole && ::munmap(addr, len) != 0) Violation("munmap: %d", errno);
    slot = Slot{Kind::kHole, PROT_NONE, false, true};
    return;
  }
  const int flags = (kind == Kind::kShared ? MAP_SHARED : MAP_PRIVATE) | MAP_ANONYMOUS |
                    (slot.kind == Kind::kHole ? MAP_FIXED_NOREPLACE : MAP_FIXED);
  void* p = ::mmap(addr, len, PROT_READ | PROT_WRITE, flags, -1, 0);
  if (p == MAP_FAILED && errno == EEXIST) {
    slot.lost = true;
    return;
  }
  if (p != addr) Violation("mmap slot %zu: %p (errno %d)", s, p, errno);
  for (size_t i = 0; i < kSlotPages; ++i) {
    uint8_t* page = static_cast<uint8_t*>(addr) + i * kPage;
    if (fill) Pattern(page, fill, reinterpret_cast<uintptr_t>(page));
    std::memcpy(&shadow_[(first + i) * kPage], page, kPage);
    known_[first + i] = true;
  }
  slot = Slot{kind, PROT_READ | PROT_WRITE, false, true};
  Protect(s, prot);
}

void DmirrorArena::Protect(size_t s, int prot) {
  Slot& slot = slots_[s];
  if (slot.lost || slot.kind == Kind::kHole) return;
  if (::mprotect(reinterpret_cast<void*>(SlotAddr(s)), kSlotPages * kPage, prot) != 0)
    Violation("mprotect slot %zu: %d", s, errno);
  slot.prot = prot;  // the data is kept: known pages stay known
}

void DmirrorArena::CpuWrite(size_t s, size_t page, uint8_t seed) {
  const Slot& slot = slots_[s];
  if (slot.lost || slot.kind == Kind::kHole || !(slot.prot & PROT_WRITE)) return;
  uint8_t* p = reinterpret_cast<uint8_t*>(SlotAddr(s) + page * kPage);
  Pattern(p, seed, reinterpret_cast<uintptr_t>(p));
  SetExpected(reinterpret_cast<uintptr_t>(p), p);
}

const uint8_t* DmirrorArena::Expected(uintptr_t page) const {
  if (page < target_ || page >= target_end()) return nullptr;
  const size_t t = (page - target_) / kPage;
  return known_[t] ? &shadow_[t * kPage] : nullptr;
}

void DmirrorArena::SetExpected(uintptr_t page, const uint8_t* data) {
  if (page < target_ || page >= target_end()) return;  // not modeled
  const size_t t = (page - target_) / kPage;
  std::memcpy(&shadow_[t * kPage], data, kPage);
  known_[t] = true;
}

void DmirrorArena::Forget(uintptr_t page) {
  if (page >= target_ && page < target_end()) known_[(page - target_) / kPage] = false;
}

void DmirrorArena::VerifyAll() {
  CheckCanaries();
  for (Slot& s : slots_) s.replaced = false;
  for (size_t t = 1; t + 1 < kTargetPages; ++t) {
    const uintptr_t page = TargetPage(t);
    const PageClass c = Classify(page);
    if (!c.readable || c.lost) continue;
    const uint8_t* mem = reinterpret_cast<const uint8_t*>(page);
    if (known_[t] && std::memcmp(mem, &shadow_[t * kPage], kPage) != 0)
      Violation("page %#lx (slot %zu) changed behind the harness", page, SlotOf(page));
    SetExpected(page, mem);
  }
}

void DmirrorArena::CheckCanaries() const {
  for (const uint8_t* c : {base_, base_ + (kTotalPages - 1) * kPage})
    for (size_t i = 0; i < kPage; ++i)
      if (c[i] != kCanary)
        Violation("canary page %p changed at +%zu", static_cast<const void*>(c), i);
}

}  // namespace hmmkit::fuzz
