// A minimal PNG decoder for the tests, written independently of userlib/hmmctl/image.cpp (bitwise
// CRC and Adler without tables): it checks the signature, every chunk's CRC, the zlib header, the
// stored deflate blocks and the Adler-32, and accepts only what hmmctl writes (8-bit RGB, filter
// 0, stored blocks). Anything else is an error, which is what the tests want to see.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace hmmkit::hmmctl::testing {

struct DecodedPng {
  uint32_t width = 0, height = 0;
  std::vector<uint8_t> rgb;
  int idat_chunks = 0;
  int stored_blocks = 0;
  const uint8_t* At(uint32_t x, uint32_t y) const { return &rgb[(size_t(y) * width + x) * 3]; }
};

inline uint32_t BitwiseCrc(const uint8_t* p, size_t n) {
  uint32_t c = 0xffffffffU;
  for (size_t i = 0; i < n; ++i) {
    c ^= p[i];
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xedb88320U & (0U - (c & 1U)));
  }
  return c ^ 0xffffffffU;
}

inline uint32_t SimpleAdler(const std::vector<uint8_t>& d) {
  uint64_t a = 1, b = 0;
  for (uint8_t x : d) {
    a = (a + x) % 65521;
    b = (b + a) % 65521;
  }
  return uint32_t((b << 16) | a);
}

inline uint32_t Be32(const uint8_t* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | p[3];
}

/// Decodes `png`; returns "" or what is wrong.
inline std::string DecodePng(const std::vector<uint8_t>& png, DecodedPng* out) {
  static const uint8_t kSig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  if (png.size() < 8 || !std::equal(kSig, kSig + 8, png.begin())) return "bad signature";
  size_t at = 8;
  std::vector<uint8_t> z;
  bool ihdr = false, iend = false;
  while (at < png.size()) {
    if (png.size() - at < 12) return "truncated chunk at " + std::to_string(at);
    const uint32_t len = Be32(&png[at]);
    if (png.size() - at - 12 < len) return "chunk length past the end";
    const std::string type(png.begin() + long(at + 4), png.begin() + long(at + 8));
    const uint8_t* data = &png[at + 8];
    if (BitwiseCrc(&png[at + 4], len + 4) != Be32(&png[at + 8 + len]))
      return "bad CRC in chunk " + type;
    if (type == "IHDR") {
      if (len != 13) return "IHDR length";
      out->width = Be32(data);
      out->height = Be32(data + 4);
      if (data[8] != 8 || data[9] != 2 || data[10] || data[11] || data[12])
        return "not 8-bit RGB, deflate, filter 0, no interlace";
      ihdr = true;
    } else if (type == "IDAT") {
      if (!ihdr) return "IDAT before IHDR";
      z.insert(z.end(), data, data + len);
      ++out->idat_chunks;
    } else if (type == "IEND") {
      iend = true;
      at += 12 + len;
      break;
    }
    at += 12 + len;
  }
  if (!iend || at != png.size()) return "no IEND at the end";
  if (z.size() < 6) return "zlib stream too short";
  if ((z[0] & 0x0f) != 8 || ((uint32_t(z[0]) << 8) | z[1]) % 31 != 0) return "bad zlib header";
  if (z[1] & 0x20) return "preset dictionary";
  std::vector<uint8_t> raw;
  size_t p = 2;
  for (bool final = false; !final;) {
    if (p + 5 > z.size()) return "truncated deflate block";
    final = z[p] & 1;
    if (((z[p] >> 1) & 3) != 0) return "not a stored block";
    const uint32_t n = z[p + 1] | (uint32_t(z[p + 2]) << 8);
    const uint32_t nn = z[p + 3] | (uint32_t(z[p + 4]) << 8);
    if ((n ^ 0xffffU) != nn) return "LEN/NLEN mismatch";
    p += 5;
    if (p + n > z.size()) return "stored block past the end";
    raw.insert(raw.end(), z.begin() + long(p), z.begin() + long(p + n));
    p += n;
    ++out->stored_blocks;
  }
  if (p + 4 != z.size()) return "bytes after the Adler-32";
  if (SimpleAdler(raw) != Be32(&z[p])) return "bad Adler-32";
  const size_t row = size_t(out->width) * 3;
  if (raw.size() != (row + 1) * out->height) return "wrong amount of pixel data";
  for (uint32_t y = 0; y < out->height; ++y) {
    if (raw[y * (row + 1)] != 0) return "row filter is not 0";
    out->rgb.insert(out->rgb.end(), raw.begin() + long(y * (row + 1) + 1),
                    raw.begin() + long((y + 1) * (row + 1)));
  }
  return "";
}

}  // namespace hmmkit::hmmctl::testing
