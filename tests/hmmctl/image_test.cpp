// The PNG writer (decoded by the independent decoder in png_decode.hpp) and the SVG writer; the
// rendered heatmap has the colours the replay says at the pixels of the cells.
#include <gtest/gtest.h>

#include <bit>
#include <cstring>
#include <string>
#include <vector>

#include "font.hpp"
#include "heatmap.hpp"
#include "image.hpp"
#include "png_decode.hpp"
#include "synthetic_trace.hpp"

namespace hmmkit::hmmctl {
namespace {

HeatmapOptions Options(int width, int height) {
  HeatmapOptions o;
  o.width = width;
  o.height = height;
  return o;
}

using testing::DecodedPng;
using testing::DecodePng;
using testing::kPage;
using testing::TraceBuilder;

constexpr uint64_t kA = 0x7f0000000000;

TEST(Checksums, KnownValues) {
  const char* s = "123456789";  // the standard check input
  const std::span<const uint8_t> d(reinterpret_cast<const uint8_t*>(s), 9);
  EXPECT_EQ(Crc32(d), 0xcbf43926U);
  EXPECT_EQ(Adler32(d), 0x091e01deU);
  // Continuing a checksum over two halves gives the one of the whole.
  EXPECT_EQ(Crc32(d.subspan(4), Crc32(d.first(4))), 0xcbf43926U);
  EXPECT_EQ(Adler32(d.subspan(4), Adler32(d.first(4))), 0x091e01deU);
  // Adler-32 over more than 5552 bytes (the deferred modulo).
  std::vector<uint8_t> big(100000, 0xff);
  EXPECT_EQ(Adler32(big), testing::SimpleAdler(big));
}

TEST(PngWriter, DecodesToTheSamePixels) {
  // Given a raster larger than one stored block (65535 bytes) and IDAT chunks of 10000 bytes.
  Raster img(200, 150, {1, 2, 3});
  img.Fill(10, 20, 30, 40, {200, 100, 50});
  img.Fill(-5, 140, 400, 50, {9, 8, 7});  // clipped
  const std::vector<uint8_t> png = EncodePng(img, 10000);
  DecodedPng d;
  ASSERT_EQ(DecodePng(png, &d), "");
  EXPECT_EQ(d.width, 200U);
  EXPECT_EQ(d.height, 150U);
  EXPECT_GT(d.stored_blocks, 1);
  EXPECT_GT(d.idat_chunks, 1);
  EXPECT_EQ(d.rgb, img.pixels());
  EXPECT_EQ(d.At(10, 20)[0], 200);
  EXPECT_EQ(d.At(39, 59)[2], 50);
  EXPECT_EQ(d.At(40, 60)[0], 1);
  EXPECT_EQ(d.At(199, 149)[0], 9);
}

TEST(PngWriter, TheDecoderCatchesCorruption) {
  Raster img(8, 8, {1, 2, 3});
  std::vector<uint8_t> png = EncodePng(img);
  DecodedPng d;
  ASSERT_EQ(DecodePng(png, &d), "");
  std::vector<uint8_t> bad = png;
  bad[60] ^= 1;  // inside IDAT's data
  DecodedPng d2;
  EXPECT_EQ(DecodePng(bad, &d2), "bad CRC in chunk IDAT");
}

Trace ThreeStates() {
  // Pages 0-3 on the device, 4-7 back in system memory after a CPU fault, 8-11 mapped remotely,
  // then pages 0-3 ping-pong (to system at 50 us, to the device at 75 us).
  TraceBuilder b;
  b.Migrate(0, kA, kA + 8 * kPage, "to_device")
      .CpuFault(10, kA + 4 * kPage, kA + 8 * kPage)
      .MapRemote(20, kA + 8 * kPage, kA + 12 * kPage)
      .Migrate(50, kA, kA + 4 * kPage, "to_system", "cpu_fault")
      .Migrate(75, kA, kA + 4 * kPage, "to_device", "fault")
      .Dma(99, 1, 4096);
  Trace t;
  std::string error;
  EXPECT_TRUE(ParseTrace(b.Text(), &t, &error)) << error;
  return t;
}

// The state the replay gives for `addr` at the end of column `col`.
Residency ReplayedState(const Trace& t, const Heatmap& map, size_t col, uint64_t addr) {
  ResidencyReplay r(t, map.clusters);
  r.AdvanceTo(map.t0_us + (map.t1_us - map.t0_us) * double(col + 1) / map.columns);
  return r.StateAt(addr);
}

TEST(HeatmapPng, PixelsHaveTheReplayedColours) {
  const Trace t = ThreeStates();
  Heatmap map;
  std::string error;
  ASSERT_TRUE(BuildHeatmap(t, Options(40, 48), &map, &error)) << error;
  ASSERT_EQ(map.columns, 20);
  ASSERT_EQ(map.pages_per_row, 1U);
  DecodedPng d;
  ASSERT_EQ(DecodePng(EncodePng(RenderRaster(map)), &d), "");
  const HeatmapLayout l = LayoutHeatmap(map);
  ASSERT_EQ(d.width, uint32_t(l.width));
  ASSERT_EQ(d.height, uint32_t(l.height));
  auto pixel = [&](size_t row, size_t col) {
    // Bottom-right pixel of the cell: away from the thrash marks at the top.
    const uint8_t* p = d.At(uint32_t(l.left + int(col) * l.cell_w + l.cell_w - 1),
                            uint32_t(l.top + int(row) * l.cell_h + l.cell_h - 1));
    return Rgb{p[0], p[1], p[2]};
  };
  int checked[kResidencyCount] = {};
  for (size_t col : {2U, 8U, 12U, 19U}) {
    for (size_t row : {0U, 3U, 4U, 7U, 8U, 11U}) {
      const Residency want = ReplayedState(t, map, col, kA + row * kPage);
      EXPECT_EQ(pixel(row, col), ResidencyColor(want)) << "row " << row << " column " << col;
      ++checked[int(want)];
    }
  }
  // The checks cover all three states (and the ping-pong: row 0 is system at column 12).
  EXPECT_GT(checked[int(Residency::kDevice)], 0);
  EXPECT_GT(checked[int(Residency::kSystem)], 0);
  EXPECT_GT(checked[int(Residency::kRemote)], 0);
  EXPECT_EQ(ReplayedState(t, map, 12, kA), Residency::kSystem);
  EXPECT_EQ(pixel(0, 12), ResidencyColor(Residency::kSystem));
  EXPECT_EQ(pixel(0, 19), ResidencyColor(Residency::kDevice));
  // The legend's swatches carry the state colours.
  const uint8_t* sw = d.At(uint32_t(l.left + 2 * l.legend_step + 5), uint32_t(l.legend_y + 5));
  EXPECT_EQ((Rgb{sw[0], sw[1], sw[2]}), ResidencyColor(Residency::kDevice));
}

// Pixels of the text colour in [x0, x0 + w) x [y0, y0 + h) of a decoded PNG (clipped).
int TextPixels(const DecodedPng& d, int x0, int y0, int w, int h) {
  int n = 0;
  for (int y = std::max(0, y0); y < std::min(int(d.height), y0 + h); ++y)
    for (int x = std::max(0, x0); x < std::min(int(d.width), x0 + w); ++x) {
      const uint8_t* p = d.At(uint32_t(x), uint32_t(y));
      n += Rgb{p[0], p[1], p[2]} == kTextColor ? 1 : 0;
    }
  return n;
}

int GlyphPixels(std::string_view text) {
  int n = 0;
  for (char c : text)
    for (uint8_t row : GlyphOf(c)) n += std::popcount(unsigned(row));
  return n;
}

TEST(HeatmapPng, LabelsAreDrawnOutsideThePlot) {
  // Given the heatmap of a trace written to a PNG file and read back with the test's decoder.
  const Trace t = ThreeStates();
  Heatmap map;
  std::string error;
  ASSERT_TRUE(BuildHeatmap(t, Options(800, 48), &map, &error)) << error;
  const std::string path = ::testing::TempDir() + "/hmmctl_labels.png";
  ASSERT_TRUE(WriteHeatmap(map, path, &error)) << error;
  FILE* f = std::fopen(path.c_str(), "rb");
  ASSERT_NE(f, nullptr);
  std::vector<uint8_t> png;
  for (int c; (c = std::fgetc(f)) != EOF;) png.push_back(uint8_t(c));
  std::fclose(f);
  std::remove(path.c_str());
  DecodedPng d;
  ASSERT_EQ(DecodePng(png, &d), "");
  const HeatmapLayout l = LayoutHeatmap(map);
  ASSERT_EQ(d.width, uint32_t(l.width));

  // Then right of each legend swatch is its name, pixel for pixel the glyphs of the name.
  const char* names[] = {"untouched", "system", "device", "remote", "unmapped", "thrash"};
  for (int i = 0; i <= kResidencyCount; ++i) {
    const int x = l.left + i * l.legend_step;
    EXPECT_EQ(TextPixels(d, x, l.legend_y - 2, kSwatch, kSwatch + 4), 0) << names[i];
    EXPECT_EQ(TextPixels(d, x + kSwatch, l.legend_y - 2, l.legend_step - kSwatch, kSwatch + 4),
              GlyphPixels(names[i]))
        << names[i];
  }
  // Under every one of the 11 axis ticks is a time (an 800-pixel plot has room for all).
  for (int i = 0; i <= 10; ++i) {
    const int x = l.left + std::min(l.plot_w - 1, l.plot_w * i / 10);
    EXPECT_GT(TextPixels(d, x - 3, l.tick_label_y, 7, kLineHeight), 0) << "tick " << i;
  }
  EXPECT_EQ(TextPixels(d, l.left, l.axis_y, l.plot_w, kTickLength), 0);  // not on the axis
  // Left of the first row, right-aligned at the plot: the range's start address.
  EXPECT_GT(TextPixels(d, l.left - 4 - TextWidth("0x7f0000000000"), l.top, TextWidth("0x7f"),
                       kLineHeight),
            0);
  EXPECT_EQ(TextPixels(d, l.left - 3, l.top, 3, l.plot_h), 0);  // the gap before the plot
  // The title line above the thrash lane.
  EXPECT_GT(TextPixels(d, 0, 0, l.width, l.top - 8), 0);
  // And none inside the plot: the cells keep their colours.
  EXPECT_EQ(TextPixels(d, l.left, l.top, l.plot_w, l.plot_h), 0);
}

TEST(HeatmapPng, ANarrowPlotLabelsTheEndOfTheAxisWithoutOverlap) {
  // Given a 40-pixel plot: no room for 11 times (4 pixels apart).
  const Trace t = ThreeStates();
  Heatmap map;
  std::string error;
  ASSERT_TRUE(BuildHeatmap(t, Options(40, 48), &map, &error)) << error;
  DecodedPng d;
  ASSERT_EQ(DecodePng(EncodePng(RenderRaster(map)), &d), "");
  const HeatmapLayout l = LayoutHeatmap(map);
  // Then the start and the end of the span are labelled and the times between, which would
  // overlap them, are left out: the band holds exactly the glyph pixels of the two.
  EXPECT_GT(TextPixels(d, l.left + l.plot_w - 4, l.tick_label_y, 7, kLineHeight), 0);
  char end[32];
  std::snprintf(end, sizeof(end), "%.3g ms", (map.t1_us - map.t0_us) / 1000);
  EXPECT_EQ(TextPixels(d, 0, l.tick_label_y, l.width, kLineHeight),
            GlyphPixels("0 ms") + GlyphPixels(end))
      << end;
}

// Checks that tags nest: every open tag is closed in order; returns "" or the problem.
std::string CheckBalanced(const std::string& svg, std::string* root) {
  std::vector<std::string> stack;
  size_t at = 0;
  while ((at = svg.find('<', at)) != std::string::npos) {
    const size_t end = svg.find('>', at);
    if (end == std::string::npos) return "unterminated tag";
    const std::string tag = svg.substr(at + 1, end - at - 1);
    at = end + 1;
    if (tag.empty()) return "empty tag";
    if (tag[0] == '?' || tag[0] == '!') continue;
    if (tag[0] == '/') {
      if (stack.empty() || stack.back() != tag.substr(1)) return "unbalanced </" + tag;
      stack.pop_back();
      continue;
    }
    const std::string name = tag.substr(0, tag.find_first_of(" \n/"));
    if (stack.empty() && root->empty()) *root = name;
    if (tag.back() != '/') stack.push_back(name);
  }
  return stack.empty() ? "" : "unclosed <" + stack.back() + ">";
}

TEST(HeatmapSvg, WellFormedWithMergedRects) {
  const Trace t = ThreeStates();
  Heatmap map;
  std::string error;
  ASSERT_TRUE(BuildHeatmap(t, Options(400, 48), &map, &error)) << error;
  const std::string svg = RenderSvg(map);
  std::string root;
  EXPECT_EQ(CheckBalanced(svg, &root), "");
  EXPECT_EQ(root, "svg");
  auto hex = [](Rgb c) {
    char buf[8];
    std::snprintf(buf, sizeof(buf), "#%02x%02x%02x", c.r, c.g, c.b);
    return std::string(buf);
  };
  for (Residency r : {Residency::kDevice, Residency::kSystem, Residency::kRemote})
    EXPECT_NE(svg.find("fill=\"" + hex(ResidencyColor(r)) + "\""), std::string::npos)
        << ToString(r);
  // Runs of equal cells are merged: far fewer rects than cells (12 rows x 200 columns).
  size_t rects = 0;
  for (size_t at = 0; (at = svg.find("<rect", at)) != std::string::npos; ++at) ++rects;
  EXPECT_LT(rects, 100U);
  EXPECT_NE(svg.find("0x7f0000000000"), std::string::npos);  // the cluster label
  EXPECT_NE(svg.find(">device</text>"), std::string::npos);  // the legend
}

TEST(HeatmapSvg, TitleIsEscapedAndPlacedLikeThePng) {
  const Trace t = ThreeStates();
  HeatmapOptions o = Options(400, 48);
  o.title = "a<b & c>";
  Heatmap map;
  std::string error;
  ASSERT_TRUE(BuildHeatmap(t, o, &map, &error)) << error;
  const std::string svg = RenderSvg(map);
  std::string root;
  EXPECT_EQ(CheckBalanced(svg, &root), "");
  EXPECT_NE(svg.find(">a&lt;b &amp; c&gt; - 12 rows, 1 page per row"), std::string::npos);
  // The default title names the traced process.
  ASSERT_TRUE(BuildHeatmap(t, Options(400, 48), &map, &error)) << error;
  EXPECT_EQ(map.title, "hmmkit residency: hmmkit synthetic");
}

}  // namespace
}  // namespace hmmkit::hmmctl
