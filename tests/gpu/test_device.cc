#include <cstring>

#include "epmoe/cuda/device.h"
#include "tests/gpu/gpu_test_util.h"

namespace epmoe::cuda {
namespace {

TEST(GpuDevice, RoundTripAndPoison) {
  EPMOE_REQUIRE_GPU();
  Tensor h(DType::kI32, {1000});
  for (int i = 0; i < 1000; ++i) h.as<int32_t>()[i] = i * 7 - 3;
  DeviceTensor d = DeviceTensor::from_host(h);
  Tensor back = d.to_host();
  EXPECT_EQ(std::memcmp(h.view().data, back.view().data, h.nbytes()), 0);
  d.fill_bytes(0xff);
  Tensor poisoned = d.to_host();
  EXPECT_EQ(poisoned.as<int32_t>()[500], -1);
}

TEST(GpuDevice, DescriptionNamesTheDevice) {
  EPMOE_REQUIRE_GPU();
  EXPECT_FALSE(device_description(0).empty());
  EXPECT_THROW(device_description(device_count() + 5), Error);
}

}  // namespace
}  // namespace epmoe::cuda
