// Driver side of MigrateVma with a DeviceMemory and a DMA engine (device_migration.hpp).
#include "hmmkit/driver/device_migration.hpp"

#include <unistd.h>

#include <algorithm>
#include <vector>

#include "hmmkit/mirror/migrate.hpp"

namespace hmmkit::driver {

namespace {

size_t PageSize() {
  static const size_t page = size_t(::sysconf(_SC_PAGESIZE));
  return page;
}

// Gives device pages to the collected entries of m: a whole chunk for each aligned, fully
// collected chunk-sized block, 4 KiB pages for the rest. Stops at the first allocation failure
// (the entries without a destination simply do not move) and returns it.
Status AllocateDestinations(DeviceMemory& mem, MigrateVma& m) {
  const size_t page = PageSize(), n = m.npages, per_chunk = mem.pages_per_chunk();
  auto wanted = [&](size_t i) { return (m.src[i] & migrate_pfn::kMigrate) != 0; };
  for (size_t i = 0; i < n;) {
    const uintptr_t va = m.start + i * page;
    const bool block = (va % (per_chunk * page)) == 0 && i + per_chunk <= n &&
                       std::all_of(m.src.begin() + i, m.src.begin() + i + per_chunk,
                                   [](uint64_t s) { return (s & migrate_pfn::kMigrate) != 0; });
    if (block) {
      auto head = mem.AllocChunk();
      if (head.ok()) {
        // One reference per subpage: each becomes one CPU entry.
        for (size_t k = 0; k < per_chunk; ++k) {
          if (k) mem.GetPage(*head);
          m.dst[i + k] = migrate_pfn::FromDevice(*head + k);
        }
        i += per_chunk;
        continue;
      }
    }
    size_t j = i;
    while (j < n && wanted(j) && (j == i || (m.start + j * page) % (per_chunk * page) != 0)) ++j;
    if (j == i) {
      ++i;
      continue;
    }
    auto ids = mem.AllocPages(j - i);
    if (!ids.ok()) return ids.status();
    for (size_t k = i; k < j; ++k) m.dst[k] = migrate_pfn::FromDevice((*ids)[k - i]);
    i = j;
  }
  return Status::Ok();
}

// One descriptor per run of pages that are contiguous on both sides: a 2 MiB chunk is one copy
// (the engine splits it over its workers), not 512 of them, each with its own checked system
// access. kind(i) is 0 for a page that does not move, else a class a run keeps (copy or fill);
// fn(i, k) gets each maximal run [i, i + k) whose `to` and `from` addresses both advance by a page.
template <class Kind, class To, class From, class Fn>
void ForEachJointRun(size_t n, Kind kind, To to, From from, Fn fn) {
  const size_t page = PageSize();
  for (size_t i = 0; i < n;) {
    const int c = kind(i);
    if (c == 0) {
      ++i;
      continue;
    }
    size_t j = i + 1;
    while (j < n && kind(j) == c && to(j) == to(j - 1) + page && from(j) == from(j - 1) + page) ++j;
    fn(i, j - i);
    i = j;
  }
}

struct Run {
  size_t first = 0, count = 0;  // page indices [first, first + count) of the migration
};

// System -> device copies (zero fills for holes). The pages of a run whose copy failed get their
// device pages back and no destination, so they stay in system memory. Returns the first error.
Status CopyToDevice(DeviceMemory& mem, dma::DmaEngine& dma, MigrateVma& m) {
  const size_t page = PageSize();
  std::vector<dma::Descriptor> batch;
  std::vector<Run> runs;
  auto device = [&](size_t i) {
    return static_cast<char*>(mem.PageData(migrate_pfn::DeviceId(m.dst[i])));
  };
  enum : int { kStays, kCopy, kFill };
  auto kind = [&](size_t i) {
    if (!(m.src[i] & migrate_pfn::kMigrate) || !(m.dst[i] & migrate_pfn::kValid)) return +kStays;
    return (m.src[i] & migrate_pfn::kValid) ? +kCopy : +kFill;
  };
  // A fill has no source: its "source" advances with the destination.
  auto source = [&](size_t i) {
    return kind(i) == kCopy ? static_cast<const char*>(migrate_pfn::SystemAddress(m.src[i]))
                            : static_cast<const char*>(device(i));
  };
  ForEachJointRun(m.npages, kind, device, source, [&](size_t i, size_t k) {
    dma::Endpoint to{device(i), dma::Memory::kDevice};
    batch.push_back(kind(i) == kFill
                        ? dma::Descriptor::Fill(to, 0, k * page)
                        : dma::Descriptor::Copy(
                              to, dma::ConstEndpoint(source(i), dma::Memory::kSystem), k * page));
    runs.push_back({i, k});
  });
  if (batch.empty()) return Status::Ok();
  auto drop = [&](const Run& r) {
    for (size_t i = r.first; i < r.first + r.count; ++i) {
      mem.PutPage(migrate_pfn::DeviceId(m.dst[i]));  // never handed to Finalize
      m.dst[i] = 0;
    }
  };
  auto fence = dma.Submit(batch);
  if (!fence.ok()) {
    for (const Run& r : runs) drop(r);
    return fence.status();
  }
  fence->Wait().IgnoreError();  // per-descriptor results below
  Status first = Status::Ok();
  auto results = fence->results();
  for (size_t k = 0; k < runs.size(); ++k) {
    if (results[k].ok()) continue;
    if (first.ok()) first = results[k];
    drop(runs[k]);
  }
  return first;
}

}  // namespace

Result<DeviceMigrationResult> MigrateToDevice(AddressSpace& as, DeviceMemory& mem,
                                              dma::DmaEngine& dma, uintptr_t start, uintptr_t end) {
  const size_t n = (end - start) / PageSize();
  std::vector<uint64_t> src(n), dst(n);
  MigrateVma m;
  m.start = start;
  m.end = end;
  m.src = src;
  m.dst = dst;
  m.pgmap_owner = mem.owner();
  m.flags = kSelectSystem | kSelectCompound;
  m.dst_pagemap = &mem;
  HMMKIT_RETURN_IF_ERROR(MigrateVmaSetup(as, m));
  DeviceMigrationResult r;
  r.collected = m.cpages;
  const Status allocated = AllocateDestinations(mem, m);
  const Status copied = CopyToDevice(mem, dma, m);
  const Status committed = MigrateVmaPages(m);
  MigrateVmaFinalize(m);
  for (size_t i = 0; i < n; ++i)
    if ((m.src[i] & migrate_pfn::kMigrate) && (m.dst[i] & migrate_pfn::kValid)) ++r.migrated;
  HMMKIT_RETURN_IF_ERROR(allocated);
  HMMKIT_RETURN_IF_ERROR(copied);
  HMMKIT_RETURN_IF_ERROR(committed);
  return r;
}

Result<DeviceMigrationResult> MigrateToSystem(AddressSpace& as, DeviceMemory& mem,
                                              dma::DmaEngine& dma, uintptr_t start, uintptr_t end) {
  const size_t page = PageSize(), n = (end - start) / page;
  std::vector<uint64_t> src(n), dst(n);
  MigrateVma m;
  m.start = start;
  m.end = end;
  m.src = src;
  m.dst = dst;
  m.pgmap_owner = mem.owner();
  m.flags = mem.kind() == PageKind::kDevicePrivate ? kSelectDevicePrivate : kSelectDeviceCoherent;
  m.src_pagemap = &mem;
  HMMKIT_RETURN_IF_ERROR(MigrateVmaSetup(as, m));
  DeviceMigrationResult r;
  r.collected = m.cpages;
  Status st = Status::Ok();
  if (m.cpages > 0) st = MigrateVmaAllocSystemPages(m);
  if (st.ok() && m.cpages > 0) {
    // Staging pages are contiguous; device pages are within a chunk: one copy per joint run.
    std::vector<dma::Descriptor> batch;
    auto device = [&](size_t i) {
      return static_cast<const char*>(mem.PageData(migrate_pfn::DeviceId(m.src[i])));
    };
    auto staging = [&](size_t i) {
      return static_cast<char*>(migrate_pfn::SystemAddress(m.dst[i]));
    };
    ForEachJointRun(
        n, [&](size_t i) { return (m.src[i] & migrate_pfn::kMigrate) ? 1 : 0; }, staging, device,
        [&](size_t i, size_t k) {
          batch.push_back(dma::Descriptor::Copy(dma::Endpoint{staging(i), dma::Memory::kSystem},
                                                dma::ConstEndpoint(device(i), dma::Memory::kDevice),
                                                k * page));
        });
    auto fence = dma.Submit(batch);
    st = fence.ok() ? fence->Wait() : fence.status();
    if (!st.ok()) std::fill(m.dst.begin(), m.dst.end(), 0);  // nothing commits
  }
  if (st.ok()) st = MigrateVmaPages(m);
  MigrateVmaFinalize(m);
  for (size_t i = 0; i < n; ++i)
    if ((m.src[i] & migrate_pfn::kMigrate) && (m.dst[i] & migrate_pfn::kValid)) ++r.migrated;
  HMMKIT_RETURN_IF_ERROR(st);
  return r;
}

}  // namespace hmmkit::driver
