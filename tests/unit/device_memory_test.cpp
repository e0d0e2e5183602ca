// DeviceMemory (driver/device_memory.hpp): the device page map.
//
// The tests never sleep to order threads. Where a test must know that a thread is blocked inside
// Shutdown, it asks Linux (/proc/self/task/<tid>/stat reports 'S' for a thread asleep in a futex
// wait) and checks, through flags the blocked thread reads when it returns, that it returned only
// after the event it waited for.
#include "hmmkit/driver/device_memory.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <functional>
#include <latch>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "hmmkit/base/mutex.hpp"

namespace hmmkit::driver {
namespace {

constexpr size_t kPage = kDevicePageSize;
constexpr size_t kSmallChunk = 16 * kPage;  // 16 pages: small arenas with several chunks

DeviceMemory::Options SmallOptions(size_t chunks, size_t chunk_size = kSmallChunk) {
  DeviceMemory::Options o;
  o.capacity = chunks * chunk_size;
  o.chunk_size = chunk_size;
  o.kind = PageKind::kDevicePrivate;
  o.huge_pages = false;
  o.name = "test";
  o.shutdown_timeout = std::chrono::milliseconds(2000);
  return o;
}

std::shared_ptr<DeviceMemory> Make(const DeviceMemory::Options& o) {
  auto r = DeviceMemory::Create(o);
  if (!r.ok()) {
    ADD_FAILURE() << "DeviceMemory::Create: " << r.status().ToString();
    return nullptr;
  }
  return std::move(r).value();
}

std::vector<uint64_t> Alloc(DeviceMemory& mem, size_t n) {
  auto r = mem.AllocPages(n);
  if (!r.ok()) {
    ADD_FAILURE() << "AllocPages(" << n << "): " << r.status().ToString();
    return {};
  }
  return std::move(r).value();
}

void PutAll(DeviceMemory& mem, const std::vector<uint64_t>& ids) {
  for (uint64_t id : ids) mem.PutPage(id);
}

std::set<uint64_t> ChunksOf(const DeviceMemory& mem, const std::vector<uint64_t>& ids) {
  std::set<uint64_t> chunks;
  for (uint64_t id : ids) chunks.insert(mem.ChunkOf(id));
  return chunks;
}

std::vector<uint64_t> Sorted(std::vector<uint64_t> v) {
  std::sort(v.begin(), v.end());
  return v;
}

// The pages a test holds a reference to; an evict hook takes them away (drops the references),
// as mirror's MigrateDevicePages drops the CPU-side entries' references.
class HeldPages {
 public:
  void Add(const std::vector<uint64_t>& ids) {
    MutexLock lock(mu_);
    held_.insert(ids.begin(), ids.end());
  }
  // Drops the references to those of `ids` that are held. Returns how many.
  size_t Evict(DeviceMemory& mem, std::span<const uint64_t> ids) {
    std::vector<uint64_t> drop;
    {
      MutexLock lock(mu_);
      for (uint64_t id : ids) {
        if (held_.erase(id) != 0) drop.push_back(id);
      }
    }
    PutAll(mem, drop);
    return drop.size();
  }
  void ReleaseAll(DeviceMemory& mem) {
    std::vector<uint64_t> drop;
    {
      MutexLock lock(mu_);
      drop.assign(held_.begin(), held_.end());
      held_.clear();
    }
    PutAll(mem, drop);
  }

