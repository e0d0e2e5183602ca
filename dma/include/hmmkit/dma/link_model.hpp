/// @file
/// LinkModel: the cost of moving bytes between system memory and device memory over a bus.
///
/// A transfer of `len` bytes that crosses system <-> device costs
///     latency + len / bytes_per_second
/// of time on one link shared by the whole engine. The link has a single "busy until" clock:
/// transfers reserve consecutive slots on it, so two workers that copy at the same time take as
/// long as one worker copying both (a real bus is shared the same way). A transfer completes no
/// earlier than the end of its slot. device <-> device and system <-> system transfers never touch
/// the link. See docs/dma.md ("The link model") for how an engine applies it.
///
/// The presets are illustrative round numbers, not measurements of a particular board.
#pragma once

#include <chrono>
#include <cmath>
#include <cstddef>

namespace hmmkit::dma {

struct LinkModel {
  double bytes_per_second = 0;         ///< effective bandwidth; must be finite and > 0
  std::chrono::nanoseconds latency{};  ///< per transfer; must be >= 0

  /// PCIe 4.0 x16: 31.5 GB/s raw, ~25 GB/s effective for large DMA; ~1.5 us per transfer.
  static LinkModel Pcie4x16() { return {25e9, std::chrono::nanoseconds(1500)}; }
  /// PCIe 3.0 x16: 15.75 GB/s raw, ~12 GB/s effective; ~2 us per transfer.
  static LinkModel Pcie3x16() { return {12e9, std::chrono::nanoseconds(2000)}; }

  /// True when the fields describe a usable link.
  bool valid() const {
    return std::isfinite(bytes_per_second) && bytes_per_second > 0 && latency.count() >= 0;
  }
  /// Time the link is busy moving `bytes` (bandwidth part only, rounded up to whole nanoseconds so
  /// that the model is a guaranteed lower bound).
  std::chrono::nanoseconds WireTime(size_t bytes) const {
    return std::chrono::nanoseconds(static_cast<std::chrono::nanoseconds::rep>(
        std::ceil(double(bytes) * 1e9 / bytes_per_second)));
  }
  /// Full modeled cost of one transfer of `bytes`: latency + WireTime(bytes).
  std::chrono::nanoseconds TransferTime(size_t bytes) const { return latency + WireTime(bytes); }
};

}  // namespace hmmkit::dma
