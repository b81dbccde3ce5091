// Helpers shared by the CPU suites: fresh random data (seed printed on failure), metrics, the
// golden directory.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>

#include "epmoe/core/stats.h"
#include "epmoe/core/tensor.h"

namespace epmoe::testing {

// A new seed per call (std::random_device), recorded in the test log so failures reproduce.
inline uint64_t fresh_seed() {
  const uint64_t s = (uint64_t(std::random_device{}()) << 32) ^ std::random_device{}();
  ::testing::Test::RecordProperty("seed", std::to_string(s));
  return s;
}

inline Tensor random_tensor(DType dt, const Shape& shape, std::mt19937_64& rng, float scale = 1.f) {
  Tensor t(dt, shape);
  std::normal_distribution<float> d(0.f, scale);
  const int64_t n = t.numel();
  for (int64_t i = 0; i < n; ++i) {
    const float v = d(rng);
    if (dt == DType::kF32)
      t.as<float>()[i] = v;
    else if (dt == DType::kBF16)
      t.as<bf16>()[i] = f32_to_bf16(v);
  }
  return t;
}

using ::epmoe::rel_l2;

// Index of the first bytewise difference of two same-shaped tensors, -1 if none.
inline int64_t first_mismatch(const TensorView& a, const TensorView& b) {
  const size_t es = dtype_size(a.dtype);
  for (int64_t i = 0; i < a.numel(); ++i)
    if (std::memcmp(static_cast<const char*>(a.data) + size_t(i) * es,
                    static_cast<const char*>(b.data) + size_t(i) * es, es) != 0)
      return i;
  return -1;
}

inline std::string golden_dir() {
  const char* env = std::getenv("EPMOE_GOLDEN_DIR");
  return env ? std::string(env) : std::string(EPMOE_SOURCE_DIR) + "/../shared/golden";
}

}  // namespace epmoe::testing