 private:
  Mutex mu_;
  std::set<uint64_t> held_ GUARDED_BY(mu_);
};

// The scheduler state letter of thread `tid` of this process ('R', 'S', ...), or '?' when gone.
char ThreadState(pid_t tid) {
  const std::string path = "/proc/self/task/" + std::to_string(tid) + "/stat";
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return '?';
  char buf[512];
  const ssize_t n = read(fd, buf, sizeof(buf) - 1);
  close(fd);
  if (n <= 0) return '?';
  const std::string_view stat(buf, size_t(n));
  const size_t paren = stat.rfind(')');  // the command name may contain parentheses
  if (paren == std::string_view::npos || paren + 2 >= stat.size()) return '?';
  return stat[paren + 2];
}

// ---------------------------------------------------------------------------------------------
// Creation and the arena

TEST(DeviceMemoryCreate, RejectsBadSizesAndKinds) {
  auto expect_einval = [](const DeviceMemory::Options& o, const char* what) {
    auto r = DeviceMemory::Create(o);
    ASSERT_FALSE(r.ok()) << what;
    EXPECT_EQ(r.errno_value(), EINVAL) << what << ": " << r.status().ToString();
  };
  DeviceMemory::Options o = SmallOptions(2);
  o.capacity = 0;
  expect_einval(o, "capacity 0");
  o = SmallOptions(2);
  o.capacity += kPage;
  expect_einval(o, "capacity not a multiple of the chunk size");
  o = SmallOptions(2);
  o.chunk_size = 3 * kPage;
  o.capacity = 6 * kPage;
  expect_einval(o, "chunk size not a power of two");
  o = SmallOptions(2);
  o.chunk_size = 2048;
  o.capacity = 4096;
  expect_einval(o, "chunk smaller than a page");
  o = SmallOptions(2);
  o.kind = PageKind::kSystem;
  expect_einval(o, "system kind");
  o = SmallOptions(2);
  o.evict_rounds = 0;
  expect_einval(o, "no eviction round");
}

TEST(DeviceMemoryCreate, ReportsGeometryOwnerAndKind) {
  int token = 0;
  DeviceMemory::Options o;
  o.capacity = 4 << 20;
  o.kind = PageKind::kDeviceCoherent;
  o.owner = &token;
  o.name = "geometry";
  auto mem = Make(o);
  ASSERT_NE(mem, nullptr);
  EXPECT_EQ(mem->page_count(), 1024u);
  EXPECT_EQ(mem->chunk_count(), 2u);
  EXPECT_EQ(mem->pages_per_chunk(), 512u);
  EXPECT_EQ(mem->ChunkOf(511), 0u);
  EXPECT_EQ(mem->ChunkOf(512), 1u);
  EXPECT_EQ(mem->owner(), &token);
  EXPECT_EQ(mem->kind(), PageKind::kDeviceCoherent);
  EXPECT_FALSE(mem->hugetlb()) << "coherent memory is mapped 4 KiB at a time: never hugetlb";
  EXPECT_GE(mem->ArenaFd(), 0);
  EXPECT_EQ(mem->PageData(3), static_cast<char*>(mem->base()) + 3 * kPage);
  EXPECT_EQ(mem->ArenaOffset(3), 3 * kPage);
  const DeviceMemory::Stats s = mem->stats();
  EXPECT_EQ(s.capacity, size_t{4} << 20);
  EXPECT_EQ(s.pages_total, 1024u);
  EXPECT_EQ(s.pages_free, 1024u);
  EXPECT_EQ(s.chunks_total, 2u);
}

TEST(DeviceMemoryCreate, PageDataIsSharedWithTheArenaFd) {
  // Given coherent memory (the CPU maps its pages from ArenaFd at ArenaOffset).
  DeviceMemory::Options o = SmallOptions(2);
  o.kind = PageKind::kDeviceCoherent;
  auto mem = Make(o);
  ASSERT_NE(mem, nullptr);
  const std::vector<uint64_t> ids = Alloc(*mem, 3);
  ASSERT_EQ(ids.size(), 3u);
  const uint64_t id = ids[2];
  // When a page is written through PageData, and a second mapping of the fd is written too,
  std::memset(mem->PageData(id), 0x5a, kPage);
  void* view = mmap(nullptr, kPage, PROT_READ | PROT_WRITE, MAP_SHARED, mem->ArenaFd(),
                    off_t(mem->ArenaOffset(id)));
  ASSERT_NE(view, MAP_FAILED) << strerror(errno);
  auto* bytes = static_cast<unsigned char*>(view);
  // Then each sees the other's bytes: the same memory.
  EXPECT_EQ(bytes[0], 0x5a);
  EXPECT_EQ(bytes[kPage - 1], 0x5a);
  bytes[100] = 0xc3;
  EXPECT_EQ(static_cast<unsigned char*>(mem->PageData(id))[100], 0xc3);
  EXPECT_EQ(static_cast<unsigned char*>(mem->PageData(ids[1]))[100], 0) << "neighbour untouched";
  munmap(view, kPage);
  PutAll(*mem, ids);
}

// ---------------------------------------------------------------------------------------------
// Allocation

TEST(DeviceMemoryAlloc, AccountsForPagesAndHandsOutUniqueIdsInRange) {
  auto mem = Make(SmallOptions(4));  // 64 pages
  ASSERT_NE(mem, nullptr);
  const std::vector<uint64_t> a = Alloc(*mem, 10);
  const std::vector<uint64_t> b = Alloc(*mem, 30);
  ASSERT_EQ(a.size(), 10u);
  ASSERT_EQ(b.size(), 30u);
  std::set<uint64_t> all(a.begin(), a.end());
  all.insert(b.begin(), b.end());
  EXPECT_EQ(all.size(), 40u) << "ids are unique";
  EXPECT_LT(*all.rbegin(), mem->page_count());
  for (uint64_t id : all) EXPECT_EQ(mem->RefCount(id), 1u) << id;
  DeviceMemory::Stats s = mem->stats();
  EXPECT_EQ(s.pages_in_use, 40u);
  EXPECT_EQ(s.pages_free, 24u);
  EXPECT_EQ(s.allocations, 40u);
  EXPECT_EQ(s.chunks_in_use, 3u) << "pages are packed into as few chunks as possible";
  EXPECT_EQ(s.frees, 0u);

  PutAll(*mem, a);
  PutAll(*mem, b);
  s = mem->stats();
  EXPECT_EQ(s.pages_in_use, 0u);
  EXPECT_EQ(s.pages_free, 64u);
  EXPECT_EQ(s.frees, 40u);
  EXPECT_EQ(s.chunks_in_use, 0u);
  for (uint64_t id : all) EXPECT_EQ(mem->RefCount(id), 0u) << id;
}

TEST(DeviceMemoryAlloc, ZeroPagesIsEinvalAndMoreThanCapacityIsEnomem) {
  auto mem = Make(SmallOptions(1));
  ASSERT_NE(mem, nullptr);
  EXPECT_EQ(mem->AllocPages(0).errno_value(), EINVAL);
  auto r = mem->AllocPages(17);
  EXPECT_EQ(r.errno_value(), ENOMEM);
  EXPECT_NE(r.status().message().find("capacity 16 pages"), std::string::npos)
      << r.status().ToString();
  EXPECT_EQ(mem->stats().pages_in_use, 0u);
}

TEST(DeviceMemoryAlloc, FullMemoryWithoutEvictHookIsEnomemNamingCapacityAndUse) {
  auto mem = Make(SmallOptions(2));
  ASSERT_NE(mem, nullptr);
  const std::vector<uint64_t> ids = Alloc(*mem, 32);
  auto r = mem->AllocPages(1);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.errno_value(), ENOMEM);
  const std::string msg = r.status().message();
  EXPECT_NE(msg.find("capacity 32 pages"), std::string::npos) << msg;
  EXPECT_NE(msg.find("32 in use"), std::string::npos) << msg;
  EXPECT_EQ(mem->stats().alloc_failures, 1u);
  // And after a free the same call succeeds (ENOMEM is retryable).
  mem->PutPage(ids[7]);
  auto again = mem->AllocPages(1);
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ(again.value()[0], ids[7]);
  mem->PutPage(again.value()[0]);
  for (uint64_t id : ids) {
    if (id != ids[7]) mem->PutPage(id);
  }
}

TEST(DeviceMemoryAlloc, PartialAllocationIsGivenBackOnFailure) {
  // Given 3 free pages and no evict hook,
  auto mem = Make(SmallOptions(2));
  ASSERT_NE(mem, nullptr);
  const std::vector<uint64_t> held = Alloc(*mem, 29);
  // When 5 pages are asked for,
  auto r = mem->AllocPages(5);
  // Then the call fails and the 3 pages it took are free again.
  EXPECT_EQ(r.errno_value(), ENOMEM);
  const DeviceMemory::Stats s = mem->stats();
  EXPECT_EQ(s.pages_in_use, 29u);
  EXPECT_EQ(s.pages_free, 3u);
  const std::vector<uint64_t> rest = Alloc(*mem, 3);
  EXPECT_EQ(rest.size(), 3u);
  PutAll(*mem, held);
  PutAll(*mem, rest);
}

TEST(DeviceMemoryAlloc, FailNextAllocFailsOnceWithoutEvicting) {
  std::atomic<int> evictions{0};
  DeviceMemory::Options o = SmallOptions(2);
  o.evict = [&](DeviceMemory&, std::span<const uint64_t>) {
    evictions++;
    return Status::Ok();
  };
  auto mem = Make(o);
  ASSERT_NE(mem, nullptr);
  mem->FailNextAlloc();
  EXPECT_EQ(mem->AllocPages(1).errno_value(), ENOMEM);
  auto ok = mem->AllocPages(1);
  ASSERT_TRUE(ok.ok()) << "the failure is one-shot: " << ok.status().ToString();
  mem->FailNextAlloc();
  EXPECT_EQ(mem->AllocChunk().errno_value(), ENOMEM);
  auto folio = mem->AllocChunk();
  ASSERT_TRUE(folio.ok()) << folio.status().ToString();
  EXPECT_EQ(mem->stats().alloc_failures, 2u);
  EXPECT_EQ(evictions.load(), 0);
  mem->PutPage(ok.value()[0]);
  mem->PutPage(folio.value());
}

TEST(DeviceMemoryAlloc, MappingIsSetByTheCallerAndClearedOnFree) {
  auto mem = Make(SmallOptions(1));
  ASSERT_NE(mem, nullptr);
  const uint64_t id = Alloc(*mem, 1).at(0);
  EXPECT_EQ(mem->GetMapping(id).as, nullptr);
  auto* fake_as = reinterpret_cast<AddressSpace*>(uintptr_t{0x1000});
  mem->SetMapping(id, {fake_as, 0x7000'0000});
  EXPECT_EQ(mem->GetMapping(id).as, fake_as);
  EXPECT_EQ(mem->GetMapping(id).va, 0x7000'0000u);
  mem->ClearMapping(id);
  EXPECT_EQ(mem->GetMapping(id).as, nullptr);
  mem->SetMapping(id, {fake_as, 0x7000'0000});
  mem->PutPage(id);
  EXPECT_EQ(mem->GetMapping(id).as, nullptr) << "a freed page is mapped nowhere";
}

// ---------------------------------------------------------------------------------------------
// References

TEST(DeviceMemoryRefs, FreeCallbackRunsOnceOnTheThreadDroppingTheLastReference) {
  struct Call {
    uint64_t id;
    void* data;
    std::thread::id thread;
  };
  Mutex mu;
  std::vector<Call> calls;
  DeviceMemory::Options o = SmallOptions(1);
  o.on_free = [&](uint64_t id, void* data) {
    MutexLock lock(mu);
    calls.push_back({id, data, std::this_thread::get_id()});
  };
  auto mem = Make(o);
  ASSERT_NE(mem, nullptr);
  int payload = 0;
  const uint64_t id = Alloc(*mem, 1).at(0);
  mem->SetDriverData(id, &payload);
  EXPECT_EQ(mem->DriverData(id), &payload);
  // Given three references,
  mem->GetPage(id);
  mem->GetPage(id);
  EXPECT_EQ(mem->RefCount(id), 3u);
  // When two are dropped here, nothing is freed;
  mem->PutPage(id);
  mem->PutPage(id);
  {
    MutexLock lock(mu);
    EXPECT_TRUE(calls.empty());
  }
  EXPECT_EQ(mem->stats().pages_in_use, 1u);
  // When another thread drops the last one,
  std::thread::id dropper;
  std::thread t([&] {
    dropper = std::this_thread::get_id();
    mem->PutPage(id);
  });
  t.join();
  // Then the callback ran once, on that thread, with the page's driver_data.
  MutexLock lock(mu);
  ASSERT_EQ(calls.size(), 1u);
  EXPECT_EQ(calls[0].id, id);
  EXPECT_EQ(calls[0].data, &payload);
  EXPECT_EQ(calls[0].thread, dropper);
  EXPECT_EQ(mem->DriverData(id), nullptr) << "driver_data is cleared when the page is freed";
  EXPECT_EQ(mem->stats().frees, 1u);
  EXPECT_EQ(mem->stats().pages_in_use, 0u);
}

TEST(DeviceMemoryRefs, FreeCallbackRunsBeforeThePageIsFreeAgain) {
  std::shared_ptr<DeviceMemory> mem;
  std::vector<DeviceMemory::Stats> during;
  DeviceMemory::Options o = SmallOptions(1);
  o.on_free = [&](uint64_t, void*) { during.push_back(mem->stats()); };  // no lock is held
  mem = Make(o);
  ASSERT_NE(mem, nullptr);
  const std::vector<uint64_t> all = Alloc(*mem, 16);
  mem->PutPage(all[4]);
  ASSERT_EQ(during.size(), 1u);
  EXPECT_EQ(during[0].pages_free, 0u) << "the page was free while its on_free ran";
  EXPECT_EQ(during[0].pages_in_use, 16u);
  EXPECT_EQ(mem->stats().pages_free, 1u);
  for (uint64_t id : all) {
    if (id != all[4]) mem->PutPage(id);
  }
}

TEST(DeviceMemoryRefs, GetPageOnAFreePageIsABug) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto mem = Make(SmallOptions(1));
  ASSERT_NE(mem, nullptr);
  const uint64_t id = Alloc(*mem, 1).at(0);
  mem->PutPage(id);
  // Debug builds abort; release builds log and leave the page free.
  EXPECT_DEBUG_DEATH(mem->GetPage(id), "");
  EXPECT_DEBUG_DEATH(mem->PutPage(id), "");
  EXPECT_EQ(mem->RefCount(id), 0u);
  EXPECT_EQ(mem->stats().pages_in_use, 0u);
  EXPECT_EQ(mem->stats().frees, 1u);
}

// ---------------------------------------------------------------------------------------------
// Compound pages (device folios)

TEST(DeviceMemoryFolio, SubpagesShareOneReferenceCount) {
  std::atomic<int> frees{0};
  std::atomic<uint64_t> freed_id{~0ull};
  DeviceMemory::Options o;
  o.capacity = 4 << 20;  // two 2 MiB chunks
  o.huge_pages = false;
  o.name = "folio";
  o.on_free = [&](uint64_t id, void*) {
    frees++;
    freed_id = id;
  };
  auto mem = Make(o);
  ASSERT_NE(mem, nullptr);
  auto r = mem->AllocChunk();
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  const uint64_t head = r.value();
  EXPECT_EQ(head % 512, 0u);
  EXPECT_EQ(mem->FolioHead(head + 5), head);
  EXPECT_EQ(mem->FolioOrder(head + 5), 9u);
  EXPECT_EQ(mem->RefCount(head + 100), 1u);
  DeviceMemory::Stats s = mem->stats();
  EXPECT_EQ(s.pages_in_use, 512u);
  EXPECT_EQ(s.folio_allocations, 1u);
  EXPECT_EQ(s.chunks_in_use, 1u);
  // A reference taken through one subpage is seen through every other, and dropped through any.
  mem->GetPage(head + 7);
  EXPECT_EQ(mem->RefCount(head), 2u);
  EXPECT_EQ(mem->RefCount(head + 511), 2u);
  mem->PutPage(head + 300);
  EXPECT_EQ(mem->RefCount(head + 7), 1u);
  EXPECT_EQ(frees.load(), 0);
  // The last reference, dropped through a subpage, frees the folio once, reported by its head.
  mem->PutPage(head + 1);
  EXPECT_EQ(frees.load(), 1);
  EXPECT_EQ(freed_id.load(), head);
  s = mem->stats();
  EXPECT_EQ(s.pages_in_use, 0u);
  EXPECT_EQ(s.frees, 512u);
  EXPECT_EQ(mem->FolioOrder(head), 0u);
  // And the chunk is whole again.
  auto again = mem->AllocChunk();
  ASSERT_TRUE(again.ok());
  mem->PutPage(again.value());
}

TEST(DeviceMemoryFolio, SplitGivesIndependentPagesWithTheFoliosCount) {
  std::atomic<int> frees{0};
  DeviceMemory::Options o = SmallOptions(2);
  o.on_free = [&](uint64_t, void*) { frees++; };
  auto mem = Make(o);
  ASSERT_NE(mem, nullptr);
  const uint64_t head = mem->AllocChunk().value();
  int payload = 0;
  mem->SetDriverData(head, &payload);
  mem->GetPage(head + 2);  // folio count 2
  EXPECT_EQ(mem->SplitFolio(head + 1).errno_value(), EINVAL) << "not a head";
  ASSERT_TRUE(mem->SplitFolio(head).ok());
  for (uint64_t id = head; id < head + 16; ++id) {
    EXPECT_EQ(mem->RefCount(id), 2u) << id;
    EXPECT_EQ(mem->FolioHead(id), id);
    EXPECT_EQ(mem->FolioOrder(id), 0u);
    EXPECT_EQ(mem->DriverData(id), &payload) << id;
  }
  EXPECT_EQ(mem->SplitFolio(head).errno_value(), EINVAL) << "already split";
  EXPECT_EQ(mem->stats().folio_splits, 1u);
  // Freeing one page frees only that page.
  mem->PutPage(head + 3);
  mem->PutPage(head + 3);
  EXPECT_EQ(frees.load(), 1);
  EXPECT_EQ(mem->stats().pages_in_use, 15u);
  EXPECT_EQ(mem->stats().pages_free, 17u);
  for (uint64_t id = head; id < head + 16; ++id) {
    if (id == head + 3) continue;
    mem->PutPage(id);
    mem->PutPage(id);
  }
  EXPECT_EQ(frees.load(), 16);
  EXPECT_EQ(mem->stats().pages_in_use, 0u);
  // The chunk can become a folio again.
  auto again = mem->AllocChunk();
  ASSERT_TRUE(again.ok());
  mem->PutPage(again.value());
}

TEST(DeviceMemoryFolio, SplitLosesNoReferenceTakenConcurrently) {
  // Threads take and drop references through subpages 1 and 3 (Get then Put) before, during and
  // after the split. A pair that completes on one side of the split changes nothing. A pair that
  // straddles it (Get on the folio, Put on the split page) leaves the folio's count, copied to
  // every page, one higher and its own page back where it was. So with C the count of the other
  // pages, each of pages 1 and 3 is C or C - 1, and C - 2 = (C - count(1)) + (C - count(3)).
  // An update lost by the split (or applied twice) breaks this.
  for (int iter = 0; iter < 30; ++iter) {
    auto mem = Make(SmallOptions(1, kDefaultChunkSize));  // 512 pages: a long split
    ASSERT_NE(mem, nullptr);
    const uint64_t head = mem->AllocChunk().value();
    const uint64_t end = head + mem->pages_per_chunk();
    mem->GetPage(head);  // count 2
    std::atomic<bool> stop{false};
    std::atomic<uint64_t> pairs[2] = {0, 0};
    auto worker = [&](int i, uint64_t id) {
      while (!stop.load(std::memory_order_relaxed)) {
        mem->GetPage(id);
        mem->PutPage(id);
        pairs[i].fetch_add(1, std::memory_order_relaxed);
      }
    };
    auto wait_for_pairs = [&](uint64_t n) {
      while (pairs[0].load() < n || pairs[1].load() < n) std::this_thread::yield();
    };
    std::thread t1(worker, 0, head + 1);
    std::thread t3(worker, 1, head + 3);
    wait_for_pairs(10);
    ASSERT_TRUE(mem->SplitFolio(head).ok());
    wait_for_pairs(std::max(pairs[0].load(), pairs[1].load()) + 10);  // both ran after it
    stop = true;
    t1.join();
    t3.join();
    const uint32_t c = mem->RefCount(head + 5);
    for (uint64_t id = head; id < end; ++id) {
      if (id != head + 1 && id != head + 3) {
        ASSERT_EQ(mem->RefCount(id), c) << id << ", iteration " << iter;
      }
    }
    const uint32_t c1 = mem->RefCount(head + 1);
    const uint32_t c3 = mem->RefCount(head + 3);
    ASSERT_TRUE(c1 == c || c1 + 1 == c) << c1 << " vs " << c << ", iteration " << iter;
    ASSERT_TRUE(c3 == c || c3 + 1 == c) << c3 << " vs " << c << ", iteration " << iter;
    ASSERT_EQ(c - 2, (c - c1) + (c - c3)) << "iteration " << iter;
    for (uint64_t id = head; id < end; ++id) {
      for (uint32_t n = mem->RefCount(id); n > 0; --n) mem->PutPage(id);
    }
    ASSERT_EQ(mem->stats().pages_in_use, 0u);
  }
}

// ---------------------------------------------------------------------------------------------
// Eviction

// Two chunks of 16 pages, both full, with an evict hook that records its calls and drops the
// references the test holds.
class DeviceMemoryEviction : public ::testing::Test {
 protected:
  void SetUp() override {
    DeviceMemory::Options o = SmallOptions(2);
    o.evict = [this](DeviceMemory& mem, std::span<const uint64_t> ids) {
      {
        MutexLock lock(mu_);
        calls_.emplace_back(ids.begin(), ids.end());
      }
      if (hook_) return hook_(mem, ids);
      held_.Evict(mem, ids);
      return Status::Ok();
    };
    mem_ = Make(o);
    ASSERT_NE(mem_, nullptr);
    first_ = Alloc(*mem_, 16);
    second_ = Alloc(*mem_, 16);
    held_.Add(first_);
    held_.Add(second_);
    ASSERT_EQ(ChunksOf(*mem_, first_).size(), 1u);
    ASSERT_EQ(ChunksOf(*mem_, second_).size(), 1u);
    ASSERT_NE(mem_->ChunkOf(first_[0]), mem_->ChunkOf(second_[0]));
  }
  void TearDown() override {
    if (mem_ != nullptr) held_.ReleaseAll(*mem_);
  }
  std::vector<std::vector<uint64_t>> calls() {
    MutexLock lock(mu_);
    return calls_;
  }

  std::function<Status(DeviceMemory&, std::span<const uint64_t>)> hook_;  // set before use
  std::shared_ptr<DeviceMemory> mem_;
  HeldPages held_;
  std::vector<uint64_t> first_, second_;
  Mutex mu_;
  std::vector<std::vector<uint64_t>> calls_ GUARDED_BY(mu_);
};

TEST_F(DeviceMemoryEviction, EvictsTheChunkAllocatedLongestAgo) {
  auto r = mem_->AllocPages(1);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  const auto c = calls();
  ASSERT_EQ(c.size(), 1u);
  EXPECT_EQ(Sorted(c[0]), Sorted(first_));
  EXPECT_EQ(mem_->ChunkOf(r.value()[0]), mem_->ChunkOf(first_[0]));
  const DeviceMemory::Stats s = mem_->stats();
  EXPECT_EQ(s.evictions, 1u);
  EXPECT_EQ(s.evicted_pages, 16u);
  EXPECT_EQ(s.pages_in_use, 17u);
  held_.Add(r.value());
}

TEST_F(DeviceMemoryEviction, TouchKeepsAChunkHot) {
  // Given the older chunk touched by the device,
  mem_->Touch(first_[3]);
  // When memory runs out, the other chunk is evicted.
  auto r = mem_->AllocPages(2);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  const auto c = calls();
  ASSERT_EQ(c.size(), 1u);
  EXPECT_EQ(Sorted(c[0]), Sorted(second_));
  EXPECT_EQ(ChunksOf(*mem_, r.value()), ChunksOf(*mem_, second_));
  held_.Add(r.value());
}

TEST_F(DeviceMemoryEviction, HookFailureIsEnomemWithAMessage) {
  hook_ = [](DeviceMemory&, std::span<const uint64_t>) {
    return Status::FromErrno(EIO, "copy engine hung");
  };
  auto r = mem_->AllocPages(1);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.errno_value(), ENOMEM);
  const std::string msg = r.status().message();
  EXPECT_NE(msg.find("capacity 32 pages"), std::string::npos) << msg;
  EXPECT_NE(msg.find("32 in use"), std::string::npos) << msg;
  EXPECT_NE(msg.find("copy engine hung"), std::string::npos) << msg;
  const DeviceMemory::Stats s = mem_->stats();
  EXPECT_EQ(s.evict_failures, 1u);
  EXPECT_EQ(s.alloc_failures, 1u);
  EXPECT_EQ(s.pages_in_use, 32u);
  EXPECT_EQ(calls().size(), 1u) << "a failing hook ends the allocation";
}

// Pages under migration are not waited for (the hook runs in a MigrationNoWaitScope and reports
// EBUSY or EDEADLK): the allocation goes on with the next coldest chunk instead of failing.
TEST_F(DeviceMemoryEviction, ABusyChunkMovesTheAllocationToTheNextOne) {
  for (const int busy : {EBUSY, EDEADLK}) {
    SCOPED_TRACE(busy);
    std::atomic<int> calls_seen{0};
    hook_ = [&, busy](DeviceMemory& mem, std::span<const uint64_t> ids) {
      if (calls_seen++ == 0) return Status::FromErrno(busy, "pages under migration");
      held_.Evict(mem, ids);
      return Status::Ok();
    };
    auto r = mem_->AllocPages(1);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(calls_seen.load(), 2);
    held_.Add(r.value());
    // Fill the freed chunk again so the next iteration starts from a full memory.
    auto rest = mem_->AllocPages(15);
    ASSERT_TRUE(rest.ok()) << rest.status().ToString();
    held_.Add(rest.value());
  }
  const auto c = calls();
  ASSERT_GE(c.size(), 4u);
  EXPECT_NE(mem_->ChunkOf(c[0][0]), mem_->ChunkOf(c[1][0])) << "the busy chunk is not retried";
}

TEST_F(DeviceMemoryEviction, GivesUpAfterTryingEveryChunkOnce) {
  hook_ = [](DeviceMemory&, std::span<const uint64_t>) { return Status::Ok(); };  // frees nothing
  auto r = mem_->AllocPages(1);
  EXPECT_EQ(r.errno_value(), ENOMEM);
  const auto c = calls();
  ASSERT_EQ(c.size(), 2u);
  EXPECT_NE(mem_->ChunkOf(c[0][0]), mem_->ChunkOf(c[1][0])) << "each chunk is tried once";
}

TEST_F(DeviceMemoryEviction, ConcurrentAllocatorsNeverEvictTheSameChunk) {
  // The first eviction blocks in the hook until a second allocator has evicted.
  std::atomic<int> entered{0};
  std::atomic<bool> release_first{false};
  hook_ = [&](DeviceMemory& mem, std::span<const uint64_t> ids) {
    if (entered.fetch_add(1) == 0) {
      entered.notify_all();
      release_first.wait(false);
    }
    held_.Evict(mem, ids);
    return Status::Ok();
  };
  Result<std::vector<uint64_t>> a = Status::FromErrno(EAGAIN);
  std::thread first([&] { a = mem_->AllocPages(1); });
  entered.wait(0);
  // While chunk X is being evicted, a second allocation evicts the other chunk.
  auto b = mem_->AllocPages(1);
  release_first = true;
  release_first.notify_all();
  first.join();
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  const auto c = calls();
  ASSERT_EQ(c.size(), 2u);
  EXPECT_NE(mem_->ChunkOf(c[0][0]), mem_->ChunkOf(c[1][0]));
  held_.Add(a.value());
  held_.Add(b.value());
}

TEST_F(DeviceMemoryEviction, AllocChunkEvictsAWholeChunkAndPassesEverySubpage) {
  // Given a folio in the older chunk (the test holds its head) and pages in the newer one.
  held_.ReleaseAll(*mem_);
  const uint64_t head = mem_->AllocChunk().value();
  const std::vector<uint64_t> pages = Alloc(*mem_, 5);
  held_.Add({head});
  held_.Add(pages);
  ASSERT_NE(mem_->ChunkOf(head), mem_->ChunkOf(pages[0]));
  // When a second folio is asked for,
  auto r = mem_->AllocChunk();
  // Then the folio's chunk was evicted with all of its subpages and handed out again.
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r.value(), head);
  const auto c = calls();
  ASSERT_EQ(c.size(), 1u);
  ASSERT_EQ(c[0].size(), 16u);
  EXPECT_EQ(Sorted(c[0]).front(), head);
  EXPECT_EQ(Sorted(c[0]).back(), head + 15);
  held_.Add({r.value()});
}

TEST_F(DeviceMemoryEviction, WithoutAWholeChunkAllocChunkFailsAndAllocPagesStillWorks) {
  hook_ = [](DeviceMemory&, std::span<const uint64_t>) { return Status::Ok(); };  // frees nothing
  // Free one page in each chunk: 2 pages free, no whole chunk.
  ASSERT_EQ(held_.Evict(*mem_, std::vector<uint64_t>{first_[0], second_[0]}), 2u);
  auto folio = mem_->AllocChunk();
  EXPECT_EQ(folio.errno_value(), ENOMEM);
  EXPECT_NE(folio.status().message().find("no whole chunk"), std::string::npos);
  auto pages = mem_->AllocPages(2);
  ASSERT_TRUE(pages.ok()) << "the fallback to 4 KiB pages";
  held_.Add(pages.value());
}

// ---------------------------------------------------------------------------------------------
// Concurrency: many allocators, frees and evictions on a small memory.

TEST(DeviceMemoryConcurrency, NoPageIsEverHandedToTwoOwners) {
  constexpr int kThreads = 6;
  constexpr int kIterations = 500;
  constexpr size_t kHoldMax = 24;
  // The test's ownership table; every access to page bytes happens under its lock, so that a
  // page handed to two owners shows up as a broken table, not as a data race in the test.
  struct Owner {
    int thread = -1;
    uint64_t tag = 0;
  };
  Mutex table_mu;
  std::vector<Owner> table(64);
  std::atomic<int> double_owner{0}, bad_data{0}, enomem{0}, stolen{0};
  std::shared_ptr<DeviceMemory> mem;

  DeviceMemory::Options o = SmallOptions(4);  // 64 pages, 4 chunks
  o.evict = [&](DeviceMemory& m, std::span<const uint64_t> ids) {
    std::vector<uint64_t> drop;
    {
      MutexLock lock(table_mu);
      for (uint64_t id : ids) {
        if (table[id].thread >= 0) {
          table[id].thread = -1;
          drop.push_back(id);
        }
      }
    }
    stolen += int(drop.size());
    PutAll(m, drop);
    return Status::Ok();
  };
  mem = Make(o);
  ASSERT_NE(mem, nullptr);

  auto claim = [&](int self, uint64_t id, uint64_t tag) {
    MutexLock lock(table_mu);
    if (table[id].thread != -1) double_owner++;
    table[id] = Owner{self, tag};
    std::memcpy(mem->PageData(id), &tag, sizeof(tag));
  };
  // Drops our reference unless the page was evicted from under us.
  auto release = [&](int self, uint64_t id, uint64_t tag) {
    bool mine = false;
    {
      MutexLock lock(table_mu);
      if (table[id].thread == self && table[id].tag == tag) {
        uint64_t seen;
        std::memcpy(&seen, mem->PageData(id), sizeof(seen));
        if (seen != tag) bad_data++;
        table[id].thread = -1;
        mine = true;
      }
    }
    if (mine) mem->PutPage(id);
  };

  std::latch start(kThreads);
  std::latch done_allocating(kThreads);
  auto worker = [&](int self) {
    start.arrive_and_wait();
    std::mt19937 rng(unsigned(self) * 7919u + 1u);
    std::vector<std::pair<uint64_t, uint64_t>> held;  // (id, tag)
    uint64_t seq = 0;
    for (int i = 0; i < kIterations; ++i) {
      std::vector<uint64_t> got;
      if (rng() % 8 == 0) {
        auto r = mem->AllocChunk();
        if (r.ok()) {
          if (!mem->SplitFolio(r.value()).ok()) double_owner++;
          for (uint64_t id = r.value(); id < r.value() + mem->pages_per_chunk(); ++id) {
            got.push_back(id);
          }
        } else {
          if (r.errno_value() != ENOMEM) double_owner++;  // unexpected error
          enomem++;
        }
      } else {
        auto r = mem->AllocPages(1 + rng() % 8);
        if (r.ok()) {
          got = std::move(r).value();
        } else {
          if (r.errno_value() != ENOMEM) double_owner++;  // unexpected error
          enomem++;
        }
      }
      for (uint64_t id : got) {
        const uint64_t tag = (uint64_t(self) << 32) | ++seq;
        claim(self, id, tag);
        held.emplace_back(id, tag);
        mem->Touch(id);
      }
      // Extra references come and go (a device mapping the page for a moment).
      if (!held.empty()) {
        const uint64_t id = held[rng() % held.size()].first;
        bool mine;
        {
          MutexLock lock(table_mu);
          mine = table[id].thread == self;
          if (mine) mem->GetPage(id);  // under the lock: the page cannot be evicted meanwhile
        }
        if (mine) mem->PutPage(id);
      }
      if (held.size() > kHoldMax) {
        std::shuffle(held.begin(), held.end(), rng);
        while (held.size() > kHoldMax / 2) {
          release(self, held.back().first, held.back().second);
          held.pop_back();
        }
      }
    }
    done_allocating.arrive_and_wait();  // hold on: the others' allocations must evict
    for (const auto& [id, tag] : held) release(self, id, tag);
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);
  for (auto& t : threads) t.join();

  EXPECT_EQ(double_owner.load(), 0);
  EXPECT_EQ(bad_data.load(), 0);
  const DeviceMemory::Stats s = mem->stats();
  EXPECT_EQ(s.pages_in_use, 0u);
  EXPECT_EQ(s.pages_free, 64u);
  EXPECT_EQ(s.allocations, s.frees);
  EXPECT_GT(s.evictions, 0u);
  EXPECT_GT(stolen.load(), 0);
  EXPECT_EQ(s.alloc_failures, uint64_t(enomem.load())) << "every ENOMEM is counted";
}

// ---------------------------------------------------------------------------------------------
// Device memory failure

TEST(DeviceMemoryPoison, APoisonedPageIsNeverHandedOutAgain) {
  auto mem = Make(SmallOptions(1));  // 16 pages
  ASSERT_NE(mem, nullptr);
  // Given a free page and an allocated page, both poisoned,
  const std::vector<uint64_t> first = Alloc(*mem, 16);
  const uint64_t in_use = first[2];
  const uint64_t freed = first[5];
  mem->PutPage(freed);
  mem->MarkPoisoned(freed);
  mem->MarkPoisoned(in_use);
  mem->MarkPoisoned(in_use);  // idempotent
  EXPECT_TRUE(mem->IsPoisoned(freed));
  EXPECT_TRUE(mem->IsPoisoned(in_use));
  EXPECT_FALSE(mem->IsPoisoned(first[0]));
  // When every page is freed and allocation cycles many times,
  for (uint64_t id : first) {
    if (id != freed) mem->PutPage(id);
  }
  DeviceMemory::Stats s = mem->stats();
  EXPECT_EQ(s.poisoned_pages, 2u);
  EXPECT_EQ(s.pages_free, 14u);
  EXPECT_EQ(s.pages_in_use, 0u);
  for (int round = 0; round < 5; ++round) {
    const std::vector<uint64_t> all = Alloc(*mem, 14);
    ASSERT_EQ(all.size(), 14u);
    // Then neither poisoned page is among them, and nothing more is available.
    EXPECT_EQ(std::count(all.begin(), all.end(), freed), 0);
    EXPECT_EQ(std::count(all.begin(), all.end(), in_use), 0);
    EXPECT_EQ(mem->AllocPages(1).errno_value(), ENOMEM);
    PutAll(*mem, all);
  }
  EXPECT_EQ(mem->AllocChunk().errno_value(), ENOMEM) << "a chunk with poison is never a folio";
}

TEST(DeviceMemoryPoison, APagePoisonedInsideAFolioIsRetiredWhenTheFolioIsFreed) {
  auto mem = Make(SmallOptions(2));
  ASSERT_NE(mem, nullptr);
  const uint64_t head = mem->AllocChunk().value();
  mem->MarkPoisoned(head + 4);
  mem->PutPage(head);
  const DeviceMemory::Stats s = mem->stats();
  EXPECT_EQ(s.pages_free, 31u);
  EXPECT_EQ(s.pages_in_use, 0u);
  const std::vector<uint64_t> all = Alloc(*mem, 31);
  EXPECT_EQ(std::count(all.begin(), all.end(), head + 4), 0);
  PutAll(*mem, all);
}

// ---------------------------------------------------------------------------------------------
// Lifetime

TEST(DeviceMemoryShutdown, WaitsForAReferenceHeldByAnotherThread) {
  std::atomic<bool> hook_called{false};
  std::atomic<bool> go{false};
  std::atomic<bool> released{false};
  std::atomic<bool> shutdown_returned{false};
  std::atomic<bool> released_when_returned{false};
  std::vector<uint64_t> evicted;
  DeviceMemory::Options o = SmallOptions(2);
  o.evict = [&](DeviceMemory&, std::span<const uint64_t> ids) {
    evicted.assign(ids.begin(), ids.end());
    hook_called = true;
    hook_called.notify_all();
    return Status::Ok();  // the holder drops its reference itself, later
  };
  auto mem = Make(o);
  ASSERT_NE(mem, nullptr);
  // Given a page referenced by a holder thread,
  std::atomic<uint64_t> id{~0ull};
  std::thread holder([&] {
    id = Alloc(*mem, 1).at(0);
    id.notify_all();
    go.wait(false);
    released = true;
    mem->PutPage(id);
  });
  id.wait(~0ull);
  // When Shutdown runs on another thread,
  std::atomic<pid_t> tid{0};
  Status result;
  std::thread closer([&] {
    tid = gettid();
    result = mem->Shutdown(std::chrono::milliseconds(60000));
    released_when_returned = released.load();
    shutdown_returned = true;
  });
  hook_called.wait(false);
  // it calls the evict hook with the page, then waits: it is asleep and has not returned.
  while (!shutdown_returned && (tid == 0 || ThreadState(tid) != 'S')) std::this_thread::yield();
  EXPECT_FALSE(shutdown_returned.load()) << "Shutdown returned while a reference was held";
  go = true;
  go.notify_all();
  holder.join();
  closer.join();
  // Then it returned only after the holder released its reference.
  EXPECT_TRUE(result.ok()) << result.ToString();
  EXPECT_TRUE(released_when_returned.load());
  EXPECT_EQ(evicted, std::vector<uint64_t>{id.load()});
  EXPECT_EQ(mem->stats().pages_in_use, 0u);
  EXPECT_EQ(mem->AllocPages(1).errno_value(), ENODEV) << "no allocation after Shutdown";
  EXPECT_EQ(mem->AllocChunk().errno_value(), ENODEV);
  EXPECT_TRUE(mem->Shutdown(std::chrono::milliseconds(0)).ok()) << "idempotent";
}

TEST(DeviceMemoryShutdown, TimesOutWithAnErrorWhenAReferenceIsNeverReleased) {
  auto mem = Make(SmallOptions(1));
  ASSERT_NE(mem, nullptr);
  const std::vector<uint64_t> ids = Alloc(*mem, 2);
  Status st = mem->Shutdown(std::chrono::milliseconds(20));
  EXPECT_EQ(st.errno_value(), ETIMEDOUT);
  EXPECT_NE(st.message().find("2 pages still referenced"), std::string::npos) << st.ToString();
  EXPECT_EQ(mem->AllocPages(1).errno_value(), ENODEV) << "allocations stay refused";
  // Once the references are gone a later Shutdown succeeds.
  PutAll(*mem, ids);
  EXPECT_TRUE(mem->Shutdown(std::chrono::milliseconds(0)).ok());
}

TEST(DeviceMemoryShutdown, EvictsEveryChunkInUse) {
  HeldPages held;
  Mutex mu;
  std::vector<std::vector<uint64_t>> calls;
  DeviceMemory::Options o = SmallOptions(3);
  o.evict = [&](DeviceMemory& mem, std::span<const uint64_t> ids) {
    {
      MutexLock lock(mu);
      calls.emplace_back(ids.begin(), ids.end());
    }
    held.Evict(mem, ids);
    return Status::Ok();
  };
  auto mem = Make(o);
  ASSERT_NE(mem, nullptr);
  const std::vector<uint64_t> a = Alloc(*mem, 16);
  const std::vector<uint64_t> b = Alloc(*mem, 3);
  held.Add(a);
  held.Add(b);
  ASSERT_TRUE(mem->Shutdown(std::chrono::milliseconds(60000)).ok());
  MutexLock lock(mu);
  ASSERT_EQ(calls.size(), 2u) << "the unused chunk is not evicted";
  std::vector<uint64_t> all = calls[0];
  all.insert(all.end(), calls[1].begin(), calls[1].end());
  std::vector<uint64_t> expected = a;
  expected.insert(expected.end(), b.begin(), b.end());
  EXPECT_EQ(Sorted(all), Sorted(expected));
  EXPECT_EQ(mem->stats().evictions, 2u);
}

TEST(DeviceMemoryShutdown, DestructionWithAReferenceHeldLeaksTheArenaInsteadOfUnmappingIt) {
  DeviceMemory::Options o = SmallOptions(1);
  o.shutdown_timeout = std::chrono::milliseconds(10);
  auto mem = Make(o);
  ASSERT_NE(mem, nullptr);
  const uint64_t id = Alloc(*mem, 1).at(0);
  auto* data = static_cast<volatile unsigned char*>(mem->PageData(id));
  data[0] = 0x11;
  // The reference is never dropped (its holder is "stuck"); the last owner lets go.
  mem.reset();
  // The page's memory is still mapped: touching it does not fault.
  data[1] = 0x22;
  EXPECT_EQ(data[0], 0x11);
  EXPECT_EQ(data[1], 0x22);
}

}  // namespace
}  // namespace hmmkit::driver
