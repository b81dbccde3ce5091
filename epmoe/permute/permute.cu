// Token permutation kernels; host launchers follow their kernels.
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <algorithm>

#include "epmoe/core/config.h"
#include "epmoe/cuda/cuda_check.h"
#include "epmoe/cuda/fp8.cuh"
#include "epmoe/cuda/nvtx.h"
#include "epmoe/cuda/vec8.cuh"
#include "epmoe/permute/permute.cuh"
#include "epmoe/permute/reduce_plan.h"

namespace epmoe::cuda {

namespace {

// --- preprocess: count per block -> scan -> stable scatter ------------------------------------
// The T·K' pairs are cut into `blocks` chunks of `chunk` consecutive pairs, one warp each. Inside
// a warp, pairs of one expert find each other with __match_any_sync; their rank among the peers
// of lower lanes keeps the sort stable.

constexpr int kPreMaxBlocks = 256;

struct PreprocessGrid {
  int blocks;
  int64_t chunk;
};

PreprocessGrid preprocess_grid(int64_t n) {
  int64_t chunk = std::max<int64_t>(64, (n + kPreMaxBlocks - 1) / kPreMaxBlocks);
  chunk = (chunk + 31) / 32 * 32;
  const int blocks = int(std::max<int64_t>(1, (n + chunk - 1) / chunk));
  return {blocks, chunk};
}

__device__ __forceinline__ int local_expert(const int32_t* ids, int64_t i, int64_t n, int start,
                                            int e_loc) {
  if (i >= n) return -2;  // past the end: matches nothing real
  const int e = ids[i] - start;
  return (ids[i] >= 0 && e >= 0 && e < e_loc) ? e : -1;
}

// block_counts: [blocks, E_loc] i32, this block's pairs per local expert.
__global__ void preprocess_count_kernel(int32_t* __restrict__ block_counts,
                                        const int32_t* __restrict__ ids, int64_t n, int64_t chunk,
                                        int start, int e_loc) {
  extern __shared__ int32_t s_cnt[];
  const int lane = threadIdx.x;
  for (int e = lane; e < e_loc; e += 32) s_cnt[e] = 0;
  __syncwarp();
  const int64_t begin = int64_t(blockIdx.x) * chunk, end = min(n, begin + chunk);
  for (int64_t base = begin; base < end; base += 32) {
    const int e = local_expert(ids, base + lane, end, start, e_loc);
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    if (e >= 0 && lane == __ffs(peers) - 1) s_cnt[e] += __popc(peers);
    __syncwarp();
  }
  for (int e = lane; e < e_loc; e += 32) block_counts[int64_t(blockIdx.x) * e_loc + e] = s_cnt[e];
}

// One block of 1024 threads: block_counts becomes each block's exclusive offset within its
// expert; seg_indptr the exclusive scan of the per-expert totals.
__global__ void __launch_bounds__(kMaxPreprocessExperts)
    preprocess_scan_kernel(int32_t* __restrict__ seg_indptr, int32_t* __restrict__ block_counts,
                           int blocks, int e_loc) {
  __shared__ int32_t s_scan[kMaxPreprocessExperts];
  const int e = threadIdx.x;
  int32_t total = 0;
  if (e < e_loc) {
    for (int b = 0; b < blocks; ++b) {
      const int32_t c = block_counts[int64_t(b) * e_loc + e];
      block_counts[int64_t(b) * e_loc + e] = total;
      total += c;
    }
  }
  s_scan[e] = total;
  __syncthreads();
  for (int off = 1; off < kMaxPreprocessExperts; off <<= 1) {  // inclusive Hillis-Steele
    const int32_t v = e >= off ? s_scan[e - off] : 0;
    __syncthreads();
    s_scan[e] += v;
    __syncthreads();
  }
  if (e < e_loc) seg_indptr[e + 1] = s_scan[e];
  if (e == 0) seg_indptr[0] = 0;
}

__global__ void preprocess_scatter_kernel(int32_t* __restrict__ src2dst,
                                          const int32_t* __restrict__ ids,
                                          const int32_t* __restrict__ seg_indptr,
                                          const int32_t* __restrict__ block_offsets, int64_t n,
                                          int64_t chunk, int start, int e_loc) {
  extern __shared__ int32_t s_next[];
  const int lane = threadIdx.x;
  for (int e = lane; e < e_loc; e += 32)
    s_next[e] = seg_indptr[e] + block_offsets[int64_t(blockIdx.x) * e_loc + e];
  __syncwarp();
  const int64_t begin = int64_t(blockIdx.x) * chunk, end = min(n, begin + chunk);
  for (int64_t base = begin; base < end; base += 32) {
    const int64_t i = base + lane;
    const int e = local_expert(ids, i, end, start, e_loc);
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int rank = __popc(peers & ((1u << lane) - 1u));
    const int dst = e >= 0 ? s_next[e] + rank : -1;
    __syncwarp();
    if (e >= 0 && lane == __ffs(peers) - 1) s_next[e] += __popc(peers);
    __syncwarp();
    if (i < end) src2dst[i] = dst;
  }
}

// --- pre_reorder: one warp per token, 16-byte vectors -----------------------------------------

constexpr int kReorderWarps = 8;

__global__ void __launch_bounds__(kReorderWarps * 32)
    pre_reorder_kernel(uint4* __restrict__ sorted, const uint4* __restrict__ x,
                       const int32_t* __restrict__ src2dst, int64_t T, int K, int64_t N,
                       int64_t vecs /* H / 8 */) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * kReorderWarps + warp;
  if (t >= T) return;
  __shared__ int32_t s_dst[kReorderWarps][kMaxSlots];
  int nd = 0;
  for (int k = 0; k < K; ++k) {  // compact the valid destinations (every lane agrees)
    const int32_t d = __ldg(src2dst + t * K + k);
    if (d >= 0 && d < N) {
      if (lane == 0) s_dst[warp][nd] = d;
      ++nd;
    }
  }
  __syncwarp();
  const uint4* src = x + t * vecs;
  constexpr int kUnroll = 4;
  for (int64_t v0 = lane; v0 < vecs; v0 += 32 * kUnroll) {
    uint4 r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      r[u] = v0 + u * 32 < vecs ? __ldg(src + v0 + u * 32) : make_uint4(0, 0, 0, 0);
    for (int d = 0; d < nd; ++d) {
      uint4* dst = sorted + int64_t(s_dst[warp][d]) * vecs;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (v0 + u * 32 < vecs) dst[v0 + u * 32] = r[u];
    }
  }
}

// Each lane quantises 8 values; 16 lanes form a block of 128 (FP8 path).
__global__ void __launch_bounds__(kReorderWarps * 32)
    pre_reorder_fp8_kernel(uint2* __restrict__ sorted, float* __restrict__ scales,
                           const uint4* __restrict__ x, const int32_t* __restrict__ src2dst,
                           int64_t T, int K, int64_t N, int64_t vecs, int64_t nb) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * kReorderWarps + warp;
  if (t >= T) return;
  __shared__ int32_t s_dst[kReorderWarps][kMaxSlots];
  int nd = 0;
  for (int k = 0; k < K; ++k) {
    const int32_t d = __ldg(src2dst + t * K + k);
    if (d >= 0 && d < N) {
      if (lane == 0) s_dst[warp][nd] = d;
      ++nd;
    }
  }
  __syncwarp();
  if (nd == 0) return;
  for (int64_t base = 0; base < vecs; base += 32) {  // uniform trip count: shuffles are safe
    const int64_t v = base + lane;
    const bool valid = v < vecs;
    float f[8];
    if (valid) {
      bf16x8_to_f32(f, __ldg(x + t * vecs + v));
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) f[i] = 0.f;
    }
    float scale;
    const uint2 packed = quantize8_fp8_group128(f, &scale);
    if (valid) {
      for (int d = 0; d < nd; ++d) {
        const int64_t row = s_dst[warp][d];
        sorted[row * vecs + v] = packed;
        if ((lane & 15) == 0) scales[row * nb + v / 16] = scale;
      }
    }
  }
}

