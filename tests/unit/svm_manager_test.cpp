// SvmManager: chunk selection, the fault policy (migrate or map remotely), partial unmap and
// garbage collection, eviction under pressure, thrashing detection, residency and errors. The
// device side is a recording SvmDeviceOps: what is mapped, page by page.
#include "hmmkit/driver/svm_manager.hpp"

#include <link.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>

#include <gtest/gtest.h>

#include "hmmkit/dma/cpu_engine.hpp"
#include "hmmkit/driver/device_migration.hpp"
#include "hmmkit/mirror/migrate.hpp"
#include "hmmkit/mirror/mm_monitor.hpp"
#include "hmmkit/mirror/range_fault.hpp"
#include "test_support.hpp"

namespace hmmkit::test {
namespace {

using driver::DeviceMemory;
using driver::Residency;
using driver::SvmManager;

constexpr size_t kMiB = size_t(1) << 20;

// The device page table of the test: one hmm_pfn entry per mapped page.
class RecordingOps final : public driver::SvmDeviceOps {
 public:
  Status MapPages(uintptr_t start, std::span<const uint64_t> pfns) override {
    std::lock_guard lock(mu_);
    for (size_t i = 0; i < pfns.size(); ++i) mapped_[start + i * PageSize()] = pfns[i];
    maps_++;
    return Status::Ok();
  }
  void UnmapPages(uintptr_t start, uintptr_t end) override {
    std::lock_guard lock(mu_);
    mapped_.erase(mapped_.lower_bound(start), mapped_.lower_bound(end));
    unmaps_++;
  }
  // The entry mapped for the page at va, or 0.
  uint64_t At(uintptr_t va) {
    std::lock_guard lock(mu_);
    auto it = mapped_.find(va);
    return it == mapped_.end() ? 0 : it->second;
  }
  size_t Count(uintptr_t start, uintptr_t end) {
    std::lock_guard lock(mu_);
    return size_t(std::distance(mapped_.lower_bound(start), mapped_.lower_bound(end)));
  }
  uint64_t unmaps() {
    std::lock_guard lock(mu_);
    return unmaps_;
  }

 private:
  std::mutex mu_;
  std::map<uintptr_t, uint64_t> mapped_;
  uint64_t maps_ = 0, unmaps_ = 0;
};

int owner;

class SvmManagerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    as_ = MakeAddressSpace({});
    ASSERT_TRUE(as_);
    if (!as_->monitor()) GTEST_SKIP() << "no userfaultfd monitor";
    auto dma = dma::CpuDmaEngine::Create({});
    ASSERT_TRUE(dma.ok()) << dma.status().ToString();
    dma_ = std::move(*dma);
  }
  void TearDown() override {
    svm_.reset();
    mem_.reset();
    dma_.reset();
    as_.reset();
  }
  // Device memory of `capacity` bytes; with evict, exhaustion evicts by device page.
  void MakeDevice(size_t capacity, bool evict, const SvmManager::Options& o = {}) {
    DeviceMemory::Options mo;
    mo.capacity = capacity;
    mo.owner = &owner;
    mo.name = "svm-test";
    mo.huge_pages = false;
    if (evict) {
      AddressSpace* space = as_.get();
      mo.evict = [space](DeviceMemory& mem, std::span<const uint64_t> ids) {
        return MigrateDevicePages(*space, mem, ids);
      };
    }
    auto mem = DeviceMemory::Create(mo);
    ASSERT_TRUE(mem.ok()) << mem.status().ToString();
    mem_ = std::move(*mem);
    auto svm = SvmManager::Create(as_, *mem_, *dma_, ops_, o);
    ASSERT_TRUE(svm.ok()) << svm.status().ToString();
    svm_ = std::move(*svm);
  }
  static void Fill(char* p, size_t len, uint8_t seed) {
    for (size_t i = 0; i < len; i += 64) p[i] = char(seed + i / 64);
  }
  size_t OnDevice(const Mapping& m) {
    std::vector<DevicePageInfo> info(m.size() / 4096);
    return as_->LookupDevicePages(m.addr(), m.end(), info);
  }
  static bool Check(const char* p, size_t len, uint8_t seed) {
    for (size_t i = 0; i < len; i += 64)
      if (reinterpret_cast<const volatile char*>(p)[i] != char(seed + i / 64)) return false;
    return true;
  }

  std::shared_ptr<AddressSpace> as_;
  std::unique_ptr<dma::CpuDmaEngine> dma_;
  std::shared_ptr<DeviceMemory> mem_;
  RecordingOps ops_;
  std::unique_ptr<SvmManager> svm_;
};

