// Image output without dependencies: an RGB raster, a PNG encoder (stored deflate blocks, our own
// CRC-32 and Adler-32: no zlib), and the checksums themselves (exposed for tests).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace hmmkit::hmmctl {

struct Rgb {
  uint8_t r = 0, g = 0, b = 0;
  bool operator==(const Rgb&) const = default;
};

/// An 8-bit RGB image, row-major, top row first. Drawing outside the image is clipped.
class Raster {
 public:
  Raster(int width, int height, Rgb background);
  int width() const { return width_; }
  int height() const { return height_; }
  void Fill(int x, int y, int w, int h, Rgb c);
  Rgb At(int x, int y) const;
  const std::vector<uint8_t>& pixels() const { return rgb_; }

 private:
  int width_, height_;
  std::vector<uint8_t> rgb_;
};

/// CRC-32 (ISO-HDLC, the one PNG chunks use) of `data`, continuing from `crc` (0 to start).
uint32_t Crc32(std::span<const uint8_t> data, uint32_t crc = 0);
/// Adler-32 (the zlib stream checksum) of `data`, continuing from `adler` (1 to start).
uint32_t Adler32(std::span<const uint8_t> data, uint32_t adler = 1);

/// The PNG file bytes of `image`: colour type 2 (RGB), 8 bits, filter 0 on every row, the zlib
/// stream made of stored blocks, IDAT split into chunks of at most `idat_chunk` bytes.
std::vector<uint8_t> EncodePng(const Raster& image, size_t idat_chunk = size_t(1) << 20);

/// Writes `data` to `path` (replacing it); false with "PATH: strerror" on failure.
bool WriteWholeFile(const std::string& path, std::span<const uint8_t> data, std::string* error);

}  // namespace hmmkit::hmmctl
