// The residency heatmap: rows are pages of the traced address clusters (several pages per row when
// there are many; clusters stacked with a separator row between them), columns are time buckets,
// each cell the state most of the row's pages are in at the end of the bucket. Rendered to an RGB
// raster (PNG) or SVG by the same layout and the same labels (title, range addresses, axis times,
// legend names); the PNG draws its text with the built-in bitmap font (font.hpp).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "image.hpp"
#include "residency.hpp"
#include "trace_file.hpp"

namespace hmmkit::hmmctl {

struct HeatmapOptions {
  int width = 800;          // plot width in pixels (2 per time bucket)
  int height = 400;         // plot height in pixels (at least 2 per row)
  bool all_ranges = false;  // false: the (at most 8) clusters with the most migrations
  std::string title;        // first words of the title line; empty: "hmmkit residency[: PROCESS]"
};

inline constexpr uint8_t kSeparatorCell = 0xff;

struct HeatmapRow {
  int cluster = -1;   // -1: separator
  uint64_t addr = 0;  // first page of the row
  uint64_t pages = 0;
};

struct Heatmap {
  int columns = 0;
  std::vector<HeatmapRow> rows;
  std::vector<uint8_t> cells;           // rows x columns: Residency values or kSeparatorCell
  std::vector<uint8_t> thrash;          // rows x columns: 1 where a thrash event touched the row
  std::vector<uint8_t> thrash_columns;  // 1 where any thrash event started in the bucket
  std::vector<Cluster> clusters;
  uint64_t pages_per_row = 1;
  double t0_us = 0, t1_us = 0;
  std::string title;  // HeatmapOptions::title or its default
  uint8_t cell(size_t row, size_t col) const { return cells[row * size_t(columns) + col]; }
};

/// Replays `trace` into a heatmap. False with a message when the trace has no residency events or
/// covers more than kMaxReplayPages pages.
bool BuildHeatmap(const Trace& trace, const HeatmapOptions& options, Heatmap* out,
                  std::string* error);

/// Where things are drawn (pixels; the same for PNG and SVG). Text never enters the plot: the
/// title is above the thrash lane, range labels left of `left`, times below the axis ticks, legend
/// names right of their swatches.
struct HeatmapLayout {
  int title_y = 0;        // top of the title line's text
  int left = 0, top = 0;  // plot origin
  int cell_w = 2, cell_h = 2;
  int plot_w = 0, plot_h = 0;
  int axis_y = 0;        // time axis line; ticks are kTickLength below it
  int tick_label_y = 0;  // top of the axis times' text
  int legend_y = 0;      // legend swatches (kSwatch square)
  int legend_step = 0;   // x distance between legend entries
  int width = 0, height = 0;
};
inline constexpr int kTickLength = 5;
inline constexpr int kSwatch = 12;
HeatmapLayout LayoutHeatmap(const Heatmap& map);

Rgb ResidencyColor(Residency r);
inline constexpr Rgb kThrashColor{220, 30, 30};
inline constexpr Rgb kBackground{255, 255, 255};
inline constexpr Rgb kInk{0, 0, 0};  // axis, ticks, swatch borders
/// The colour of all text: near black, distinct from kInk so tests can tell text from lines.
inline constexpr Rgb kTextColor{32, 32, 32};

/// The heatmap as an RGB raster (for EncodePng), its text drawn with DrawText in kTextColor.
Raster RenderRaster(const Heatmap& map);
/// The heatmap as an SVG document: one rect per run of equal cells in a row.
std::string RenderSvg(const Heatmap& map);

/// Renders to `path` as PNG or SVG by its extension (".png", ".svg"); false with a message.
bool WriteHeatmap(const Heatmap& map, const std::string& path, std::string* error);

}  // namespace hmmkit::hmmctl