TEST_F(SvmManagerTest, BadOptionsAreEinval) {
  MakeDevice(2 * kMiB, false);
  SvmManager::Options o;
  o.chunk_sizes = {64 << 10, 2 * kMiB, 4096};
  EXPECT_EQ(SvmManager::Create(as_, *mem_, *dma_, ops_, o).status().errno_value(), EINVAL);
  o.chunk_sizes = {2 * kMiB, 64 << 10};
  EXPECT_EQ(SvmManager::Create(as_, *mem_, *dma_, ops_, o).status().errno_value(), EINVAL)
      << "the smallest chunk must be the page size";
  o = {};
  o.window = kMiB;
  EXPECT_EQ(SvmManager::Create(as_, *mem_, *dma_, ops_, o).status().errno_value(), EINVAL)
      << "window smaller than the largest chunk";
  o = {};
  o.prefetch_threshold = 1.5;
  EXPECT_EQ(SvmManager::Create(as_, *mem_, *dma_, ops_, o).status().errno_value(), EINVAL);
  o = {};
  o.prefetch_region = 3 * 4096;
  EXPECT_EQ(SvmManager::Create(as_, *mem_, *dma_, ops_, o).status().errno_value(), EINVAL);
}

TEST_F(SvmManagerTest, RangesAreTheLargestAlignedChunkInsideTheVma) {
  SvmManager::Options o;
  o.prefetch_threshold = 0;  // chunk selection alone (the prefetcher would fill the small VMA)
  MakeDevice(8 * kMiB, false, o);
  // Given a 4 MiB VMA aligned to 2 MiB
  Mapping big = Mapping::AlignedAnon(4 * kMiB, 2 * kMiB);
  // When the device faults in its second half
  ASSERT_TRUE(svm_->HandleFault(big.addr() + 3 * kMiB + 100, false).ok());
  // Then the range is that aligned 2 MiB chunk
  auto ranges = svm_->Ranges();
  ASSERT_EQ(ranges.size(), 1u);
  EXPECT_EQ(ranges[0].first, big.addr() + 2 * kMiB);
  EXPECT_EQ(ranges[0].second, big.addr() + 4 * kMiB);
  EXPECT_EQ(ops_.Count(big.addr() + 2 * kMiB, big.end()), 512u);
  EXPECT_EQ(ops_.Count(big.addr(), big.addr() + 2 * kMiB), 0u);

  // Given a 96 KiB VMA starting on a 64 KiB boundary (and not on a 2 MiB one)
  Mapping room = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB);
  const uintptr_t base = room.addr() + 64 * 1024;
  ASSERT_EQ(munmap(room.data(), 64 * 1024), 0);
  ASSERT_EQ(munmap(reinterpret_cast<void*>(base + 96 * 1024), 2 * kMiB - 160 * 1024), 0);
  room.Release();
  // When the device faults at its first page and at its last page
  ASSERT_TRUE(svm_->HandleFault(base + 4096, false).ok());
  ASSERT_TRUE(svm_->HandleFault(base + 92 * 1024, false).ok());
  // Then the first range is 64 KiB, the second a single page (64 KiB would cross the VMA end)
  // (the ranges come sorted by address, and mmap may place the small VMA above the big one)
  ranges = svm_->Ranges();
  ASSERT_EQ(ranges.size(), 3u);
  const auto has = [&](uintptr_t first, uintptr_t second) {
    return std::find(ranges.begin(), ranges.end(), std::make_pair(first, second)) != ranges.end();
  };
  EXPECT_TRUE(has(base, base + 64 * 1024)) << std::hex << base;
  EXPECT_TRUE(has(base + 92 * 1024, base + 96 * 1024)) << std::hex << base;
  EXPECT_TRUE(has(big.addr() + 2 * kMiB, big.addr() + 4 * kMiB));
  // And one window covers each 512 MiB of address space in use
  EXPECT_GE(svm_->window_count(), 1u);
  munmap(reinterpret_cast<void*>(base), 96 * 1024);
}

