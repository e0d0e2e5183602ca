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

// System -> device copies (zero fills for holes). A page whose copy failed gets its device page
// back and no destination, so it stays in system memory. Returns the first error.
Status CopyToDevice(DeviceMemory& mem, dma::DmaEngine& dma, MigrateVma& m) {
  const size_t page = PageSize();
  std::vector<dma::Descriptor> batch;
  std::vector<size_t> index;
  for (size_t i = 0; i < m.npages; ++i) {
    if (!(m.src[i] & migrate_pfn::kMigrate) || !(m.dst[i] & migrate_pfn::kValid)) continue;
    dma::Endpoint to{mem.PageData(migrate_pfn::DeviceId(m.dst[i])), dma::Memory::kDevice};
    batch.push_back(
        (m.src[i] & migrate_pfn::kValid)
            ? dma::Descriptor::Copy(
                  to,
                  dma::ConstEndpoint(migrate_pfn::SystemAddress(m.src[i]), dma::Memory::kSystem),
                  page)
            : dma::Descriptor::Fill(to, 0, page));
    index.push_back(i);
  }
  if (batch.empty()) return Status::Ok();
  auto drop = [&](size_t i) {
    mem.PutPage(migrate_pfn::DeviceId(m.dst[i]));  // never handed to Finalize
    m.dst[i] = 0;
  };
  auto fence = dma.Submit(batch);
  if (!fence.ok()) {
    for (size_t i : index) drop(i);
    return fence.status();
  }
  fence->Wait().IgnoreError();  // per-descriptor results below
  Status first = Status::Ok();
  auto results = fence->results();
  for (size_t k = 0; k < index.size(); ++k) {
    if (results[k].ok()) continue;
    if (first.ok()) first = results[k];
    drop(index[k]);
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
    std::vector<dma::Descriptor> batch;
    for (size_t i = 0; i < n; ++i) {
      if (!(m.src[i] & migrate_pfn::kMigrate)) continue;
      batch.push_back(dma::Descriptor::Copy(
          dma::Endpoint{migrate_pfn::SystemAddress(m.dst[i]), dma::Memory::kSystem},
          dma::ConstEndpoint(mem.PageData(migrate_pfn::DeviceId(m.src[i])), dma::Memory::kDevice),
          page));
    }
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
