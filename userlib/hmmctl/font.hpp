// A tiny bitmap font of our own for the text in the heatmap's PNG: 5 x 9 pixel glyphs (7 rows
// above the baseline, 2 for descenders) on a 6 x 10 pixel cell, for digits, letters and the few
// punctuation marks hmmctl prints. A character without a glyph draws as a hollow box, so a missing
// glyph shows on the picture instead of vanishing. Pure functions: no state, any thread.
#pragma once

#include <array>
#include <cstdint>
#include <string_view>

#include "image.hpp"

namespace hmmkit::hmmctl {

inline constexpr int kGlyphWidth = 5;   ///< lit columns per glyph
inline constexpr int kGlyphHeight = 9;  ///< rows 0-6 above the baseline, 7-8 descenders
inline constexpr int kCharAdvance = 6;  ///< pixels from one character's left edge to the next
inline constexpr int kLineHeight = 10;  ///< pixels from one line's top to the next

/// One glyph: a row per pixel row, top first; bit 4 is the leftmost column, bit 0 the rightmost.
using GlyphRows = std::array<uint8_t, kGlyphHeight>;

/// True when `c` has a glyph of its own (digits, ASCII letters, space and . , : - / ( ) % + _ =).
[[nodiscard]] bool HasGlyph(char c);
/// The glyph of `c`, or the placeholder (a hollow box) when HasGlyph(c) is false.
[[nodiscard]] const GlyphRows& GlyphOf(char c);

/// Width in pixels of `text` on one line: kCharAdvance per character less the trailing gap
/// (0 for the empty string).
[[nodiscard]] int TextWidth(std::string_view text);

/// Draws `text` with its cell's top-left corner at (x, y): the lit pixels of each glyph are set to
/// `color`, the others are left as they are. Pixels outside the raster are clipped. Returns the
/// x just past the text (x + TextWidth(text)).
int DrawText(Raster* image, int x, int y, std::string_view text, Rgb color);

}  // namespace hmmkit::hmmctl
