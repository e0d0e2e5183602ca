// The memory fuzz_dmirror points the device at: a fixed layout of slots whose mappings the harness
// replaces between commands, with a shadow copy of the data every readable page must hold.
//
// Layout, in pages:  [canary][guard][slot 0] ... [slot kSlots-1][guard][canary]
// Guards stay PROT_NONE, so a range that starts in the arena and runs past its end fails at the
// upper guard; canaries are RW pages that no command ever targets: their bytes must never change.
// Owned by one harness run (one fuzzer input): the constructor maps, the destructor unmaps all.
#pragma once

#include <sys/mman.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace hmmkit::fuzz {

inline constexpr size_t kPage = 4096;

class DmirrorArena {
 public:
  static constexpr size_t kSlots = 6;
  static constexpr size_t kSlotPages = 4;
  // Pages from the lower guard to the upper guard, both included: the pages a command may target.
  static constexpr size_t kTargetPages = kSlots * kSlotPages + 2;

  enum class Kind : uint8_t { kHole, kPrivate, kShared };
  struct Slot {
    Kind kind = Kind::kHole;
    int prot = PROT_NONE;
    bool lost = false;      // another thread mapped into our hole: never target or touch it again
    bool replaced = false;  // remapped or unmapped since the last VerifyAll
  };
  // What a command may do to one target page.
  struct PageClass {
    bool mapped = false, readable = false, writable = false, shared = false, lost = false;
    bool replaced = false;
  };

  DmirrorArena();
  ~DmirrorArena();
  DmirrorArena(const DmirrorArena&) = delete;
  DmirrorArena& operator=(const DmirrorArena&) = delete;

  bool ok() const { return base_ != nullptr; }
  // Address of target page i (0: the lower guard, kTargetPages - 1: the upper guard).
  uintptr_t TargetPage(size_t i) const { return target_ + i * kPage; }
  uintptr_t target_begin() const { return target_; }
  uintptr_t target_end() const { return target_ + kTargetPages * kPage; }
  PageClass Classify(uintptr_t page) const;

  // Replaces slot s by a fresh mapping of `kind` (kHole unmaps it); `fill` 0 leaves it untouched
  // (zero), else writes a pattern seeded by it before applying `prot`.
  void Remap(size_t s, Kind kind, int prot, uint8_t fill);
  void Protect(size_t s, int prot);
  // A CPU store of a pattern into one page of slot s (when writable): faults device pages back.
  void CpuWrite(size_t s, size_t page, uint8_t seed);

  // The expected data of a target page; nullptr when unknown.
  const uint8_t* Expected(uintptr_t page) const;
  void SetExpected(uintptr_t page, const uint8_t* data);
  void Forget(uintptr_t page);
  // Checks every readable known page and the canaries against the shadow (a CPU read, which
  // faults device pages back), and learns the unknown readable pages. Aborts on a mismatch.
  void VerifyAll();
  void CheckCanaries() const;

 private:
  size_t SlotOf(uintptr_t page) const { return ((page - target_) / kPage - 1) / kSlotPages; }
  uintptr_t SlotAddr(size_t s) const { return target_ + (1 + s * kSlotPages) * kPage; }

  uint8_t* base_ = nullptr;
  uintptr_t target_ = 0;
  std::array<Slot, kSlots> slots_{};
  std::vector<uint8_t> shadow_;  // kTargetPages pages
  std::vector<bool> known_;      // per target page
};

// Aborts with a message: a violated invariant is a crash the fuzzer reports.
[[noreturn]] void Violation(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

}  // namespace hmmkit::fuzz
