// Shared by the GPU suites: every test starts with EPMOE_REQUIRE_GPU(), which reports the test
// as SKIPPED (not passed) on machines without a CUDA device.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>

#include "epmoe/cuda/device.h"

namespace epmoe::cuda::testing_env {
// Eager module loading before the first CUDA call: with lazy loading, a kernel's first launch
// may wait for the device while a loopback peer's kernel spins on a flag.
inline const bool kEagerModules = [] {
  setenv("CUDA_MODULE_LOADING", "EAGER", 0);
  setenv("NCCL_NVLS_ENABLE", "0", 0);
  setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32", 0);  // a hardware queue per loopback rank
  return true;
}();
}  // namespace epmoe::cuda::testing_env

#define EPMOE_REQUIRE_GPU()                                                \
  do {                                                                     \
    if (::epmoe::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA GPU"; \
  } while (0)
