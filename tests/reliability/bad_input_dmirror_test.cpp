// Bad input to the test_hmm-compatible command interface (hmmkit/dmirror.h): a NULL command,
// migrations of memory without read permission or without a mapping, failed allocations, and
// threads closing or using one handle at once (run under TSan in CI). Unaligned, empty,
// overflowing ranges, unknown requests and closed handles are covered by the parity suite
// (tests/parity/parity_test.cpp); docs/reliability.md points at those tests.
#include <sys/mman.h>

#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "reliability_support.hpp"
#include "test_support.hpp"

namespace hmmkit::test {
namespace {

constexpr unsigned kPages = 4;

Mapping Written(size_t pages) {
  Mapping m(pages * PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  for (size_t i = 0; i < m.size(); ++i) m.data()[i] = char(i * 3 + 11);
  return m;
}
bool Intact(const Mapping& m) {
  for (size_t i = 0; i < m.size(); ++i)
    if (m.data()[i] != char(i * 3 + 11)) return false;
  return true;
}

TEST(DmirrorBadInputTest, NullCommandIsEfaultAndBadMmapIsEinval) {
  HMMKIT_OPEN_DMIRROR_OR_SKIP(h, 0);
  errno = 0;
  EXPECT_EQ(hmm_dmirror_ioctl(h.get(), HMM_DMIRROR_READ, nullptr), -1);
  EXPECT_EQ(errno, EFAULT);
  errno = 0;
  EXPECT_EQ(hmm_dmirror_mmap(h.get(), nullptr, 0, PROT_READ, MAP_SHARED, 0), MAP_FAILED);
  EXPECT_EQ(errno, EINVAL);
  errno = 0;
  EXPECT_EQ(hmm_dmirror_mmap(h.get(), nullptr, PageSize(), PROT_READ, MAP_SHARED, 4096),
            MAP_FAILED);
  EXPECT_EQ(errno, EINVAL);
  errno = 0;
  EXPECT_EQ(hmm_dmirror_mmap(-1, nullptr, PageSize(), PROT_READ, MAP_SHARED, 0), MAP_FAILED);
  EXPECT_EQ(errno, EINVAL);
}

TEST(DmirrorBadInputTest, MigrateOfProtNoneOrUnmappedIsEinvalAndMovesNothing) {
  HMMKIT_OPEN_DMIRROR_OR_SKIP(h, 0);
  // Given a written buffer made PROT_NONE
  Mapping m = Written(kPages);
  std::vector<char> bounce(kPages * PageSize());
  ASSERT_EQ(mprotect(m.data(), m.size(), PROT_NONE), 0);
  // When it is migrated to the device
  // Then EINVAL (no read permission), and no page moved
  EXPECT_EQ(DmirrorCmd(h.get(), HMM_DMIRROR_MIGRATE_TO_DEV, m.addr(), bounce.data(), kPages),
            EINVAL);
  ASSERT_EQ(mprotect(m.data(), m.size(), PROT_READ | PROT_WRITE), 0);
  EXPECT_EQ(DevicePages(h.get(), m.addr(), kPages), 0);
  EXPECT_TRUE(Intact(m));
  // Given a range whose second half is a hole, when it is migrated, then EINVAL, nothing moved
  Mapping two = Written(2 * kPages);
  ASSERT_EQ(mprotect(two.page(kPages), kPages * PageSize(), PROT_NONE), 0);
  EXPECT_EQ(DmirrorCmd(h.get(), HMM_DMIRROR_MIGRATE_TO_DEV, two.addr(), bounce.data(), 2 * kPages),
            EINVAL);
  EXPECT_EQ(DevicePages(h.get(), two.addr(), kPages), 0);
  auto* hole = static_cast<char*>(UnmappedAddress());
  ASSERT_NE(hole, nullptr);
  EXPECT_EQ(DmirrorCmd(h.get(), HMM_DMIRROR_MIGRATE_TO_DEV, reinterpret_cast<uintptr_t>(hole),
                       bounce.data(), 1),
            EINVAL);
}

TEST(DmirrorBadInputTest, ConcurrentCloseOfOneHandleSucceedsExactlyOnce) {
  for (int round = 0; round < 20; ++round) {
    // Given one open handle and four threads that all close it at once
    int h = hmm_dmirror_open(0);
    if (h < 0 && errno == ENOTSUP) GTEST_SKIP() << "no userfaultfd";
    ASSERT_GE(h, 0) << strerror(errno);
    std::atomic<int> ok{0}, einval{0}, other{0};
    std::atomic<bool> go{false};
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&] {
        while (!go.load()) {
        }
        if (hmm_dmirror_close(h) == 0)
          ok++;
        else if (errno == EINVAL)
          einval++;
        else
          other++;
      });
    }
    go = true;
    for (auto& t : threads) t.join();
    // Then exactly one close succeeded and the others were EINVAL
    ASSERT_EQ(ok.load(), 1) << round;
    ASSERT_EQ(einval.load(), 3) << round;
    ASSERT_EQ(other.load(), 0) << round;
  }
}

TEST(DmirrorBadInputTest, CommandsRacingACloseGetTheirResultOrEinval) {
  // Given a written buffer mirrored by one handle, and two threads issuing commands on it
  Mapping m = Written(kPages);
  int h = hmm_dmirror_open(0);
  if (h < 0 && errno == ENOTSUP) GTEST_SKIP() << "no userfaultfd";
  ASSERT_GE(h, 0) << strerror(errno);
  std::atomic<bool> closed{false};
  std::atomic<int> unexpected{0}, after_close_ok{0}, reads{0};
  std::vector<std::thread> users;
  for (int t = 0; t < 2; ++t) {
    users.emplace_back([&, t] {
      std::vector<char> bounce(kPages * PageSize());
      for (int i = 0;; ++i) {
        const bool was_closed = closed.load();
        const unsigned long req = (i + t) % 3 == 0   ? HMM_DMIRROR_MIGRATE_TO_DEV
                                  : (i + t) % 3 == 1 ? HMM_DMIRROR_READ
                                                     : HMM_DMIRROR_MIGRATE_TO_SYS;
        const int err = DmirrorCmd(h, req, m.addr(), bounce.data(), kPages);
        if (err == 0 && req == HMM_DMIRROR_READ) {
          reads++;
          if (std::memcmp(bounce.data(), m.data(), m.size()) != 0) {
            ADD_FAILURE() << "a READ returned other bytes";
            unexpected++;
          }
        }
        // ENOENT: a page the CPU (the memcmp below) was faulting back did not migrate this time
        // (migrate.hpp: such pages are skipped, never lost).
        const bool skipped = err == ENOENT && req == HMM_DMIRROR_MIGRATE_TO_DEV;
        if (err != 0 && err != EINVAL && !skipped) {
          ADD_FAILURE() << "request " << (req & 0xff) << ": " << strerror(err);
          unexpected++;
        }
        if (was_closed) {
          if (err == 0) after_close_ok++;
          break;
        }
      }
    });
  }
  // When a third thread closes the handle while they run
  while (reads.load() < 4) std::this_thread::yield();
  ASSERT_EQ(hmm_dmirror_close(h), 0);
  closed = true;
  for (auto& t : users) t.join();
  // Then every command returned its result or EINVAL, none succeeded after the close,
  // and the bytes are intact wherever the pages ended up
  EXPECT_EQ(unexpected.load(), 0);
  EXPECT_EQ(after_close_ok.load(), 0);
  EXPECT_TRUE(Intact(m));
}

}  // namespace
}  // namespace hmmkit::test
