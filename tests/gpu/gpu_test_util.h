// Shared by the GPU suites: every test starts with EPMOE_REQUIRE_GPU(), which reports the test
// as SKIPPED (not passed) on machines without a CUDA device.
#pragma once

#include <gtest/gtest.h>

#include "epmoe/cuda/device.h"

#define EPMOE_REQUIRE_GPU()                                                  \
  do {                                                                       \
    if (::epmoe::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA GPU";   \
  } while (0)