// --- post_reorder: one warp per token, accumulators in shared memory --------------------------

constexpr int kPostWarps = 4;

template <typename T>
struct Vec8;  // 8 values, loaded with 16-byte accesses
template <>
struct Vec8<__nv_bfloat16> {
  __device__ static void load(float* f, const __nv_bfloat16* p) { ldg8(f, p); }
  __device__ static void store(__nv_bfloat16* p, const float* f) {
    uint4 v;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = v;
  }
};
template <>
struct Vec8<float> {
  __device__ static void load(float* f, const float* p) { ldg8(f, p); }
  __device__ static void store(float* p, const float* f) {
    reinterpret_cast<float4*>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
  }
};
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ void from_f32(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void from_f32(float* p, float v) { *p = v; }

// VEC = 8: lane handles 8 columns per step (H % 8 == 0); VEC = 1: scalar, any H.
// grid.y splits the columns so that small T still fills the GPU; every block of a token
// recomputes the (cheap) plan. Shared accumulators: [warp][slot][VEC][32 lanes] floats
// (conflict-free), private to each lane: no barrier between column steps.
template <typename In, typename Out, int VEC>
__global__ void __launch_bounds__(kPostWarps * 32)
    post_reorder_kernel(Out* __restrict__ out, const In* __restrict__ down,
                        const int32_t* __restrict__ src2dst, const int32_t* __restrict__ ids,
                        const float* __restrict__ weights, int64_t T, int K, int64_t N, int64_t H,
                        int64_t cols_per_split, int num_routed, int id_offset) {
  extern __shared__ float s_acc[];
  // NOTES: raw storage: ReducePlan's member initialisers forbid a __shared__ ReducePlan.
  __shared__ alignas(ReducePlan) unsigned char s_plan_raw[kPostWarps * sizeof(ReducePlan)];
  ReducePlan* s_plan = reinterpret_cast<ReducePlan*>(s_plan_raw);
  __shared__ int32_t s_row[kPostWarps][kMaxSlots];
  __shared__ float s_w[kPostWarps][kMaxSlots];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * kPostWarps + warp;
  if (t >= T) return;
  if (lane < K) {
    const int32_t d = src2dst[t * K + lane];
    s_row[warp][lane] = (d >= 0 && d < N) ? d : -1;
    s_w[warp][lane] = weights[t * K + lane];
  }
  __syncwarp();
  if (lane == 0) {
    int keys[kMaxSlots];
    for (int k = 0; k < K; ++k) keys[k] = s_row[warp][k] >= 0 ? ids[t * K + k] + id_offset : -1;
    ReducePlan plan;
    plan_reduce(plan, keys, K, num_routed);
    s_plan[warp] = plan;
  }
  __syncwarp();
  const ReducePlan& plan = s_plan[warp];
  const int root = plan.root;
  float* acc = s_acc + int64_t(warp) * K * VEC * 32;
  auto slot = [&](int k, int i) -> float& { return acc[(k * VEC + i) * 32 + lane]; };
  const int64_t c_begin = int64_t(blockIdx.y) * cols_per_split;
  const int64_t c_end = min(H, c_begin + cols_per_split);
  constexpr int kBatch = 8;  // rows loaded before the first use: loads in flight per lane
  for (int64_t c0 = c_begin + int64_t(lane) * VEC; c0 < c_end; c0 += 32 * VEC) {
    float res[VEC];
    if (root < 0) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) res[i] = 0.f;
    } else {
      for (int k0 = 0; k0 < K; k0 += kBatch) {
        float v[kBatch][VEC];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          const int k = k0 + u;
          const int32_t row = k < K ? s_row[warp][k] : -1;
          if (row < 0) continue;
          if constexpr (VEC == 8) {
            Vec8<In>::load(v[u], down + int64_t(row) * H + c0);
          } else {
            v[u][0] = to_f32(down[int64_t(row) * H + c0]);
          }
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          const int k = k0 + u;
          if (k >= K || s_row[warp][k] < 0) continue;
          const float w = s_w[warp][k];
#pragma unroll
          for (int i = 0; i < VEC; ++i) slot(k, i) = w * v[u][i];
        }
      }
      reduce_in_plan_order<VEC>(plan, slot, res);
    }
    if constexpr (VEC == 8) {
      Vec8<Out>::store(out + t * H + c0, res);
    } else {
      from_f32(out + t * H + c0, res[0]);
    }
  }
}

