// CUDA / cuBLAS error checks: every failing call becomes epmoe::Error(kCuda) naming the call.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "epmoe/core/error.h"

#define EPMOE_CUDA_CHECK(expr)                                                       \
  do {                                                                               \
    cudaError_t epmoe_err_ = (expr);                                                 \
    if (epmoe_err_ != cudaSuccess) {                                                 \
      EPMOE_FAIL(kCuda, "{} failed: {} ({})", #expr, cudaGetErrorString(epmoe_err_), \
                 cudaGetErrorName(epmoe_err_));                                      \
    }                                                                                \
  } while (0)

// After a kernel launch: reports launch-configuration errors at the launch site.
#define EPMOE_CUDA_CHECK_LAUNCH(name) EPMOE_CUDA_CHECK(cudaGetLastError())

#define EPMOE_CUBLAS_CHECK(expr)                                                   \
  do {                                                                             \
    cublasStatus_t epmoe_st_ = (expr);                                             \
    if (epmoe_st_ != CUBLAS_STATUS_SUCCESS) {                                      \
      EPMOE_FAIL(kCuda, "{} failed: {}", #expr, cublasGetStatusString(epmoe_st_)); \
    }                                                                              \
  } while (0)
