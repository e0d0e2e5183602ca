// The trace ring (hmmkit/base/trace.hpp): what is recorded from many threads, what is dropped
// when the ring is full, nothing while off, and an export that follows the format contract.
#include "hmmkit/base/trace.hpp"

#include <atomic>
#include <set>
#include <sstream>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "trace_checker.hpp"

namespace hmmkit::test {
namespace {

// Restores "tracing off, ring empty" after each test.
class TraceTest : public ::testing::Test {
 protected:
  void TearDown() override {
    trace::Disable();
    trace::Clear();
  }

  // The current recording, exported, parsed and checked against the contract.
  std::vector<TraceEvent> Export() {
    std::ostringstream out;
    EXPECT_TRUE(trace::WriteChromeJson(out).ok());
    text_ = out.str();
    doc_ = JsonValue{};
    std::string err;
    EXPECT_TRUE(ParseJson(text_, &doc_, &err)) << err;
    std::vector<TraceEvent> events;
    const std::string problem = CheckTrace(doc_, &events);
    EXPECT_EQ(problem, "");
    return events;
  }

  static trace::Event MapRemote(uint16_t track, uint64_t start, uint64_t pages) {
    trace::Event e;
    e.ts_ns = trace::NowNs();
    e.dur_ns = 1500;
    e.name = trace::Name::kMapRemote;
    e.track = track;
    e.a[0] = start;
    e.a[1] = start + pages * 4096;
    e.a[2] = pages;
    return e;
  }

  std::string text_;
  JsonValue doc_;
};

TEST_F(TraceTest, DisabledRecordsNothing) {
  trace::Disable();
  trace::Clear();
  EXPECT_FALSE(trace::Enabled());
  trace::Record(MapRemote(trace::kCpuFaultTrack, 0x1000, 1));
  { trace::Span span(trace::Name::kCpuFault, trace::kCpuFaultTrack); }
  EXPECT_EQ(trace::Stats().events, 0u);
  EXPECT_TRUE(Export().empty());
}

TEST_F(TraceTest, RecordsFromManyThreadsAreAllPresentWithTheirArgs) {
  constexpr int kThreads = 8, kPer = 2000;
  ASSERT_TRUE(trace::Enable({.capacity = kThreads * kPer}).ok());
  const uint16_t track = trace::RegisterTrack(trace::TrackKind::kDevice, "ring-test");
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([t, track] {
      for (int i = 0; i < kPer; ++i)
        trace::Record(MapRemote(track, (uint64_t(t + 1) << 40) | (uint64_t(i) << 12), i + 1));
    });
  for (auto& th : threads) th.join();
  trace::Disable();
  const trace::TraceStats st = trace::Stats();
  EXPECT_EQ(st.events, uint64_t(kThreads * kPer));
  EXPECT_EQ(st.dropped, 0u);

  std::set<std::pair<uint64_t, uint64_t>> seen;
  for (const TraceEvent& e : Export()) {
    ASSERT_EQ(e.name, "map_remote");
    EXPECT_EQ(e.cat, "map");
    EXPECT_EQ(e.track, "device ring-test");
    EXPECT_EQ(e.dur, 1.5);
    const uint64_t start = e.Hex("start");
    EXPECT_EQ(e.Hex("end"), start + e.Num("pages") * 4096);
    EXPECT_EQ(e.Num("pages"), ((start >> 12) & 0xfffffff) + 1);  // the args came through intact
    seen.emplace(start >> 40, (start >> 12) & 0xfffffff);
  }
  EXPECT_EQ(seen.size(), size_t(kThreads * kPer));
  EXPECT_EQ(doc_.at("otherData").at("dropped").u64(), 0u);
}

TEST_F(TraceTest, FullRingDropsNewRecordsAndCountsThem) {
  ASSERT_TRUE(trace::Enable({.capacity = 100}).ok());
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([] {
      for (int i = 0; i < 60; ++i) trace::Record(MapRemote(trace::kCpuFaultTrack, 0x10000, 1));
    });
  for (auto& th : threads) th.join();
  const trace::TraceStats st = trace::Stats();
  EXPECT_EQ(st.events, 100u);
  EXPECT_EQ(st.dropped, 140u);
  EXPECT_EQ(st.capacity, 100u);
  EXPECT_EQ(Export().size(), 100u);
  EXPECT_EQ(doc_.at("otherData").at("dropped").u64(), 140u);
  EXPECT_EQ(doc_.at("otherData").at("ring_capacity").u64(), 100u);

  trace::Clear();  // starts over: room again, nothing dropped
  EXPECT_EQ(trace::Stats().events, 0u);
  EXPECT_EQ(trace::Stats().dropped, 0u);
  trace::Record(MapRemote(trace::kCpuFaultTrack, 0x10000, 1));
  EXPECT_EQ(Export().size(), 1u);
}

TEST_F(TraceTest, ExportFollowsTheContract) {
  ASSERT_TRUE(trace::Enable().ok());
  const uint16_t dev = trace::TrackFor(this, trace::TrackKind::kDevice, "emu-test");
  EXPECT_EQ(trace::TrackFor(this, trace::TrackKind::kDevice, "ignored"), dev);  // bound once
  const uint16_t dma = trace::RegisterTrack(trace::TrackKind::kDma, "cpu");
  {
    trace::Span s(trace::Name::kMigrate, dev);
    s.ev.a[0] = 0x7f0000001000;
    s.ev.a[1] = 0x7f0000005000;
    s.ev.a[2] = 4;
    s.ev.small = trace::MigrateSmall(true, trace::Cause::kPrefetch);
  }
  {
    trace::Span s(trace::Name::kInvalidate, trace::kNotifierTrack);
    s.ev.a[0] = 0x7f0000002000;
    s.ev.a[1] = 0x7f0000003000;
    s.ev.small = uint32_t(trace::InvalidateKind::kUnmap);
  }
  trace::Event thrash;
  thrash.ts_ns = trace::NowNs();
  thrash.instant = true;
  thrash.name = trace::Name::kThrash;
  thrash.track = dev;
  thrash.a[0] = 0x7f0000000000;
  thrash.a[1] = 0x7f0000200000;
  thrash.a[2] = 100;
  trace::Record(thrash);
  trace::Event copy;
  copy.ts_ns = trace::NowNs() - 1'000'000;  // began earlier: must sort first among these
  copy.dur_ns = 123'456;
  copy.name = trace::Name::kDmaCopy;
  copy.track = dma;
  copy.a[0] = 16384;
  copy.a[1] = 2;
  copy.small = uint32_t(trace::DmaDir::kD2H);
  trace::Record(copy);

  const std::vector<TraceEvent> ev = Export();
  ASSERT_EQ(ev.size(), 4u);
  EXPECT_EQ(ev[0].name, "dma_copy");
  EXPECT_EQ(ev[0].track, "dma cpu");
  EXPECT_EQ(ev[0].Num("bytes"), 16384u);
  EXPECT_EQ(ev[0].Str("dir"), "d2h");
  EXPECT_EQ(ev[0].Num("pieces"), 2u);
  EXPECT_EQ(ev[0].dur, 123.456);
  EXPECT_EQ(ev[1].name, "migrate");
  EXPECT_EQ(ev[1].track, "device emu-test");
  EXPECT_EQ(ev[1].Hex("start"), 0x7f0000001000u);
  EXPECT_EQ(ev[1].Num("pages"), 4u);
  EXPECT_EQ(ev[1].Num("bytes"), 4u * doc_.at("otherData").at("page_size").u64());
  EXPECT_EQ(ev[1].Str("dir"), "to_device");
  EXPECT_EQ(ev[1].Str("cause"), "prefetch");
  EXPECT_EQ(ev[2].name, "invalidate");
  EXPECT_EQ(ev[2].track, "mmu notifier");
  EXPECT_EQ(ev[2].Str("event"), "unmap");
  EXPECT_EQ(ev[3].name, "thrash");
  EXPECT_EQ(ev[3].ph, "i");
  EXPECT_EQ(ev[3].cat, "policy");
  EXPECT_EQ(ev[3].Num("pin_ms"), 100u);
  trace::ForgetTrackKey(this);
  EXPECT_NE(trace::TrackFor(this, trace::TrackKind::kDevice, "emu-test"), dev);  // a new track
}

TEST_F(TraceTest, ExportWhileProducersRunIsValid) {
  ASSERT_TRUE(trace::Enable({.capacity = 5000}).ok());
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&stop] {
      while (!stop.load(std::memory_order_relaxed)) {
        trace::Record(MapRemote(trace::kCpuFaultTrack, 0x20000, 2));
        std::this_thread::yield();  // leaves the exporter a core on small machines
      }
    });
  while (trace::Stats().events < 1000) std::this_thread::yield();  // producers are running
  size_t last = 0;
  for (int round = 0; round < 3; ++round) {
    const std::vector<TraceEvent> ev = Export();                   // checked inside
    for (const TraceEvent& e : ev) ASSERT_EQ(e.Num("pages"), 2u);  // never a torn record
    EXPECT_GE(ev.size(), last);
    last = ev.size();
  }
  stop = true;
  for (auto& th : threads) th.join();
}

