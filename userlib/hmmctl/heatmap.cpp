#include "heatmap.hpp"

#include <algorithm>
#include <array>
#include <cinttypes>
#include <cstdio>
#include <limits>

#include "font.hpp"

namespace hmmkit::hmmctl {
namespace {

constexpr int kMaxAutoClusters = 8;
constexpr uint64_t kClusterGapPages = 16;
constexpr int kThrashLane = 6;  // pixels above the plot where thrash events are ticked

// Ties go to the more interesting state.
constexpr std::array<Residency, kResidencyCount> kPriority = {
    Residency::kDevice, Residency::kRemote, Residency::kSystem, Residency::kUnmapped,
    Residency::kUntouched};

std::string Hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "0x%" PRIx64, v);
  return buf;
}

std::string ColorHex(Rgb c) {
  char buf[8];
  std::snprintf(buf, sizeof(buf), "#%02x%02x%02x", c.r, c.g, c.b);
  return buf;
}

std::string Size(uint64_t bytes) {
  char buf[32];
  if (bytes >= (uint64_t(1) << 30))
    std::snprintf(buf, sizeof(buf), "%.1f GiB", double(bytes) / double(1 << 30));
  else if (bytes >= (uint64_t(1) << 20))
    std::snprintf(buf, sizeof(buf), "%.1f MiB", double(bytes) / double(1 << 20));
  else
    std::snprintf(buf, sizeof(buf), "%" PRIu64 " KiB", bytes >> 10);
  return buf;
}

std::string XmlEscaped(const std::string& text) {
  std::string out;
  for (char c : text) {
    if (c == '<')
      out += "&lt;";
    else if (c == '>')
      out += "&gt;";
    else if (c == '&')
      out += "&amp;";
    else
      out += c;
  }
  return out;
}

std::string Ms(double us) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.3g ms", us / 1000.0);
  return buf;
}

}  // namespace

Rgb ResidencyColor(Residency r) {
  switch (r) {
    case Residency::kUntouched:
      return {230, 230, 230};
    case Residency::kSystem:
      return {60, 110, 220};
    case Residency::kDevice:
      return {30, 165, 70};
    case Residency::kRemote:
      return {245, 160, 20};
    case Residency::kUnmapped:
      return {80, 80, 80};
  }
  return kInk;
}

