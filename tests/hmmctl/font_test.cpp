// The built-in bitmap font (userlib/hmmctl/font.hpp): every character hmmctl prints has a glyph of
// its own, text lands in its cells without overlap, unknown characters show as a visible box.
#include <gtest/gtest.h>

#include <bit>
#include <set>
#include <string>
#include <string_view>

#include "font.hpp"
#include "image.hpp"

namespace hmmkit::hmmctl {
namespace {

constexpr Rgb kWhite{255, 255, 255};
constexpr Rgb kPen{10, 20, 30};

// The characters the brief of the font promises.
std::string Required() {
  std::string s = " .:-/()%+_=,";  // and x, among the letters
  for (char c = '0'; c <= '9'; ++c) s += c;
  for (char c = 'a'; c <= 'z'; ++c) s += c;
  for (char c = 'A'; c <= 'Z'; ++c) s += c;
  return s;
}

int TableCount(char c) {
  int n = 0;
  for (uint8_t row : GlyphOf(c)) n += std::popcount(unsigned(row));
  return n;
}

int LitIn(const Raster& img, int x0, int y0, int w, int h) {
  int n = 0;
  for (int y = y0; y < y0 + h; ++y)
    for (int x = x0; x < x0 + w; ++x) n += img.At(x, y) == kPen ? 1 : 0;
  return n;
}

TEST(Font, EveryRequiredCharacterHasItsOwnGlyph) {
  std::set<GlyphRows> seen;
  for (char c : Required()) {
    EXPECT_TRUE(HasGlyph(c)) << "'" << c << "'";
    if (c != ' ') {
      EXPECT_GT(TableCount(c), 0) << "'" << c << "'";
    }
    // Only the glyph's 5 columns are used: the sixth is the gap between characters.
    for (uint8_t row : GlyphOf(c)) EXPECT_EQ(row & ~0x1fU, 0U) << "'" << c << "'";
    // No two characters look alike (0 and O, 1 and l, 5 and S are told apart).
    EXPECT_TRUE(seen.insert(GlyphOf(c)).second) << "'" << c << "' repeats another glyph";
  }
}

TEST(Font, EachGlyphLandsInItsOwnCell) {
  // Given a known string drawn at (3, 2) on a blank raster.
  const std::string text = "Hx0.(%)gj:/_mW";
  Raster img(120, 16, kWhite);
  const int end = DrawText(&img, 3, 2, text, kPen);
  // Then the text is as wide as TextWidth says, and each cell holds its glyph's pixels, exactly.
  EXPECT_EQ(end, 3 + TextWidth(text));
  EXPECT_EQ(TextWidth(text), int(text.size()) * kCharAdvance - 1);
  int total = 0;
  for (size_t i = 0; i < text.size(); ++i) {
    const int x = 3 + int(i) * kCharAdvance;
    EXPECT_EQ(LitIn(img, x, 2, kGlyphWidth, kGlyphHeight), TableCount(text[i])) << "'" << text[i];
    // The gap column between two glyphs stays blank: glyphs never touch or overlap.
    EXPECT_EQ(LitIn(img, x + kGlyphWidth, 0, 1, img.height()), 0) << "after '" << text[i] << "'";
    total += TableCount(text[i]);
  }
  // Nothing outside the cells.
  EXPECT_EQ(LitIn(img, 0, 0, img.width(), img.height()), total);
  // And the pixels follow the table's bits: the top-left of 'H' lit, its top middle not.
  EXPECT_EQ(img.At(3, 2), kPen);
  EXPECT_EQ(img.At(5, 2), kWhite);
}

TEST(Font, UnknownCharactersDrawAVisiblePlaceholder) {
  for (char c : {'~', '\x7f', '\x01', char(0xc3)}) {
    EXPECT_FALSE(HasGlyph(c));
    Raster img(10, 12, kWhite);
    DrawText(&img, 1, 1, std::string_view(&c, 1), kPen);
    const int lit = LitIn(img, 0, 0, img.width(), img.height());
    EXPECT_GT(lit, 0) << int(uint8_t(c));
    EXPECT_EQ(lit, TableCount(c));
    // The placeholder is no real character's glyph.
    for (char r : Required()) EXPECT_NE(GlyphOf(c), GlyphOf(r)) << "'" << r << "'";
  }
}

TEST(Font, TextIsClippedAtTheRasterEdges) {
  Raster img(8, 6, kWhite);
  // Half of "AB" hangs off the left, the bottom rows off the bottom: no fault, part drawn.
  DrawText(&img, -4, 1, "AB", kPen);
  const int lit = LitIn(img, 0, 0, img.width(), img.height());
  EXPECT_GT(lit, 0);
  EXPECT_LT(lit, TableCount('A') + TableCount('B'));
  EXPECT_EQ(TextWidth(""), 0);
}

}  // namespace
}  // namespace hmmkit::hmmctl