TEST_F(TraceTest, CauseScopesNestAndRestore) {
  EXPECT_EQ(trace::CurrentCause(), trace::Cause::kExplicit);
  {
    const trace::CauseScope a(trace::Cause::kFault);
    EXPECT_EQ(trace::CurrentCause(), trace::Cause::kFault);
    {
      const trace::CauseScope b(trace::Cause::kEvict);
      EXPECT_EQ(trace::CurrentCause(), trace::Cause::kEvict);
    }
    EXPECT_EQ(trace::CurrentCause(), trace::Cause::kFault);
  }
  EXPECT_EQ(trace::CurrentCause(), trace::Cause::kExplicit);
}

TEST_F(TraceTest, BadCapacityIsEinval) {
  EXPECT_EQ(trace::Enable({.capacity = 0}).errno_value(), EINVAL);
  EXPECT_FALSE(trace::Enabled());
}

TEST_F(TraceTest, SameNamedTracksAreToldApart) {
  const uint16_t a = trace::RegisterTrack(trace::TrackKind::kDma, "twin");
  const uint16_t b = trace::RegisterTrack(trace::TrackKind::kDma, "twin");
  EXPECT_NE(a, b);
  ASSERT_TRUE(trace::Enable().ok());
  trace::Record(MapRemote(b, 0x1000, 1));
  const std::vector<TraceEvent> ev = Export();
  ASSERT_EQ(ev.size(), 1u);
  EXPECT_EQ(ev[0].track, "dma twin #2");
}

}  // namespace
}  // namespace hmmkit::test
