// DeviceMemory allocation: free lists per chunk, the partial/whole chunk lists, and eviction.
//
// Bookkeeping (all under mu_): every chunk keeps a stack of its free page offsets and sits on at
// most one list: whole_ (every page free: can become a folio) or partial_ (some pages free).
// Chunks being evicted and chunks allocated as a folio are on neither. AllocPages takes from
// partial_ first so that whole chunks stay available for AllocChunk.
//
// An allocation that cannot be satisfied runs eviction rounds. A round picks the coldest chunk
// (smallest LRU stamp) that has allocated pages, is not being evicted and was not tried by this
// allocation, marks it evicting (so no other allocator evicts it and no page of it is handed out),
// and calls the hook with mu_ released. When no such chunk exists but other threads are evicting,
// the round waits for one of those evictions to end instead. The hook runs in a
// MigrationNoWaitScope: pages under migration (possibly by this very thread, which allocates for
// its own migration) are left, the hook fails with EBUSY or EDEADLK, and the next round takes
// another chunk; waiting there deadlocked (docs/locking.md). Pages an allocation already took stay
// reserved across rounds (state kReserved: never handed to the hook); they are given back if the
// allocation fails.
#include <algorithm>
#include <cerrno>
#include <limits>
#include <string>

#include "hmmkit/base/fault_injection.hpp"
#include "hmmkit/base/log.hpp"
#include "hmmkit/base/trace.hpp"
#include "hmmkit/driver/device_memory.hpp"
#include "hmmkit/mirror/migrate.hpp"

