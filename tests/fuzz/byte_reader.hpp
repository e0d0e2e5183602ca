// Decodes a fuzzer input into small choices. Reading past the end yields zeros, so every input,
// however short, decodes to a complete (if dull) sequence of operations.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace hmmkit::fuzz {

class ByteReader {
 public:
  ByteReader(const uint8_t* data, size_t size) : data_(data), size_(size) {}

  bool empty() const { return pos_ >= size_; }

  uint8_t U8() { return pos_ < size_ ? data_[pos_++] : 0; }

  uint64_t U64() {
    uint64_t v = 0;
    const size_t n = size_ - pos_ < sizeof(v) ? size_ - pos_ : sizeof(v);
    if (n) std::memcpy(&v, data_ + pos_, n);
    pos_ += n;
    return v;
  }

  // A value in [0, n); 0 when n is 0. As few bytes as n needs (1, 2 or 8): inputs stay short.
  uint64_t Below(uint64_t n) {
    if (n == 0) return 0;
    if (n <= 256) return U8() % n;
    if (n <= 65536) return (U8() | uint64_t{U8()} << 8) % n;
    return U64() % n;
  }

  bool Bool() { return U8() & 1; }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

}  // namespace hmmkit::fuzz
