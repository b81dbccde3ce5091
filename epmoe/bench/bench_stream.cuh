// The stream a single-GPU benchmark runs on: random device inputs and event timing after an L2
// flush. Shared by the kernel benchmarks (kernel_bench.cu) and the grouped GEMM benchmark
// (gemm_bench.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <functional>

#include "epmoe/core/tensor.h"
#include "epmoe/cuda/device.h"

namespace epmoe::cuda {

class BenchStream {
 public:
  // flush_bytes: the buffer written before every timed run (evicts L2).
  explicit BenchStream(int64_t flush_bytes);
  ~BenchStream();
  BenchStream(const BenchStream&) = delete;
  BenchStream& operator=(const BenchStream&) = delete;

  cudaStream_t stream() const { return stream_; }

  // bf16 or f32 values uniform in [-amp, amp) from a counter hash, a fresh seed per call (random,
  // never zero-filled). Synchronises the stream.
  DeviceTensor random(DType dt, const Shape& s, float amp = 1.f);

  // Runs fn `warmup` times untimed, then `iters` times, each after writing the flush buffer and
  // timed with events on stream(); returns the median in µs (the upper middle one for an even
  // count).
  double median_us(const std::function<void()>& fn, int iters, int warmup);

 private:
  cudaStream_t stream_ = nullptr;
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
  DeviceTensor flush_;
  uint64_t seed_ = 0;
};

}  // namespace epmoe::cuda
