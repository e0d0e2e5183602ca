// A binary that does not load libhmmkit_interpose: asking for interposition must fail clearly,
// not fall back silently.
#include <gtest/gtest.h>

#include "hmmkit/mirror/address_space.hpp"

namespace hmmkit {
namespace {

TEST(InterposeMissing, CreateFailsWithENOTSUPAndSaysHowToLoadIt) {
  AddressSpace::Options o;
  o.interpose = true;
  auto as = AddressSpace::Create(o);
  if (!as.ok() && as.status().message().find("userfaultfd") != std::string::npos)
    GTEST_SKIP() << "no userfaultfd: " << as.status().ToString();
  ASSERT_FALSE(as.ok());
  EXPECT_EQ(as.status().errno_value(), ENOTSUP);
  EXPECT_NE(as.status().message().find("LD_PRELOAD=libhmmkit_interpose.so"), std::string::npos)
      << as.status().ToString();
}

TEST(InterposeMissing, WithoutTheOptionCreateSucceeds) {
  auto as = AddressSpace::Create();
  ASSERT_TRUE(as.ok()) << as.status().ToString();
  EXPECT_FALSE((*as)->options().interpose);
}

}  // namespace
}  // namespace hmmkit
