// The trace ring's internals, shared by trace.cpp (recording, tracks) and trace_export.cpp.
//
// Slots are published with a per-slot sequence word. The ring's head packs an epoch (bits 40..63,
// bumped by Enable/Clear) and a count of reservations (bits 0..39). A producer takes a ticket
// with one fetch_add: the epoch and the slot index come from the same atomic value, so a record
// always knows which recording it belongs to. The slot is claimed by exchanging its sequence to
// kBusy (a second writer of the same slot, possible only across a Clear, sees kBusy and drops its
// record instead of interleaving), the fields are stored (relaxed atomics: readers may look at
// any time), and the sequence is released as Tag(epoch, index). A reader accepts a slot only when
// the sequence is Tag(current epoch, index) before and after it read the fields.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "hmmkit/base/trace.hpp"

namespace hmmkit::trace::detail {

inline constexpr int kEpochShift = 40;
inline constexpr uint64_t kCountMask = (uint64_t(1) << kEpochShift) - 1;
inline constexpr uint64_t kBusy = UINT64_MAX;

inline uint64_t Tag(uint64_t epoch, uint64_t index) {
  return (epoch << kEpochShift) | (index + 1);
}

struct alignas(64) Slot {
  std::atomic<uint64_t> seq{0};
  std::atomic<uint64_t> ts{0};
  std::atomic<uint64_t> dur{0};
  std::atomic<uint64_t> a[4] = {};
  // small (32 bits) | track (16) << 32 | name (8) << 48 | instant << 56
  std::atomic<uint64_t> packed{0};
};
static_assert(sizeof(Slot) == 64);

struct Ring {
  explicit Ring(size_t cap) : capacity(cap), slots(new Slot[cap]) {}
  const size_t capacity;
  const std::unique_ptr<Slot[]> slots;
};

// The recording state. One per process, never destroyed (a producer or the exit hook may run
// during static destruction).
struct State {
  std::atomic<Ring*> ring{nullptr};
  std::atomic<uint64_t> head{0};        // epoch << 40 | reservations
  std::atomic<uint64_t> t0{0};          // NowNs() at Enable
  std::atomic<uint64_t> busy_drops{0};  // records lost to a slot claimed twice (across Clear)
};
State& GlobalState();

// A consistent copy of one record.
struct Snapshot {
  uint64_t ts, dur;
  uint64_t a[4];
  uint32_t small;
  uint16_t track;
  Name name;
  bool instant;
};
// Every record of the current recording that is complete now.
std::vector<Snapshot> CollectRecords();
// The names of tracks [0, n) ("" for ids never registered).
std::vector<std::string> TrackNames();

}  // namespace hmmkit::trace::detail