template <typename In, typename Out>
void launch_post_reorder(const TensorView& out, const TensorView& down, const TensorView& s2d,
                         const TensorView& ids, const TensorView& w, int64_t T, int K, int64_t N,
                         int64_t H, int num_routed, int id_offset, cudaStream_t stream) {
  const NvtxRange nvtx("permute.launch_post_reorder");
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool vec = H % 8 == 0 && aligned(out.data) && aligned(down.data);
  const int width = vec ? 8 : 1;
  const size_t smem = size_t(kPostWarps) * K * width * 32 * sizeof(float);
  auto kernel = vec ? post_reorder_kernel<In, Out, 8> : post_reorder_kernel<In, Out, 1>;
  EPMOE_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  int dev = 0, sms = 0;
  EPMOE_CUDA_CHECK(cudaGetDevice(&dev));
  EPMOE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  // Split the columns until about 32 warps per SM have work (small T: decode).
  const int64_t steps = (H + 32 * width - 1) / (32 * width);
  const int64_t split =
      std::max<int64_t>(1, std::min<int64_t>(steps, (int64_t(sms) * 32 + T - 1) / T));
  const int64_t cols = (steps + split - 1) / split * 32 * width;
  const dim3 grid(unsigned((T + kPostWarps - 1) / kPostWarps), unsigned((H + cols - 1) / cols));
  kernel<<<grid, kPostWarps * 32, smem, stream>>>(
      static_cast<Out*>(out.data), static_cast<const In*>(down.data), s2d.as<int32_t>(),
      ids.as<int32_t>(), w.as<float>(), T, K, N, H, cols, num_routed, id_offset);
  EPMOE_CUDA_CHECK_LAUNCH("post_reorder_kernel");
}