TEST_F(SvmManagerTest, FirstFaultMigratesPrivateMemoryAndACpuTouchBringsItBack) {
  MakeDevice(4 * kMiB, false);
  Mapping m = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB);
  Fill(m.data(), m.size(), 9);
  // When the device faults on it
  ASSERT_TRUE(svm_->HandleFault(m.addr() + 12345, true).ok());
  // Then the whole range moved to device memory and is mapped as device pages
  auto s = svm_->stats();
  EXPECT_EQ(s.pages_to_device, 512u);
  EXPECT_EQ(s.remote_maps, 0u);
  EXPECT_EQ(hmm_pfn::Kind(ops_.At(m.addr())), PageKind::kDevicePrivate);
  EXPECT_NE(ops_.At(m.addr()) & hmm_pfn::kWrite, 0u);
  auto where = svm_->Scan(m.addr(), m.end());
  ASSERT_TRUE(where.ok());
  EXPECT_EQ(*where, Residency::kDevice);
  // When the CPU reads it
  EXPECT_TRUE(Check(m.data(), m.size(), 9));
  // Then the data came back, the device lost its translations, and the pages are in system memory
  EXPECT_EQ(ops_.Count(m.addr(), m.end()), 0u);
  where = svm_->Scan(m.addr(), m.end());
  ASSERT_TRUE(where.ok());
  EXPECT_EQ(*where, Residency::kSystem);
}

TEST_F(SvmManagerTest, SharedMemoryIsMappedRemotelyNeverMigrated) {
  MakeDevice(4 * kMiB, false);
  Mapping m(16 * PageSize(), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS);
  Fill(m.data(), m.size(), 4);
  ASSERT_TRUE(svm_->HandleFault(m.addr(), false).ok());
  auto s = svm_->stats();
  EXPECT_EQ(s.pages_to_device, 0u);
  EXPECT_EQ(s.remote_maps, 1u);
  EXPECT_EQ(hmm_pfn::Kind(ops_.At(m.addr())), PageKind::kSystem);
  EXPECT_EQ(*svm_->Scan(m.addr(), m.end()), Residency::kSystem);
}

TEST_F(SvmManagerTest, PartialUnmapMarksTheRangeAndGarbageCollectionRemovesIt) {
  MakeDevice(4 * kMiB, false);
  Mapping m = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB);
  Fill(m.data(), m.size(), 5);
  ASSERT_TRUE(svm_->HandleFault(m.addr(), true).ok());
  ASSERT_EQ(svm_->Ranges().size(), 1u);
  // When the application unmaps the first half of the range
  ASSERT_EQ(munmap(m.data(), kMiB), 0);
  as_->monitor()->Sync();  // the UNMAP event has been dispatched
  // Then the range is not split: it stays until collected
  EXPECT_EQ(svm_->Ranges().size(), 1u);
  // When garbage is collected
  EXPECT_EQ(svm_->CollectGarbage(), 1u);
  // Then the range and its window are gone, and the surviving half is back in system memory with
  // its data
  EXPECT_TRUE(svm_->Ranges().empty());
  EXPECT_EQ(svm_->window_count(), 0u);
  EXPECT_EQ(*svm_->Scan(m.addr() + kMiB, m.end()), Residency::kSystem);
  EXPECT_TRUE(Check(m.data() + kMiB, kMiB, uint8_t(5 + kMiB / 64)));
  EXPECT_EQ(mem_->stats().pages_in_use, 0u);
  ASSERT_EQ(munmap(m.data() + kMiB, kMiB), 0);
  m.Release();
}

TEST_F(SvmManagerTest, FullDeviceMemoryEvictsTheColdestChunk) {
  MakeDevice(2 * kMiB, /*evict=*/true);
  Mapping a = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB);
  Mapping b = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB);
  Fill(a.data(), a.size(), 1);
  Fill(b.data(), b.size(), 2);
  // When two 2 MiB ranges fault on a device with room for one
  ASSERT_TRUE(svm_->HandleFault(a.addr(), false).ok());
  ASSERT_TRUE(svm_->HandleFault(b.addr(), false).ok());
  // Then the second one evicted the first: both migrated, one is on the device now
  EXPECT_EQ(svm_->stats().pages_to_device, 1024u);
  EXPECT_EQ(*svm_->Scan(b.addr(), b.end()), Residency::kDevice);
  EXPECT_EQ(*svm_->Scan(a.addr(), a.end()), Residency::kSystem);
  EXPECT_GE(mem_->stats().evictions, 1u);
  // And no byte was lost
  EXPECT_TRUE(Check(a.data(), a.size(), 1));
  EXPECT_TRUE(Check(b.data(), b.size(), 2));
}

