#include <cuda_bf16.h>

#include <algorithm>
#include <random>
#include <vector>

#include "epmoe/bench/bench_stream.cuh"
#include "epmoe/cuda/cuda_check.h"

namespace epmoe::cuda {

namespace {

// Uniform values in [-1, 1) from a counter hash (splitmix64 of the index and the seed).
__device__ __forceinline__ float hash_uniform(uint64_t i, uint64_t seed) {
  uint64_t z = i + seed * 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return float(z >> 40) * (1.0f / 16777216.0f) * 2.f - 1.f;
}

template <typename T>
__global__ void fill_uniform_kernel(T* p, int64_t n, float amp, uint64_t seed) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    p[i] = T(amp * hash_uniform(uint64_t(i), seed));
}

}  // namespace

BenchStream::BenchStream(int64_t flush_bytes) {
  EPMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  EPMOE_CUDA_CHECK(cudaEventCreate(&start_));
  EPMOE_CUDA_CHECK(cudaEventCreate(&stop_));
  flush_ = DeviceTensor(DType::kI32, {std::max<int64_t>(flush_bytes / 4, 1)});
  std::random_device rd;
  seed_ = (uint64_t(rd()) << 32) | rd();
}

BenchStream::~BenchStream() {
  cudaStreamSynchronize(stream_);
  cudaEventDestroy(start_);
  cudaEventDestroy(stop_);
  cudaStreamDestroy(stream_);
}

DeviceTensor BenchStream::random(DType dt, const Shape& s, float amp) {
  EPMOE_CHECK(dt == DType::kBF16 || dt == DType::kF32, kInvalidArgument,
              "BenchStream::random fills bf16 or f32, not {}", dtype_name(dt));
  DeviceTensor t(dt, s);
  const int64_t n = t.numel();
  if (n == 0) return t;
  const unsigned grid = unsigned(std::min<int64_t>((n + 255) / 256, 8192));
  if (dt == DType::kBF16)
    fill_uniform_kernel<<<grid, 256, 0, stream_>>>(static_cast<__nv_bfloat16*>(t.view().data), n,
                                                   amp, ++seed_);
  else
    fill_uniform_kernel<<<grid, 256, 0, stream_>>>(t.as<float>(), n, amp, ++seed_);
  EPMOE_CUDA_CHECK_LAUNCH("fill_uniform_kernel");
  EPMOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  return t;
}

double BenchStream::median_us(const std::function<void()>& fn, int iters, int warmup) {
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<double> v;
  for (int i = 0; i < iters; ++i) {
    EPMOE_CUDA_CHECK(cudaMemsetAsync(flush_.view().data, i & 0xff, flush_.nbytes(), stream_));
    EPMOE_CUDA_CHECK(cudaEventRecord(start_, stream_));
    fn();
    EPMOE_CUDA_CHECK(cudaEventRecord(stop_, stream_));
    EPMOE_CUDA_CHECK(cudaEventSynchronize(stop_));
    float ms = 0.f;
    EPMOE_CUDA_CHECK(cudaEventElapsedTime(&ms, start_, stop_));
    v.push_back(double(ms) * 1e3);
  }
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

}  // namespace epmoe::cuda
