#include "vulkan_batch.hpp"

#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <string>
#include <utility>

#include "host_probe.hpp"

namespace hmmkit::dma::vulkan_detail {

namespace {

uintptr_t AlignDown(uintptr_t v, size_t a) {
  return v & ~(uintptr_t(a) - 1);
}
uintptr_t AlignUp(uintptr_t v, size_t a) {
  return AlignDown(v + a - 1, a);
}

std::string ErrnoName(int err) {
  const char* name = strerrorname_np(err);
  return name ? name : std::to_string(err);
}

std::string OpText(const Descriptor& d) {
  return d.op == Descriptor::Op::kCopy
             ? fmt::format("copy of {:#x} bytes {} -> {}", d.len, d.src.ptr, d.dst.ptr)
             : fmt::format("fill of {:#x} bytes at {}", d.len, d.dst.ptr);
}

// The error of a descriptor whose system range failed the probe at `fault.addr`.
Status ProbeFailure(const ProbeFault& fault, size_t index, bool source, const Descriptor& d) {
  return Status::FromErrno(
      fault.err,
      fmt::format("descriptor {}: system {} {} is not {} ({}); {}", index,
                  source ? "source" : "destination", reinterpret_cast<const void*>(fault.addr),
                  source ? "readable" : "writable", ErrnoName(fault.err), OpText(d)));
}

// Checks one host side of descriptor `index` (see host_probe.hpp). Only kSystem memory is probed:
// kDevice memory outside the engine's allocations is trusted to be mapped, as the DmaEngine
// interface promises (CpuDmaEngine memcpy's it unchecked as well).
Status ProbeSide(const PrepareContext& ctx, const Side& side, Memory tag, bool write, size_t index,
                 const Descriptor& d) {
  if (side.device || tag != Memory::kSystem) return Status::Ok();
  if (auto fault = ProbeHostRange(ctx.vm, side.addr, d.len, write, ctx.populate)) {
    return ProbeFailure(*fault, index, !write, d);
  }
  // When the import alignment is larger than a page, the import window reaches pages outside the
  // range; the driver pins (or lavapipe reads) whole windows, so those must be readable too.
  static const size_t page = size_t(sysconf(_SC_PAGESIZE));
  const size_t align = ctx.core.info().import_alignment;
  if (align <= page) return Status::Ok();
  const uintptr_t end = side.addr + d.len;
  const std::pair<uintptr_t, uintptr_t> around[] = {
      {AlignDown(side.addr, align), AlignDown(side.addr, page)},
      {AlignUp(end, page), AlignUp(end, align)}};
  for (auto [from, to] : around) {
    if (from >= to) continue;
    if (auto fault = ProbeHostRange(ctx.vm, from, to - from, false, ctx.populate)) {
      return Status::FromErrno(
          fault->err,
          fmt::format("descriptor {}: page {} next to the system {} is not readable ({}), but the "
                      "driver imports whole {:#x}-byte aligned windows; {}",
                      index, reinterpret_cast<const void*>(fault->addr),
                      write ? "destination" : "source", ErrnoName(fault->err), align, OpText(d)));
    }
  }
  return Status::Ok();
}

void Barrier(const vk::DeviceFns& fn, VkCommandBuffer cmd, VkPipelineStageFlags src_stage,
             VkAccessFlags src_access, VkPipelineStageFlags dst_stage, VkAccessFlags dst_access) {
  auto barrier = vk::Make<VkMemoryBarrier>(VK_STRUCTURE_TYPE_MEMORY_BARRIER);
  barrier.srcAccessMask = src_access;
  barrier.dstAccessMask = dst_access;
  fn.CmdPipelineBarrier(cmd, src_stage, dst_stage, 0, 1, &barrier, 0, nullptr, 0, nullptr);
}

// vkCmdFillBuffer writes whole aligned words only: the 0..3 bytes before and after the aligned
// middle are copied from the pattern buffer (a fill without an aligned word is at most 6 bytes,
// which fits in one pattern slot).
void RecordFill(const vk::DeviceFns& fn, VkCommandBuffer cmd, VkBuffer pattern, uint8_t byte,
                VkBuffer dst, VkDeviceSize offset, VkDeviceSize len) {
  auto edge = [&](VkDeviceSize at, VkDeviceSize n) {
    const VkBufferCopy region{VkDeviceSize(byte) * kPatternSlot, at, n};
    fn.CmdCopyBuffer(cmd, pattern, dst, 1, &region);
  };
  const VkDeviceSize end = offset + len;
  const VkDeviceSize first_word = (offset + 3) & ~VkDeviceSize(3);
  const VkDeviceSize last_word = end & ~VkDeviceSize(3);
  if (first_word >= last_word) {
    edge(offset, len);
    return;
  }
  if (first_word > offset) edge(offset, first_word - offset);
  fn.CmdFillBuffer(cmd, dst, first_word, last_word - first_word, uint32_t(byte) * 0x01010101u);
  if (end > last_word) edge(last_word, end - last_word);
}

}  // namespace

Status ResolveEndpoints(const Core& core, std::span<const Descriptor> descs, Batch& batch) {
  for (size_t i = 0; i < descs.size(); ++i) {
    const Descriptor& d = descs[i];
    auto resolve = [&](const void* ptr, Side& side, const char* which) {
      side.addr = reinterpret_cast<uintptr_t>(ptr);
      Core::Lookup found = core.Find(side.addr, d.len);
      if (found.crosses) {
        return Status::FromErrno(
            EINVAL, fmt::format("dma batch: descriptor {}: {} {} + {:#x} crosses the boundary of "
                                "a Vulkan device allocation",
                                i, which, ptr, d.len));
      }
      if (found.record) {
        side.device = found.record.get();
        batch.device.push_back(std::move(found.record));
      }
      return Status::Ok();
    };
    HMMKIT_RETURN_IF_ERROR(resolve(d.dst.ptr, batch.dst[i], "destination"));
    if (d.op == Descriptor::Op::kCopy) {
      HMMKIT_RETURN_IF_ERROR(resolve(d.src.ptr, batch.src[i], "source"));
    }
  }
  return Status::Ok();
}

std::vector<Piece> ProbeAndImport(const PrepareContext& ctx, std::span<const Descriptor> descs,
                                  Batch& batch) {
  // 1. Probe host ranges: a bad one fails its descriptor only.
  for (size_t i = 0; i < descs.size(); ++i) {
    const Descriptor& d = descs[i];
    Status st;
    if (d.op == Descriptor::Op::kCopy) st = ProbeSide(ctx, batch.src[i], d.src.memory, false, i, d);
    if (st.ok()) st = ProbeSide(ctx, batch.dst[i], d.dst.memory, true, i, d);
    batch.results[i] = std::move(st);
  }

  // 2. Split the surviving descriptors into pieces; place their device sides.
  std::vector<Piece> pieces;
  for (size_t i = 0; i < descs.size(); ++i) {
    if (!batch.results[i].ok()) continue;
    for (size_t off = 0; off < descs[i].len; off += ctx.piece_bytes) {
      Piece p;
      p.index = i;
      p.offset = off;
      p.len = std::min(ctx.piece_bytes, descs[i].len - off);
      if (const DeviceMemoryRecord* dev = batch.dst[i].device) {
        p.dst_buffer = dev->bound.buffer;
        p.dst_offset = batch.dst[i].addr + off - dev->addr;
      }
      if (const DeviceMemoryRecord* dev = batch.src[i].device) {
        p.src_buffer = dev->bound.buffer;
        p.src_offset = batch.src[i].addr + off - dev->addr;
      }
      pieces.push_back(p);
    }
  }

  // 3. The import window of every host side: its range rounded out to the import alignment.
  struct Window {
    uintptr_t start, end;
    size_t piece;
    bool src;
  };
  const size_t align = ctx.core.info().import_alignment;
  std::vector<Window> windows;
  for (size_t k = 0; k < pieces.size(); ++k) {
    const Piece& p = pieces[k];
    const Descriptor& d = descs[p.index];
    if (!batch.dst[p.index].device) {
      const uintptr_t a = batch.dst[p.index].addr + p.offset;
      windows.push_back({AlignDown(a, align), AlignUp(a + p.len, align), k, false});
    }
    if (d.op == Descriptor::Op::kCopy && !batch.src[p.index].device) {
      const uintptr_t a = batch.src[p.index].addr + p.offset;
      windows.push_back({AlignDown(a, align), AlignUp(a + p.len, align), k, true});
    }
  }
  std::sort(windows.begin(), windows.end(), [](const Window& x, const Window& y) {
    return x.start != y.start ? x.start < y.start : x.end < y.end;
  });

  // 4. Merge overlapping or adjacent windows up to max_import_bytes and import each run once. When
  // a merged run is refused (a real driver may refuse a range spanning two mappings), import its
  // windows one by one, so that only descriptors whose own range is refused fail.
  auto place = [&](const Window& w, VkBuffer buffer, uintptr_t base) {
    Piece& p = pieces[w.piece];
    if (w.src) {
      p.src_buffer = buffer;
      p.src_offset = batch.src[p.index].addr + p.offset - base;
    } else {
      p.dst_buffer = buffer;
      p.dst_offset = batch.dst[p.index].addr + p.offset - base;
    }
  };
  auto import = [&](uintptr_t start, uintptr_t end) -> Result<VkBuffer> {
    Result<BoundBuffer> bound = ctx.core.ImportHost(start, end - start);
    if (!bound.ok()) return bound.status();
    batch.imports.push_back(*bound);
    return bound->buffer;
  };
  auto fail = [&](const Window& w, const Status& st) {
    const size_t i = pieces[w.piece].index;
    if (!batch.results[i].ok()) return;
    batch.results[i] = Status::FromErrno(
        st.errno_value(), fmt::format("descriptor {}: import of the system {} window {:#x}-{:#x} "
                                      "failed: {}; {}",
                                      i, w.src ? "source" : "destination", w.start, w.end,
                                      st.message(), OpText(descs[i])));
  };
  const size_t max_import = ctx.core.info().max_import_bytes;
  for (size_t a = 0; a < windows.size();) {
    uintptr_t start = windows[a].start, end = windows[a].end;
    size_t b = a + 1;
    while (b < windows.size() && windows[b].start <= end &&
           std::max(end, windows[b].end) - start <= max_import) {
      end = std::max(end, windows[b].end);
      ++b;
    }
    Result<VkBuffer> merged = import(start, end);
    for (size_t k = a; k < b; ++k) {
      if (merged.ok()) {
        place(windows[k], *merged, start);
        continue;
      }
      Result<VkBuffer> one = b - a == 1 ? merged : import(windows[k].start, windows[k].end);
      if (one.ok()) {
        place(windows[k], *one, windows[k].start);
      } else {
        fail(windows[k], one.status());
      }
    }
    a = b;
  }

  // 5. Pieces of descriptors that failed an import are not recorded.
  std::erase_if(pieces, [&](const Piece& p) { return !batch.results[p.index].ok(); });
  return pieces;
}

Status Record(const PrepareContext& ctx, std::span<const Descriptor> descs,
              std::span<const Piece> pieces, const Batch& batch) {
  const vk::DeviceFns& fn = ctx.core.fn();
  VkCommandBuffer cmd = batch.context->cmd;
  auto begin = vk::Make<VkCommandBufferBeginInfo>(VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO);
  begin.flags = VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT;
  VkResult r = fn.BeginCommandBuffer(cmd, &begin);
  if (r != VK_SUCCESS) return vk::Failed("vkBeginCommandBuffer", r);
  // Earlier batches' transfers (in submission order on this queue) before this batch's.
  Barrier(fn, cmd, VK_PIPELINE_STAGE_TRANSFER_BIT, VK_ACCESS_TRANSFER_WRITE_BIT,
          VK_PIPELINE_STAGE_TRANSFER_BIT,
          VK_ACCESS_TRANSFER_READ_BIT | VK_ACCESS_TRANSFER_WRITE_BIT);
  for (const Piece& p : pieces) {
    const Descriptor& d = descs[p.index];
    if (d.op == Descriptor::Op::kCopy) {
      const VkBufferCopy region{p.src_offset, p.dst_offset, p.len};
      fn.CmdCopyBuffer(cmd, p.src_buffer, p.dst_buffer, 1, &region);
    } else {
      RecordFill(fn, cmd, ctx.pattern, d.fill, p.dst_buffer, p.dst_offset, p.len);
    }
  }
  // This batch's writes made visible to the host, which reads them after the timeline wait.
  Barrier(fn, cmd, VK_PIPELINE_STAGE_TRANSFER_BIT, VK_ACCESS_TRANSFER_WRITE_BIT,
          VK_PIPELINE_STAGE_HOST_BIT, VK_ACCESS_HOST_READ_BIT | VK_ACCESS_HOST_WRITE_BIT);
  r = fn.EndCommandBuffer(cmd);
  if (r != VK_SUCCESS) return vk::Failed("vkEndCommandBuffer", r);
  return Status::Ok();
}

}  // namespace hmmkit::dma::vulkan_detail