// A migration to the device allocates for the pages it collected; when memory is full, the
// allocator evicts the coldest chunk, which may hold pages of the very range this thread is
// migrating (already on the device, so not collected). Evicting them means migrating inside our
// own migration: it once waited for itself forever (a hang in the stress's device sweep, where a
// fault's range grows over pages already on the device). Such pages are left; another chunk goes.
TEST_F(SvmManagerTest, EvictionInsideAMigrationLeavesItsOwnPagesAndEvictsAnotherChunk) {
  MakeDevice(4 * kMiB, /*evict=*/true);  // two chunks
  Mapping a = Mapping::AlignedAnon(4 * kMiB, 2 * kMiB);
  Mapping b = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB);
  Fill(a.data(), a.size(), 3);
  Fill(b.data(), b.size(), 4);
  const uintptr_t half = a.addr() + 2 * kMiB;
  // a's first half in the older chunk, b in the newer one; a's second half in system memory.
  auto first = driver::MigrateToDevice(*as_, *mem_, *dma_, a.addr(), a.end());
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  ASSERT_EQ(first->migrated, 1024u);
  auto back = driver::MigrateToSystem(*as_, *mem_, *dma_, half, a.end());
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  auto bdev = driver::MigrateToDevice(*as_, *mem_, *dma_, b.addr(), b.end());
  ASSERT_TRUE(bdev.ok()) << bdev.status().ToString();
  ASSERT_EQ(mem_->stats().pages_in_use, 1024u);

  // All of a: 512 pages to allocate, and the coldest chunk holds a's own first half.
  auto all = driver::MigrateToDevice(*as_, *mem_, *dma_, a.addr(), a.end());
  ASSERT_TRUE(all.ok()) << all.status().ToString();
  EXPECT_EQ(all->migrated, 512u);
  EXPECT_GE(mem_->stats().evict_failures, 1u) << "the chunk under migration was refused";
  EXPECT_EQ(mem_->stats().pages_in_use, 1024u) << "a on the device, b evicted";
  EXPECT_EQ(OnDevice(a), 1024u);
  EXPECT_EQ(OnDevice(b), 0u);
  EXPECT_TRUE(Check(b.data(), b.size(), 4));
  EXPECT_TRUE(Check(a.data(), a.size(), 3));
}

TEST_F(SvmManagerTest, FullDeviceMemoryWithoutEvictionMapsRemotely) {
  MakeDevice(2 * kMiB, /*evict=*/false);
  Mapping a = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB);
  Mapping b = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB);
  Fill(b.data(), b.size(), 3);
  ASSERT_TRUE(svm_->HandleFault(a.addr(), false).ok());
  ASSERT_TRUE(svm_->HandleFault(b.addr(), false).ok());
  EXPECT_EQ(svm_->stats().remote_maps, 1u);
  EXPECT_EQ(hmm_pfn::Kind(ops_.At(b.addr())), PageKind::kSystem);
  EXPECT_TRUE(Check(b.data(), b.size(), 3));
}

TEST_F(SvmManagerTest, PingPongPinsTheRangeToSystemMemory) {
  SvmManager::Options o;
  o.thrash_migrations = 2;
  o.thrash_window = std::chrono::hours(1);
  o.thrash_pin = std::chrono::hours(1);
  MakeDevice(4 * kMiB, false, o);
  // A whole aligned 2 MiB of our own: a small mapping merges with its neighbours (under TSan, the
  // runtime's own memory), and the range would then migrate memory the fault path itself uses.
  Mapping m = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB);
  Fill(m.data(), m.size(), 6);
  // Given a range that went to the device and back to the CPU twice
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(svm_->HandleFault(m.addr(), true).ok());
    ASSERT_EQ(hmm_pfn::Kind(ops_.At(m.addr())), PageKind::kDevicePrivate) << i;
    m.data()[0] = 6;  // the CPU takes it back
  }
  EXPECT_EQ(svm_->stats().migrations_to_device, 2u);
  // When the device faults on it a third time
  ASSERT_TRUE(svm_->HandleFault(m.addr(), true).ok());
  // Then it is pinned to system memory and mapped remotely
  auto s = svm_->stats();
  EXPECT_EQ(s.thrashing_events, 1u);
  EXPECT_EQ(s.migrations_to_device, 2u);
  EXPECT_EQ(hmm_pfn::Kind(ops_.At(m.addr())), PageKind::kSystem);
  EXPECT_TRUE(Check(m.data(), m.size(), 6));
}

TEST_F(SvmManagerTest, ErrorsNameTheAddress) {
  MakeDevice(2 * kMiB, false);
  Mapping ro(PageSize(), PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS);
  Status st = svm_->HandleFault(ro.addr(), /*write=*/true);
  EXPECT_EQ(st.errno_value(), EPERM);
  EXPECT_NE(st.ToString().find("read-only"), std::string::npos) << st.ToString();
  const auto addr = reinterpret_cast<uintptr_t>(UnmappedAddress());
  ASSERT_NE(addr, 0u);
  st = svm_->HandleFault(addr, false);
  EXPECT_EQ(st.errno_value(), EFAULT);
  EXPECT_NE(st.ToString().find("not mapped"), std::string::npos) << st.ToString();
  EXPECT_EQ(svm_->HandleFault(uintptr_t(1) << 47, false).errno_value(), EFAULT);
}

