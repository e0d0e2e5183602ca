// VulkanDmaEngine (dma/include/hmmkit/dma/vulkan_engine.hpp) on whatever Vulkan device the machine
// has; CI installs mesa-vulkan-drivers, so there it is lavapipe (the CPU device).
//
// Without a usable device (no loader, no ICD, or a device without VK_EXT_external_memory_host or
// timeline semaphores) every test that needs one skips with Create's error text. Set
// HMMKIT_REQUIRE_VULKAN=1 to make that a failure instead (a CI lane that must exercise the engine).
//
// "System memory" is anonymous private memory (sometimes unmapped, PROT_NONE, read-only or
// registered with userfaultfd on purpose); "device memory" comes from AllocateDeviceMemory.
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include <gtest/gtest.h>
#include <boost/asio/io_context.hpp>

#include "hmmkit/dma/dma_engine.hpp"
#include "hmmkit/dma/vm_access.hpp"
#include "hmmkit/dma/vulkan_engine.hpp"
#include "test_support.hpp"

namespace hmmkit::dma {
namespace {

using test::kMiB;
using test::Mapping;
using test::PageSize;
using Options = VulkanDmaEngine::Options;

constexpr int kRw = PROT_READ | PROT_WRITE;
constexpr uint32_t kVulkan12 = (1u << 22) | (2u << 12);  // VK_MAKE_API_VERSION(0, 1, 2, 0)

// Create's error when it means "no usable Vulkan here" (skip), as opposed to a bug (fail).
bool NoVulkanHere(const Status& st) {
  const int e = st.errno_value();
  return e == ENOENT || e == ENODEV || e == ENOTSUP;
}

bool VulkanRequired() {
  const char* v = std::getenv("HMMKIT_REQUIRE_VULKAN");
  return v && *v && std::strcmp(v, "0") != 0;
}

// Creates an engine; on "no Vulkan here" sets *skip to the reason (the caller skips), on any other
// error fails the test. Null in both cases.
std::unique_ptr<VulkanDmaEngine> TryMakeEngine(const Options& options, std::string* skip) {
  Result<std::unique_ptr<VulkanDmaEngine>> engine = VulkanDmaEngine::Create(options);
  if (engine.ok()) return std::move(engine).value();
  if (NoVulkanHere(engine.status()) && !VulkanRequired()) {
    *skip = "no usable Vulkan device: " + engine.status().ToString();
  } else {
    ADD_FAILURE() << "VulkanDmaEngine::Create: " << engine.status().ToString();
  }
  return nullptr;
}

// Declares `var`, an engine made with `options`, or skips/fails the test.
// NOLINTBEGIN(bugprone-macro-parentheses): `var` is the name of the variable declared here
#define VK_ENGINE_OR_SKIP(var, options)                        \
  std::string var##_skip;                                      \
  auto var = TryMakeEngine(options, &var##_skip);              \
  if (!var && !var##_skip.empty()) GTEST_SKIP() << var##_skip; \
  ASSERT_TRUE(var)
// NOLINTEND(bugprone-macro-parentheses)

DeviceAllocation Allocate(
    VulkanDmaEngine& engine, size_t len,
    DeviceMemoryPlacement placement = DeviceMemoryPlacement::kMappedIfPossible) {
  Result<DeviceAllocation> a = engine.AllocateDeviceMemory(len, placement);
  EXPECT_TRUE(a.ok()) << a.status().ToString();
  return a.ok() ? std::move(a).value() : DeviceAllocation();
}

Mapping SystemMemory(size_t len) {
  return Mapping(len, kRw, MAP_PRIVATE | MAP_ANONYMOUS);
}

void RandomFill(void* p, size_t len, uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto* b = static_cast<unsigned char*>(p);
  for (size_t i = 0; i < len; ++i) b[i] = static_cast<unsigned char>(rng());
}

// Index of the first byte of [p, p + len) that is not `v`, or len.
size_t FirstNot(const void* p, size_t len, unsigned char v) {
  const auto* b = static_cast<const unsigned char*>(p);
  return static_cast<size_t>(std::find_if(b, b + len, [v](unsigned char c) { return c != v; }) - b);
}

std::string Addr(const void* p) {
  return fmt::format("{}", p);
}

char* Bytes(const DeviceAllocation& a) {
  return static_cast<char*>(a.data());
}

// ---------------------------------------------------------------------------------------------
// Creation and errors that need no device.

TEST(VulkanDma, AMissingLoaderIsENOENTAndSaysWhatToInstall) {
  // Given a loader name that does not exist, Create fails with ENOENT telling what to install.
  Options options;
  options.loader = "libvulkan-hmmkit-test-missing.so.1";
  Result<std::unique_ptr<VulkanDmaEngine>> engine = VulkanDmaEngine::Create(options);
  ASSERT_FALSE(engine.ok());
  EXPECT_EQ(engine.errno_value(), ENOENT);
  const std::string msg = engine.status().message();
  EXPECT_NE(msg.find("libvulkan-hmmkit-test-missing.so.1"), std::string::npos) << msg;
  EXPECT_NE(msg.find("libvulkan1"), std::string::npos) << msg;
  EXPECT_NE(msg.find("mesa-vulkan-drivers"), std::string::npos) << msg;
}

TEST(VulkanDma, ALibraryThatIsNotALoaderIsENOTSUP) {
  Options options;
  options.loader = "libc.so.6";  // opens, but has no vkGetInstanceProcAddr
  Result<std::unique_ptr<VulkanDmaEngine>> engine = VulkanDmaEngine::Create(options);
  ASSERT_FALSE(engine.ok());
  EXPECT_EQ(engine.errno_value(), ENOTSUP);
  EXPECT_NE(engine.status().message().find("vkGetInstanceProcAddr"), std::string::npos);
}

TEST(VulkanDma, TooSmallAnImportLimitIsEINVAL) {
  Options options;
  options.max_import_bytes = 4096;
  EXPECT_EQ(VulkanDmaEngine::Create(options).errno_value(), EINVAL);
}

// ---------------------------------------------------------------------------------------------
// Device selection.

TEST(VulkanDma, CreateReportsTheChosenDeviceAndQueue) {
  VK_ENGINE_OR_SKIP(engine, Options{});
  const VulkanDmaEngine::DeviceInfo& info = engine->device_info();
  EXPECT_FALSE(info.device_name.empty());
  EXPECT_GE(info.api_version, kVulkan12);
  EXPECT_GT(info.import_alignment, 0u);
  EXPECT_EQ(info.import_alignment & (info.import_alignment - 1), 0u);
  EXPECT_GE(info.max_import_bytes, kMiB);
  EXPECT_NE(info.queue_flags, 0u);
  EXPECT_EQ(engine->name(), "vulkan");
  EXPECT_EQ(engine->drm_node(), info.drm_render ? info.drm_render : info.drm_primary);
  std::printf(
      "device %u: %s (%s, %s), queue family %u flags %#x%s, import alignment %#zx, DRM %s\n",
      info.physical_device_index, info.device_name.c_str(), info.driver_name.c_str(),
      info.driver_info.c_str(), info.queue_family, info.queue_flags,
      info.transfer_only_queue ? " (transfer-only)" : "", info.import_alignment,
      engine->drm_node()
          ? fmt::format("{}:{}", engine->drm_node()->major, engine->drm_node()->minor).c_str()
          : "unknown");
}

TEST(VulkanDma, DeviceIndexAndDrmNodeSelectOrAreENODEV) {
  VK_ENGINE_OR_SKIP(engine, Options{});
  const VulkanDmaEngine::DeviceInfo info = engine->device_info();
  engine.reset();

  // An index past the end, or a DRM node no device has, is ENODEV.
  Options past;
  past.device_index = 1000;
  EXPECT_EQ(VulkanDmaEngine::Create(past).errno_value(), ENODEV);
  Options no_node;
  no_node.drm_node = VulkanDmaEngine::DrmNode{0, 0x7fff0000};
  Result<std::unique_ptr<VulkanDmaEngine>> none = VulkanDmaEngine::Create(no_node);
  EXPECT_EQ(none.errno_value(), ENODEV) << none.status().ToString();

  // The index of the chosen device picks it again; so does its DRM node, when it reports one.
  Options by_index;
  by_index.device_index = info.physical_device_index;
  Result<std::unique_ptr<VulkanDmaEngine>> again = VulkanDmaEngine::Create(by_index);
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ((*again)->device_info().device_name, info.device_name);
  if (info.drm_render || info.drm_primary) {
    Options by_node;
    by_node.drm_node = info.drm_render ? info.drm_render : info.drm_primary;
    Result<std::unique_ptr<VulkanDmaEngine>> node = VulkanDmaEngine::Create(by_node);
    ASSERT_TRUE(node.ok()) << node.status().ToString();
    EXPECT_EQ((*node)->device_info().physical_device_index, info.physical_device_index);
  } else {
    EXPECT_NE(none.status().message().find("VK_EXT_physical_device_drm"), std::string::npos)
        << none.status().ToString();
  }
}

// ---------------------------------------------------------------------------------------------
// Copies: system -> device -> system round trips at odd sizes and offsets.

class VulkanDmaRoundTrip : public testing::TestWithParam<std::tuple<size_t, size_t>> {
 protected:
  static void SetUpTestSuite() {
    Result<std::unique_ptr<VulkanDmaEngine>> e = VulkanDmaEngine::Create(Options{});
    if (e.ok()) {
      engine_ = std::move(e).value().release();
    } else {
      skip_ = new std::string(e.status().ToString());
    }
  }
  static void TearDownTestSuite() {
    delete engine_;
    engine_ = nullptr;
    delete skip_;
    skip_ = nullptr;
  }
  void SetUp() override {
    if (!engine_) {
      if (VulkanRequired()) FAIL() << *skip_;
      GTEST_SKIP() << "no usable Vulkan device: " << *skip_;
    }
  }
  static VulkanDmaEngine* engine_;
  static std::string* skip_;
};
VulkanDmaEngine* VulkanDmaRoundTrip::engine_ = nullptr;
std::string* VulkanDmaRoundTrip::skip_ = nullptr;

TEST_P(VulkanDmaRoundTrip, SystemToDeviceToSystemIsExactInEveryPair) {
  const auto [len, offset] = GetParam();
  VulkanDmaEngine& engine = *engine_;
  const size_t page = PageSize();
  const size_t span = offset + len + 1 + page;  // guard byte after every range

  // Given a random system source, a device allocation and a system destination, every range at
  // `offset` (sources and destinations at different offsets, so nothing is page-aligned alike),
  Mapping src = SystemMemory(span), dst = SystemMemory(span), sys2 = SystemMemory(span);
  DeviceAllocation dev = Allocate(engine, span), dev2 = Allocate(engine, span);
  ASSERT_TRUE(dev && dev2);
  ASSERT_TRUE(dev.mapped()) << "lavapipe and integrated GPUs have mappable device memory";
  RandomFill(src.data(), span, len * 31 + offset);
  std::memset(dst.data(), 0xEE, span);
  std::memset(sys2.data(), 0xEE, span);
  std::memset(dev.data(), 0xEE, span);
  std::memset(dev2.data(), 0xEE, span);
  char* s = src.data() + offset;
  char* d1 = Bytes(dev) + (offset + 1) % 8;
  char* d2 = Bytes(dev2) + (offset + 3) % 8;
  char* out = dst.data() + (offset + 2) % page;
  char* out2 = sys2.data() + offset;

  // when the bytes go system -> device, device -> device, device -> system, system -> system,
  struct Step {
    const char* what;
    void* to;
    Memory to_mem;
    const void* from;
    Memory from_mem;
  };
  const Step steps[] = {
      {"system->device", d1, Memory::kDevice, s, Memory::kSystem},
      {"device->device", d2, Memory::kDevice, d1, Memory::kDevice},
      {"device->system", out, Memory::kSystem, d2, Memory::kDevice},
      {"system->system", out2, Memory::kSystem, out, Memory::kSystem},
  };
  for (const Step& step : steps) {
    SCOPED_TRACE(step.what);
    ASSERT_TRUE(engine.Copy(step.to, step.to_mem, step.from, step.from_mem, len).ok());
    // then each destination equals the source, and the byte after it is untouched.
    EXPECT_EQ(std::memcmp(step.to, s, len), 0);
    EXPECT_EQ(static_cast<unsigned char>(static_cast<char*>(step.to)[len]), 0xEE);
  }
  // Bytes before the destination ranges are untouched too.
  if ((offset + 2) % page > 0) {
    EXPECT_EQ(static_cast<unsigned char>(out[-1]), 0xEE);
  }
  if ((offset + 1) % 8 > 0) {
    EXPECT_EQ(static_cast<unsigned char>(d1[-1]), 0xEE);
  }
}

INSTANTIATE_TEST_SUITE_P(
    SizesAndOffsets, VulkanDmaRoundTrip,
    testing::Combine(testing::Values(size_t{1}, size_t{3}, size_t{4}, size_t{5}, size_t{4095},
                                     size_t{4096}, size_t{4097}, size_t{65537}, kMiB + 3,
                                     3 * kMiB + 5, 16 * kMiB + 1),
                     testing::Values(size_t{0}, size_t{1}, size_t{3}, size_t{4093})),
    [](const testing::TestParamInfo<std::tuple<size_t, size_t>>& p) {
      return fmt::format("{}B_at{}", std::get<0>(p.param), std::get<1>(p.param));
    });

TEST(VulkanDma, ADescriptorLargerThanTheImportLimitIsSplit) {
  // Given a 1 MiB import limit, a 5 MiB + 3 copy at an odd address becomes several imports,
  Options options;
  options.max_import_bytes = kMiB;
  VK_ENGINE_OR_SKIP(engine, options);
  const size_t len = 5 * kMiB + 3;
  Mapping src = SystemMemory(len + 8), dst = SystemMemory(len + 8);
  DeviceAllocation dev = Allocate(*engine, len);
  ASSERT_TRUE(dev);
  RandomFill(src.data(), len + 8, 5);
  ASSERT_TRUE(engine->Copy(dev.data(), Memory::kDevice, src.data() + 5, Memory::kSystem, len).ok());
  ASSERT_TRUE(engine->Copy(dst.data() + 1, Memory::kSystem, dev.data(), Memory::kDevice, len).ok());
  // and the data still arrives exactly.
  EXPECT_EQ(std::memcmp(dst.data() + 1, src.data() + 5, len), 0);
  EXPECT_GE(engine->vulkan_stats().imports, 2 * 6u);
  EXPECT_LE(engine->vulkan_stats().imported_bytes / engine->vulkan_stats().imports, kMiB);
}

TEST(VulkanDma, AdjacentSystemRangesOfOneBatchShareOneImport) {
  VK_ENGINE_OR_SKIP(engine, Options{});
  const size_t page = PageSize(), n = 16;
  // Given 16 page-sized copies from consecutive system pages (and one from the middle of a page),
  Mapping src = SystemMemory(n * page);
  DeviceAllocation dev = Allocate(*engine, n * page);
  ASSERT_TRUE(dev);
  RandomFill(src.data(), n * page, 16);
  std::vector<Descriptor> batch;
  for (size_t i = 0; i < n; ++i) {
    batch.push_back(Descriptor::Copy({Bytes(dev) + i * page, Memory::kDevice},
                                     {src.page(i), Memory::kSystem}, page));
  }
  const uint64_t before = engine->vulkan_stats().imports;
  Result<Fence> fence = engine->Submit(batch);
  ASSERT_TRUE(fence.ok()) << fence.status().ToString();
  ASSERT_TRUE(fence->Wait().ok()) << fence->Wait().ToString();
  // when they are one batch, the system side is imported once (when the alignment is a page).
  EXPECT_EQ(std::memcmp(dev.data(), src.data(), n * page), 0);
  if (engine->device_info().import_alignment <= page) {
    EXPECT_EQ(engine->vulkan_stats().imports - before, 1u);
  }
}

TEST(VulkanDma, KDeviceMemoryOutsideEngineAllocationsIsImportedLikeHostMemory) {
  // A kDevice endpoint that is not an engine allocation (an emulated device's memfd arena).
  VK_ENGINE_OR_SKIP(engine, Options{});
  Mapping arena = Mapping::Memfd(kMiB), src = SystemMemory(kMiB);
  RandomFill(src.data(), kMiB, 9);
  ASSERT_TRUE(
      engine->Copy(arena.data() + 7, Memory::kDevice, src.data(), Memory::kSystem, kMiB - 7).ok());
  EXPECT_EQ(std::memcmp(arena.data() + 7, src.data(), kMiB - 7), 0);
}

// ---------------------------------------------------------------------------------------------
// Fills: vkCmdFillBuffer for the aligned middle, pattern copies for unaligned heads and tails.

TEST(VulkanDma, FillsAreExactAtEveryAlignmentInSystemAndDeviceMemory) {
  VK_ENGINE_OR_SKIP(engine, Options{});
  const size_t lens[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 4096 + 3, kMiB + 1};
  constexpr size_t kSlot = 2 * kMiB;  // room for the longest fill, its offset and guard bytes
  const size_t count = std::size(lens) * 8;
  Mapping sys = SystemMemory(count * kSlot);
  DeviceAllocation dev = Allocate(*engine, count * kSlot);
  ASSERT_TRUE(dev);
  for (char* base : {sys.data(), Bytes(dev)}) {
    const Memory mem = base == sys.data() ? Memory::kSystem : Memory::kDevice;
    SCOPED_TRACE(mem == Memory::kSystem ? "system" : "device");
    // Given guard bytes everywhere and one fill per (length, offset 0..7) in its own slot,
    std::memset(base, 0xEE, count * kSlot);
    std::vector<Descriptor> batch;
    for (size_t i = 0; i < count; ++i) {
      batch.push_back(Descriptor::Fill({base + i * kSlot + 8 + i % 8, mem},
                                       static_cast<uint8_t>(i + 1), lens[i / 8]));
    }
    // when they run as one batch,
    Result<Fence> fence = engine->Submit(batch);
    ASSERT_TRUE(fence.ok()) << fence.status().ToString();
    ASSERT_TRUE(fence->Wait().ok()) << fence->Wait().ToString();
    // then exactly the asked bytes hold the fill byte.
    for (size_t i = 0; i < count; ++i) {
      SCOPED_TRACE(fmt::format("len {} offset {}", lens[i / 8], i % 8));
      const char* slot = base + i * kSlot;
      const size_t at = 8 + i % 8, len = lens[i / 8];
      EXPECT_EQ(FirstNot(slot, at, 0xEE), at);
      EXPECT_EQ(FirstNot(slot + at, len, static_cast<unsigned char>(i + 1)), len);
      EXPECT_EQ(FirstNot(slot + at + len, 64, 0xEE), 64u);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Per-descriptor errors and validation.

class VulkanDmaFaults : public testing::TestWithParam<bool> {};  // populate_probe

TEST_P(VulkanDmaFaults, BadSystemAddressesFailOnlyTheirDescriptors) {
  Options options;
  options.populate_probe = GetParam();
  VK_ENGINE_OR_SKIP(engine, options);
  const size_t page = PageSize(), len = 4 * page;

  // Given good memory, a hole, a PROT_NONE page, a read-only page and a source whose second page
  // is PROT_NONE,
  Mapping good = SystemMemory(len), out = SystemMemory(len);
  DeviceAllocation dev = Allocate(*engine, 8 * len);
  ASSERT_TRUE(dev);
  char* unmapped = static_cast<char*>(test::UnmappedAddress());
  ASSERT_NE(unmapped, nullptr);
  Mapping none(page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS);
  Mapping read_only(page, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS);
  Mapping half = SystemMemory(2 * page);
  ASSERT_EQ(mprotect(half.page(1), page, PROT_NONE), 0);
  RandomFill(good.data(), len, 1);
  std::memset(dev.data(), 0, 8 * len);
  char* d = Bytes(dev);

  // when one batch mixes them with good descriptors,
  const std::vector<Descriptor> batch = {
      Descriptor::Copy({d, Memory::kDevice}, {good.data(), Memory::kSystem}, len),          // 0
      Descriptor::Copy({d + len, Memory::kDevice}, {unmapped, Memory::kSystem}, page),      // 1
      Descriptor::Fill({out.data(), Memory::kSystem}, 0x77, len),                           // 2
      Descriptor::Copy({none.data(), Memory::kSystem}, {d, Memory::kDevice}, page),         // 3
      Descriptor::Fill({read_only.data(), Memory::kSystem}, 1, 8),                          // 4
      Descriptor::Copy({d + 2 * len, Memory::kDevice}, {half.data() + 9, Memory::kSystem},  // 5
                       page),
      Descriptor::Fill({unmapped + 3, Memory::kSystem}, 1, 5),                              // 6
      Descriptor::Copy({d + 3 * len, Memory::kDevice}, {good.data() + 1, Memory::kSystem},  // 7
                       len - 1),
  };
  Result<Fence> fence = engine->Submit(batch);
  ASSERT_TRUE(fence.ok()) << fence.status().ToString();
  const Status first = fence->Wait();

  // then Wait reports the lowest failing descriptor, each bad one has EFAULT naming its address and
  // side, and the good ones ran.
  EXPECT_EQ(first.errno_value(), EFAULT);
  EXPECT_NE(first.message().find("descriptor 1"), std::string::npos) << first.ToString();
  const auto results = fence->results();
  ASSERT_EQ(results.size(), batch.size());
  for (size_t ok : {0, 2, 7}) EXPECT_TRUE(results[ok].ok()) << ok << ": " << results[ok].ToString();
  struct Bad {
    size_t index;
    const void* addr;
    const char* side;
  };
  for (const Bad& bad : {Bad{1, unmapped, "source"}, Bad{3, none.data(), "destination"},
                         Bad{4, read_only.data(), "destination"}, Bad{5, half.page(1), "source"},
                         Bad{6, unmapped + 3, "destination"}}) {
    SCOPED_TRACE(bad.index);
    EXPECT_EQ(results[bad.index].errno_value(), EFAULT);
    const std::string msg = results[bad.index].message();
    EXPECT_NE(msg.find(Addr(bad.addr)), std::string::npos) << msg;
    EXPECT_NE(msg.find(bad.side), std::string::npos) << msg;
  }
  EXPECT_EQ(std::memcmp(d, good.data(), len), 0);
  EXPECT_EQ(std::memcmp(d + 3 * len, good.data() + 1, len - 1), 0);
  EXPECT_EQ(FirstNot(out.data(), len, 0x77), len);
  EXPECT_EQ(engine->vulkan_stats().failed_descriptors, 5u);
  // The blocking helper returns the descriptor's own error.
  EXPECT_EQ(engine->Copy(d, Memory::kDevice, none.data(), Memory::kSystem, 16).errno_value(),
            EFAULT);
}

INSTANTIATE_TEST_SUITE_P(Probe, VulkanDmaFaults, testing::Values(true, false),
                         [](const testing::TestParamInfo<bool>& p) {
                           return p.param ? "Populate" : "PageByPage";
                         });

TEST(VulkanDma, AMalformedBatchIsEINVALAndStartsNothing) {
  VK_ENGINE_OR_SKIP(engine, Options{});
  const size_t page = PageSize();
  Mapping src = SystemMemory(page), dst = SystemMemory(page);
  DeviceAllocation dev = Allocate(*engine, page);
  ASSERT_TRUE(dev);
  std::memset(src.data(), 0xAB, page);
  std::memset(dst.data(), 0, page);
  std::memset(dev.data(), 0, page);
  const Descriptor good =
      Descriptor::Copy({dst.data(), Memory::kSystem}, {src.data(), Memory::kSystem}, 64);
  const Descriptor good_dev = Descriptor::Fill({dev.data(), Memory::kDevice}, 1, 64);
  struct Case {
    const char* what;
    Descriptor bad;
  };
  const Case cases[] = {
      {"zero length",
       Descriptor::Copy({dev.data(), Memory::kDevice}, {src.data(), Memory::kSystem}, 0)},
      {"null source",
       Descriptor::Copy({dev.data(), Memory::kDevice}, {nullptr, Memory::kSystem}, 8)},
      {"overlap",
       Descriptor::Copy({src.data() + 8, Memory::kSystem}, {src.data(), Memory::kSystem}, 16)},
      // Engine-specific: a range that runs past the end of a device allocation.
      {"past the allocation", Descriptor::Copy({Bytes(dev) + page - 8, Memory::kDevice},
                                               {src.data(), Memory::kSystem}, 16)},
      {"around the allocation", Descriptor::Fill({Bytes(dev) - 8, Memory::kSystem}, 1, page + 16)},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    const Descriptor batch[] = {good, good_dev, c.bad};
    Result<Fence> fence = engine->Submit(batch);
    ASSERT_FALSE(fence.ok());
    EXPECT_EQ(fence.errno_value(), EINVAL);
    EXPECT_NE(fence.status().message().find("descriptor 2"), std::string::npos)
        << fence.status().ToString();
  }
  // Nothing was copied or counted.
  EXPECT_EQ(FirstNot(dst.data(), page, 0), page);
  EXPECT_EQ(FirstNot(dev.data(), page, 0), page);
  EXPECT_EQ(engine->stats().batches, 0u);
  EXPECT_EQ(engine->vulkan_stats().submissions, 0u);
  // An empty batch gives a complete fence.
  Result<Fence> empty = engine->Submit({});
  ASSERT_TRUE(empty.ok());
  EXPECT_TRUE(empty->Poll());
}

// A VmAccess that fails the first `eintr` reads with EINTR, then every read with `fail_errno` (0:
// none), else behaves like the real one.
class FlakyVm : public VmAccess {
 public:
  FlakyVm(int eintr, int fail_errno) : eintr_(eintr), fail_errno_(fail_errno) {}
  ssize_t ReadV(std::span<const iovec> local, std::span<const iovec> remote) override {
    calls_++;
    if (eintr_ > 0) {
      eintr_--;
      errno = EINTR;
      return -1;
    }
    if (fail_errno_) {
      errno = fail_errno_;
      return -1;
    }
    return VmAccess::ReadV(local, remote);
  }
  std::atomic<int> calls_{0};

 private:
  std::atomic<int> eintr_;
  const int fail_errno_;
};

TEST(VulkanDmaVm, ThePageProbeRetriesEintrAndReportsOtherErrnos) {
  const size_t len = 8 * PageSize();
  Mapping src = SystemMemory(len);
  RandomFill(src.data(), len, 3);
  {
    // Given a probe whose first two reads are interrupted, the copy still succeeds.
    FlakyVm vm(2, 0);
    Options options;
    options.populate_probe = false;
    options.vm = &vm;
    VK_ENGINE_OR_SKIP(engine, options);
    DeviceAllocation dev = Allocate(*engine, len);
    ASSERT_TRUE(engine->Copy(dev.data(), Memory::kDevice, src.data(), Memory::kSystem, len).ok());
    EXPECT_EQ(std::memcmp(dev.data(), src.data(), len), 0);
    EXPECT_GE(vm.calls_.load(), 3);
  }
  {
    // Given a probe that fails with ENOMEM, the descriptor carries ENOMEM and the address.
    FlakyVm vm(0, ENOMEM);
    Options options;
    options.populate_probe = false;
    options.vm = &vm;
    VK_ENGINE_OR_SKIP(engine, options);
    DeviceAllocation dev = Allocate(*engine, len);
    const Status st = engine->Copy(dev.data(), Memory::kDevice, src.data(), Memory::kSystem, len);
    EXPECT_EQ(st.errno_value(), ENOMEM);
    EXPECT_NE(st.message().find(Addr(src.data())), std::string::npos) << st.ToString();
  }
}

// ---------------------------------------------------------------------------------------------
// Device memory.

TEST(VulkanDma, DeviceAllocationErrors) {
  VK_ENGINE_OR_SKIP(engine, Options{});
  EXPECT_EQ(engine->AllocateDeviceMemory(0).errno_value(), EINVAL);
  EXPECT_EQ(engine->AllocateDeviceMemory(size_t{1} << 62).errno_value(), ENOMEM);
}

TEST(VulkanDma, UnmappedDeviceMemoryIsAddressedButNotTouchable) {
  VK_ENGINE_OR_SKIP(engine, Options{});
  const size_t len = 3 * kMiB + 5;
  // Given device memory that is never mapped,
  DeviceAllocation dev = Allocate(*engine, len, DeviceMemoryPlacement::kUnmapped);
  ASSERT_TRUE(dev);
  EXPECT_FALSE(dev.mapped());
  EXPECT_EQ(dev.size(), len);
  // its address is a reservation the CPU cannot read,
  unsigned char byte;
  const iovec local{&byte, 1}, remote{dev.data(), 1};
  EXPECT_EQ(process_vm_readv(getpid(), &local, 1, &remote, 1, 0), -1);
  // but the engine copies into it, fills it and copies out of it.
  Mapping src = SystemMemory(len), dst = SystemMemory(len);
  RandomFill(src.data(), len, 11);
  ASSERT_TRUE(engine->Copy(dev.data(), Memory::kDevice, src.data(), Memory::kSystem, len).ok());
  ASSERT_TRUE(engine->Fill(Bytes(dev) + 1, Memory::kDevice, 0x42, 6).ok());
  ASSERT_TRUE(engine->Copy(dst.data(), Memory::kSystem, dev.data(), Memory::kDevice, len).ok());
  EXPECT_EQ(dst.data()[0], src.data()[0]);
  EXPECT_EQ(FirstNot(dst.data() + 1, 6, 0x42), 6u);
  EXPECT_EQ(std::memcmp(dst.data() + 7, src.data() + 7, len - 7), 0);
}

TEST(VulkanDma, FreeingAnAllocationInFlightKeepsItUntilTheBatchCompletes) {
  VK_ENGINE_OR_SKIP(engine, Options{});
  const size_t len = 16 * kMiB;
  DeviceAllocation dev = Allocate(*engine, len);
  ASSERT_TRUE(dev);
  std::memset(dev.data(), 0x3C, len);
  Mapping dst = SystemMemory(len);
  const Descriptor d =
      Descriptor::Copy({dst.data(), Memory::kSystem}, {dev.data(), Memory::kDevice}, len);
  Result<Fence> fence = engine->Submit(std::span(&d, 1));
  ASSERT_TRUE(fence.ok());
  // when the allocation is freed while the copy runs,
  dev.Free();
  EXPECT_FALSE(dev);
  // then the copy still reads it to the end.
  ASSERT_TRUE(fence->Wait().ok()) << fence->Wait().ToString();
  EXPECT_EQ(FirstNot(dst.data(), len, 0x3C), len);
}

TEST(VulkanDma, ADeviceAllocationMayOutliveItsEngine) {
  DeviceAllocation dev;
  {
    VK_ENGINE_OR_SKIP(engine, Options{});
    dev = Allocate(*engine, kMiB);
    ASSERT_TRUE(dev);
    ASSERT_TRUE(engine->Fill(dev.data(), Memory::kDevice, 0x5A, kMiB).ok());
  }
  // The engine is gone; the memory stays mapped and holds what the device wrote.
  ASSERT_TRUE(dev.mapped());
  EXPECT_EQ(FirstNot(dev.data(), kMiB, 0x5A), kMiB);
  std::memset(dev.data(), 1, kMiB);
  dev.Free();
}

// ---------------------------------------------------------------------------------------------
// Threads and completion.

TEST(VulkanDma, ManyThreadsSubmittingConcurrentlyEachGetTheirOwnResults) {
  VK_ENGINE_OR_SKIP(engine, Options{});
  constexpr size_t kThreads = 8, kBatches = 40, kLen = 3 * 4096 + 7;
  DeviceAllocation dev = Allocate(*engine, kThreads * 2 * kLen);
  ASSERT_TRUE(dev);
  std::atomic<int> errors{0};
  std::vector<std::thread> threads;
  for (size_t t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      Mapping src = SystemMemory(kLen), back = SystemMemory(kLen), filled = SystemMemory(kLen);
      char* mine = Bytes(dev) + t * 2 * kLen;
      for (size_t b = 0; b < kBatches; ++b) {
        RandomFill(src.data(), kLen, t * 1000 + b);
        // One batch writes the thread's device slice and fills a system buffer; the next reads the
        // slice back (dependent transfers go in separate batches).
        const Descriptor first[] = {
            Descriptor::Copy({mine, Memory::kDevice}, {src.data(), Memory::kSystem}, kLen),
            Descriptor::Fill({filled.data(), Memory::kSystem}, static_cast<uint8_t>(b), kLen),
        };
        Result<Fence> f1 = engine->Submit(first);
        if (!f1.ok() || !f1->Wait().ok()) errors++;
        const Descriptor second =
            Descriptor::Copy({back.data(), Memory::kSystem}, {mine, Memory::kDevice}, kLen);
        Result<Fence> f2 = engine->Submit(std::span(&second, 1));
        if (!f2.ok() || !f2->Wait().ok()) errors++;
        if (std::memcmp(back.data(), src.data(), kLen) != 0) errors++;
        if (FirstNot(filled.data(), kLen, static_cast<unsigned char>(b)) != kLen) errors++;
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_EQ(engine->stats().batches, 2 * kThreads * kBatches);
  EXPECT_EQ(engine->stats().descriptors, 3 * kThreads * kBatches);
  EXPECT_EQ(engine->vulkan_stats().submissions, 2 * kThreads * kBatches);
  EXPECT_EQ(engine->vulkan_stats().failed_descriptors, 0u);
}

TEST(VulkanDma, OnCompletePostsTheHandlerToAnIoContext) {
  boost::asio::io_context io;  // outlives the engine
  VK_ENGINE_OR_SKIP(engine, Options{});
  Mapping src = SystemMemory(kMiB);
  DeviceAllocation dev = Allocate(*engine, kMiB);
  RandomFill(src.data(), kMiB, 4);
  const Descriptor d =
      Descriptor::Copy({dev.data(), Memory::kDevice}, {src.data(), Memory::kSystem}, kMiB);
  Result<Fence> fence = engine->Submit(std::span(&d, 1));
  ASSERT_TRUE(fence.ok());
  std::thread::id ran_on;
  int runs = 0;
  bool data_ok = false;
  fence->OnComplete(io.get_executor(), [&](const Fence& done) {
    ran_on = std::this_thread::get_id();
    runs++;
    data_ok = done.Wait().ok() && std::memcmp(dev.data(), src.data(), kMiB) == 0;
  });
  EXPECT_EQ(runs, 0);  // never inline
  io.run();            // returns once the handler ran: a pending fence counts as work
  EXPECT_EQ(runs, 1);
  EXPECT_EQ(ran_on, std::this_thread::get_id());
  EXPECT_TRUE(data_ok);
}

TEST(VulkanDma, DestroyingTheEngineCompletesEveryFenceInFlight) {
  constexpr size_t kBatches = 12, kLen = 4 * kMiB;
  Mapping src = SystemMemory(kLen), dst = SystemMemory(kBatches * kLen);
  RandomFill(src.data(), kLen, 12);
  std::vector<Fence> fences;
  {
    VK_ENGINE_OR_SKIP(engine, Options{});
    for (size_t i = 0; i < kBatches; ++i) {
      const Descriptor d = Descriptor::Copy({dst.data() + i * kLen, Memory::kSystem},
                                            {src.data(), Memory::kSystem}, kLen);
      Result<Fence> f = engine->Submit(std::span(&d, 1));
      ASSERT_TRUE(f.ok());
      fences.push_back(*f);
    }
  }  // the engine is destroyed with work in flight
  for (size_t i = 0; i < kBatches; ++i) {
    ASSERT_TRUE(fences[i].Poll()) << i;
    EXPECT_TRUE(fences[i].Wait().ok()) << fences[i].Wait().ToString();
    EXPECT_EQ(std::memcmp(dst.data() + i * kLen, src.data(), kLen), 0) << i;
  }
}

// ---------------------------------------------------------------------------------------------
// userfaultfd: the probe faults registered pages in through the kernel, so the monitor resolves
// them (on its own thread) before the device touches the memory.

// Opens a userfaultfd that also serves faults taken inside the kernel (/dev/userfaultfd, else
// userfaultfd(2) without UFFD_USER_MODE_ONLY), or one with UFFD_USER_MODE_ONLY. -1 with errno.
int OpenUffd(bool user_mode_only) {
  constexpr int kFlags = O_CLOEXEC | O_NONBLOCK;
  if (user_mode_only) return int(syscall(SYS_userfaultfd, kFlags | UFFD_USER_MODE_ONLY));
  const int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
  if (dev >= 0) {
    const int fd = ioctl(dev, USERFAULTFD_IOC_NEW, kFlags);
    close(dev);
    if (fd >= 0) return fd;
  }
  return int(syscall(SYS_userfaultfd, kFlags));
}

class UffdRegion {
 public:
  // `pages` anonymous pages registered for MISSING faults; each fault is resolved with a page of
  // byte `fill + page index`. ok() false when userfaultfd is not available here (errno says why).
  UffdRegion(size_t pages, unsigned char fill, bool user_mode_only = false) : fill_(fill) {
    page_ = PageSize();
    uffd_ = OpenUffd(user_mode_only);
    if (uffd_ < 0) return;
    uffdio_api api{};
    api.api = UFFD_API;
    if (ioctl(uffd_, UFFDIO_API, &api) != 0) return;
    area_ = Mapping(pages * page_, kRw, MAP_PRIVATE | MAP_ANONYMOUS);
    uffdio_register reg{};
    reg.range.start = area_.addr();
    reg.range.len = pages * page_;
    reg.mode = UFFDIO_REGISTER_MODE_MISSING;
    if (ioctl(uffd_, UFFDIO_REGISTER, &reg) != 0) return;
    if (pipe2(stop_, O_CLOEXEC) != 0) return;
    monitor_ = std::thread([this] { Monitor(); });
    ok_ = true;
  }
  ~UffdRegion() {
    if (monitor_.joinable()) {
      char c = 0;
      (void)!write(stop_[1], &c, 1);
      monitor_.join();
    }
    area_.Unmap();
    for (int fd : {uffd_, stop_[0], stop_[1]}) {
      if (fd >= 0) close(fd);
    }
  }
  bool ok() const { return ok_; }
  char* data() const { return area_.data(); }
  int faults() const { return faults_.load(); }
  unsigned char expected(size_t page) const { return static_cast<unsigned char>(fill_ + page); }

 private:
  void Monitor() {
    std::vector<unsigned char> source(page_);
    for (;;) {
      pollfd fds[2] = {{uffd_, POLLIN, 0}, {stop_[0], POLLIN, 0}};
      if (poll(fds, 2, -1) < 0) continue;
      if (fds[1].revents) return;
      uffd_msg msg;
      if (read(uffd_, &msg, sizeof msg) != sizeof msg) continue;
      if (msg.event != UFFD_EVENT_PAGEFAULT) continue;
      const uintptr_t page = msg.arg.pagefault.address & ~(uintptr_t(page_) - 1);
      std::memset(source.data(), expected((page - area_.addr()) / page_), page_);
      uffdio_copy copy{};
      copy.dst = page;
      copy.src = reinterpret_cast<uintptr_t>(source.data());
      copy.len = page_;
      faults_++;  // before the copy wakes the faulting thread, which may read the count at once
      ioctl(uffd_, UFFDIO_COPY, &copy);  // EEXIST when another fault of the page won: fine
    }
  }

  size_t page_ = 0;
  unsigned char fill_;
  int uffd_ = -1, stop_[2] = {-1, -1};
  Mapping area_;
  std::thread monitor_;
  std::atomic<int> faults_{0};
  bool ok_ = false;
};

TEST(VulkanDma, UserfaultfdRegisteredMemoryIsFaultedInByTheProbe) {
  VK_ENGINE_OR_SKIP(engine, Options{});
  constexpr size_t kPages = 16;
  const size_t page = PageSize(), len = kPages * page;
  UffdRegion src(kPages, 0x10), dst(kPages, 0x80);
  if (!src.ok() || !dst.ok()) {
    GTEST_SKIP() << "no userfaultfd that serves kernel-mode faults (/dev/userfaultfd or "
                    "userfaultfd(2) without UFFD_USER_MODE_ONLY): "
                 << strerror(errno);
  }
  DeviceAllocation dev = Allocate(*engine, len);
  ASSERT_TRUE(dev);

  // Given missing pages that only the monitor can fill, a copy from them reads what it supplies,
  const Status in =
      engine->Copy(dev.data(), Memory::kDevice, src.data() + 1, Memory::kSystem, len - 1);
  ASSERT_TRUE(in.ok()) << in.ToString();
  EXPECT_GE(src.faults(), int(kPages));
  for (size_t i = 0; i < kPages; ++i) {
    const size_t from = i == 0 ? 1 : i * page;
    EXPECT_EQ(FirstNot(Bytes(dev) + from - 1, (i + 1) * page - from, src.expected(i)),
              (i + 1) * page - from)
        << "page " << i;
  }
  // and a copy into them overwrites what it supplied, except the bytes outside the range.
  std::memset(dev.data(), 0x01, len);
  const Status out =
      engine->Copy(dst.data() + 3, Memory::kSystem, dev.data(), Memory::kDevice, len - 6);
  ASSERT_TRUE(out.ok()) << out.ToString();
  EXPECT_GE(dst.faults(), int(kPages));
  EXPECT_EQ(FirstNot(dst.data() + 3, len - 6, 0x01), len - 6);
  EXPECT_EQ(static_cast<unsigned char>(dst.data()[0]), dst.expected(0));
  EXPECT_EQ(static_cast<unsigned char>(dst.data()[len - 1]), dst.expected(kPages - 1));
}

TEST(VulkanDma, UserModeOnlyUserfaultfdMemoryIsEFAULTNotAHang) {
  // A UFFD_USER_MODE_ONLY userfaultfd does not serve faults taken inside the kernel, so the probe
  // cannot fault its missing pages in: the descriptor fails with EFAULT (as with CpuDmaEngine's
  // process_vm_readv), and nothing blocks or crashes.
  VK_ENGINE_OR_SKIP(engine, Options{});
  constexpr size_t kPages = 4;
  const size_t len = kPages * PageSize();
  UffdRegion src(kPages, 0x10, /*user_mode_only=*/true);
  if (!src.ok())
    GTEST_SKIP() << "userfaultfd(UFFD_USER_MODE_ONLY) unavailable: " << strerror(errno);
  DeviceAllocation dev = Allocate(*engine, len);
  ASSERT_TRUE(dev);
  const Status st = engine->Copy(dev.data(), Memory::kDevice, src.data(), Memory::kSystem, len);
  EXPECT_EQ(st.errno_value(), EFAULT) << st.ToString();
  EXPECT_EQ(src.faults(), 0);
}

}  // namespace
}  // namespace hmmkit::dma