bool BuildHeatmap(const Trace& trace, const HeatmapOptions& options, Heatmap* out,
                  std::string* error) {
  *out = Heatmap();
  std::vector<Cluster> clusters = FindClusters(trace, kClusterGapPages * trace.page_size);
  if (clusters.empty()) {
    *error = "the trace has no residency events (cpu_fault, migrate, map_remote, evict)";
    return false;
  }
  if (!options.all_ranges && clusters.size() > size_t(kMaxAutoClusters)) {
    std::vector<Cluster> by_moves = clusters;
    std::stable_sort(by_moves.begin(), by_moves.end(), [](const Cluster& a, const Cluster& b) {
      return a.migrations != b.migrations ? a.migrations > b.migrations : a.events > b.events;
    });
    by_moves.resize(size_t(kMaxAutoClusters));
    std::sort(by_moves.begin(), by_moves.end(),
              [](const Cluster& a, const Cluster& b) { return a.start < b.start; });
    clusters = std::move(by_moves);
  }
  uint64_t total = 0;
  for (const Cluster& c : clusters) total += (c.end - c.start) / trace.page_size;
  if (total > kMaxReplayPages) {
    *error = "the traced ranges hold " + std::to_string(total) + " pages, more than " +
             std::to_string(kMaxReplayPages) + " (try --ranges auto)";
    return false;
  }

  out->clusters = clusters;
  out->title = !options.title.empty()       ? options.title
               : trace.process_name.empty() ? "hmmkit residency"
                                            : "hmmkit residency: " + trace.process_name;
  out->columns = std::max(1, options.width / 2);
  const int max_rows = std::max(1, options.height / 2);
  const auto separators = uint64_t(clusters.size() - 1);
  const uint64_t avail = std::max<uint64_t>(
      uint64_t(max_rows) > separators ? uint64_t(max_rows) - separators : 1, clusters.size());
  const uint64_t ppr = std::max<uint64_t>(1, (total + avail - 1) / avail);
  out->pages_per_row = ppr;

  // Rows, and the first row of each cluster.
  std::vector<size_t> cluster_row(clusters.size());
  for (size_t c = 0; c < clusters.size(); ++c) {
    if (c) out->rows.push_back({});
    cluster_row[c] = out->rows.size();
    const uint64_t pages = (clusters[c].end - clusters[c].start) / trace.page_size;
    for (uint64_t p = 0; p < pages; p += ppr)
      out->rows.push_back(
          {int(c), clusters[c].start + p * trace.page_size, std::min(ppr, pages - p)});
  }
  const size_t nrows = out->rows.size();
  const auto ncols = size_t(out->columns);
  out->cells.assign(nrows * ncols, kSeparatorCell);
  out->thrash.assign(nrows * ncols, 0);
  out->thrash_columns.assign(ncols, 0);

  // Per-row state counts, updated page by page as the replay changes states.
  std::vector<std::array<uint64_t, kResidencyCount>> counts(nrows);
  for (size_t r = 0; r < nrows; ++r) {
    counts[r] = {};
    counts[r][size_t(Residency::kUntouched)] = out->rows[r].pages;
  }
  ResidencyReplay replay(trace, clusters);
  auto row_of_page = [&](size_t page) {
    // The cluster holding the page: the last whose first page index is <= page.
    size_t lo = 0, hi = clusters.size();
    while (hi - lo > 1) {
      const size_t mid = (lo + hi) / 2;
      if (replay.cluster_base(mid) <= page)
        lo = mid;
      else
        hi = mid;
    }
    return cluster_row[lo] + (page - replay.cluster_base(lo)) / ppr;
  };
  auto on_change = [&](size_t page, Residency from, Residency to) {
    auto& cnt = counts[row_of_page(page)];
    --cnt[size_t(from)];
    ++cnt[size_t(to)];
  };

  out->t0_us = trace.first_ts_us;
  out->t1_us = std::max(trace.last_ts_us, trace.first_ts_us + 1e-3);
  const double span = out->t1_us - out->t0_us;
  for (size_t col = 0; col < ncols; ++col) {
    const double t_end = col + 1 == ncols ? std::numeric_limits<double>::infinity()
                                          : out->t0_us + span * double(col + 1) / double(ncols);
    replay.AdvanceTo(t_end, on_change);
    for (size_t r = 0; r < nrows; ++r) {
      if (out->rows[r].cluster < 0) continue;
      Residency best = kPriority[0];
      for (Residency s : kPriority)
        if (counts[r][size_t(s)] > counts[r][size_t(best)]) best = s;
      out->cells[r * ncols + col] = uint8_t(best);
    }
  }

  // Thrash markers: the bucket of the event's start, every row its range overlaps.
  for (const TraceEvent& e : trace.events) {
    if (e.kind != EventKind::kThrash) continue;
    const auto col =
        std::min(ncols - 1, size_t(std::max(0.0, (e.ts_us - out->t0_us) / span * double(ncols))));
    out->thrash_columns[col] = 1;
    for (size_t r = 0; r < nrows; ++r) {
      const HeatmapRow& row = out->rows[r];
      if (row.cluster < 0) continue;
      const uint64_t row_end = row.addr + row.pages * trace.page_size;
      if (row.addr < e.end && e.start < row_end) out->thrash[r * ncols + col] = 1;
    }
  }
  return true;
}

HeatmapLayout LayoutHeatmap(const Heatmap& map) {
  HeatmapLayout l;
  l.title_y = 4;
  l.left = 170;  // "0x7f0000000000 1023.9 GiB" and a gap
  l.top = l.title_y + kLineHeight + 2 + kThrashLane + 2;
  l.cell_w = 2;
  const int rows = std::max<int>(1, int(map.rows.size()));
  l.cell_h = std::clamp(400 / rows, 2, 16);
  l.plot_w = map.columns * l.cell_w;
  l.plot_h = rows * l.cell_h;
  l.axis_y = l.top + l.plot_h + 2;
  l.tick_label_y = l.axis_y + kTickLength + 2;
  l.legend_y = l.tick_label_y + kLineHeight + 8;
  l.legend_step = 100;
  const int legend_w = (kResidencyCount + 1) * l.legend_step;
  l.width = l.left + std::max(l.plot_w, legend_w) + 40;
  l.height = l.legend_y + kSwatch + 8;
  return l;
}

