// DeviceMemory page references and folios.
//
// Every page has a 32-bit reference word: the count in the low 30 bits, kFolioHead when the word
// counts a whole folio (it lives on the folio's head page; the subpages' words are 0), kFrozen
// while SplitFolio rewrites the folio. GetPage/PutPage find the word to change from the chunk's
// `folio` flag (head word for a folio, the page's own word otherwise) and change it with a
// compare-and-swap, so that no update can slip between a split's read of the count and its
// rewrite:
//   - a frozen word is waited out (SplitFolio holds it for pages_per_chunk stores);
//   - a subpage that reaches the head word and finds it without kFolioHead was split meanwhile:
//     it looks again, and now finds its own word (SplitFolio clears the chunk's folio flag before
//     it unfreezes the head word, so the second look cannot see the old flag);
//   - an update that read the head word before the freeze fails its compare-and-swap, because
//     the word changed (the count alone may come back to the same value; the flag bits do not).
// The chunk's folio flag can only be set while every page of the chunk is free, when nobody may
// call GetPage/PutPage on it.
//
// When a count reaches zero the thread that dropped it runs on_free (no lock held), then returns
// the page, or the whole folio, to its chunk under mu_.
#include <cerrno>
#include <cstdlib>
#include <string>
#include <thread>

#include "hmmkit/base/log.hpp"
#include "hmmkit/driver/device_memory.hpp"

namespace hmmkit::driver {

void DeviceMemory::GetPage(uint64_t id) {
  if (!CheckId(id, "GetPage")) return;
  const uint64_t c = ChunkOf(id);
  const uint64_t first = c * pages_per_chunk_;
  for (;;) {
    const uint64_t h = hot_[c].folio.load(std::memory_order_acquire) ? first : id;
    std::atomic<uint32_t>& ref = refs_[h].ref;
    uint32_t w = ref.load(std::memory_order_acquire);
    if ((w & kFrozen) != 0) {
      std::this_thread::yield();
      continue;
    }
    if ((w & kCountMask) == 0) {
      ReportBug(id, "GetPage on a page that has no reference (a free page)");
      return;
    }
    if (h != id && (w & kFolioHead) == 0) continue;  // the folio was split: look again
    if ((w & kCountMask) == kCountMask) {
      ReportBug(id, "GetPage: reference count overflow");
      return;
    }
    if (ref.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
      return;
    }
  }
}

void DeviceMemory::PutPage(uint64_t id) {
  if (!CheckId(id, "PutPage")) return;
  const uint64_t c = ChunkOf(id);
  const uint64_t first = c * pages_per_chunk_;
  for (;;) {
    const uint64_t h = hot_[c].folio.load(std::memory_order_acquire) ? first : id;
    std::atomic<uint32_t>& ref = refs_[h].ref;
    uint32_t w = ref.load(std::memory_order_acquire);
    if ((w & kFrozen) != 0) {
      std::this_thread::yield();
      continue;
    }
    const uint32_t count = w & kCountMask;
    if (count == 0) {
      ReportBug(id, "PutPage on a page that has no reference (a free page)");
      return;
    }
    if (h != id && (w & kFolioHead) == 0) continue;  // the folio was split: look again
    const uint32_t next = count == 1 ? 0 : w - 1;
    if (!ref.compare_exchange_weak(w, next, std::memory_order_acq_rel, std::memory_order_acquire)) {
      continue;
    }
    if (count == 1) Release(h, (w & kFolioHead) != 0);
    return;
  }
}

void DeviceMemory::Release(uint64_t head, bool folio) {
  CallOnFree(head, refs_[head].driver_data.load(std::memory_order_acquire));
  const uint64_t c = ChunkOf(head);
  MutexLock lock(mu_);
  if (folio) {
    chunks_[c].folio = false;
    hot_[c].folio.store(false, std::memory_order_release);
    for (uint64_t id = head; id < head + pages_per_chunk_; ++id) ReturnPageLocked(id);
  } else {
    ReturnPageLocked(head);
  }
  ReclassifyLocked(c);
  cv_.NotifyAll();
}

void DeviceMemory::CallOnFree(uint64_t id, void* driver_data) noexcept {
  options_.on_free(id, driver_data);
}

Status DeviceMemory::SplitFolio(uint64_t head) {
  if (head >= page_count_ || head % pages_per_chunk_ != 0) {
    return Status::FromErrno(
        EINVAL, "SplitFolio: page " + std::to_string(head) + " is not the head of a folio");
  }
  const uint64_t c = ChunkOf(head);
  MutexLock lock(mu_);  // serializes splits and frees of the folio
  if (!chunks_[c].folio) {
    return Status::FromErrno(EINVAL, "SplitFolio: page " + std::to_string(head) +
                                         " is not the head of an allocated folio");
  }
  std::atomic<uint32_t>& ref = refs_[head].ref;
  uint32_t w = ref.load(std::memory_order_acquire);
  for (;;) {
    if ((w & kCountMask) == 0) {
      // The last reference dropped; Release is about to free the folio.
      return Status::FromErrno(EINVAL, "SplitFolio: folio " + std::to_string(head) +
                                           " has no reference (the caller must hold one)");
    }
    if (ref.compare_exchange_weak(w, w | kFrozen, std::memory_order_acq_rel,
                                  std::memory_order_acquire)) {
      break;
    }
  }
  const uint32_t count = w & kCountMask;
  void* data = refs_[head].driver_data.load(std::memory_order_relaxed);
  for (uint64_t id = head + 1; id < head + pages_per_chunk_; ++id) {
    refs_[id].ref.store(count, std::memory_order_relaxed);
    refs_[id].driver_data.store(data, std::memory_order_relaxed);
  }
  chunks_[c].folio = false;
  hot_[c].folio.store(false, std::memory_order_release);
  ref.store(count, std::memory_order_release);  // unfreezes; no kFolioHead any more
  ++counters_.folio_splits;
  return Status::Ok();
}

uint64_t DeviceMemory::FolioHead(uint64_t id) const {
  if (!CheckId(id, "FolioHead")) return id;
  const uint64_t c = ChunkOf(id);
  return hot_[c].folio.load(std::memory_order_acquire) ? c * pages_per_chunk_ : id;
}

unsigned DeviceMemory::FolioOrder(uint64_t id) const {
  if (!CheckId(id, "FolioOrder")) return 0;
  return hot_[ChunkOf(id)].folio.load(std::memory_order_acquire) ? folio_order_ : 0;
}

uint32_t DeviceMemory::RefCount(uint64_t id) const {
  if (!CheckId(id, "RefCount")) return 0;
  return refs_[FolioHead(id)].ref.load(std::memory_order_acquire) & kCountMask;
}

bool DeviceMemory::CheckId(uint64_t id, const char* op) const {
  if (id < page_count_) return true;
  ReportBug(id,
            (std::string(op) + ": page id out of range (" + std::to_string(page_count_) + " pages)")
                .c_str());
  return false;
}

void DeviceMemory::ReportBug(uint64_t id, const char* what) const {
  Log().error("device memory '{}': bug: {} (page {})", options_.name, what, id);
#ifndef NDEBUG
  std::abort();
#endif
}

}  // namespace hmmkit::driver