void check_reorder(const TensorView& sorted, const TensorView& x, const TensorView& s2d) {
  const NvtxRange nvtx("permute.check_reorder");
  EPMOE_CHECK(x.shape.rank == 2 && sorted.shape.rank == 2 && sorted.shape[1] == x.shape[1],
              kInvalidArgument, "reorder: x {} and sorted {} must be 2-D with equal H",
              x.shape.str(), sorted.shape.str());
  EPMOE_CHECK(x.dtype == DType::kBF16, kInvalidArgument, "reorder: x must be bf16, got {}",
              dtype_name(x.dtype));
  EPMOE_CHECK(x.shape[1] % 8 == 0, kUnsupported,
              "reorder: H = {} must be a multiple of 8 (16-byte rows)", x.shape[1]);
  EPMOE_CHECK(s2d.dtype == DType::kI32 && s2d.shape.rank == 2 && s2d.shape[0] == x.shape[0] &&
                  s2d.shape[1] <= kMaxSlots,
              kInvalidArgument, "src2dst must be [T={}, K<={}] i32, got {} {}", x.shape[0],
              kMaxSlots, s2d.shape.str(), dtype_name(s2d.dtype));
}

}  // namespace

size_t preprocess_workspace_bytes(int64_t num_pairs, int num_local_experts) {
  return size_t(preprocess_grid(num_pairs).blocks) * size_t(std::max(num_local_experts, 1)) * 4;
}

