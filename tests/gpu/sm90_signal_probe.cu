// The signal consumer of sm90_signal_probe.h.
#include "tests/gpu/sm90_signal_probe.h"

namespace epmoe::cuda::testing {

namespace {

__device__ __forceinline__ int load_acquire(const int32_t* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__global__ void signal_consumer_kernel(uint16_t* snapshot, int* failed, const uint16_t* out,
                                       const int32_t* signal, const int32_t* count, int e_loc,
                                       int64_t m_max, int64_t cols, int block_m, int threshold,
                                       long long timeout_cycles) {
  const int64_t nb = (m_max + block_m - 1) / block_m;
  __shared__ int ready;
  for (int64_t i = blockIdx.x; i < e_loc * nb; i += gridDim.x) {
    const int e = int(i / nb);
    const int64_t m = i % nb;
    const int64_t rows = min(int64_t(max(count[e], 0)), m_max) - m * block_m;
    if (rows <= 0) continue;
    if (threadIdx.x == 0) {
      const long long t0 = clock64();
      int v = load_acquire(signal + i);
      // After one timeout every other wait gives up at once (one failure is enough to report).
      while (v < threshold && clock64() - t0 < timeout_cycles &&
             *static_cast<volatile int*>(failed) == -1)
        v = load_acquire(signal + i);
      ready = v >= threshold;
      if (!ready) atomicCAS(failed, -1, int(i));
    }
    __syncthreads();
    if (ready) {
      // NOTES: plain loads after the acquire by thread 0 and the CTA barrier (cumulativity).
      const int64_t n = min(rows, int64_t(block_m)) * cols;
      const int64_t base = (int64_t(e) * m_max + m * block_m) * cols;
      for (int64_t j = threadIdx.x; j < n; j += blockDim.x) snapshot[base + j] = out[base + j];
    }
    __syncthreads();
  }
}

}  // namespace

void launch_signal_consumer(uint16_t* snapshot, int* failed, const uint16_t* out,
                            const int32_t* signal, const int32_t* count, int e_loc, int64_t m_max,
                            int64_t cols, int block_m, int threshold, long long timeout_cycles,
                            int blocks, cudaStream_t stream) {
  signal_consumer_kernel<<<blocks, 256, 0, stream>>>(
      snapshot, failed, out, signal, count, e_loc, m_max, cols, block_m, threshold, timeout_cycles);
}

}  // namespace epmoe::cuda::testing
