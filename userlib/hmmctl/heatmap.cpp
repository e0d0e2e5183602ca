#include "heatmap.hpp"

#include <algorithm>
#include <array>
#include <cinttypes>
#include <cstdio>
#include <limits>

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

HeatmapLayout LayoutHeatmap(const Heatmap& map, bool labels) {
  HeatmapLayout l;
  l.left = labels ? 170 : 8;
  l.top = 8 + kThrashLane + 2;
  l.cell_w = 2;
  const int rows = std::max<int>(1, int(map.rows.size()));
  l.cell_h = std::clamp(400 / rows, 2, 16);
  l.plot_w = map.columns * l.cell_w;
  l.plot_h = rows * l.cell_h;
  l.axis_y = l.top + l.plot_h + 2;
  l.legend_y = l.axis_y + (labels ? 28 : 12);
  const int legend_w = labels ? 6 * 100 : 6 * 20;
  l.width = l.left + std::max(l.plot_w, legend_w) + (labels ? 40 : 8);
  l.height = l.legend_y + 12 + 8;
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

}  // namespace

Raster RenderRaster(const Heatmap& map) {
  const HeatmapLayout l = LayoutHeatmap(map, false);
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
    img.Fill(l.left + std::min(l.plot_w - 1, l.plot_w * i / 10), l.axis_y, 1, 5, kInk);
  for (int i = 0; i <= kResidencyCount; ++i) {
    img.Fill(l.left + i * 20, l.legend_y, 12, 12, kInk);
    img.Fill(l.left + i * 20 + 1, l.legend_y + 1, 10, 10, LegendColor(i));
  }
  return img;
}

std::string RenderSvg(const Heatmap& map) {
  const HeatmapLayout l = LayoutHeatmap(map, true);
  std::string s;
  char buf[256];
  auto rect = [&](int x, int y, int w, int h, Rgb c) {
    std::snprintf(buf, sizeof(buf),
                  "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"%s\"/>\n", x, y, w, h,
                  ColorHex(c).c_str());
    s += buf;
  };
  auto text = [&](int x, int y, const char* anchor, const std::string& t) {
    std::snprintf(buf, sizeof(buf), "<text x=\"%d\" y=\"%d\" text-anchor=\"%s\">", x, y, anchor);
    s += buf;
    s += t;  // our texts hold no markup characters
    s += "</text>\n";
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
  // Cluster labels at their first row.
  for (size_t r = 0; r < map.rows.size(); ++r) {
    const HeatmapRow& row = map.rows[r];
    if (row.cluster < 0 || (r > 0 && map.rows[r - 1].cluster == row.cluster)) continue;
    const Cluster& c = map.clusters[size_t(row.cluster)];
    text(l.left - 4, l.top + int(r) * l.cell_h + 9, "end",
         Hex(c.start) + " " + Size(c.end - c.start));
  }
  std::snprintf(buf, sizeof(buf), "%" PRIu64 " page%s per row", map.pages_per_row,
                map.pages_per_row == 1 ? "" : "s");
  text(l.left - 4, l.top + l.plot_h, "end", buf);
  rect(l.left, l.axis_y, l.plot_w, 1, kInk);
  for (int i = 0; i <= 10; ++i) {
    const int x = l.left + std::min(l.plot_w - 1, l.plot_w * i / 10);
    rect(x, l.axis_y, 1, 5, kInk);
    text(x, l.axis_y + 16, "middle", Ms((map.t1_us - map.t0_us) * i / 10));
  }
  for (int i = 0; i <= kResidencyCount; ++i) {
    rect(l.left + i * 100, l.legend_y, 12, 12, kInk);
    rect(l.left + i * 100 + 1, l.legend_y + 1, 10, 10, LegendColor(i));
    text(l.left + i * 100 + 16, l.legend_y + 10, "start", LegendName(i));
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