void preprocess(const TensorView& seg_indptr, const TensorView& src2dst, const TensorView& topk_ids,
                int expert_start, int expert_end, void* workspace, cudaStream_t stream) {
  const NvtxRange nvtx("permute.preprocess");
  (void)cudaGetLastError();  // NOTES: drop a stale error of an earlier, already-reported call
  EPMOE_CHECK(topk_ids.shape.rank == 2, kInvalidArgument, "topk_ids must be [T, K], got {}",
              topk_ids.shape.str());
  EPMOE_CHECK(expert_start >= 0 && expert_end >= expert_start, kInvalidArgument,
              "bad expert range [{}, {})", expert_start, expert_end);
  const int e_loc = expert_end - expert_start;
  EPMOE_CHECK(e_loc <= kMaxPreprocessExperts, kUnsupported,
              "preprocess handles up to {} local experts, got {}", kMaxPreprocessExperts, e_loc);
  const int64_t T = topk_ids.shape[0], K = topk_ids.shape[1], n = T * K;
  topk_ids.expect("topk_ids", DType::kI32, {T, K});
  seg_indptr.expect("seg_indptr", DType::kI32, {e_loc + 1});
  src2dst.expect("src2dst", DType::kI32, {T, K});
  EPMOE_CHECK(workspace != nullptr || e_loc == 0, kInvalidArgument, "preprocess needs a workspace");
  if (e_loc == 0) {
    EPMOE_CUDA_CHECK(cudaMemsetAsync(seg_indptr.data, 0, 4, stream));
    if (n) EPMOE_CUDA_CHECK(cudaMemsetAsync(src2dst.data, 0xff, size_t(n) * 4, stream));
    return;
  }
  const PreprocessGrid g = preprocess_grid(n);
  int32_t* counts = static_cast<int32_t*>(workspace);
  const size_t smem = size_t(e_loc) * 4;
  preprocess_count_kernel<<<g.blocks, 32, smem, stream>>>(counts, topk_ids.as<int32_t>(), n,
                                                          g.chunk, expert_start, e_loc);
  EPMOE_CUDA_CHECK_LAUNCH("preprocess_count_kernel");
  preprocess_scan_kernel<<<1, kMaxPreprocessExperts, 0, stream>>>(seg_indptr.as<int32_t>(), counts,
                                                                  g.blocks, e_loc);
  EPMOE_CUDA_CHECK_LAUNCH("preprocess_scan_kernel");
  preprocess_scatter_kernel<<<g.blocks, 32, smem, stream>>>(
      src2dst.as<int32_t>(), topk_ids.as<int32_t>(), seg_indptr.as<int32_t>(), counts, n, g.chunk,
      expert_start, e_loc);
  EPMOE_CUDA_CHECK_LAUNCH("preprocess_scatter_kernel");
}

void pre_reorder(const TensorView& sorted, const TensorView& x, const TensorView& src2dst,
                 cudaStream_t stream) {
  const NvtxRange nvtx("permute.pre_reorder");
  (void)cudaGetLastError();  // NOTES: drop a stale error of an earlier, already-reported call
  check_reorder(sorted, x, src2dst);
  EPMOE_CHECK(sorted.dtype == DType::kBF16, kInvalidArgument,
              "pre_reorder: sorted must be bf16, got {}", dtype_name(sorted.dtype));
  const int64_t T = x.shape[0], H = x.shape[1];
  if (T == 0 || H == 0) return;
  const unsigned grid = unsigned((T + kReorderWarps - 1) / kReorderWarps);
  pre_reorder_kernel<<<grid, kReorderWarps * 32, 0, stream>>>(
      static_cast<uint4*>(sorted.data), static_cast<const uint4*>(x.data), src2dst.as<int32_t>(), T,
      int(src2dst.shape[1]), sorted.shape[0], H / 8);
  EPMOE_CUDA_CHECK_LAUNCH("pre_reorder_kernel");
}

