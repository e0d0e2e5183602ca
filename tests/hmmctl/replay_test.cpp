// Residency replay and the heatmap grid: synthetic events -> the state of given pages at given
// times, per the contract's residency-effect column.
#include <gtest/gtest.h>

#include <string>

#include "heatmap.hpp"
#include "residency.hpp"
#include "synthetic_trace.hpp"
#include "trace_file.hpp"

namespace hmmkit::hmmctl {
namespace {

HeatmapOptions Options(int width, int height) {
  HeatmapOptions o;
  o.width = width;
  o.height = height;
  return o;
}

using testing::kPage;
using testing::TraceBuilder;

constexpr uint64_t kA = 0x7f0000000000;  // a 12-page cluster
constexpr uint64_t kB = 0x7f0000100000;  // a second cluster, 1 MiB above

Trace Parse(const TraceBuilder& b) {
  Trace t;
  std::string error;
  EXPECT_TRUE(ParseTrace(b.Text(), &t, &error)) << error;
  return t;
}

TEST(ResidencyReplay, EachEventAppliesItsEffect) {
  // Given pages 0-7 migrated to the device, 8-11 mapped remotely, then a CPU fault on page 2, an
  // mprotect invalidation over 8-9 (drops the remote mapping), an unmap of 10-11, an eviction of
  // page 0 and a migration of page 4 back to system.
  TraceBuilder b;
  b.Migrate(10, kA, kA + 8 * kPage, "to_device")
      .MapRemote(20, kA + 8 * kPage, kA + 12 * kPage)
      .CpuFault(30, kA + 2 * kPage, kA + 3 * kPage)
      .Invalidate(40, kA + 8 * kPage, kA + 10 * kPage, "mprotect")
      .Invalidate(50, kA + 10 * kPage, kA + 12 * kPage, "unmap")
      .Evict(60, kA, kA + kPage)
      .Migrate(70, kA + 4 * kPage, kA + 5 * kPage, "to_system", "evict")
      .Invalidate(80, kA + 5 * kPage, kA + 7 * kPage, "release")  // device pages: no effect
      .Dma(90, 2, 4096);                                          // no residency effect
  const Trace t = Parse(b);
  const auto clusters = FindClusters(t, 16 * kPage);
  ASSERT_EQ(clusters.size(), 1U);
  EXPECT_EQ(clusters[0].start, kA);
  EXPECT_EQ(clusters[0].end, kA + 12 * kPage);

  ResidencyReplay r(t, clusters);
  auto page = [](int i) { return kA + uint64_t(i) * kPage + 100; };
  r.AdvanceTo(5);
  EXPECT_EQ(r.StateAt(page(0)), Residency::kUntouched);
  r.AdvanceTo(10);  // an event applies at its start ts
  EXPECT_EQ(r.StateAt(page(0)), Residency::kDevice);
  EXPECT_EQ(r.StateAt(page(7)), Residency::kDevice);
  EXPECT_EQ(r.StateAt(page(8)), Residency::kUntouched);
  r.AdvanceTo(25);
  EXPECT_EQ(r.StateAt(page(8)), Residency::kRemote);
  EXPECT_EQ(r.StateAt(page(11)), Residency::kRemote);
  r.AdvanceTo(35);
  EXPECT_EQ(r.StateAt(page(2)), Residency::kSystem);
  EXPECT_EQ(r.StateAt(page(3)), Residency::kDevice);
  r.AdvanceTo(45);
  EXPECT_EQ(r.StateAt(page(8)), Residency::kSystem);
  EXPECT_EQ(r.StateAt(page(9)), Residency::kSystem);
  EXPECT_EQ(r.StateAt(page(10)), Residency::kRemote);
  r.AdvanceTo(55);
  EXPECT_EQ(r.StateAt(page(10)), Residency::kUnmapped);
  EXPECT_EQ(r.StateAt(page(11)), Residency::kUnmapped);
  EXPECT_EQ(r.StateAt(page(9)), Residency::kSystem);
  r.AdvanceTo(1000);
  EXPECT_EQ(r.StateAt(page(0)), Residency::kSystem);
  EXPECT_EQ(r.StateAt(page(1)), Residency::kDevice);
  EXPECT_EQ(r.StateAt(page(4)), Residency::kSystem);
  EXPECT_EQ(r.StateAt(page(5)), Residency::kDevice);  // release only drops remote mappings
  EXPECT_EQ(r.StateAt(kA + 12 * kPage), Residency::kUntouched);  // outside the cluster
}

TEST(ResidencyReplay, ChangesAreReportedPageByPage) {
  TraceBuilder b;
  b.Migrate(1, kA, kA + 4 * kPage, "to_device")
      .Migrate(2, kA + 2 * kPage, kA + 6 * kPage, "to_device");
  const Trace t = Parse(b);
  ResidencyReplay r(t, FindClusters(t, 0));
  int changes = 0;
  r.AdvanceTo(10, [&](size_t, Residency from, Residency to) {
    EXPECT_EQ(from, Residency::kUntouched);
    EXPECT_EQ(to, Residency::kDevice);
    ++changes;
  });
  EXPECT_EQ(changes, 6);  // pages 2-3 changed once only
  EXPECT_EQ(r.total_pages(), 6U);
}

TEST(ResidencyReplay, ClustersSplitOnGapsAndIgnoreInvalidations) {
  TraceBuilder b;
  b.Migrate(1, kA, kA + kPage, "to_device")
      .CpuFault(2, kB, kB + 2 * kPage)
      .Invalidate(3, 0, 0x7fffffffffff, "unmap")  // spans everything: not a cluster of its own
      .FaultBatch(4, 1, 0x1000, 0x7ffffffff000, 9);
  const Trace t = Parse(b);
  const auto clusters = FindClusters(t, 16 * kPage);
  ASSERT_EQ(clusters.size(), 2U);
  EXPECT_EQ(clusters[1].start, kB);
  EXPECT_EQ(clusters[1].end, kB + 2 * kPage);
  EXPECT_EQ(clusters[0].migrations, 1U);
  ResidencyReplay r(t, clusters);
  r.AdvanceTo(2.5);
  EXPECT_EQ(r.StateAt(kB), Residency::kSystem);
  r.AdvanceTo(3);
  EXPECT_EQ(r.StateAt(kA), Residency::kUnmapped);
  EXPECT_EQ(r.StateAt(kB + kPage), Residency::kUnmapped);
}

TEST(Heatmap, PingPongShowsAsAlternatingColumns) {
  // Given a range that moves to the device and back every 10 us over 100 us, and 10 columns,
  // then the columns alternate device / system.
  TraceBuilder b;
  for (int i = 0; i < 10; ++i)
    b.Migrate(5 + 10 * i, kA, kA + 4 * kPage, i % 2 ? "to_system" : "to_device",
              i % 2 ? "cpu_fault" : "fault");
  b.Thrash(35, kA, kA + 4 * kPage, 2.0).Dma(0, 100, 4096);
  const Trace t = Parse(b);
  Heatmap map;
  std::string error;
  ASSERT_TRUE(BuildHeatmap(t, Options(20, 40), &map, &error)) << error;
  ASSERT_EQ(map.columns, 10);
  ASSERT_EQ(map.rows.size(), 4U);  // 4 pages, one per row (room for 20 rows)
  EXPECT_EQ(map.pages_per_row, 1U);
  for (size_t col = 0; col < 10; ++col)
    for (size_t row = 0; row < 4; ++row)
      EXPECT_EQ(Residency(map.cell(row, col)), col % 2 ? Residency::kSystem : Residency::kDevice)
          << "row " << row << " column " << col;
  EXPECT_EQ(map.thrash_columns[3], 1);
  EXPECT_EQ(map.thrash[0 * 10 + 3], 1);
  EXPECT_EQ(map.thrash[0 * 10 + 4], 0);
}

TEST(Heatmap, ManyPagesShareARowAndClustersAreSeparated) {
  TraceBuilder b;
  b.Migrate(1, kA, kA + 64 * kPage, "to_device").MapRemote(2, kB, kB + 64 * kPage);
  const Trace t = Parse(b);
  Heatmap map;
  std::string error;
  // 10 rows at most: one separator, 9 for 128 pages -> 15 pages a row.
  ASSERT_TRUE(BuildHeatmap(t, Options(4, 20), &map, &error)) << error;
  EXPECT_EQ(map.pages_per_row, 15U);
  ASSERT_EQ(map.rows.size(), 5U + 1 + 5);
  EXPECT_EQ(map.rows[5].cluster, -1);
  EXPECT_EQ(map.cell(5, 1), kSeparatorCell);
  EXPECT_EQ(Residency(map.cell(0, 1)), Residency::kDevice);
  EXPECT_EQ(Residency(map.cell(6, 1)), Residency::kRemote);
  EXPECT_EQ(map.rows[6].addr, kB);
  EXPECT_EQ(map.rows[10].pages, 64U - 4 * 15);
}

TEST(Heatmap, NoResidencyEventsIsAnError) {
  TraceBuilder b;
  b.Dma(1, 1, 4096);
  const Trace t = Parse(b);
  Heatmap map;
  std::string error;
  EXPECT_FALSE(BuildHeatmap(t, {}, &map, &error));
  EXPECT_NE(error.find("no residency events"), std::string::npos) << error;
}

TEST(TraceFile, BadAddressIsAnError) {
  Trace t;
  std::string error;
  const std::string text =
      R"({"otherData":{"page_size":4096},"traceEvents":[{"ph":"X","name":"migrate","ts":1,)"
      R"("dur":1,"args":{"start":"zz","end":"0x2000"}}]})";
  EXPECT_FALSE(ParseTrace(text, &t, &error));
  EXPECT_NE(error.find("not an address"), std::string::npos) << error;
  EXPECT_EQ(error.rfind("offset " + std::to_string(text.find("{\"ph\"")), 0), 0U) << error;
}

}  // namespace
}  // namespace hmmkit::hmmctl
