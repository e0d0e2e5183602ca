// The DRM backend against a real kernel driver: vgem (virtual GEM). On a machine without vgem the
// tests that need it skip, naming how to run them (the guest lane loads vgem in a stock kernel);
// the error-path tests need no DRM device and always run.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <xf86drm.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <thread>

#include <gtest/gtest.h>
#include <boost/asio/io_context.hpp>

#include "hmmkit/driver/device_memory.hpp"
#include "hmmkit/drm/discovery.hpp"
#include "hmmkit/drm/gem.hpp"
#include "hmmkit/drm/gem_arena.hpp"
#include "hmmkit/drm/sync.hpp"

namespace hmmkit::drm {
namespace {

using namespace std::chrono_literals;

constexpr size_t kMiB = size_t{1} << 20;

// The vgem card node, or a skip that says how to get one.
std::shared_ptr<DrmDevice> OpenVgem(bool card = true) {
  auto dev = OpenDrmDevice("vgem", card);
  if (!dev.ok()) return nullptr;
  return *dev;
}

// HMMKIT_REQUIRE_DRM=1 (set by the guest lane, where vgem is loaded) turns the skip into a failure.
bool VgemRequired() {
  const char* v = std::getenv("HMMKIT_REQUIRE_DRM");
  return v != nullptr && *v != '\0' && *v != '0';
}

#define REQUIRE_VGEM(dev)                                                                   \
  if (!(dev)) {                                                                             \
    if (VgemRequired()) FAIL() << OpenDrmDevice("vgem", true).status().ToString();          \
    GTEST_SKIP() << "no vgem device (modprobe vgem; CI runs these in the qemu guest lane, " \
                    "scripts/guest/run.sh): "                                               \
                 << OpenDrmDevice("vgem", true).status().ToString();                        \
  }

TEST(DrmErrors, AMissingNodeSaysWhatToCheck) {
  auto dev = DrmDevice::Open("/dev/dri/card-does-not-exist");
  ASSERT_FALSE(dev.ok());
  EXPECT_EQ(dev.status().errno_value(), ENOENT);
  EXPECT_NE(dev.status().message().find("ls /dev/dri"), std::string::npos)
      << dev.status().ToString();
}

TEST(DrmErrors, ANodeThatIsNotDrmIsRefused) {
  auto dev = DrmDevice::Open("/dev/null");
  ASSERT_FALSE(dev.ok());
  EXPECT_EQ(dev.status().errno_value(), ENODEV) << dev.status().ToString();
  EXPECT_NE(dev.status().message().find("not a DRM node"), std::string::npos);
}

TEST(DrmErrors, AnUnknownDriverListsWhatExists) {
  auto dev = OpenDrmDevice("no-such-driver", true);
  ASSERT_FALSE(dev.ok());
  EXPECT_EQ(dev.status().errno_value(), ENODEV) << dev.status().ToString();
  const auto all = ListDrmDevices();
  if (all.empty()) {
    EXPECT_NE(dev.status().message().find("no /dev/dri nodes"), std::string::npos);
  } else {
    EXPECT_NE(dev.status().message().find("found:"), std::string::npos);
  }
}

TEST(DrmVgem, DiscoveryListsCardAndRenderNodesWithTheDriverVersion) {
  auto dev = OpenVgem();
  REQUIRE_VGEM(dev);
  const auto all = ListDrmDevices();
  auto it = std::find_if(all.begin(), all.end(),
                         [](const DrmDeviceInfo& d) { return d.driver.name == "vgem"; });
  ASSERT_NE(it, all.end());
  EXPECT_EQ(it->card.rfind("/dev/dri/card", 0), 0u) << it->card;
  EXPECT_EQ(it->render.rfind("/dev/dri/renderD", 0), 0u) << it->render;
  EXPECT_FALSE(it->bus.empty());
  EXPECT_TRUE(dev->primary());
  EXPECT_EQ(dev->version().name, "vgem");
  // DRM_CAP_DUMB_BUFFER is answered only by KMS drivers: vgem says no, yet creates dumb buffers
  // (the next test), so CreateDumb never trusts the cap alone.
  EXPECT_FALSE(dev->caps().dumb_buffer);
  EXPECT_TRUE(dev->caps().prime_export);
  EXPECT_TRUE(dev->caps().prime_import);
}

TEST(DrmVgem, DumbBuffersAreMappedAndRenderNodesRefuseThemClearly) {
  auto dev = OpenVgem();
  REQUIRE_VGEM(dev);
  auto buf = GemBuffer::CreateDumb(dev, kMiB + 100);
  ASSERT_TRUE(buf.ok()) << buf.status().ToString();
  EXPECT_GE(buf->size(), kMiB + 100);
  EXPECT_EQ(dev->HandleRefs(buf->handle()), 1u);
  auto p = buf->Map();
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  std::memset(*p, 0x5a, buf->size());
  auto again = buf->Map();
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, *p);
  EXPECT_EQ(static_cast<unsigned char*>(*p)[buf->size() - 1], 0x5a);