void pre_reorder_fp8(const TensorView& sorted, const TensorView& scales, const TensorView& x,
                     const TensorView& src2dst, cudaStream_t stream) {
  const NvtxRange nvtx("permute.pre_reorder_fp8");
  (void)cudaGetLastError();  // NOTES: drop a stale error of an earlier, already-reported call
  check_reorder(sorted, x, src2dst);
  const int64_t T = x.shape[0], H = x.shape[1], N = sorted.shape[0];
  const int64_t nb = (H + 127) / 128;
  sorted.expect("sorted", DType::kF8E4M3, {N, H});
  scales.expect("scales", DType::kF32, {N, nb});
  if (T == 0 || H == 0) return;
  const unsigned grid = unsigned((T + kReorderWarps - 1) / kReorderWarps);
  pre_reorder_fp8_kernel<<<grid, kReorderWarps * 32, 0, stream>>>(
      static_cast<uint2*>(sorted.data), scales.as<float>(), static_cast<const uint4*>(x.data),
      src2dst.as<int32_t>(), T, int(src2dst.shape[1]), N, H / 8, nb);
  EPMOE_CUDA_CHECK_LAUNCH("pre_reorder_fp8_kernel");
}

void post_reorder(const TensorView& out, const TensorView& down_out, const TensorView& src2dst,
                  const TensorView& topk_ids, const TensorView& topk_weights, int num_routed,
                  int id_offset, cudaStream_t stream) {
  const NvtxRange nvtx("permute.post_reorder");
  (void)cudaGetLastError();  // NOTES: drop a stale error of an earlier, already-reported call
  EPMOE_CHECK(out.shape.rank == 2 && down_out.shape.rank == 2 && down_out.shape[1] == out.shape[1],
              kInvalidArgument, "post_reorder: out {} and down_out {} must be 2-D with equal H",
              out.shape.str(), down_out.shape.str());
  const int64_t T = out.shape[0], H = out.shape[1], N = down_out.shape[0];
  EPMOE_CHECK(src2dst.shape.rank == 2 && src2dst.shape[1] >= 1 && src2dst.shape[1] <= kMaxSlots,
              kInvalidArgument, "post_reorder: src2dst must be [T, 1..{}], got {}", kMaxSlots,
              src2dst.shape.str());
  const int K = int(src2dst.shape[1]);
  src2dst.expect("src2dst", DType::kI32, {T, K});
  topk_ids.expect("topk_ids", DType::kI32, {T, K});
  topk_weights.expect("topk_weights", DType::kF32, {T, K});
  EPMOE_CHECK(out.dtype == DType::kF32 || out.dtype == DType::kBF16, kInvalidArgument,
              "post_reorder: out must be f32 or bf16, got {}", dtype_name(out.dtype));
  EPMOE_CHECK(down_out.dtype == DType::kF32 || down_out.dtype == DType::kBF16, kInvalidArgument,
              "post_reorder: down_out must be f32 or bf16, got {}", dtype_name(down_out.dtype));
  if (T == 0 || H == 0) return;
  const bool in_bf16 = down_out.dtype == DType::kBF16, out_bf16 = out.dtype == DType::kBF16;
  if (in_bf16 && out_bf16)
    launch_post_reorder<__nv_bfloat16, __nv_bfloat16>(
        out, down_out, src2dst, topk_ids, topk_weights, T, K, N, H, num_routed, id_offset, stream);
  else if (in_bf16)
    launch_post_reorder<__nv_bfloat16, float>(out, down_out, src2dst, topk_ids, topk_weights, T, K,
                                              N, H, num_routed, id_offset, stream);
  else if (out_bf16)
    launch_post_reorder<float, __nv_bfloat16>(out, down_out, src2dst, topk_ids, topk_weights, T, K,
                                              N, H, num_routed, id_offset, stream);
  else
    launch_post_reorder<float, float>(out, down_out, src2dst, topk_ids, topk_weights, T, K, N, H,
                                      num_routed, id_offset, stream);
}

}  // namespace epmoe::cuda
