// A device page map in miniature for mirror/ tests: a memfd arena of `pages` pages, refcounts, a
// free list. The real one is driver/device_memory.hpp.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include <gtest/gtest.h>

#include "hmmkit/mirror/device_pages.hpp"
#include "hmmkit/mirror/migrate.hpp"
#include "test_support.hpp"

namespace hmmkit::test {

class TestPagemap : public DevicePagemap {
 public:
  // Pages still mapped in `as` when the pagemap dies are migrated back first (the pgmap lifetime
  // rule); `as` must outlive the pagemap.
  TestPagemap(size_t pages, PageKind kind, const void* owner, AddressSpace* as = nullptr)
      : as_(as), kind_(kind), owner_(owner), refs_(pages) {
    page_ = size_t(sysconf(_SC_PAGESIZE));
    fd_ = memfd_create("hmmkit-test-pagemap", MFD_CLOEXEC);
    EXPECT_GE(fd_, 0);
    EXPECT_EQ(ftruncate(fd_, off_t(pages * page_)), 0);
    base_ = static_cast<char*>(
        mmap(nullptr, pages * page_, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0));
    EXPECT_NE(base_, MAP_FAILED);
    for (size_t i = pages; i > 0; --i) free_.push_back(i - 1);
    size_ = pages;
  }
  ~TestPagemap() override {
    if (as_) {
      EXPECT_TRUE(MigrateAllToRam(*as_, *this).ok());
      // The pgmap lifetime rule: also wait for references still being dropped. A fault-back's
      // Finalize puts its pages after the faulting thread may already have run on (and the test
      // ended). Bounded: a test may keep pages allocated on purpose.
      std::unique_lock<std::mutex> l(mu_);
      freed_cv_.wait_for(l, std::chrono::seconds(5), [&] { return free_.size() == size_; });
    }
    munmap(base_, size_ * page_);
    close(fd_);
  }

  const void* owner() const override { return owner_; }
  PageKind kind() const override { return kind_; }
  void GetPage(uint64_t id) override { refs_[id].fetch_add(1); }
  void PutPage(uint64_t id) override {
    if (refs_[id].fetch_sub(1) == 1) {
      std::lock_guard<std::mutex> l(mu_);
      free_.push_back(id);
      frees++;
      freed_cv_.notify_all();  // under mu_: the destructor may free the cv once it sees this
    }
  }
  void* PageData(uint64_t id) override { return base_ + id * page_; }
  int ArenaFd() const override { return kind_ == PageKind::kDeviceCoherent ? fd_ : -1; }
  uint64_t ArenaOffset(uint64_t id) const override { return id * page_; }
  Status CopyToRam(std::span<const uint64_t> ids, std::span<void* const> dst) override {
    copies_to_ram += ids.size();
    return DevicePagemap::CopyToRam(ids, dst);
  }

  // A page with one reference, or -1 when full. Consecutive calls give consecutive ids while the
  // free list allows.
  int64_t Alloc() {
    std::lock_guard<std::mutex> l(mu_);
    if (free_.empty()) return -1;
    uint64_t id = free_.back();
    free_.pop_back();
    refs_[id].store(1);
    return int64_t(id);
  }
  size_t in_use() {
    std::lock_guard<std::mutex> l(mu_);
    return size_ - free_.size();
  }
  int refs(uint64_t id) const { return refs_[id].load(); }

  std::atomic<size_t> frees{0};
  std::atomic<size_t> copies_to_ram{0};

 private:
  AddressSpace* as_;
  PageKind kind_;
  const void* owner_;
  size_t page_ = 4096;
  size_t size_ = 0;
  int fd_ = -1;
  char* base_ = nullptr;
  std::vector<std::atomic<int>> refs_;
  std::mutex mu_;
  std::condition_variable freed_cv_;
  std::vector<uint64_t> free_;
};

// Migrates [start, end) of one VMA to `pm` (copying with memcpy), the way a driver does.
inline Status MigrateVmaToDevice(AddressSpace& as, TestPagemap& pm, uintptr_t start, uintptr_t end,
                                 size_t* cpages) {
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  const size_t n = (end - start) / page;
  std::vector<uint64_t> src(n), dst(n);
  MigrateVma m;
  m.start = start;
  m.end = end;
  m.src = src;
  m.dst = dst;
  m.pgmap_owner = pm.owner();
  m.flags = kSelectSystem;
  m.dst_pagemap = &pm;
  HMMKIT_RETURN_IF_ERROR(MigrateVmaSetup(as, m));
  if (cpages) *cpages += m.cpages;
  for (size_t i = 0; i < n; ++i) {
    if (!(m.src[i] & migrate_pfn::kMigrate)) continue;
    int64_t id = pm.Alloc();
    if (id < 0) continue;
    void* to = pm.PageData(uint64_t(id));
    if (!(m.src[i] & migrate_pfn::kValid)) {
      std::memset(to, 0, page);
    } else if (!CopyWriteProtectedPage(to, migrate_pfn::SystemAddress(m.src[i]), page)) {
      pm.PutPage(uint64_t(id));  // unmapped meanwhile: the page stays (and goes with its VMA)
      continue;
    }
    m.dst[i] = migrate_pfn::FromDevice(uint64_t(id));
  }
  Status st = MigrateVmaPages(m);
  MigrateVmaFinalize(m);
  return st;
}

// The same over every VMA in [start, end) (a coherent round trip leaves the range in several
// VMAs). *cpages receives the total collected.
inline Status MigrateToDevice(AddressSpace& as, TestPagemap& pm, uintptr_t start, uintptr_t end,
                              size_t* cpages = nullptr) {
  if (cpages) *cpages = 0;
  auto vmas = as.FindVmas(start, end);
  if (!vmas.ok()) return vmas.status();
  for (const Vma& v : *vmas)
    HMMKIT_RETURN_IF_ERROR(
        MigrateVmaToDevice(as, pm, std::max(v.start, start), std::min(v.end, end), cpages));
  return Status::Ok();
}

}  // namespace hmmkit::test
