// Parity with hmm-tests: fork. A child opens its own device handle (a mirror of its own address
// space) and writes through it; MAP_PRIVATE memory is copied on write, MAP_SHARED memory is not.
//
// The child runs no GoogleTest code: it computes a result and _exit()s with a code that names the
// step that failed (ChildStep), which the parent reports.
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>

#include "parity_fixture.hpp"
#include "test_support.hpp"

namespace hmmkit::parity {
namespace {

enum ChildStep : int {
  kChildOk = 0,
  kChildSawWrongData = 2,     // the child did not see the parent's data
  kChildOpenFailed = 3,       // hmm_dmirror_open in the child
  kChildWriteFailed = 4,      // WRITE through the child's device returned an error
  kChildWrongCounts = 5,      // WRITE: cpages != npages or faults != 1
  kChildWrongAfterWrite = 6,  // the child does not see what its device wrote
};

const char* Describe(int code) {
  switch (code) {
    case kChildSawWrongData:
      return "the child did not see the parent's data";
    case kChildOpenFailed:
      return "hmm_dmirror_open failed in the child";
    case kChildWriteFailed:
      return "WRITE through the child's device failed";
    case kChildWrongCounts:
      return "WRITE in the child: cpages != npages or faults != 1";
    case kChildWrongAfterWrite:
      return "the child does not see what its device wrote";
    default:
      return "unexpected exit code";
  }
}

bool Holds(const int* p, size_t n, int (*f)(size_t)) {
  const volatile int* v = p;
  for (size_t i = 0; i < n; ++i)
    if (v[i] != f(i)) return false;
  return true;
}

// Forks; the child runs `body` and _exit()s with its result. Success when the child exited 0.
template <class F>
::testing::AssertionResult InChild(F body) {
  fflush(nullptr);
  pid_t pid = fork();
  if (pid < 0) return ::testing::AssertionFailure() << "fork: " << strerror(errno);
  if (pid == 0) _exit(body());
  int status = 0;
  while (waitpid(pid, &status, 0) < 0)
    if (errno != EINTR) return ::testing::AssertionFailure() << "waitpid: " << strerror(errno);
  if (WIFSIGNALED(status))
    return ::testing::AssertionFailure() << "child killed by signal " << WTERMSIG(status) << " ("
                                         << strsignal(WTERMSIG(status)) << ")";
  if (!WIFEXITED(status) || WEXITSTATUS(status) != kChildOk)
    return ::testing::AssertionFailure()
           << "child exited " << WEXITSTATUS(status) << ": " << Describe(WEXITSTATUS(status));
  return ::testing::AssertionSuccess();
}

// The child's part of both scenarios: check it sees `before`, write the bounce buffer (Neg) through
// its own device, check it sees Neg.
int ChildWritesThroughItsDevice(unsigned device, Buffer& b, size_t n) {
  if (!Holds(b.ints(), b.nints(), Seq)) return kChildSawWrongData;
  int h = hmm_dmirror_open(device);
  if (h < 0) return kChildOpenFailed;
  hmm_dmirror_cmd cmd{};
  int rc = Cmd(h, kWrite, b.addr(), b.bounce(), n, &cmd);
  int result = kChildOk;
  if (rc != 0)
    result = kChildWriteFailed;
  else if (cmd.cpages != n || cmd.faults != 1)
    result = kChildWrongCounts;
  else if (!Holds(b.ints(), b.nints(), Neg))
    result = kChildWrongAfterWrite;
  hmm_dmirror_close(h);
  return result;
}

// hmm-tests' anon_write_child: with and without a prior migration, with and without THP.
TEST_P(DmirrorParity, ForkChildWritesThroughItsOwnDevice) {
  if (const char* why = hmmkit::test::ForkWithMonitorUnavailableReason()) GTEST_SKIP() << why;
  for (bool migrate : {false, true}) {
    for (bool thp : {false, true}) {
      SCOPED_TRACE(std::string(migrate ? "migrated" : "system memory") + (thp ? ", THP" : ""));
      // Given a written private buffer (a THP candidate or 4 MiB of small pages), maybe migrated
      const size_t n = thp ? PmdSize() / PageSize() : DefaultPages();
      Buffer b = Buffer::Aligned(n, thp ? PmdSize() : PageSize());
      ASSERT_TRUE(b.mapped());
      if (thp && !AdviseHuge(b)) continue;  // no THP in this kernel: small pages only
      FillInts(b.ints(), b.nints(), Seq);
      if (migrate) {
        hmm_dmirror_cmd cmd{};
        ASSERT_EQ(Run(kMigrateToDev, b, &cmd), 0);
        ASSERT_EQ(cmd.cpages, n);
      }
      // And the data a device will write, in the bounce buffer
      FillInts(b.bounce_ints(), b.nints(), Neg);
      // When a child writes the buffer through its own device
      const unsigned device_index = device();
      EXPECT_TRUE(InChild([&] { return ChildWritesThroughItsDevice(device_index, b, n); }));
      // Then the child saw the parent's data and then its own write (checked in the child)
      // And the parent's buffer did not change (copy on write)
      EXPECT_TRUE(IntsAre(b.ints(), b.nints(), Seq)) << "parent";
    }
  }
}

// hmm-tests' anon_write_child_shared.
TEST_P(DmirrorParity, ForkChildWriteToMapSharedIsSeenByParent) {
  if (const char* why = hmmkit::test::ForkWithMonitorUnavailableReason()) GTEST_SKIP() << why;
  // Given a written MAP_SHARED anonymous buffer and the data a device will write
  const size_t n = DefaultPages();
  Buffer b(n, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS);
  ASSERT_TRUE(b.mapped());
  FillInts(b.ints(), b.nints(), Seq);
  FillInts(b.bounce_ints(), b.nints(), Neg);
  // When a child writes it through its own device
  const unsigned device_index = device();
  EXPECT_TRUE(InChild([&] { return ChildWritesThroughItsDevice(device_index, b, n); }));
  // Then the parent sees the child's write (shared memory is not copied)
  EXPECT_TRUE(IntsAre(b.ints(), b.nints(), Neg)) << "parent";
}

}  // namespace
}  // namespace hmmkit::parity
