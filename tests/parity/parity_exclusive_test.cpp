// Parity with hmm-tests: device-exclusive access (EXCLUSIVE, CHECK_EXCLUSIVE). A page the device
// holds exclusively (for device atomics) stays so until the CPU touches it.
#include <sys/mman.h>

#include "hmmkit/mirror/kernel_features.hpp"
#include "parity_fixture.hpp"

namespace hmmkit::parity {
namespace {

// hmm-tests' exclusive.
TEST_P(DmirrorParity, ExclusiveThenCpuIncrementRevokesIt) {
  // Given a written buffer the device holds exclusively
  const size_t n = DefaultPages();
  Buffer b(n);
  ASSERT_TRUE(b.mapped());
  FillInts(b.ints(), b.nints(), Seq);
  hmm_dmirror_cmd cmd{};
  ASSERT_EQ(Run(kExclusive, b, &cmd), 0);
  EXPECT_EQ(cmd.cpages, n);
  EXPECT_TRUE(IntsAre(b.bounce_ints(), b.nints(), Seq));
  // When the CPU increments every int
  volatile int* p = b.ints();
  for (size_t i = 0; i < b.nints(); ++i) p[i] = p[i] + 1;
  // Then it sees its increments
  EXPECT_TRUE(IntsAre(b.ints(), b.nints(), [](size_t i) { return int(i) + 1; }));
  // And the device no longer holds any page exclusively
  EXPECT_EQ(Run(kCheckExclusive, b), 0);
}

// hmm-tests' exclusive_mprotect.
TEST_P(DmirrorParity, ExclusiveThenMprotectReadOnlyDeviceWriteIsEperm) {
  // Given a written buffer the device holds exclusively
  const size_t n = DefaultPages();
  Buffer b(n);
  ASSERT_TRUE(b.mapped());
  FillInts(b.ints(), b.nints(), Seq);
  hmm_dmirror_cmd cmd{};
  ASSERT_EQ(Run(kExclusive, b, &cmd), 0);
  EXPECT_EQ(cmd.cpages, n);
  EXPECT_TRUE(IntsAre(b.bounce_ints(), b.nints(), Seq));
  // When the buffer is made read-only
  ASSERT_EQ(mprotect(b.data(), b.size(), PROT_READ), 0);
  // Then a device write is refused with EPERM and the data is intact
  FillInts(b.bounce_ints(), b.nints(), Neg);
  EXPECT_EQ(Run(kWrite, b), EPERM);
  EXPECT_TRUE(IntsAre(b.ints(), b.nints(), Seq));
}

// munmap returns before the monitor dispatches its event; a new mapping at the same address made
// exclusive right away must be registered afresh, not taken for the old one (UFFDIO_WRITEPROTECT
// failed with ENOENT before exclusive access let pending events land first).
TEST_P(DmirrorParity, ExclusiveOnANewMappingAtAnUnmappedAddress) {
  const size_t n = 4;
  size_t reused = 0;
  for (int round = 0; round < 40; ++round) {
    Buffer old_buffer(n);
    ASSERT_TRUE(old_buffer.mapped());
    FillInts(old_buffer.ints(), old_buffer.nints(), Seq);
    ASSERT_EQ(Run(kExclusive, old_buffer), 0);
    const uintptr_t at = old_buffer.addr();
    old_buffer.Unmap();
    Buffer b(n);
    ASSERT_TRUE(b.mapped());
    reused += b.addr() == at;
    FillInts(b.ints(), b.nints(), Neg);
    hmm_dmirror_cmd cmd{};
    ASSERT_EQ(Run(kExclusive, b, &cmd), 0) << "round " << round;
    EXPECT_EQ(cmd.cpages, n);
    EXPECT_TRUE(IntsAre(b.bounce_ints(), b.nints(), Neg)) << "round " << round;
  }
  EXPECT_GT(reused, 0u) << "the kernel never reused the address: the test proved nothing";
}

TEST_P(DmirrorParity, ExclusiveHoldsUntilTheCpuTouchesIt) {
  // Given a written buffer the device holds exclusively
  const size_t n = 8;
  Buffer b(n);
  ASSERT_TRUE(b.mapped());
  FillInts(b.ints(), b.nints(), Seq);
  hmm_dmirror_cmd cmd{};
  ASSERT_EQ(Run(kExclusive, b, &cmd), 0);
  ASSERT_EQ(cmd.cpages, n);
  // When nothing touches it
  // Then the device still holds it: CHECK_EXCLUSIVE is EPERM
  EXPECT_EQ(Run(kCheckExclusive, b), EPERM);
  // When the CPU writes one page
  *reinterpret_cast<volatile int*>(b.page(3)) = -3;
  // Then the other pages are still exclusive
  EXPECT_EQ(Run(kCheckExclusive, b), EPERM);
  // When the CPU writes every page
  for (size_t i = 0; i < n; ++i) *reinterpret_cast<volatile int*>(b.page(i)) = -int(i);
  // Then none is exclusive any more
  EXPECT_EQ(Run(kCheckExclusive, b), 0);
}

TEST_P(DmirrorParity, CpuReadRevokesExclusive) {
  // A CPU read revokes exclusivity where hmmkit takes the page out of reach (UFFDIO_MOVE); with
  // the write-protect fallback only writes do (documented weaker read guarantee).
  if (!KernelFeatures::Get().uffdio_move) GTEST_SKIP() << "no UFFDIO_MOVE: reads do not revoke";
  // Given a written buffer the device holds exclusively
  const size_t n = 8;
  Buffer b(n);
  ASSERT_TRUE(b.mapped());
  FillInts(b.ints(), b.nints(), Seq);
  hmm_dmirror_cmd cmd{};
  ASSERT_EQ(Run(kExclusive, b, &cmd), 0);
  ASSERT_EQ(cmd.cpages, n);
  // When the CPU reads every page
  EXPECT_TRUE(IntsAre(b.ints(), b.nints(), Seq));
  // Then none is exclusive any more
  EXPECT_EQ(Run(kCheckExclusive, b), 0);
}

}  // namespace
}  // namespace hmmkit::parity