namespace {

// The legend entries, in order: the five states, then the thrash marker.
Rgb LegendColor(int i) {
  return i < kResidencyCount ? ResidencyColor(Residency(i)) : kThrashColor;
}
const char* LegendName(int i) {
  return i < kResidencyCount ? ToString(Residency(i)) : "thrash";
}

// One line of text, placed: (x, y) is the top-left of its first character cell.
struct Label {
  int x = 0, y = 0;
  std::string text;
};

// Every text of the picture, placed in pixels with the bitmap font's metrics (the SVG's 10 px
// monospace has the same 6 px advance). Labels that would overlap an earlier one are left out
// (range labels of clusters a few pixels apart, axis times on a narrow plot).
std::vector<Label> PlaceLabels(const Heatmap& map, const HeatmapLayout& l) {
  std::vector<Label> out;
  char buf[160];
  std::snprintf(buf, sizeof(buf), " - %zu rows, %" PRIu64 " page%s per row, %d buckets over %s",
                map.rows.size(), map.pages_per_row, map.pages_per_row == 1 ? "" : "s", map.columns,
                Ms(map.t1_us - map.t0_us).c_str());
  std::string title = map.title + buf;
  const auto fit = size_t(std::max(0, (l.width - 16 + 1) / kCharAdvance));
  if (title.size() > fit) title.resize(fit);  // cut at the right edge: the info goes first
  out.push_back({8, l.title_y, title});

  // Range labels, right-aligned at the first row of each cluster.
  int free_y = l.top;
  for (size_t r = 0; r < map.rows.size(); ++r) {
    const HeatmapRow& row = map.rows[r];
    if (row.cluster < 0 || (r > 0 && map.rows[r - 1].cluster == row.cluster)) continue;
    const int y = l.top + int(r) * l.cell_h + 2;
    if (y < free_y) continue;
    const Cluster& c = map.clusters[size_t(row.cluster)];
    const std::string t = Hex(c.start) + " " + Size(c.end - c.start);
    out.push_back({l.left - 4 - TextWidth(t), y, t});
    free_y = y + kLineHeight;
  }
  std::snprintf(buf, sizeof(buf), "%" PRIu64 " page%s per row", map.pages_per_row,
                map.pages_per_row == 1 ? "" : "s");
  const int ppr_y = l.top + l.plot_h - 7;
  if (ppr_y >= free_y) out.push_back({l.left - 4 - TextWidth(buf), ppr_y, buf});

  // Axis times, centred under their ticks. The end of the span is always labelled: it replaces
  // the label before it when they would overlap.
  int free_x = 0, prev_free_x = 0;
  for (int i = 0; i <= 10; ++i) {
    const std::string t = Ms((map.t1_us - map.t0_us) * i / 10);
    const int x = l.left + std::min(l.plot_w - 1, l.plot_w * i / 10) - TextWidth(t) / 2;
    if (x < free_x && i == 10 && x >= prev_free_x) {
      out.pop_back();
      free_x = prev_free_x;
    }
    if (x < free_x) continue;
    out.push_back({x, l.tick_label_y, t});
    prev_free_x = free_x;
    free_x = x + TextWidth(t) + kCharAdvance;
  }
  for (int i = 0; i <= kResidencyCount; ++i)
    out.push_back({l.left + i * l.legend_step + kSwatch + 4, l.legend_y + 3, LegendName(i)});
  return out;
}

}  // namespace

Raster RenderRaster(const Heatmap& map) {
  const HeatmapLayout l = LayoutHeatmap(map);
  Raster img(l.width, l.height, kBackground);
  const auto ncols = size_t(map.columns);
  for (size_t col = 0; col < ncols; ++col)
    if (map.thrash_columns[col])
      img.Fill(l.left + int(col) * l.cell_w, l.top - kThrashLane - 2, l.cell_w, kThrashLane,
               kThrashColor);
  for (size_t r = 0; r < map.rows.size(); ++r) {
    for (size_t col = 0; col < ncols; ++col) {
      const uint8_t c = map.cell(r, col);
      if (c == kSeparatorCell) continue;
      const int x = l.left + int(col) * l.cell_w, y = l.top + int(r) * l.cell_h;
      img.Fill(x, y, l.cell_w, l.cell_h, ResidencyColor(Residency(c)));
      if (map.thrash[r * ncols + col])
        img.Fill(x, y, l.cell_w, std::max(1, l.cell_h / 4), kThrashColor);
    }
  }
  // Time axis: a line and 11 ticks (0%, 10%, ... 100% of the trace's span).
  img.Fill(l.left, l.axis_y, l.plot_w, 1, kInk);
  for (int i = 0; i <= 10; ++i)
    img.Fill(l.left + std::min(l.plot_w - 1, l.plot_w * i / 10), l.axis_y, 1, kTickLength, kInk);
  for (int i = 0; i <= kResidencyCount; ++i) {
    img.Fill(l.left + i * l.legend_step, l.legend_y, kSwatch, kSwatch, kInk);
    img.Fill(l.left + i * l.legend_step + 1, l.legend_y + 1, kSwatch - 2, kSwatch - 2,
             LegendColor(i));
  }
  for (const Label& t : PlaceLabels(map, l)) DrawText(&img, t.x, t.y, t.text, kTextColor);
  return img;
}