  auto render = OpenVgem(/*card=*/false);
  ASSERT_TRUE(render);
  ASSERT_FALSE(render->primary());
  auto refused = GemBuffer::CreateDumb(render, kMiB);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().errno_value(), ENOTSUP) << refused.status().ToString();
  EXPECT_NE(refused.status().message().find("render node"), std::string::npos);
}

TEST(DrmVgem, PrimeRoundTripSharesTheBytesAcrossFilesAndDmaBufMappings) {
  auto dev = OpenVgem();
  REQUIRE_VGEM(dev);
  auto buf = GemBuffer::CreateDumb(dev, 64 * 1024);
  ASSERT_TRUE(buf.ok()) << buf.status().ToString();
  auto* mine = static_cast<unsigned char*>(buf->Map().value());
  for (size_t i = 0; i < buf->size(); ++i) mine[i] = static_cast<unsigned char>(i * 7);
  auto dmabuf = buf->ExportDmaBuf();
  ASSERT_TRUE(dmabuf.ok()) << dmabuf.status().ToString();

  // Another open file of the device imports it under its own handle.
  auto other = DrmDevice::Open(dev->path());
  ASSERT_TRUE(other.ok()) << other.status().ToString();
  auto imported = GemBuffer::Import(*other, dmabuf->get());
  ASSERT_TRUE(imported.ok()) << imported.status().ToString();
  EXPECT_EQ(imported->size(), buf->size());
  auto* theirs = static_cast<unsigned char*>(imported->Map().value());
  EXPECT_EQ(std::memcmp(theirs, mine, buf->size()), 0);
  theirs[123] = 0xee;
  EXPECT_EQ(mine[123], 0xee);

  // The dma-buf itself maps the same bytes.
  void* direct = mmap(nullptr, buf->size(), PROT_READ, MAP_SHARED, dmabuf->get(), 0);
  ASSERT_NE(direct, MAP_FAILED) << std::strerror(errno);
  EXPECT_EQ(static_cast<unsigned char*>(direct)[123], 0xee);
  EXPECT_EQ(static_cast<unsigned char*>(direct)[4097], mine[4097]);
  munmap(direct, buf->size());
}

TEST(DrmVgem, HandlesAreCountedBecauseTheKernelGivesTheSameHandleTwice) {
  auto dev = OpenVgem();
  REQUIRE_VGEM(dev);
  auto buf = GemBuffer::CreateDumb(dev, 4096);
  ASSERT_TRUE(buf.ok());
  const uint32_t handle = buf->handle();
  auto dmabuf = buf->ExportDmaBuf().value();
  {
    // Importing into the same file returns the same handle: two holders, one kernel handle.
    auto again = GemBuffer::Import(dev, dmabuf.get());
    ASSERT_TRUE(again.ok()) << again.status().ToString();
    EXPECT_EQ(again->handle(), handle);
    EXPECT_EQ(dev->HandleRefs(handle), 2u);
    GemBuffer third = again->Share();
    EXPECT_EQ(dev->HandleRefs(handle), 3u);
  }
  // The other holders went away; the handle is still open and usable.
  EXPECT_EQ(dev->HandleRefs(handle), 1u);
  drm_mode_map_dumb map{};
  map.handle = handle;
  EXPECT_EQ(dev->Ioctl(DRM_IOCTL_MODE_MAP_DUMB, &map), 0);
  // The last holder closes it for real.
  buf = GemBuffer();
  EXPECT_EQ(dev->HandleRefs(handle), 0u);
  map = {};
  map.handle = handle;
  EXPECT_EQ(dev->Ioctl(DRM_IOCTL_MODE_MAP_DUMB, &map), ENOENT);
}