namespace hmmkit::driver {

namespace {
// An eviction that left pages because they are under migration (MigrationNoWaitScope): the
// allocation goes on with another chunk.
bool Busy(const Status& st) {
  return st.errno_value() == EBUSY || st.errno_value() == EDEADLK;
}
}  // namespace

Result<std::vector<uint64_t>> DeviceMemory::AllocPages(size_t n) {
  if (n == 0) return Status::FromErrno(EINVAL, "AllocPages of 0 pages");
  MutexLock lock(mu_);
  if (closing_) {
    return Status::FromErrno(ENODEV, "device memory '" + options_.name + "' is shut down");
  }
  if (fail_next_alloc_) {
    fail_next_alloc_ = false;
    ++counters_.alloc_failures;
    return Status::FromErrno(ENOMEM, "device memory '" + options_.name +
                                         "': injected allocation failure (FailNextAlloc)");
  }
  if (const int injected = inject::Check(inject::Site::kDeviceAlloc)) {
    ++counters_.alloc_failures;
    return Status::FromErrno(injected, "device memory '" + options_.name +
                                           "': injected allocation failure (device_alloc)");
  }
  if (n > page_count_) {
    ++counters_.alloc_failures;
    return Status::FromErrno(ENOMEM, "device memory '" + options_.name + "': cannot allocate " +
                                         std::to_string(n) + " pages: " + DescribeLocked());
  }
  std::vector<uint64_t> got;
  got.reserve(n);
  std::vector<uint64_t> tried;
  Status why;
  for (int round = 0;; ++round) {
    TakeFreeLocked(n - got.size(), got);
    if (got.size() == n) break;
    if (round == options_.evict_rounds) {
      why =
          Status::FromErrno(ENOMEM, "gave up after " + std::to_string(round) + " eviction rounds");
      break;
    }
    why = EvictRoundLocked(tried, /*need_whole=*/false);
    DropPoisonedReservedLocked(got);
    if (closing_) {
      UnreserveLocked(got);
      return Status::FromErrno(ENODEV, "device memory '" + options_.name + "' is shut down");
    }
    if (!why.ok() && !Busy(why)) break;
  }
  if (got.size() < n) {
    UnreserveLocked(got);
    ++counters_.alloc_failures;
    return Status::FromErrno(ENOMEM, "device memory '" + options_.name + "': cannot allocate " +
                                         std::to_string(n) + " pages: " + DescribeLocked() +
                                         "; eviction: " + why.ToString());
  }
  for (const uint64_t id : got) {
    const uint64_t c = ChunkOf(id);
    pages_[id].state = PageState::kAllocated;
    pages_[id].mapping = Mapping{};
    --chunks_[c].reserved;
    refs_[id].driver_data.store(nullptr, std::memory_order_relaxed);
    refs_[id].ref.store(1, std::memory_order_release);
    Stamp(c);
  }
  counters_.allocations += n;
  return got;
}

Result<uint64_t> DeviceMemory::AllocChunk() {
  MutexLock lock(mu_);
  if (closing_) {
    return Status::FromErrno(ENODEV, "device memory '" + options_.name + "' is shut down");
  }
  if (fail_next_alloc_) {
    fail_next_alloc_ = false;
    ++counters_.alloc_failures;
    return Status::FromErrno(ENOMEM, "device memory '" + options_.name +
                                         "': injected allocation failure (FailNextAlloc)");
  }
  if (const int injected = inject::Check(inject::Site::kDeviceAlloc)) {
    ++counters_.alloc_failures;
    return Status::FromErrno(injected, "device memory '" + options_.name +
                                           "': injected allocation failure (device_alloc)");
  }
  std::vector<uint64_t> tried;
  Status why;
  for (int round = 0;; ++round) {
    if (!whole_.empty()) {
      const uint64_t c = whole_.back();
      ChunkMeta& cm = chunks_[c];
      const uint64_t head = c * pages_per_chunk_;
      cm.free.clear();
      cm.folio = true;
      ReclassifyLocked(c);
      AddInUseLocked(c, pages_per_chunk_);
      pages_free_ -= pages_per_chunk_;
      for (uint64_t id = head; id < head + pages_per_chunk_; ++id) {
        pages_[id].state = PageState::kAllocated;
        pages_[id].mapping = Mapping{};
        refs_[id].driver_data.store(nullptr, std::memory_order_relaxed);
      }
      refs_[head].ref.store(1 | kFolioHead, std::memory_order_release);
      hot_[c].folio.store(true, std::memory_order_release);
      Stamp(c);
      counters_.allocations += pages_per_chunk_;
      ++counters_.folio_allocations;
      return head;
    }
    if (round == options_.evict_rounds) {
      why =
          Status::FromErrno(ENOMEM, "gave up after " + std::to_string(round) + " eviction rounds");
      break;
    }
    why = EvictRoundLocked(tried, /*need_whole=*/true);
    if (closing_) {
      return Status::FromErrno(ENODEV, "device memory '" + options_.name + "' is shut down");
    }
    if (!why.ok() && !Busy(why)) break;
  }
  ++counters_.alloc_failures;
  return Status::FromErrno(ENOMEM, "device memory '" + options_.name +
                                       "': no whole chunk free for a folio: " + DescribeLocked() +
                                       "; eviction: " + why.ToString());
}

// OK: the caller should look for free pages again (a chunk was evicted, or another thread's
// eviction ended). An error: nothing more can be evicted (ENOMEM) or the hook failed (its error).
// mu_ is released while the hook runs and while waiting.
Status DeviceMemory::EvictRoundLocked(std::vector<uint64_t>& tried, bool need_whole) {
  uint64_t victim = 0;
  if (!PickVictimLocked(tried, need_whole, &victim)) {
    if (evictions_in_flight_ == 0) return Status::FromErrno(ENOMEM, "no chunk left to evict");
    const uint64_t generation = evict_generation_;
    cv_.Wait(mu_, [&]() REQUIRES(mu_) { return evict_generation_ != generation || closing_; });
    return Status::Ok();
  }
  tried.push_back(victim);
  chunks_[victim].evicting = true;
  ReclassifyLocked(victim);
  const std::vector<uint64_t> ids = EvictableIdsLocked(victim);
  ++evictions_in_flight_;
  ++counters_.evictions;
  counters_.evicted_pages += ids.size();
  Log().debug("device memory '{}': evicting chunk {} ({} pages)", options_.name, victim,
              ids.size());

  mu_.unlock();
  Status st;
  {
    // The hook's migrations report "migrate" and "evict" events with this cause.
    const trace::CauseScope cause(trace::Cause::kEvict);
    // This thread may be inside a migration of some of these pages (it allocates for it), and
    // another thread's migration of others may be waiting for this eviction to end: neither is
    // waited for. Their pages stay; the next round takes another chunk.
    const hmmkit::MigrationNoWaitScope no_wait;
    st = CallEvict(ids);
  }
  mu_.lock();

  --evictions_in_flight_;
  ++evict_generation_;
  chunks_[victim].evicting = false;
  ReclassifyLocked(victim);
  cv_.NotifyAll();
  if (!st.ok()) {
    ++counters_.evict_failures;
    // The default hook (ENOTSUP) fails on every full allocation, and pages under migration
    // (Busy) are an ordinary outcome under load: not worth a warning each time.
    Log().log(st.errno_value() == ENOTSUP || Busy(st) ? spdlog::level::debug : spdlog::level::warn,
              "device memory '{}': evicting chunk {} failed: {}", options_.name, victim,
              st.ToString());
    return st;
  }
  return Status::Ok();
}

bool DeviceMemory::PickVictimLocked(const std::vector<uint64_t>& tried, bool need_whole,
                                    uint64_t* chunk) {
  uint64_t best_stamp = std::numeric_limits<uint64_t>::max();
  bool found = false;
  for (uint64_t c = 0; c < chunk_count_; ++c) {
    const ChunkMeta& cm = chunks_[c];
    if (cm.evicting || cm.in_use <= cm.reserved) continue;  // nothing the hook could free
    // A chunk with poisoned or reserved pages cannot become whole.
    if (need_whole && (cm.poisoned > 0 || cm.reserved > 0)) continue;
    if (std::find(tried.begin(), tried.end(), c) != tried.end()) continue;
    const uint64_t stamp = hot_[c].last_use.load(std::memory_order_relaxed);
    if (!found || stamp < best_stamp) {
      best_stamp = stamp;
      *chunk = c;
      found = true;
    }
  }
  return found;
}

std::vector<uint64_t> DeviceMemory::EvictableIdsLocked(uint64_t chunk) {
  std::vector<uint64_t> ids;
  const uint64_t first = chunk * pages_per_chunk_;
  for (uint64_t id = first; id < first + pages_per_chunk_; ++id) {
    if (pages_[id].state == PageState::kAllocated) ids.push_back(id);
  }
  return ids;
}

void DeviceMemory::TakeFreeLocked(size_t n, std::vector<uint64_t>& out) {
  while (n > 0) {
    uint64_t c;
    if (!partial_.empty()) {
      c = partial_.back();
    } else if (!whole_.empty()) {
      c = whole_.back();
    } else {
      return;
    }
    ChunkMeta& cm = chunks_[c];
    const uint32_t take = uint32_t(std::min<size_t>(n, cm.free.size()));
    for (uint32_t i = 0; i < take; ++i) {
      const uint64_t id = c * pages_per_chunk_ + cm.free.back();
      cm.free.pop_back();
      pages_[id].state = PageState::kReserved;
      out.push_back(id);
    }
    cm.reserved += take;
    AddInUseLocked(c, take);
    pages_free_ -= take;
    n -= take;
    ReclassifyLocked(c);
  }
}

void DeviceMemory::UnreserveLocked(std::vector<uint64_t>& ids) {
  DropPoisonedReservedLocked(ids);
  for (const uint64_t id : ids) {
    const uint64_t c = ChunkOf(id);
    ChunkMeta& cm = chunks_[c];
    pages_[id].state = PageState::kFree;
    cm.free.push_back(uint32_t(id - c * pages_per_chunk_));
    --cm.reserved;
    ++pages_free_;
    SubInUseLocked(c, 1);
    ReclassifyLocked(c);
  }
  ids.clear();
  cv_.NotifyAll();
}

// A page poisoned while an allocation held it reserved is retired instead of handed out.
void DeviceMemory::DropPoisonedReservedLocked(std::vector<uint64_t>& ids) {
  const auto poisoned = [&](uint64_t id) REQUIRES(mu_) {
    if (!pages_[id].poisoned) return false;
    const uint64_t c = ChunkOf(id);
    pages_[id].state = PageState::kRetired;
    --chunks_[c].reserved;
    SubInUseLocked(c, 1);
    return true;
  };
  ids.erase(std::remove_if(ids.begin(), ids.end(), poisoned), ids.end());
}

// The page's last reference dropped (on_free already ran): back on the free list, or retired.
void DeviceMemory::ReturnPageLocked(uint64_t id) {
  const uint64_t c = ChunkOf(id);
  PageMeta& pm = pages_[id];
  pm.mapping = Mapping{};
  refs_[id].driver_data.store(nullptr, std::memory_order_relaxed);
  if (pm.poisoned) {
    pm.state = PageState::kRetired;
  } else {
    pm.state = PageState::kFree;
    chunks_[c].free.push_back(uint32_t(id - c * pages_per_chunk_));
    ++pages_free_;
  }
  SubInUseLocked(c, 1);
  ++counters_.frees;
}

void DeviceMemory::ReclassifyLocked(uint64_t chunk) {
  ChunkMeta& cm = chunks_[chunk];
  ChunkList want = ChunkList::kNone;
  if (!cm.evicting && !cm.folio && !cm.free.empty()) {
    want = cm.free.size() == pages_per_chunk_ ? ChunkList::kWhole : ChunkList::kPartial;
  }
  if (want == cm.list) return;
  ListRemoveLocked(chunk);
  if (want == ChunkList::kNone) return;
  std::vector<uint64_t>& list = want == ChunkList::kWhole ? whole_ : partial_;
  cm.list = want;
  cm.list_pos = uint32_t(list.size());
  list.push_back(chunk);
}

void DeviceMemory::ListRemoveLocked(uint64_t chunk) {
  ChunkMeta& cm = chunks_[chunk];
  if (cm.list == ChunkList::kNone) return;
  std::vector<uint64_t>& list = cm.list == ChunkList::kWhole ? whole_ : partial_;
  const uint64_t last = list.back();
  list[cm.list_pos] = last;
  chunks_[last].list_pos = cm.list_pos;
  list.pop_back();
  cm.list = ChunkList::kNone;
}

void DeviceMemory::AddInUseLocked(uint64_t chunk, uint32_t n) {
  ChunkMeta& cm = chunks_[chunk];
  if (cm.in_use == 0 && n > 0) ++chunks_in_use_;
  cm.in_use += n;
  pages_in_use_ += n;
}

void DeviceMemory::SubInUseLocked(uint64_t chunk, uint32_t n) {
  ChunkMeta& cm = chunks_[chunk];
  cm.in_use -= n;
  pages_in_use_ -= n;
  if (cm.in_use == 0 && n > 0) --chunks_in_use_;
}

}  // namespace hmmkit::driver
