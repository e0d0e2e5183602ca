// FaultQueue (driver/emu/include/hmmkit/emu/fault_queue.hpp): deduplication, batching, the bounded
// buffer, error propagation, shutdown, and a many-thread stress run.
//
// No sleeps: a test that must know a thread is blocked in Raise on a full buffer waits until the
// queue's raise_waits counter says so (it is counted under the queue lock just before the wait);
// a test that needs several raises to be in the queue waits for the raised counter.
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "hmmkit/emu/fault_queue.hpp"

namespace hmmkit::emu {
namespace {

constexpr uint64_t kPage = kPageSize;

DeviceFault Fault(uint64_t va, Access access, unsigned cu = 0) {
  return DeviceFault{.va = va, .access = access, .cu = cu};
}

template <class Pred>
void SpinUntil(Pred pred) {
  while (!pred()) std::this_thread::yield();
}

TEST(FaultQueue, FaultsOnOnePageBecomeOneFaultWithTheStrongestAccess) {
  FaultQueue queue;
  const uint64_t page = 0x7000;
  // Given two reads and a write of the same page, raised by three compute units that then wait,
  Status results[3];
  std::thread units[3];
  const Access kinds[3] = {Access::kRead, Access::kRead, Access::kWrite};
  for (unsigned i = 0; i < 3; ++i) {
    units[i] = std::thread(
        [&, i] { results[i] = queue.RaiseAndWait(Fault(page + 0x10 * (i + 1), kinds[i], i)); });
  }
  SpinUntil([&] { return queue.stats().raised == 3; });
  // when the driver pops,
  std::vector<DeviceFault> batch = queue.PopBatch();
  // then it sees one fault, for write access,
  ASSERT_EQ(batch.size(), 1u);
  EXPECT_EQ(batch[0].page(), page);
  EXPECT_EQ(batch[0].access, Access::kWrite);
  EXPECT_EQ(queue.stats().deduplicated, 2u);
  // and completing it wakes every unit with its status.
  queue.Complete(batch[0], Status::Ok());
  for (std::thread& t : units) t.join();
  for (const Status& st : results) EXPECT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(queue.stats().completed, 1u);
}

TEST(FaultQueue, AnAtomicUpgradesAPendingReadAndFaultsOnOtherPagesStaySeparate) {
  FaultQueue queue;
  FaultTicket a = queue.Raise(Fault(0x1000, Access::kRead));
  FaultTicket b = queue.Raise(Fault(0x1ff8, Access::kAtomic, 3));
  FaultTicket c = queue.Raise(Fault(0x2000, Access::kRead));
  std::vector<DeviceFault> batch = queue.PopBatch();
  ASSERT_EQ(batch.size(), 2u);
  EXPECT_EQ(batch[0].va, 0x1000u);  // the first raise's address and unit
  EXPECT_EQ(batch[0].cu, 0u);
  EXPECT_EQ(batch[0].access, Access::kAtomic);
  EXPECT_EQ(batch[1].access, Access::kRead);
  EXPECT_EQ(queue.stats().upgraded, 1u);
  // A new fault on a page in service is a new fault, not joined to the one being serviced.
  FaultTicket d = queue.Raise(Fault(0x1000, Access::kWrite));
  EXPECT_EQ(queue.stats().pending, 1u);
  const Status ok[2] = {Status::Ok(), Status::Ok()};
  queue.Complete(batch, ok);
  EXPECT_TRUE(queue.Wait(a).ok());
  EXPECT_TRUE(queue.Wait(b).ok());
  EXPECT_TRUE(queue.Wait(c).ok());
  std::vector<DeviceFault> again = queue.PopBatch();
  ASSERT_EQ(again.size(), 1u);
  EXPECT_EQ(again[0].access, Access::kWrite);
  queue.Complete(again[0], Status::Ok());
  EXPECT_TRUE(queue.Wait(d).ok());
}

TEST(FaultQueue, BatchesAreSortedOldestFirstAndCappedAt256) {
  FaultQueue queue;
  std::vector<uint64_t> pages(300);
  for (uint64_t i = 0; i < pages.size(); ++i) pages[i] = 0x100000 + i * kPage;
  std::shuffle(pages.begin(), pages.end(), std::mt19937_64(7));
  std::vector<FaultTicket> tickets;
  for (uint64_t va : pages) tickets.push_back(queue.Raise(Fault(va + 8, Access::kRead)));

  std::vector<DeviceFault> first = queue.PopBatch();
  ASSERT_EQ(first.size(), 256u);
  EXPECT_TRUE(
      std::is_sorted(first.begin(), first.end(),
                     [](const DeviceFault& a, const DeviceFault& b) { return a.va < b.va; }));
  // The 256 oldest raises, whatever their addresses.
  std::set<uint64_t> expected(pages.begin(), pages.begin() + 256);
  std::set<uint64_t> got;
  for (const DeviceFault& f : first) got.insert(f.page());
  EXPECT_EQ(got, expected);
  std::vector<DeviceFault> second = queue.PopBatch();
  EXPECT_EQ(second.size(), 44u);
  EXPECT_EQ(queue.stats().batches, 2u);
  EXPECT_EQ(queue.stats().max_batch, 256u);

  std::vector<Status> ok(256);
  queue.Complete(first, ok);
  queue.Complete(second, std::span<const Status>(ok.data(), second.size()));
  for (FaultTicket t : tickets) EXPECT_TRUE(queue.Wait(t).ok());
}

TEST(FaultQueue, AFullBufferBlocksRaiseUntilTheDriverPops) {
  FaultQueue queue(FaultQueue::Options{.capacity = 4});
  std::vector<FaultTicket> tickets;
  for (uint64_t i = 0; i < 4; ++i) tickets.push_back(queue.Raise(Fault(i * kPage, Access::kRead)));
  // Given a full buffer, a fifth fault on a new page blocks in Raise,
  std::atomic<bool> raised{false};
  Status fifth;
  std::thread unit([&] {
    FaultTicket t = queue.Raise(Fault(9 * kPage, Access::kWrite, 1));
    raised.store(true);
    fifth = queue.Wait(t);
  });
  SpinUntil([&] { return queue.stats().raise_waits == 1 || raised.load(); });
  EXPECT_FALSE(raised.load());
  EXPECT_EQ(queue.stats().pending, 4u);
  // while a fault that joins a pending one does not block.
  tickets.push_back(queue.Raise(Fault(2 * kPage + 16, Access::kWrite)));
  EXPECT_EQ(queue.stats().deduplicated, 1u);
  // When the driver pops two, the blocked raise goes through.
  std::vector<DeviceFault> batch = queue.PopBatch(2);
  ASSERT_EQ(batch.size(), 2u);
  SpinUntil([&] { return raised.load(); });
  EXPECT_EQ(queue.stats().pending, 3u);
  std::vector<DeviceFault> rest = queue.PopBatch();
  ASSERT_EQ(rest.size(), 3u);
  EXPECT_EQ(rest.back().va, 9 * kPage);
  for (const DeviceFault& f : batch) queue.Complete(f, Status::Ok());
  for (const DeviceFault& f : rest) queue.Complete(f, Status::Ok());
  unit.join();
  EXPECT_TRUE(fifth.ok());
  for (FaultTicket t : tickets) EXPECT_TRUE(queue.Wait(t).ok());
}

TEST(FaultQueue, ErrorsReachEveryWaiterOfTheFault) {
  FaultQueue queue;
  Status on_bad[2];
  Status on_good;
  std::thread a([&] { on_bad[0] = queue.RaiseAndWait(Fault(0x5000, Access::kRead)); });
  std::thread b([&] { on_bad[1] = queue.RaiseAndWait(Fault(0x5008, Access::kAtomic, 1)); });
  std::thread c([&] { on_good = queue.RaiseAndWait(Fault(0x6000, Access::kWrite, 2)); });
  SpinUntil([&] { return queue.stats().raised == 3; });
  std::vector<DeviceFault> batch = queue.PopBatch();
  ASSERT_EQ(batch.size(), 2u);
  ASSERT_EQ(batch[0].page(), 0x5000u);
  const Status results[2] = {Status::FromErrno(EFAULT, "no VMA at 0x5000"), Status::Ok()};
  queue.Complete(batch, results);
  a.join();
  b.join();
  c.join();
  for (const Status& st : on_bad) {
    EXPECT_EQ(st.errno_value(), EFAULT);
    EXPECT_EQ(st.message(), "no VMA at 0x5000");
  }
  EXPECT_TRUE(on_good.ok());
}

TEST(FaultQueue, AHandlerWithTheWrongResultCountFailsTheBatchWithEio) {
  FaultQueue queue;
  Status st;
  std::thread unit([&] { st = queue.RaiseAndWait(Fault(0x5000, Access::kRead)); });
  std::thread service([&] {
    queue.ServiceLoop([](std::span<const DeviceFault>) { return std::vector<Status>{}; });
  });
  unit.join();
  EXPECT_EQ(st.errno_value(), EIO);
  queue.Shutdown();
  service.join();
}

TEST(FaultQueue, TicketsAreCollectedOnce) {
  FaultQueue queue;
  FaultTicket t = queue.Raise(Fault(0x1000, Access::kRead));
  std::vector<DeviceFault> batch = queue.PopBatch();
  queue.Complete(batch[0], Status::FromErrno(ENOMEM));
  EXPECT_EQ(queue.Wait(t).errno_value(), ENOMEM);
  EXPECT_EQ(queue.Wait(t).errno_value(), EINVAL);
  EXPECT_EQ(queue.Wait(FaultTicket{12345}).errno_value(), EINVAL);
}

TEST(FaultQueue, ShutdownFailsEveryoneWithEcanceled) {
  FaultQueue queue(FaultQueue::Options{.capacity = 1});
  // Given a fault in service (popped), a pending fault, and a raise blocked on the full buffer,
  Status in_service, pending, blocked;
  std::thread a([&] { in_service = queue.RaiseAndWait(Fault(0x1000, Access::kRead)); });
  std::vector<DeviceFault> popped = queue.PopBatch();
  ASSERT_EQ(popped.size(), 1u);
  std::thread b([&] { pending = queue.RaiseAndWait(Fault(0x2000, Access::kRead)); });
  SpinUntil([&] { return queue.stats().pending == 1; });
  std::atomic<bool> c_raised{false};
  std::thread c([&] {
    FaultTicket t = queue.Raise(Fault(0x3000, Access::kRead));
    c_raised.store(true);
    blocked = queue.Wait(t);
  });
  SpinUntil([&] { return queue.stats().raise_waits == 1 || c_raised.load(); });
  EXPECT_FALSE(c_raised.load());
  // and a driver waiting on another, empty queue,
  FaultQueue idle;
  std::vector<DeviceFault> idle_batch{Fault(1, Access::kRead)};
  std::thread driver([&] { idle_batch = idle.PopBatch(); });
  // when both shut down,
  queue.Shutdown();
  idle.Shutdown();
  a.join();
  b.join();
  c.join();
  driver.join();
  // then everyone got ECANCELED and the driver an empty batch.
  EXPECT_EQ(in_service.errno_value(), ECANCELED);
  EXPECT_EQ(pending.errno_value(), ECANCELED);
  EXPECT_EQ(blocked.errno_value(), ECANCELED);
  EXPECT_TRUE(idle_batch.empty());
  EXPECT_EQ(queue.stats().canceled, 2u);
  // Later calls fail at once; a late Complete of the canceled fault is ignored.
  queue.Complete(popped[0], Status::Ok());
  EXPECT_EQ(queue.RaiseAndWait(Fault(0x4000, Access::kRead)).errno_value(), ECANCELED);
  EXPECT_TRUE(queue.PopBatch().empty());
  EXPECT_TRUE(queue.is_shut_down());
}

TEST(FaultQueue, ManyUnitsManyFaultsEveryWaiterGetsItsPagesResult) {
  constexpr unsigned kUnits = 8;
  constexpr int kFaultsPerUnit = 400;
  constexpr uint64_t kPages = 48;
  FaultQueue queue(FaultQueue::Options{.capacity = 16});
  // The driver's verdict depends on the page only: every fifth page is bad, and says which.
  auto verdict = [](uint64_t page_index) {
    return page_index % 5 == 0 ? Status::FromErrno(EFAULT, "page " + std::to_string(page_index))
                               : Status::Ok();
  };
  std::atomic<uint64_t> bad_batches{0};
  std::thread service([&] {
    queue.ServiceLoop([&](std::span<const DeviceFault> batch) {
      std::vector<Status> results;
      std::set<uint64_t> seen;
      for (size_t i = 0; i < batch.size(); ++i) {
        if (i > 0 && batch[i - 1].va > batch[i].va) bad_batches.fetch_add(1);
        if (!seen.insert(batch[i].page()).second) bad_batches.fetch_add(1);  // not deduplicated
        results.push_back(verdict(batch[i].page() / kPage));
      }
      return results;
    });
  });
  std::atomic<uint64_t> wrong_results{0};
  std::vector<std::thread> units;
  for (unsigned cu = 0; cu < kUnits; ++cu) {
    units.emplace_back([&, cu] {
      std::mt19937_64 rng(cu);
      for (int k = 0; k < kFaultsPerUnit; ++k) {
        const uint64_t page_index = rng() % kPages;
        const Access access = Access(rng() % 3);
        Status st = queue.RaiseAndWait(Fault(page_index * kPage + (rng() % kPage), access, cu));
        Status want = verdict(page_index);
        if (st.errno_value() != want.errno_value() || st.message() != want.message()) {
          wrong_results.fetch_add(1);
        }
      }
    });
  }
  for (std::thread& t : units) t.join();
  queue.Shutdown();
  service.join();

  EXPECT_EQ(wrong_results.load(), 0u);
  EXPECT_EQ(bad_batches.load(), 0u);
  FaultQueue::Stats s = queue.stats();
  EXPECT_EQ(s.raised, uint64_t(kUnits) * kFaultsPerUnit);
  EXPECT_EQ(s.completed + s.deduplicated, s.raised);
  EXPECT_EQ(s.canceled, 0u);
  EXPECT_LE(s.max_batch, 16u);
}

}  // namespace
}  // namespace hmmkit::emu