TEST_F(SvmManagerTest, PrefetchMigratesAheadAndEvictBringsBack) {
  MakeDevice(4 * kMiB, false);
  Mapping m = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB);
  Fill(m.data(), m.size(), 8);
  ASSERT_TRUE(svm_->PrefetchToDevice(m.addr(), m.end()).ok());
  EXPECT_EQ(*svm_->Scan(m.addr(), m.end()), Residency::kDevice);
  EXPECT_EQ(svm_->stats().device_faults, 0u);
  EXPECT_EQ(ops_.Count(m.addr(), m.end()), 512u);
  ASSERT_TRUE(svm_->Evict(m.addr(), m.end()).ok());
  EXPECT_EQ(*svm_->Scan(m.addr(), m.end()), Residency::kSystem);
  EXPECT_EQ(ops_.Count(m.addr(), m.end()), 0u);
  EXPECT_EQ(svm_->stats().pages_to_system, 512u);
  EXPECT_TRUE(Check(m.data(), m.size(), 8));
}

// glibc's thread-arena heap: 64 MiB aligned, read-write from the boundary, PROT_NONE up to the
// next one. hmmkit's own small allocations live there, so such a run stays in system memory. Only
// that exact shape counts: anonymous memory merely below a PROT_NONE reservation that ends on a
// 64 MiB boundary is the application's and migrates (it did not: seen as a TSan lane failure).
TEST_F(SvmManagerTest, OnlyAnArenaHeapShapedRunStaysInSystemMemory) {
  MakeDevice(4 * kMiB, false);
  constexpr size_t kHeap = 64 * kMiB;
  // Reserve two heaps' worth and keep one 64 MiB-aligned heap of it, which this test owns.
  void* r =
      ::mmap(nullptr, 2 * kHeap, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  ASSERT_NE(r, MAP_FAILED) << strerror(errno);
  const uintptr_t lo = reinterpret_cast<uintptr_t>(r), hi = lo + 2 * kHeap;
  const uintptr_t b = (lo + kHeap - 1) & ~(kHeap - 1);
  auto unmap = [](uintptr_t s, uintptr_t e) {
    if (e > s) {
      ASSERT_EQ(::munmap(reinterpret_cast<void*>(s), e - s), 0) << strerror(errno);
    }
  };
  unmap(lo, b);
  unmap(b + kHeap, hi);
  void* rw = ::mmap(reinterpret_cast<void*>(b), 56 * kMiB, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
  ASSERT_EQ(rw, reinterpret_cast<void*>(b)) << strerror(errno);
  char* buf = reinterpret_cast<char*>(b + 4 * kMiB);
  const uintptr_t bs = b + 4 * kMiB, be = bs + 2 * kMiB;
  Fill(buf, 2 * kMiB, 5);

  ASSERT_TRUE(svm_->PrefetchToDevice(bs, be).ok());
  EXPECT_EQ(*svm_->Scan(bs, be), Residency::kSystem) << "the heap shape is mapped remotely";
  EXPECT_EQ(ops_.Count(bs, be), 512u);

  // A hole between the boundary and the buffer: no longer one mprotect'ed run, so not a heap.
  unmap(b + kMiB, b + 2 * kMiB);
  ASSERT_TRUE(svm_->PrefetchToDevice(bs, be).ok());
  EXPECT_EQ(*svm_->Scan(bs, be), Residency::kDevice);
  EXPECT_TRUE(Check(buf, 2 * kMiB, 5));

  // The hole may hold another thread's mapping by now: unmap only what is ours.
  svm_->Evict(bs, be).IgnoreError();
  unmap(b, b + kMiB);
  unmap(b + 2 * kMiB, b + kHeap);
}

// A mapping the kernel places right after a shared object's .bss merges with that anonymous VMA.
// The object's image (hmmkit's statics may live in such a .bss) stays in system memory; the
// application's pages past it migrate (the whole VMA stayed in system memory: a TSan lane fuzz
// replay failure).
TEST_F(SvmManagerTest, AMappingMergedWithALibrarysBssMigratesPastTheImage) {
  MakeDevice(4 * kMiB, false);
  constexpr size_t kLen = 16 * 4096;
  struct Search {
    uintptr_t at = 0;
  } search;
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* data) {
        auto* found = static_cast<Search*>(data);
        const uintptr_t page = PageSize();
        for (int i = 0; i < info->dlpi_phnum; ++i) {
          const ElfW(Phdr)& ph = info->dlpi_phdr[i];
          // Only segments whose .bss spills into pages of its own (an anonymous VMA).
          if (ph.p_type != PT_LOAD || ph.p_memsz <= ph.p_filesz + page) continue;
          const uintptr_t seg = info->dlpi_addr + ph.p_vaddr;
          const uintptr_t end = (seg + ph.p_memsz + page - 1) & ~(page - 1);
          void* p = ::mmap(reinterpret_cast<void*>(end), kLen, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
          if (p == reinterpret_cast<void*>(end)) {
            found->at = end;
            return 1;
          }
          if (p != MAP_FAILED) ::munmap(p, kLen);  // a kernel without MAP_FIXED_NOREPLACE
        }
        return 0;
      },
      &search);
  if (search.at == 0) GTEST_SKIP() << "no loaded object has free space right after its .bss";
  const uintptr_t bs = search.at, be = bs + kLen;
  auto vma = as_->FindVma(bs);
  ASSERT_TRUE(vma.ok() && *vma);
  if ((*vma)->start == bs) {
    ::munmap(reinterpret_cast<void*>(bs), kLen);
    GTEST_SKIP() << "the kernel did not merge the mapping with the .bss";
  }
  const uintptr_t image = (*vma)->start;
  Fill(reinterpret_cast<char*>(bs), kLen, 9);

  ASSERT_TRUE(svm_->PrefetchToDevice(bs, be).ok());
  EXPECT_EQ(*svm_->Scan(bs, be), Residency::kDevice) << "the application's pages migrate";
  auto lib = svm_->Scan(image, bs);
  ASSERT_TRUE(lib.ok());
  EXPECT_NE(*lib, Residency::kDevice) << "the object's .bss stays in system memory";
  EXPECT_NE(*lib, Residency::kMixed);

  ASSERT_TRUE(svm_->Evict(bs, be).ok());
  EXPECT_TRUE(Check(reinterpret_cast<char*>(bs), kLen, 9));
  ::munmap(reinterpret_cast<void*>(bs), kLen);
}

// ---- policy: threshold prefetcher, access counters, advice, replaceable policy ------------------

TEST_F(SvmManagerTest, ThresholdPrefetcherGrowsAFaultIntoTheRegion) {
  SvmManager::Options o;
  o.chunk_sizes = {64 << 10, 4096};
  o.prefetch_region = kMiB;
  o.prefetch_threshold = 0.5;
  MakeDevice(4 * kMiB, false, o);
  Mapping m = Mapping::AlignedAnon(kMiB, kMiB);
  Fill(m.data(), m.size(), 11);
  const size_t chunk = 64 << 10, chunks = kMiB / chunk;
  // Faults on the first half of the region migrate chunk by chunk
  for (size_t i = 0; i + 1 < chunks / 2; ++i)
    ASSERT_TRUE(svm_->HandleFault(m.addr() + i * chunk, false).ok()) << i;
  EXPECT_EQ(svm_->stats().prefetch_grows, 0u);
  EXPECT_EQ(svm_->stats().pages_to_device, (chunks / 2 - 1) * chunk / PageSize());
  // When the fault that makes half the region device-resident comes
  ASSERT_TRUE(svm_->HandleFault(m.addr() + (chunks / 2 - 1) * chunk, false).ok());
  // Then the rest of the region migrates with it, and is mapped: no more faults needed there
  auto s = svm_->stats();
  EXPECT_EQ(s.prefetch_grows, 1u);
  EXPECT_EQ(s.pages_prefetched, (kMiB / 2) / PageSize());
  EXPECT_EQ(*svm_->Scan(m.addr(), m.end()), Residency::kDevice);
  EXPECT_EQ(ops_.Count(m.addr(), m.end()), kMiB / PageSize());
  EXPECT_TRUE(Check(m.data(), m.size(), 11));
}

TEST_F(SvmManagerTest, ThresholdPrefetcherStaysOffBelowTheThresholdAndWhenDisabled) {
  SvmManager::Options o;
  o.chunk_sizes = {64 << 10, 4096};
  o.prefetch_region = kMiB;
  o.prefetch_threshold = 0;  // off
  MakeDevice(4 * kMiB, false, o);
  Mapping m = Mapping::AlignedAnon(kMiB, kMiB);
  for (size_t i = 0; i < 12; ++i)
    ASSERT_TRUE(svm_->HandleFault(m.addr() + i * (64 << 10), false).ok());
  EXPECT_EQ(svm_->stats().prefetch_grows, 0u);
  EXPECT_EQ(*svm_->Scan(m.addr(), m.end()), Residency::kMixed);
}

TEST_F(SvmManagerTest, AccessCounterPromotesAHotRemoteRange) {
  SvmManager::Options o;
  o.migrate_on_fault = false;
  MakeDevice(4 * kMiB, false, o);
  Mapping m = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB);
  Fill(m.data(), m.size(), 12);
  ASSERT_TRUE(svm_->HandleFault(m.addr(), false).ok());
  EXPECT_EQ(hmm_pfn::Kind(ops_.At(m.addr())), PageKind::kSystem) << "mapped remotely first";
  // When the device reports the range hot
  ASSERT_TRUE(svm_->HandleAccessCounter(m.addr() + 4096).ok());
  // Then it migrated and the device maps device pages
  auto s = svm_->stats();
  EXPECT_EQ(s.promotions, 1u);
  EXPECT_EQ(s.counter_notifications, 1u);
  EXPECT_EQ(*svm_->Scan(m.addr(), m.end()), Residency::kDevice);
  EXPECT_EQ(hmm_pfn::Kind(ops_.At(m.addr())), PageKind::kDevicePrivate);
  // A report for memory the device never touched is ignored
  Mapping other = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB);
  ASSERT_TRUE(svm_->HandleAccessCounter(other.addr()).ok());
  EXPECT_EQ(svm_->stats().promotions, 1u);
  EXPECT_TRUE(Check(m.data(), m.size(), 12));
}

