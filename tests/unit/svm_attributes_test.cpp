// SvmAttributeMap: splitting, merging, clearing and run lookup of advice intervals.
#include "hmmkit/driver/svm_attributes.hpp"

#include <gtest/gtest.h>

namespace hmmkit::driver {
namespace {

void SetPreferred(SvmAttributeMap& m, uintptr_t s, uintptr_t e, PreferredLocation p) {
  m.Update(s, e, [p](SvmAttributes& a) { a.preferred = p; });
}

TEST(SvmAttributeMapTest, UnadvisedMemoryHasDefaultsAndOneUnboundedRun) {
  SvmAttributeMap m;
  EXPECT_TRUE(m.At(0x1000).is_default());
  auto run = m.RunAt(0x5000, 0x1000, 0x9000);
  EXPECT_EQ(run.start, 0x1000u);
  EXPECT_EQ(run.end, 0x9000u);
  EXPECT_FALSE(m.Advised(0, UINTPTR_MAX));
  EXPECT_EQ(m.interval_count(), 0u);
}

TEST(SvmAttributeMapTest, OverlappingUpdatesSplitAndCombine) {
  SvmAttributeMap m;
  SetPreferred(m, 0x10000, 0x20000, PreferredLocation::kDevice);
  m.Update(0x18000, 0x28000, [](SvmAttributes& a) { a.read_mostly = true; });
  // [10000,18000) device; [18000,20000) device + read-mostly; [20000,28000) read-mostly
  EXPECT_EQ(m.interval_count(), 3u);
  EXPECT_EQ(m.At(0x12000).preferred, PreferredLocation::kDevice);
  EXPECT_FALSE(m.At(0x12000).read_mostly);
  EXPECT_EQ(m.At(0x19000).preferred, PreferredLocation::kDevice);
  EXPECT_TRUE(m.At(0x19000).read_mostly);
  EXPECT_EQ(m.At(0x21000).preferred, PreferredLocation::kNone);
  EXPECT_TRUE(m.At(0x21000).read_mostly);
  EXPECT_TRUE(m.At(0x28000).is_default());
  auto runs = m.Runs(0x8000, 0x30000);
  ASSERT_EQ(runs.size(), 5u);
  EXPECT_EQ(runs[0].start, 0x8000u);
  EXPECT_EQ(runs[0].end, 0x10000u);
  EXPECT_EQ(runs[2].start, 0x18000u);
  EXPECT_EQ(runs[2].end, 0x20000u);
  EXPECT_EQ(runs[4].start, 0x28000u);
  EXPECT_EQ(runs[4].end, 0x30000u);
}

TEST(SvmAttributeMapTest, EqualNeighboursMergeAndDefaultsAreDropped) {
  SvmAttributeMap m;
  SetPreferred(m, 0x10000, 0x20000, PreferredLocation::kSystem);
  SetPreferred(m, 0x30000, 0x40000, PreferredLocation::kSystem);
  EXPECT_EQ(m.interval_count(), 2u);
  // Filling the gap with the same advice leaves one interval
  SetPreferred(m, 0x20000, 0x30000, PreferredLocation::kSystem);
  EXPECT_EQ(m.interval_count(), 1u);
  auto run = m.RunAt(0x25000, 0, UINTPTR_MAX);
  EXPECT_EQ(run.start, 0x10000u);
  EXPECT_EQ(run.end, 0x40000u);
  // Unsetting the middle splits it; unsetting everything empties the map
  SetPreferred(m, 0x20000, 0x30000, PreferredLocation::kNone);
  EXPECT_EQ(m.interval_count(), 2u);
  EXPECT_FALSE(m.Advised(0x20000, 0x30000));
  EXPECT_TRUE(m.Advised(0x2f000, 0x31000));
  m.Clear(0, 0x100000);
  EXPECT_EQ(m.interval_count(), 0u);
}

TEST(SvmAttributeMapTest, RunsOfDifferentAdviceDoNotMerge) {
  SvmAttributeMap m;
  SetPreferred(m, 0x10000, 0x20000, PreferredLocation::kSystem);
  SetPreferred(m, 0x20000, 0x30000, PreferredLocation::kDevice);
  EXPECT_EQ(m.interval_count(), 2u);
  auto run = m.RunAt(0x1f000, 0, UINTPTR_MAX);
  EXPECT_EQ(run.end, 0x20000u);
  run = m.RunAt(0x30000, 0, UINTPTR_MAX);  // the default run after them
  EXPECT_EQ(run.start, 0x30000u);
  EXPECT_TRUE(run.attrs.is_default());
}

}  // namespace
}  // namespace hmmkit::driver