std::string RenderSvg(const Heatmap& map) {
  const HeatmapLayout l = LayoutHeatmap(map);
  std::string s;
  char buf[256];
  auto rect = [&](int x, int y, int w, int h, Rgb c) {
    std::snprintf(buf, sizeof(buf),
                  "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"%s\"/>\n", x, y, w, h,
                  ColorHex(c).c_str());
    s += buf;
  };
  std::snprintf(buf, sizeof(buf),
                "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" "
                "viewBox=\"0 0 %d %d\" font-family=\"monospace\" font-size=\"10\">\n",
                l.width, l.height, l.width, l.height);
  s += buf;
  rect(0, 0, l.width, l.height, kBackground);
  const auto ncols = size_t(map.columns);
  for (size_t col = 0; col < ncols; ++col)
    if (map.thrash_columns[col])
      rect(l.left + int(col) * l.cell_w, l.top - kThrashLane - 2, l.cell_w, kThrashLane,
           kThrashColor);
  for (size_t r = 0; r < map.rows.size(); ++r) {
    const int y = l.top + int(r) * l.cell_h;
    // One rect per run of equal cells, then the thrash marks of the row, also merged.
    for (size_t col = 0; col < ncols;) {
      const uint8_t c = map.cell(r, col);
      size_t end = col + 1;
      while (end < ncols && map.cell(r, end) == c) ++end;
      if (c != kSeparatorCell)
        rect(l.left + int(col) * l.cell_w, y, int(end - col) * l.cell_w, l.cell_h,
             ResidencyColor(Residency(c)));
      col = end;
    }
    for (size_t col = 0; col < ncols;) {
      if (!map.thrash[r * ncols + col]) {
        ++col;
        continue;
      }
      size_t end = col + 1;
      while (end < ncols && map.thrash[r * ncols + end]) ++end;
      rect(l.left + int(col) * l.cell_w, y, int(end - col) * l.cell_w, std::max(1, l.cell_h / 4),
           kThrashColor);
      col = end;
    }
  }
  rect(l.left, l.axis_y, l.plot_w, 1, kInk);
  for (int i = 0; i <= 10; ++i)
    rect(l.left + std::min(l.plot_w - 1, l.plot_w * i / 10), l.axis_y, 1, kTickLength, kInk);
  for (int i = 0; i <= kResidencyCount; ++i) {
    rect(l.left + i * l.legend_step, l.legend_y, kSwatch, kSwatch, kInk);
    rect(l.left + i * l.legend_step + 1, l.legend_y + 1, kSwatch - 2, kSwatch - 2, LegendColor(i));
  }
  // The same placed labels as the PNG; y + 7 is the baseline of a 7-pixel-high body.
  for (const Label& t : PlaceLabels(map, l)) {
    std::snprintf(buf, sizeof(buf), "<text x=\"%d\" y=\"%d\" fill=\"%s\">", t.x, t.y + 7,
                  ColorHex(kTextColor).c_str());
    s += buf;
    s += XmlEscaped(t.text);  // the title holds the traced process's name
    s += "</text>\n";
  }
  s += "</svg>\n";
  return s;
}

bool WriteHeatmap(const Heatmap& map, const std::string& path, std::string* error) {
  if (path.ends_with(".png")) return WriteWholeFile(path, EncodePng(RenderRaster(map)), error);
  if (path.ends_with(".svg")) {
    const std::string svg = RenderSvg(map);
    return WriteWholeFile(path, std::span(reinterpret_cast<const uint8_t*>(svg.data()), svg.size()),
                          error);
  }
  *error = path + ": the heatmap file must end in .png or .svg";
  return false;
}

}  // namespace hmmkit::hmmctl