TEST_F(SvmManagerTest, PreferredSystemMapsRemotelyAndPreferredDeviceMigrates) {
  SvmManager::Options o;
  o.migrate_on_fault = false;  // preferred kDevice overrides it
  MakeDevice(8 * kMiB, false, o);
  Mapping a = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB);
  Mapping b = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB);
  ASSERT_TRUE(
      svm_->Advise(a.addr(), a.end(), {.preferred = driver::PreferredLocation::kDevice}).ok());
  ASSERT_TRUE(
      svm_->Advise(b.addr(), b.end(), {.preferred = driver::PreferredLocation::kSystem}).ok());
  ASSERT_TRUE(svm_->HandleFault(a.addr(), true).ok());
  ASSERT_TRUE(svm_->HandleFault(b.addr(), true).ok());
  EXPECT_EQ(*svm_->Scan(a.addr(), a.end()), Residency::kDevice);
  EXPECT_EQ(hmm_pfn::Kind(ops_.At(b.addr())), PageKind::kSystem);
  EXPECT_EQ(svm_->stats().remote_maps, 1u);
  // A hot report does not promote memory that prefers system memory
  ASSERT_TRUE(svm_->HandleAccessCounter(b.addr()).ok());
  EXPECT_EQ(svm_->stats().promotions, 0u);
  // An explicit prefetch still moves it
  ASSERT_TRUE(svm_->PrefetchToDevice(b.addr(), b.end()).ok());
  EXPECT_EQ(*svm_->Scan(b.addr(), b.end()), Residency::kDevice);
}

