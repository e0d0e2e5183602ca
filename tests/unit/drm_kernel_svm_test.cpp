// Kernel-SVM delegation (Xe, nouveau, amdkfd) against a recording fake of the ioctl layer: CI has
// none of that hardware, so these tests check the request numbers and the argument bytes at the
// offsets of the kernel's uAPI layouts, byte for byte, and that the driver's answers are used.
#include <sys/ioctl.h>

#include <cstring>
#include <vector>

#include <gtest/gtest.h>

#include "hmmkit/drm/kernel_svm.hpp"

namespace hmmkit::drm {
namespace {

uint64_t U64(const std::vector<uint8_t>& b, size_t off) {
  uint64_t v;
  EXPECT_LE(off + 8, b.size());
  std::memcpy(&v, b.data() + off, 8);
  return v;
}
uint32_t U32(const std::vector<uint8_t>& b, size_t off) {
  uint32_t v;
  EXPECT_LE(off + 4, b.size());
  std::memcpy(&v, b.data() + off, 4);
  return v;
}
uint16_t U16(const std::vector<uint8_t>& b, size_t off) {
  uint16_t v;
  std::memcpy(&v, b.data() + off, 2);
  return v;
}
// Every byte in [from, to) is zero (reserved and padding fields must be).
bool Zero(const std::vector<uint8_t>& b, size_t from, size_t to) {
  for (size_t i = from; i < to && i < b.size(); ++i)
    if (b[i] != 0) return false;
  return to <= b.size();
}

DriverVersion Driver(const char* name) {
  DriverVersion v;
  v.name = name;
  return v;
}

constexpr uint64_t kStart = 0x7f0000000000, kSize = 64 << 20;

// Answers DEVICE_QUERY CONFIG as an Xe kernel would (size first, then five params) and VM_CREATE
// with vm id 7.
int XeKernel(unsigned long req, void* arg, uint64_t flags) {
  auto* b = static_cast<uint8_t*>(arg);
  if (req == 0xC0286440) {  // DEVICE_QUERY
    uint32_t size;
    std::memcpy(&size, b + 12, 4);
    if (size == 0) {
      const uint32_t need = 8 + 5 * 8;
      std::memcpy(b + 12, &need, 4);
      return 0;
    }
    uint64_t data;
    std::memcpy(&data, b + 16, 8);
    uint64_t reply[6] = {5, 0xe20b, flags, 0x10000, 48, 2};  // num_params, then info[]
    std::memcpy(reinterpret_cast<void*>(data), reply, sizeof reply);
    return 0;
  }
  if (req == 0xC0206443) {  // VM_CREATE
    const uint32_t vm = 7;
    std::memcpy(b + 12, &vm, 4);
  }
  return 0;
}

TEST(KernelSvmXe, CreatesAFaultModeVmAndMirrorsWithOneCpuAddrMirrorBind) {
  RecordingIoctl fake([](unsigned long req, void* arg) { return XeKernel(req, arg, 0x4 | 0x1); });
  auto dev = DrmDevice::ForFake(fake, Driver("xe"));
  auto svm = CreateXeSvm(dev);
  ASSERT_TRUE(svm.ok()) << svm.status().ToString();
  ASSERT_TRUE((*svm)->Mirror(kStart, kSize).ok());
  auto calls = fake.calls();
  ASSERT_EQ(calls.size(), 4u);  // query size, query data, VM_CREATE, VM_BIND
  EXPECT_EQ(calls[0].request, 0xC0286440u);
  EXPECT_EQ(U32(calls[0].bytes, 8), 2u);   // query = CONFIG
  EXPECT_EQ(U32(calls[0].bytes, 12), 0u);  // size 0: ask for the size
  EXPECT_EQ(U32(calls[1].bytes, 12), 48u);
  EXPECT_NE(U64(calls[1].bytes, 16), 0u);  // data pointer
  // VM_CREATE: flags LR_MODE | FAULT_MODE at offset 8; nothing else set.
  EXPECT_EQ(calls[2].request, 0xC0206443u);
  ASSERT_EQ(calls[2].bytes.size(), 32u);
  EXPECT_EQ(U32(calls[2].bytes, 8), 0x2u | 0x4u);
  EXPECT_TRUE(Zero(calls[2].bytes, 0, 8) && Zero(calls[2].bytes, 12, 32));
  // VM_BIND: vm 7, one op: MAP with CPU_ADDR_MIRROR | MADVISE_AUTORESET, no BO, offset 0.
  const auto& b = calls[3].bytes;
  EXPECT_EQ(calls[3].request, 0x40886445u);
  ASSERT_EQ(b.size(), 136u);
  EXPECT_EQ(U32(b, 8), 7u);                   // vm_id
  EXPECT_EQ(U32(b, 12), 0u);                  // default bind queue
  EXPECT_EQ(U32(b, 20), 1u);                  // num_binds
  EXPECT_EQ(U32(b, 24 + 8), 0u);              // obj
  EXPECT_EQ(U64(b, 24 + 16), 0u);             // cpu_addr_mirror_offset
  EXPECT_EQ(U64(b, 24 + 24), kSize);          // range
  EXPECT_EQ(U64(b, 24 + 32), kStart);         // addr
  EXPECT_EQ(U32(b, 24 + 40), 0u);             // op MAP
  EXPECT_EQ(U32(b, 24 + 44), 0x20u | 0x40u);  // flags
  EXPECT_TRUE(Zero(b, 24 + 48, 24 + 80));     // prefetch region, pad2, reserved
  EXPECT_EQ(U32(b, 108), 0u);                 // num_syncs
  EXPECT_TRUE(Zero(b, 104, 136));
  svm->reset();
  calls = fake.calls();
  ASSERT_EQ(calls.size(), 5u);  // VM_DESTROY from the destructor
  EXPECT_EQ(calls[4].request, 0x40186444u);
  EXPECT_EQ(U32(calls[4].bytes, 0), 7u);
  EXPECT_TRUE(Zero(calls[4].bytes, 4, 24));
}

TEST(KernelSvmXe, MadviseAndPrefetchCarryTheirFieldsWhereTheKernelReadsThem) {
  RecordingIoctl fake([](unsigned long req, void* arg) { return XeKernel(req, arg, 0x4); });
  auto svm = CreateXeSvm(DrmDevice::ForFake(fake, Driver("xe"))).value();
  fake.Clear();
  ASSERT_TRUE(svm->PreferLocation(kStart, kSize, SvmLocation::kDevice).ok());
  ASSERT_TRUE(svm->PreferLocation(kStart, kSize, SvmLocation::kSystem).ok());
  ASSERT_TRUE(svm->SetAtomics(kStart, 4096, SvmAtomics::kGlobal).ok());
  ASSERT_TRUE(svm->Prefetch(kStart, kSize, SvmLocation::kDevice).ok());
  ASSERT_TRUE(svm->Prefetch(kStart, kSize, SvmLocation::kSystem).ok());
  const auto calls = fake.calls();
  ASSERT_EQ(calls.size(), 5u);
  for (int i = 0; i < 3; ++i) {
    const auto& b = calls[i].bytes;
    EXPECT_EQ(calls[i].request, 0x4040644Cu);
    ASSERT_EQ(b.size(), 64u);
    EXPECT_EQ(U64(b, 8), kStart);
    EXPECT_EQ(U32(b, 24), 7u);  // vm_id
    EXPECT_TRUE(Zero(b, 0, 8) && Zero(b, 40, 64));
  }
  EXPECT_EQ(U64(calls[0].bytes, 16), kSize);
  EXPECT_EQ(U32(calls[0].bytes, 28), 0u);           // PREFERRED_LOC
  EXPECT_EQ(U32(calls[0].bytes, 32), 0u);           // DEFAULT_DEVICE
  EXPECT_EQ(U16(calls[0].bytes, 36), 0u);           // MIGRATE_ALL_PAGES
  EXPECT_EQ(U32(calls[1].bytes, 32), 0xffffffffu);  // DEFAULT_SYSTEM
  EXPECT_EQ(U64(calls[2].bytes, 16), 4096u);
  EXPECT_EQ(U32(calls[2].bytes, 28), 1u);  // ATOMIC
  EXPECT_EQ(U32(calls[2].bytes, 32), 2u);  // GLOBAL
  for (int i = 3; i < 5; ++i) {
    const auto& b = calls[i].bytes;
    EXPECT_EQ(calls[i].request, 0x40886445u);
    EXPECT_EQ(U32(b, 24 + 40), 4u);  // op PREFETCH
    EXPECT_EQ(U32(b, 24 + 44), 0u);  // no flags
    EXPECT_EQ(U64(b, 24 + 32), kStart);
  }
  EXPECT_EQ(U32(calls[3].bytes, 24 + 48), 0xffffffffu);  // consult the preferred location
  EXPECT_EQ(U32(calls[4].bytes, 24 + 48), 0u);           // region 0: system memory
}

TEST(KernelSvmXe, WithoutTheMirrorFlagItRefusesAndNamesTheFlag) {
  RecordingIoctl fake([](unsigned long req, void* arg) { return XeKernel(req, arg, 0x1); });
  auto svm = CreateXeSvm(DrmDevice::ForFake(fake, Driver("xe")));
  ASSERT_FALSE(svm.ok());
  EXPECT_EQ(svm.status().errno_value(), ENOTSUP);
  EXPECT_NE(svm.status().message().find("HAS_CPU_ADDR_MIRROR"), std::string::npos);
  EXPECT_EQ(fake.calls().size(), 2u);  // no VM was created
  auto wrong = CreateXeSvm(DrmDevice::ForFake(fake, Driver("i915")));
  EXPECT_EQ(wrong.status().errno_value(), ENOTSUP);
  // Unaligned ranges never reach the kernel.
  RecordingIoctl ok([](unsigned long req, void* arg) { return XeKernel(req, arg, 0x4); });
  auto svm2 = CreateXeSvm(DrmDevice::ForFake(ok, Driver("xe"))).value();
  EXPECT_EQ(svm2->Mirror(kStart + 1, kSize).errno_value(), EINVAL);
  EXPECT_EQ(svm2->Prefetch(kStart, 0, SvmLocation::kDevice).errno_value(), EINVAL);
}

TEST(KernelSvmXe, KernelErrorsComeBackWithTheCallNamed) {
  RecordingIoctl fake([](unsigned long req, void* arg) {
    if (req == 0x40886445u) {
      errno = ENOMEM;
      return -1;
    }
    return XeKernel(req, arg, 0x4);
  });
  auto svm = CreateXeSvm(DrmDevice::ForFake(fake, Driver("xe"))).value();
  Status st = svm->Mirror(kStart, kSize);
  EXPECT_EQ(st.errno_value(), ENOMEM);
  EXPECT_NE(st.message().find("CPU_ADDR_MIRROR"), std::string::npos) << st.ToString();
}

TEST(KernelSvmNouveau, InitAndMigrateToVramUseTheSvmLayout) {
  RecordingIoctl fake;
  auto svm = CreateNouveauSvm(DrmDevice::ForFake(fake, Driver("nouveau")), 0x1000000, 0x2000000);
  ASSERT_TRUE(svm.ok()) << svm.status().ToString();
  ASSERT_TRUE((*svm)->Prefetch(kStart, 8 * 4096, SvmLocation::kDevice).ok());
  const auto calls = fake.calls();
  ASSERT_EQ(calls.size(), 2u);
  EXPECT_EQ(calls[0].request, 0xC0106448u);
  ASSERT_EQ(calls[0].bytes.size(), 16u);
  EXPECT_EQ(U64(calls[0].bytes, 0), 0x1000000u);
  EXPECT_EQ(U64(calls[0].bytes, 8), 0x2000000u);
  const auto& b = calls[1].bytes;
  EXPECT_EQ(calls[1].request, 0xC0406449u);
  ASSERT_EQ(b.size(), 64u);
  EXPECT_EQ(U64(b, 0), 0x0000800000000000ull);  // MIGRATE | TARGET GPU_VRAM << 16
  EXPECT_EQ(U64(b, 8), kStart);
  EXPECT_EQ(U64(b, 16), kStart + 8 * 4096);
  EXPECT_EQ(U64(b, 24), 8u);     // npages
  EXPECT_TRUE(Zero(b, 32, 64));  // stride, result, reserved0/1 must be 0
  // What nouveau cannot do is refused here, not sent.
  EXPECT_EQ((*svm)->Prefetch(kStart, 4096, SvmLocation::kSystem).errno_value(), ENOTSUP);
  EXPECT_EQ((*svm)->PreferLocation(kStart, 4096, SvmLocation::kDevice).errno_value(), ENOTSUP);
  EXPECT_EQ(fake.calls().size(), 2u);
}

TEST(KernelSvmNouveau, SvmDisabledIsExplained) {
  RecordingIoctl fake([](unsigned long, void*) {
    errno = ENOSYS;
    return -1;
  });
  auto svm = CreateNouveauSvm(DrmDevice::ForFake(fake, Driver("nouveau")), 0, 0);
  ASSERT_FALSE(svm.ok());
  EXPECT_EQ(svm.status().errno_value(), ENOSYS);
  EXPECT_NE(svm.status().message().find("not enabled"), std::string::npos);
}

TEST(KernelSvmKfd, SetAttrCarriesItsAttributesInTheRequestSize) {
  RecordingIoctl fake([](unsigned long req, void* arg) {
    if (req == 0x80084B01u) {  // GET_VERSION: 1.11
      const uint32_t v[2] = {1, 11};
      std::memcpy(arg, v, 8);
    }
    return 0;
  });
  auto svm = CreateKfdSvm(/*kfd_fd=*/-1, /*gpu_id=*/0x1234, fake);
  ASSERT_TRUE(svm.ok()) << svm.status().ToString();
  ASSERT_TRUE((*svm)->Mirror(kStart, kSize).ok());
  ASSERT_TRUE((*svm)->PreferLocation(kStart, kSize, SvmLocation::kSystem).ok());
  ASSERT_TRUE((*svm)->Prefetch(kStart, kSize, SvmLocation::kDevice).ok());
  ASSERT_TRUE((*svm)->SetAtomics(kStart, kSize, SvmAtomics::kGlobal).ok());
  const auto calls = fake.calls();
  ASSERT_EQ(calls.size(), 5u);
  const uint32_t expect_type[4] = {2, 0, 1, 5};  // ACCESS, PREFERRED_LOC, PREFETCH_LOC, SET_FLAGS
  const uint32_t expect_value[4] = {0x1234, 0, 0x1234, 0x02};
  for (int i = 1; i < 5; ++i) {
    const auto& b = calls[i].bytes;
    // The size field covers the 24-byte args and one 8-byte attribute.
    EXPECT_EQ(calls[i].request, 0xC0204B20u);
    ASSERT_EQ(b.size(), 32u);
    EXPECT_EQ(U64(b, 0), kStart);
    EXPECT_EQ(U64(b, 8), kSize);
    EXPECT_EQ(U32(b, 16), 0u);  // SET_ATTR
    EXPECT_EQ(U32(b, 20), 1u);  // nattr
    EXPECT_EQ(U32(b, 24), expect_type[i - 1]);
    EXPECT_EQ(U32(b, 28), expect_value[i - 1]);
  }
}

TEST(KernelSvmKfd, AnOldKfdWithoutSvmIsRefused) {
  RecordingIoctl fake([](unsigned long, void* arg) {
    const uint32_t v[2] = {1, 4};
    std::memcpy(arg, v, 8);
    return 0;
  });
  auto svm = CreateKfdSvm(-1, 1, fake);
  ASSERT_FALSE(svm.ok());
  EXPECT_EQ(svm.status().errno_value(), ENOTSUP);
  EXPECT_NE(svm.status().message().find("1.4"), std::string::npos);
}

}  // namespace
}  // namespace hmmkit::drm
