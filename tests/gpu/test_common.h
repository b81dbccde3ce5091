// Helpers of the GPU kernel suites: fresh seeds (printed on failure), random host tensors,
// bitwise comparison reporting the first mismatch, relative L2.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "epmoe/core/stats.h"
#include "epmoe/core/tensor.h"
#include "epmoe/cuda/device.h"
#include "tests/gpu/gpu_test_util.h"

namespace epmoe::cuda::testing {

// A fresh seed per test; SCOPED_TRACE it so every failure names it.
inline uint64_t fresh_seed() {
  std::random_device rd;
  return (uint64_t(rd()) << 32) | rd();
}

// EPMOE_GPU_TEST_QUICK=1 (the compute-sanitizer pass) trims the largest sizes.
inline bool quick() {
  const char* v = std::getenv("EPMOE_GPU_TEST_QUICK");
  return v != nullptr && v[0] == '1';
}

inline std::vector<int64_t> token_sweep() {
  if (quick()) return {0, 1, 7, 128};
  return {0, 1, 7, 128, 4096, 16384};
}

inline Tensor random_tensor(DType dt, const Shape& s, std::mt19937_64& rng, float amp = 1.f) {
  Tensor t(dt, s);
  std::uniform_real_distribution<float> u(-amp, amp);
  const int64_t n = t.numel();
  if (dt == DType::kF32) {
    for (int64_t i = 0; i < n; ++i) t.as<float>()[i] = u(rng);
  } else if (dt == DType::kBF16) {
    for (int64_t i = 0; i < n; ++i) t.as<bf16>()[i] = f32_to_bf16(u(rng));
  } else {
    ADD_FAILURE() << "random_tensor: unsupported dtype";
  }
  return t;
}

inline DeviceTensor poisoned(DType dt, const Shape& s) {
  DeviceTensor t(dt, s);
  t.fill_bytes(0xff);  // NaN for floats, -1 for ints
  return t;
}

// Bitwise equality of the first `bytes`; the message names the first mismatching element.
inline ::testing::AssertionResult bitwise_equal(const Tensor& got, const Tensor& want,
                                                const std::string& what) {
  if (got.shape() != want.shape() || got.dtype() != want.dtype())
    return ::testing::AssertionFailure()
           << what << ": shape/dtype " << got.shape().str() << " vs " << want.shape().str();
  const size_t es = dtype_size(got.dtype());
  const auto* a = static_cast<const unsigned char*>(got.view().data);
  const auto* b = static_cast<const unsigned char*>(want.view().data);
  for (int64_t i = 0; i < got.numel(); ++i) {
    if (std::memcmp(a + i * es, b + i * es, es) != 0) {
      const int64_t cols = got.shape().rank >= 2 ? got.shape()[got.shape().rank - 1] : 1;
      std::string g, w;
      if (got.dtype() == DType::kI32) {
        g = std::to_string(got.as<int32_t>()[i]);
        w = std::to_string(want.as<int32_t>()[i]);
      } else if (got.dtype() == DType::kF32) {
        g = std::to_string(got.as<float>()[i]);
        w = std::to_string(want.as<float>()[i]);
      } else {
        g = "bits";
        w = "bits";
      }
      return ::testing::AssertionFailure()
             << what << ": first mismatch at element " << i << " (row " << i / cols << ", col "
             << i % cols << "): got " << g << ", want " << w;
    }
  }
  return ::testing::AssertionSuccess();
}

inline double rel_l2(const Tensor& got, const Tensor& want) {
  const Tensor a = to_f32(got.view()), b = to_f32(want.view());
  return ::epmoe::rel_l2(a.as<float>(), b.as<float>(), a.numel());
}

}  // namespace epmoe::cuda::testing