TEST_F(SvmManagerTest, ReadMostlyReadsStayRemoteWritesMigrate) {
  MakeDevice(8 * kMiB, false);
  Mapping m = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB);
  Fill(m.data(), m.size(), 13);
  ASSERT_TRUE(svm_->Advise(m.addr(), m.end(), {.read_mostly = true}).ok());
  ASSERT_TRUE(svm_->HandleFault(m.addr(), false).ok());
  EXPECT_EQ(hmm_pfn::Kind(ops_.At(m.addr())), PageKind::kSystem);
  EXPECT_EQ(svm_->stats().pages_to_device, 0u);
  // The CPU reads it without a fault-back
  EXPECT_TRUE(Check(m.data(), m.size(), 13));
  EXPECT_EQ(hmm_pfn::Kind(ops_.At(m.addr())), PageKind::kSystem) << "the mapping survived";
  ASSERT_TRUE(svm_->HandleFault(m.addr(), true).ok());
  EXPECT_EQ(*svm_->Scan(m.addr(), m.end()), Residency::kDevice);
}

TEST_F(SvmManagerTest, AccessedByMapsPresentPagesWithoutFaultsOrMigration) {
  MakeDevice(8 * kMiB, false);
  Mapping m = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB);
  ASSERT_EQ(madvise(m.data(), m.size(), MADV_NOHUGEPAGE), 0);  // no THP fills the second half
  Fill(m.data(), kMiB, 14);                                    // the first half is present
  ASSERT_TRUE(svm_->Advise(m.addr(), m.end(), {.accessed_by = true}).ok());
  EXPECT_EQ(ops_.Count(m.addr(), m.addr() + kMiB), kMiB / PageSize());
  EXPECT_EQ(ops_.Count(m.addr() + kMiB, m.end()), 0u) << "absent pages are not faulted in";
  EXPECT_EQ(svm_->stats().device_faults, 0u);
  ASSERT_TRUE(svm_->HandleFault(m.addr() + kMiB, true).ok());
  EXPECT_EQ(svm_->stats().pages_to_device, 0u) << "accessed-by never migrates on fault";
  EXPECT_EQ(svm_->AttributesAt(m.addr()).accessed_by, true);
}

