// MmMonitor fault dispatch: MISSING and WP faults reach the handler that owns the range, the
// handler resolves them with the UFFDIO wrappers, and removal waits for a running handler.
#include <sys/mman.h>

#include <atomic>
#include <cstring>
#include <future>
#include <thread>

#include <gtest/gtest.h>

#include "hmmkit/mirror/address_space.hpp"
#include "hmmkit/mirror/mm_monitor.hpp"
#include "test_support.hpp"

namespace hmmkit::test {
namespace {

// Fills each missing page with its page index; un-write-protects on WP faults.
class PatternHandler : public FaultHandler {
 public:
  explicit PatternHandler(uintptr_t base) : base_(base), page_(PageSize()), buf_(PageSize()) {}
  Status HandleFault(MmMonitor& m, const CpuFault& f) override {
    if (gate_) gate_();
    const uintptr_t pg = f.address & ~(page_ - 1);
    if (f.wp) {
      wp_faults.fetch_add(1);
      return m.WriteProtect(pg, page_, false);
    }
    missing_faults.fetch_add(1);
    if (f.write) write_faults.fetch_add(1);
    memset(buf_.data(), int((pg - base_) / page_) + 1, page_);
    Status st = m.Copy(pg, buf_.data(), page_);
    if (st.errno_value() == EEXIST) return m.Wake(pg, page_);
    return st;
  }
  void set_gate(std::function<void()> g) { gate_ = std::move(g); }

  std::atomic<int> missing_faults{0};
  std::atomic<int> write_faults{0};
  std::atomic<int> wp_faults{0};

 private:
  uintptr_t base_;
  size_t page_;
  std::vector<char> buf_;
  std::function<void()> gate_;
};

class MonitorFaults : public ::testing::Test {
 protected:
  void SetUp() override {
    as_ = MakeAddressSpace();
    ASSERT_NE(as_, nullptr);
    if (as_->monitor() == nullptr) GTEST_SKIP() << "no userfaultfd on this machine";
  }
  std::shared_ptr<AddressSpace> as_;
};

TEST_F(MonitorFaults, MissingFaultsAreResolvedByTheOwningHandler) {
  // Given 4 untouched pages routed to a handler.
  const size_t pg = PageSize();
  Mapping m(4 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  PatternHandler h(m.addr());
  ASSERT_TRUE(as_->monitor()->AddFaultHandler(m.addr(), m.end(), h).ok());

  // When the CPU reads pages 0 and 2 and writes page 3.
  char r0 = m.page(0)[10];
  char r2 = m.page(2)[pg - 1];
  m.page(3)[0] = 'x';

  // Then each touched page faulted once into the handler and holds its pattern.
  EXPECT_EQ(r0, 1);
  EXPECT_EQ(r2, 3);
  EXPECT_EQ(m.page(3)[0], 'x');
  EXPECT_EQ(m.page(3)[1], 4);
  EXPECT_EQ(h.missing_faults.load(), 3);
  EXPECT_EQ(h.write_faults.load(), 1);
  as_->monitor()->RemoveFaultHandler(h);
}

TEST_F(MonitorFaults, WriteProtectFaultsReachTheHandlerAndTheWriteCompletes) {
  if (!as_->features().uffd_wp) GTEST_SKIP() << "no userfaultfd write-protect";
  const size_t pg = PageSize();
  Mapping m(2 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  PatternHandler h(m.addr());
  ASSERT_TRUE(as_->monitor()->AddFaultHandler(m.addr(), m.end(), h).ok());
  m.page(0)[0] = 7;  // populate (missing fault)
  ASSERT_TRUE(as_->monitor()->WriteProtect(m.addr(), pg, true).ok());

  m.page(0)[1] = 9;  // blocks in a WP fault until the handler un-protects

  EXPECT_EQ(h.wp_faults.load(), 1);
  EXPECT_EQ(m.page(0)[0], 7);
  EXPECT_EQ(m.page(0)[1], 9);
  as_->monitor()->RemoveFaultHandler(h);
}

TEST_F(MonitorFaults, AfterRemovalTheHandlerIsNotCalledAndMemoryIsOrdinary) {
  const size_t pg = PageSize();
  Mapping m(2 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  PatternHandler h(m.addr());
  ASSERT_TRUE(as_->monitor()->AddFaultHandler(m.addr(), m.end(), h).ok());
  EXPECT_EQ(m.page(0)[0], 1);
  as_->monitor()->RemoveFaultHandler(h);

  EXPECT_EQ(m.page(1)[0], 0);  // an ordinary zero-fill fault
  EXPECT_EQ(h.missing_faults.load(), 1);
  EXPECT_TRUE(as_->monitor()->IsWatched(m.addr(), m.end())) << "range must stay watched";
}

TEST_F(MonitorFaults, RemoveWaitsForTheRunningHandler) {
  const size_t pg = PageSize();
  Mapping m(pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  PatternHandler h(m.addr());
  std::promise<void> entered, release;
  auto release_f = release.get_future().share();
  std::atomic<bool> handler_done{false};
  h.set_gate([&] {
    entered.set_value();
    release_f.wait();
    handler_done = true;
  });
  ASSERT_TRUE(as_->monitor()->AddFaultHandler(m.addr(), m.end(), h).ok());
  std::thread toucher([&] { (void)*static_cast<volatile char*>(m.data()); });
  entered.get_future().wait();

  // Removal starts while the handler runs; it may only return after the handler did. (If the
  // remover happens to start late the check passes trivially; when it starts first, as it
  // usually does, a Remove that does not wait is caught.)
  std::atomic<bool> done_when_removed{false};
  std::promise<void> remover_started;
  std::thread remover([&] {
    remover_started.set_value();
    as_->monitor()->RemoveFaultHandler(h);
    done_when_removed = handler_done.load();
  });
  remover_started.get_future().wait();
  release.set_value();
  remover.join();
  toucher.join();
  EXPECT_TRUE(done_when_removed.load());
}

TEST_F(MonitorFaults, BadHandlerRangesAreRejected) {
  const size_t pg = PageSize();
  Mapping m(4 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  PatternHandler h1(m.addr()), h2(m.addr());
  EXPECT_EQ(as_->monitor()->AddFaultHandler(m.addr() + 1, m.end(), h1).errno_value(), EINVAL);
  EXPECT_EQ(as_->monitor()->AddFaultHandler(m.end(), m.addr(), h1).errno_value(), EINVAL);
  ASSERT_TRUE(as_->monitor()->AddFaultHandler(m.addr(), m.addr() + 2 * pg, h1).ok());
  EXPECT_EQ(as_->monitor()->AddFaultHandler(m.addr() + pg, m.end(), h2).errno_value(), EEXIST);
  as_->monitor()->RemoveFaultHandler(h1);
  // A range that starts where nothing is mapped cannot be registered.
  Mapping gone(pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  const uintptr_t hole = gone.addr();
  gone.Unmap();
  EXPECT_EQ(as_->monitor()->AddFaultHandler(hole, hole + pg, h2).errno_value(), EINVAL);
}

}  // namespace
}  // namespace hmmkit::test
