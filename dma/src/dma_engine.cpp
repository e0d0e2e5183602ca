#include "hmmkit/dma/dma_engine.hpp"

#include <fmt/format.h>

#include <cstdint>

namespace hmmkit::dma {

namespace {

bool KnownMemory(Memory m) {
  return m == Memory::kSystem || m == Memory::kDevice;
}

// True when [p, p + len) wraps around the address space.
bool Wraps(const void* p, size_t len) {
  auto a = reinterpret_cast<uintptr_t>(p);
  return a + len < a;
}

Status Invalid(size_t index, std::string_view why) {
  return Status::FromErrno(EINVAL, fmt::format("dma batch: descriptor {}: {}", index, why));
}

}  // namespace

Status ValidateBatch(std::span<const Descriptor> batch) {
  for (size_t i = 0; i < batch.size(); ++i) {
    const Descriptor& d = batch[i];
    if (d.op != Descriptor::Op::kCopy && d.op != Descriptor::Op::kFill) {
      return Invalid(i, fmt::format("unknown op {}", static_cast<unsigned>(d.op)));
    }
    if (d.len == 0) return Invalid(i, "zero length");
    if (!d.dst.ptr) return Invalid(i, "null destination");
    if (!KnownMemory(d.dst.memory)) {
      return Invalid(i, fmt::format("unknown destination memory kind {}",
                                    static_cast<unsigned>(d.dst.memory)));
    }
    if (Wraps(d.dst.ptr, d.len)) {
      return Invalid(i, fmt::format("destination {} + {:#x} wraps around", d.dst.ptr, d.len));
    }
    if (d.op == Descriptor::Op::kFill) continue;
    if (!d.src.ptr) return Invalid(i, "null source");
    if (!KnownMemory(d.src.memory)) {
      return Invalid(
          i, fmt::format("unknown source memory kind {}", static_cast<unsigned>(d.src.memory)));
    }
    if (Wraps(d.src.ptr, d.len)) {
      return Invalid(i, fmt::format("source {} + {:#x} wraps around", d.src.ptr, d.len));
    }
    auto dst = reinterpret_cast<uintptr_t>(d.dst.ptr);
    auto src = reinterpret_cast<uintptr_t>(d.src.ptr);
    if (dst < src + d.len && src < dst + d.len) {
      return Invalid(i, fmt::format("source {} and destination {} overlap ({:#x} bytes)", d.src.ptr,
                                    d.dst.ptr, d.len));
    }
  }
  return Status::Ok();
}

Status DmaEngine::Copy(void* dst, Memory dst_memory, const void* src, Memory src_memory,
                       size_t len) {
  const Descriptor d = Descriptor::Copy({dst, dst_memory}, {src, src_memory}, len);
  Result<Fence> fence = Submit(std::span(&d, 1));
  if (!fence.ok()) return fence.status();
  return fence->Wait();
}

Status DmaEngine::Fill(void* dst, Memory dst_memory, uint8_t byte, size_t len) {
  const Descriptor d = Descriptor::Fill({dst, dst_memory}, byte, len);
  Result<Fence> fence = Submit(std::span(&d, 1));
  if (!fence.ok()) return fence.status();
  return fence->Wait();
}

}  // namespace hmmkit::dma