TEST(DrmVgem, AVgemFenceBecomesAFrameworkFenceThatCompletesWhenSignaled) {
  auto dev = OpenVgem();
  REQUIRE_VGEM(dev);
  auto buf = GemBuffer::CreateDumb(dev, 4096);
  ASSERT_TRUE(buf.ok());
  auto dmabuf = buf->ExportDmaBuf().value();
  auto fence_id = VgemAttachFence(*buf, /*write=*/true);
  ASSERT_TRUE(fence_id.ok()) << fence_id.status().ToString();
  // A second write fence while the first is pending is refused.
  auto busy = VgemAttachFence(*buf, true);
  ASSERT_FALSE(busy.ok());
  EXPECT_EQ(busy.status().errno_value(), EBUSY) << busy.status().ToString();

  auto sync = ExportSyncFile(dmabuf.get(), /*writes_only=*/false);
  ASSERT_TRUE(sync.ok()) << sync.status().ToString();
  EXPECT_FALSE(SyncFileSignaled(sync->get()));
  auto from_sync = FenceFromFd(std::move(*sync), FenceFdKind::kSyncFile);
  ASSERT_TRUE(from_sync.ok());
  UniqueFd dup(fcntl(dmabuf.get(), F_DUPFD_CLOEXEC, 0));
  auto from_dmabuf = FenceFromFd(std::move(dup), FenceFdKind::kDmaBufAll);
  ASSERT_TRUE(from_dmabuf.ok());
  boost::asio::io_context io;
  bool handler_ran = false;
  from_sync->OnComplete(io.get_executor(), [&](const dma::Fence& f) {
    handler_ran = f.Poll() && f.results()[0].ok();
  });
  EXPECT_FALSE(from_sync->Poll());
  EXPECT_FALSE(from_dmabuf->WaitFor(20ms));

  ASSERT_TRUE(VgemSignalFence(*dev, *fence_id).ok());
  EXPECT_TRUE(from_sync->Wait().ok());
  EXPECT_TRUE(from_dmabuf->Wait().ok());
  io.run();
  EXPECT_TRUE(handler_ran);
  // Signaling twice, or an unknown fence, is an error.
  auto twice = VgemSignalFence(*dev, *fence_id);
  EXPECT_FALSE(twice.ok());
  auto unknown = VgemSignalFence(*dev, 0xfffff);
  ASSERT_FALSE(unknown.ok());
  EXPECT_EQ(unknown.errno_value(), ENOENT) << unknown.ToString();
}

TEST(DrmVgem, SyncobjIsRefusedWithTheReasonOnADriverWithoutIt) {
  auto dev = OpenVgem();
  REQUIRE_VGEM(dev);
  ASSERT_FALSE(dev->caps().syncobj);
  auto obj = Syncobj::Create(dev, false);
  ASSERT_FALSE(obj.ok());
  EXPECT_EQ(obj.status().errno_value(), ENOTSUP);
  EXPECT_NE(obj.status().message().find("no syncobj"), std::string::npos);
}

TEST(DrmVgem, DeviceMemoryCarvesItsPagesOutOfAGemObject) {
  auto dev = OpenVgem();
  REQUIRE_VGEM(dev);
  auto arena = GemArena(dev, 4 * kMiB);
  ASSERT_TRUE(arena.ok()) << arena.status().ToString();
  driver::DeviceMemory::Options o;
  o.capacity = 4 * kMiB;
  o.name = "vgem-private";
  o.external = *arena;
  auto mem = driver::DeviceMemory::Create(o);
  ASSERT_TRUE(mem.ok()) << mem.status().ToString();
  EXPECT_TRUE((*mem)->external());
  auto ids = (*mem)->AllocPages(3);
  ASSERT_TRUE(ids.ok());
  for (uint64_t id : *ids) std::memset((*mem)->PageData(id), int(id + 1), 4096);
  // The bytes live in the GEM object: a mapping of the arena fd sees them.
  void* whole = mmap(nullptr, 4 * kMiB, PROT_READ, MAP_SHARED, (*mem)->ArenaFd(),
                     off_t((*mem)->ArenaOffset(0)));
  ASSERT_NE(whole, MAP_FAILED) << std::strerror(errno);
  for (uint64_t id : *ids) {
    EXPECT_EQ(static_cast<unsigned char*>(whole)[id * 4096 + 17], (id + 1) & 0xff);
  }
  munmap(whole, 4 * kMiB);
  for (uint64_t id : *ids) (*mem)->PutPage(id);

  // Coherent memory maps single pages at their offset; either the driver does that right (and the
  // page shows its own bytes), or Create refuses with the reason.
  auto carena = GemArena(dev, 4 * kMiB);
  ASSERT_TRUE(carena.ok());
  o.kind = PageKind::kDeviceCoherent;
  o.name = "vgem-coherent";
  o.external = *carena;
  auto cmem = driver::DeviceMemory::Create(o);
  if (cmem.ok()) {
    std::memset((*cmem)->PageData(5), 0x77, 4096);
    void* one = mmap(nullptr, 4096, PROT_READ, MAP_SHARED, (*cmem)->ArenaFd(),
                     off_t((*cmem)->ArenaOffset(5)));
    ASSERT_NE(one, MAP_FAILED);
    EXPECT_EQ(static_cast<unsigned char*>(one)[9], 0x77);
    munmap(one, 4096);
    std::printf("vgem: device-coherent GEM arenas supported (page mappings honour the offset)\n");
  } else {
    EXPECT_EQ(cmem.status().errno_value(), ENOTSUP) << cmem.status().ToString();
    EXPECT_NE(cmem.status().message().find("ignores the offset"), std::string::npos);
    std::printf("vgem: device-coherent GEM arenas refused: %s\n", cmem.status().ToString().c_str());
  }
}

}  // namespace
}  // namespace hmmkit::drm
