#include "image.hpp"

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdio>
#include <cstring>

namespace hmmkit::hmmctl {

Raster::Raster(int width, int height, Rgb background)
    : width_(std::max(1, width)), height_(std::max(1, height)) {
  rgb_.resize(size_t(width_) * size_t(height_) * 3);
  for (size_t i = 0; i < rgb_.size(); i += 3) {
    rgb_[i] = background.r;
    rgb_[i + 1] = background.g;
    rgb_[i + 2] = background.b;
  }
}

void Raster::Fill(int x, int y, int w, int h, Rgb c) {
  const int x0 = std::max(0, x), y0 = std::max(0, y);
  const int x1 = std::min(width_, x + w), y1 = std::min(height_, y + h);
  for (int yy = y0; yy < y1; ++yy) {
    uint8_t* p = &rgb_[(size_t(yy) * size_t(width_) + size_t(x0)) * 3];
    for (int xx = x0; xx < x1; ++xx, p += 3) {
      p[0] = c.r;
      p[1] = c.g;
      p[2] = c.b;
    }
  }
}

Rgb Raster::At(int x, int y) const {
  if (x < 0 || y < 0 || x >= width_ || y >= height_) return {};
  const uint8_t* p = &rgb_[(size_t(y) * size_t(width_) + size_t(x)) * 3];
  return {p[0], p[1], p[2]};
}

namespace {

constexpr std::array<uint32_t, 256> MakeCrcTable() {
  std::array<uint32_t, 256> t{};
  for (uint32_t n = 0; n < 256; ++n) {
    uint32_t c = n;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xedb88320U ^ (c >> 1) : c >> 1;
    t[n] = c;
  }
  return t;
}
constexpr std::array<uint32_t, 256> kCrcTable = MakeCrcTable();

void Put32(std::vector<uint8_t>* out, uint32_t v) {
  out->push_back(uint8_t(v >> 24));
  out->push_back(uint8_t(v >> 16));
  out->push_back(uint8_t(v >> 8));
  out->push_back(uint8_t(v));
}

void Chunk(std::vector<uint8_t>* out, const char type[4], std::span<const uint8_t> data) {
  Put32(out, uint32_t(data.size()));
  const size_t type_at = out->size();
  out->insert(out->end(), type, type + 4);
  out->insert(out->end(), data.begin(), data.end());
  Put32(out, Crc32(std::span(out->data() + type_at, 4 + data.size())));
}

}  // namespace

uint32_t Crc32(std::span<const uint8_t> data, uint32_t crc) {
  crc = ~crc;
  for (uint8_t b : data) crc = kCrcTable[(crc ^ b) & 0xff] ^ (crc >> 8);
  return ~crc;
}

uint32_t Adler32(std::span<const uint8_t> data, uint32_t adler) {
  constexpr uint32_t kMod = 65521;
  uint32_t a = adler & 0xffff, b = adler >> 16;
  // 5552 bytes is the longest run whose sums cannot overflow 32 bits before the modulo.
  while (!data.empty()) {
    const size_t n = std::min<size_t>(data.size(), 5552);
    for (size_t i = 0; i < n; ++i) {
      a += data[i];
      b += a;
    }
    a %= kMod;
    b %= kMod;
    data = data.subspan(n);
  }
  return (b << 16) | a;
}

std::vector<uint8_t> EncodePng(const Raster& image, size_t idat_chunk) {
  // The raw scanlines: a filter byte (0, none) before each row.
  const size_t row = size_t(image.width()) * 3;
  std::vector<uint8_t> raw;
  raw.reserve((row + 1) * size_t(image.height()));
  for (int y = 0; y < image.height(); ++y) {
    raw.push_back(0);
    const uint8_t* p = image.pixels().data() + size_t(y) * row;
    raw.insert(raw.end(), p, p + row);
  }
  // zlib: CMF 0x78 (deflate, 32K window), FLG 0x01 (check bits: 0x7801 % 31 == 0), stored blocks
  // of at most 65535 bytes (BFINAL on the last, BTYPE 00), then the Adler-32 of the raw data.
  std::vector<uint8_t> z = {0x78, 0x01};
  size_t at = 0;
  do {
    const size_t n = std::min<size_t>(raw.size() - at, 65535);
    const bool last = at + n == raw.size();
    z.push_back(last ? 1 : 0);
    z.push_back(uint8_t(n));
    z.push_back(uint8_t(n >> 8));
    z.push_back(uint8_t(~n));
    z.push_back(uint8_t(~n >> 8));
    z.insert(z.end(), raw.begin() + long(at), raw.begin() + long(at + n));
    at += n;
  } while (at < raw.size());
  Put32(&z, Adler32(raw));

  std::vector<uint8_t> out = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  std::vector<uint8_t> ihdr;
  Put32(&ihdr, uint32_t(image.width()));
  Put32(&ihdr, uint32_t(image.height()));
  ihdr.insert(ihdr.end(), {8, 2, 0, 0, 0});  // depth 8, RGB, deflate, filter 0, no interlace
  Chunk(&out, "IHDR", ihdr);
  idat_chunk = std::max<size_t>(idat_chunk, 1);
  for (size_t off = 0; off < z.size(); off += idat_chunk)
    Chunk(&out, "IDAT", std::span(z).subspan(off, std::min(idat_chunk, z.size() - off)));
  Chunk(&out, "IEND", {});
  return out;
}

bool WriteWholeFile(const std::string& path, std::span<const uint8_t> data, std::string* error) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) {
    *error = path + ": " + std::strerror(errno);
    return false;
  }
  const bool wrote = std::fwrite(data.data(), 1, data.size(), f) == data.size();
  const int err = errno;
  if (std::fclose(f) != 0 || !wrote) {
    *error = path + ": " + std::strerror(wrote ? errno : err);
    return false;
  }
  return true;
}

}  // namespace hmmkit::hmmctl