TEST_F(SvmManagerTest, AdviceSplittingARangeEvictsItAndUnmapForgetsTheAdvice) {
  MakeDevice(8 * kMiB, false);
  Mapping m = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB);
  Fill(m.data(), m.size(), 15);
  ASSERT_TRUE(svm_->HandleFault(m.addr(), true).ok());
  ASSERT_EQ(svm_->Ranges().size(), 1u);
  // When advice covers only the second half of the 2 MiB range
  ASSERT_TRUE(svm_->Advise(m.addr() + kMiB, m.end(), {.read_mostly = true}).ok());
  // Then the range is gone (evicted, data intact), and new ranges stay inside one advice run
  EXPECT_TRUE(svm_->Ranges().empty());
  EXPECT_EQ(*svm_->Scan(m.addr(), m.end()), Residency::kSystem);
  ASSERT_TRUE(svm_->HandleFault(m.addr() + kMiB - 4096, false).ok());
  auto ranges = svm_->Ranges();
  ASSERT_EQ(ranges.size(), 1u);
  EXPECT_LE(ranges[0].second, m.addr() + kMiB);
  EXPECT_TRUE(Check(m.data(), m.size(), 15));
  // When the advised memory is unmapped, its advice is forgotten
  const uintptr_t half = m.addr() + kMiB;
  ASSERT_EQ(munmap(reinterpret_cast<void*>(half), kMiB), 0);
  as_->monitor()->Sync();
  EXPECT_FALSE(svm_->AttributesAt(half).read_mostly);
  ASSERT_EQ(munmap(m.data(), kMiB), 0);
  m.Release();
}

TEST_F(SvmManagerTest, AdviceErrors) {
  MakeDevice(2 * kMiB, false);
  Mapping m(4 * PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  EXPECT_EQ(svm_->Advise(m.addr(), m.addr(), {.read_mostly = true}).errno_value(), EINVAL);
  EXPECT_EQ(svm_->Advise(m.addr() + 1, m.end(), {.read_mostly = true}).errno_value(), EINVAL);
  const auto g = reinterpret_cast<uintptr_t>(UnmappedAddress());
  ASSERT_NE(g, 0u);
  Status st = svm_->Advise(g, g + PageSize(), {.read_mostly = true});
  EXPECT_EQ(st.errno_value(), EFAULT);
  EXPECT_NE(st.ToString().find("not mapped"), std::string::npos) << st.ToString();
}

// A driver's own policy: everything remote, nothing promoted.
class RemoteOnlyPolicy final : public driver::SvmPolicy {
 public:
  driver::Placement OnDeviceFault(const driver::SvmFault& f) const override {
    seen_migratable = f.migratable;
    return driver::Placement::kRemote;
  }
  bool PromoteHotRange(const driver::SvmFault&) const override { return false; }
  mutable bool seen_migratable = false;
};

TEST_F(SvmManagerTest, ADriverPolicyReplacesTheDefault) {
  auto policy = std::make_shared<RemoteOnlyPolicy>();
  SvmManager::Options o;
  o.policy = policy;
  MakeDevice(4 * kMiB, false, o);
  Mapping m = Mapping::AlignedAnon(2 * kMiB, 2 * kMiB);
  ASSERT_TRUE(svm_->HandleFault(m.addr(), true).ok());
  EXPECT_TRUE(policy->seen_migratable);
  EXPECT_EQ(svm_->stats().pages_to_device, 0u);
  EXPECT_EQ(hmm_pfn::Kind(ops_.At(m.addr())), PageKind::kSystem);
  ASSERT_TRUE(svm_->HandleAccessCounter(m.addr()).ok());
  EXPECT_EQ(svm_->stats().promotions, 0u);
}

}  // namespace
}  // namespace hmmkit::test
