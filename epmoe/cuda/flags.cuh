// Device-side flags, clocks and bounded waits shared by every kernel that waits on another rank
// or another kernel (DESIGN §5: every wait is bounded and reports what it waited for).
#pragma once

#include <cstdint>

namespace epmoe::cuda {

// Nanoseconds of the GPU's global timer (same clock on every SM).
__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// System-scope acquire load / release store of a 64-bit flag (peers on other GPUs read and write
// it through NVLink/PCIe mappings).
__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// GPU-scope acquire load of a 32-bit counter another kernel of this GPU raises with release
// semantics (the sm90 GEMMs' per-tile signals).
__device__ __forceinline__ int ld_acquire_gpu(const int32_t* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Bounded wait until (*flag & mask) == expected; false on timeout (*observed filled either way).
__device__ __forceinline__ bool wait_flag(const uint64_t* flag, uint64_t expected, uint64_t mask,
                                          int64_t timeout_ns, uint64_t* observed) {
  const uint64_t start = global_ns();
  while (true) {
    const uint64_t v = ld_acquire_sys(flag);
    if ((v & mask) == expected) {
      *observed = v;
      return true;
    }
    if (int64_t(global_ns() - start) > timeout_ns) {
      *observed = v;
      return false;
    }
    __nanosleep(64);
  }
}

// Spins until `ns` nanoseconds have passed (a compute phase of known length, for benchmarks).
__device__ __forceinline__ void spin_ns(int64_t ns) {
  const uint64_t start = global_ns();
  while (int64_t(global_ns() - start) < ns) {
  }
}

}  // namespace epmoe::cuda
