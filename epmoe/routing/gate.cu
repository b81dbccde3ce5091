// Router kernels: gate GEMM (cuBLAS), the fused one-warp-per-token selection, and the unfused
// baseline. Every decision uses the CPU reference's rules (gate_cpu.cc): exact_sigmoidf /
// exact_expf scores, "larger value, then lower index" for experts and groups.
#include <cstdint>

#include "epmoe/core/exact_math.h"
#include "epmoe/cuda/cuda_check.h"
#include "epmoe/cuda/nvtx.h"
#include "epmoe/routing/gate.cuh"
#include "epmoe/routing/gate_cpu.h"

namespace epmoe::cuda {

namespace {

constexpr int kGateWarps = 4;  // tokens per block of the fused kernel
constexpr int kMaxGateExperts = 512;

// Everything the kernels need of MoeConfig, flattened for the device.
struct GateParams {
  int E, G, P, topk_group, K, Kp;
  int lanes_per_group;  // > 0: fast group path (each group spans whole lanes), else general
  bool sigmoid, norm, has_bias, group_limited;
  float rsf_applied;    // rsf, or 1 when scale_on_output
  float shared_weight;  // 1, or 1/rsf when scale_on_output
};

GateParams make_params(const MoeConfig& c, bool has_bias, int vpt) {
  GateParams p{};
  p.E = c.n_routed_experts;
  p.G = c.n_group;
  p.P = c.experts_per_group();
  p.topk_group = c.topk_group;
  p.K = c.top_k;
  p.Kp = c.num_slots();
  p.sigmoid = c.scoring == Scoring::kSigmoid;
  p.norm = c.norm_topk_prob;
  p.has_bias = has_bias;
  p.group_limited = c.topk_group < c.n_group;
  const bool scale_out = c.fuse_shared && c.scale_on_output;
  p.rsf_applied = scale_out ? 1.0f : c.routed_scaling_factor;
  p.shared_weight = scale_out ? 1.0f / c.routed_scaling_factor : 1.0f;
  p.lanes_per_group = 0;
  if (vpt > 0 && p.P % vpt == 0) {
    const int l = p.P / vpt;
    if (l <= 32 && (l & (l - 1)) == 0) p.lanes_per_group = l;
  }
  return p;
}

// Orders like `better` of the CPU reference: larger value first, ties to the lower index.
// NOTES: -0 is folded into +0 (v + 0.0f) because the reference treats them as equal.
__device__ __forceinline__ uint64_t make_key(float v, int idx) {
  uint32_t u = __float_as_uint(v + 0.0f);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (uint64_t(u) << 32) | uint64_t(0xffffffffu - uint32_t(idx));
}
// Monotone map of a float to uint32 (larger value, larger key; never 0 for a non-NaN value, so 0
// marks "no candidate"). -0 is folded into +0 like the reference's == comparison.
__device__ __forceinline__ uint32_t order_key(float v) {
  const uint32_t u = __float_as_uint(v + 0.0f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ int key_index(uint64_t key) {
  return int(0xffffffffu - uint32_t(key & 0xffffffffu));
}
__device__ __forceinline__ uint64_t warp_max_key(uint64_t k) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t other = __shfl_xor_sync(0xffffffffu, k, o);
    k = other > k ? other : k;
  }
  return k;
}
// Top two values of a multiset (the group score needs values only, not indices).
__device__ __forceinline__ void top2_push(float& m1, float& m2, float v) {
  if (v > m1) {
    m2 = m1;
    m1 = v;
  } else if (v > m2) {
    m2 = v;
  }
}

// One warp per token; lane l holds experts [l·VPT, l·VPT + VPT).
template <int VPT>
__global__ void __launch_bounds__(kGateWarps * 32)
    fused_gate_kernel(int32_t* __restrict__ ids_out, float* __restrict__ w_out,
                      const float* __restrict__ logits, const float* __restrict__ bias, int64_t T,
                      GateParams p) {
  __shared__ float s_choice[kGateWarps][kMaxGateExperts];  // general group path only
  __shared__ float s_gscore[kGateWarps][kMaxGateExperts];
  __shared__ uint8_t s_kept[kGateWarps][kMaxGateExperts];
  __shared__ float s_w[kGateWarps][kMaxSlots];
  __shared__ int s_id[kGateWarps][kMaxSlots];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * kGateWarps + warp;
  if (t >= T) return;  // a whole warp leaves: the kernel only uses warp-level syncs
  const float* lg = logits + t * p.E;
  const int e0 = lane * VPT;

  float raw[VPT];
  uint32_t alive = 0;
  bool loaded = false;
  if constexpr (VPT % 4 == 0) {
    if (p.E % 4 == 0) {  // rows are 16-byte aligned and a lane's 4-runs never straddle E
#pragma unroll
      for (int j = 0; j < VPT; j += 4) {
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (e0 + j < p.E) v = __ldg(reinterpret_cast<const float4*>(lg + e0 + j));
        raw[j] = v.x;
        raw[j + 1] = v.y;
        raw[j + 2] = v.z;
        raw[j + 3] = v.w;
      }
      loaded = true;
    }
  }
  if (!loaded) {
#pragma unroll
    for (int j = 0; j < VPT; ++j) raw[j] = e0 + j < p.E ? __ldg(lg + e0 + j) : 0.f;
  }
#pragma unroll
  for (int j = 0; j < VPT; ++j)
    if (e0 + j < p.E) alive |= 1u << j;

  // score: what weights come from; choice: what experts are ranked by.
  float score[VPT], choice[VPT];
  if (p.sigmoid) {
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      score[j] = exact_sigmoidf(raw[j]);
      choice[j] = (p.has_bias && (alive >> j & 1u)) ? score[j] + __ldg(bias + e0 + j) : score[j];
    }
  } else {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < VPT; ++j)
      if (alive >> j & 1u) mx = fmaxf(mx, raw[j]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      score[j] = (alive >> j & 1u) ? exact_expf(raw[j] - mx) : 0.f;
      sum += score[j];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      score[j] = score[j] / sum;
      choice[j] = raw[j];
    }
  }

  // Group limit: keep the topk_group best groups, drop the experts of the others.
  if (p.group_limited) {
    if (p.lanes_per_group > 0) {
      // Fast path (DeepSeek-V3 256/8: 4 lanes per group): group scores and the group choice
      // stay in registers. Every lane of a group holds its score; the lowest lane among equal
      // maxima is the lowest group index.
      const int L = p.lanes_per_group;
      float m1 = -INFINITY, m2 = -INFINITY;
#pragma unroll
      for (int j = 0; j < VPT; ++j)
        if (alive >> j & 1u) top2_push(m1, m2, choice[j]);
      for (int o = 1; o < L; o <<= 1) {
        const float o1 = __shfl_xor_sync(0xffffffffu, m1, o);
        const float o2 = __shfl_xor_sync(0xffffffffu, m2, o);
        const float n1 = fmaxf(m1, o1);
        m2 = fmaxf(fminf(m1, o1), fmaxf(m2, o2));
        m1 = n1;
      }
      const int g = lane / L;
      const bool real = g < p.G;
      const uint32_t gkey = real ? order_key((p.sigmoid && p.P >= 2) ? m1 + m2 : m1) : 0u;
      bool kept = false;
      for (int r = 0; r < p.topk_group; ++r) {
        const uint32_t mine = kept ? 0u : gkey;
        const uint32_t best = __reduce_max_sync(0xffffffffu, mine);
        const unsigned ball = __ballot_sync(0xffffffffu, real && !kept && mine == best);
        kept |= g == (__ffs(ball) - 1) / L;
      }
      if (!kept) alive = 0;
    } else {
#pragma unroll
      for (int j = 0; j < VPT; ++j)
        if (alive >> j & 1u) s_choice[warp][e0 + j] = choice[j];
      __syncwarp();
      for (int g = lane; g < p.G; g += 32) {
        float m1 = -INFINITY, m2 = -INFINITY;
        for (int j = 0; j < p.P; ++j) top2_push(m1, m2, s_choice[warp][g * p.P + j]);
        s_gscore[warp][g] = (p.sigmoid && p.P >= 2) ? m1 + m2 : m1;
        s_kept[warp][g] = 0;
      }
      __syncwarp();
      for (int r = 0; r < p.topk_group; ++r) {
        uint64_t best = 0;
        for (int g = lane; g < p.G; g += 32)
          if (!s_kept[warp][g]) {
            const uint64_t k = make_key(s_gscore[warp][g], g);
            best = k > best ? k : best;
          }
        const uint64_t win = warp_max_key(best);
        const int g = key_index(win);
        if ((g & 31) == lane) s_kept[warp][g] = 1;
        __syncwarp();
      }
#pragma unroll
      for (int j = 0; j < VPT; ++j)
        if ((alive >> j & 1u) && !s_kept[warp][(e0 + j) / p.P]) alive &= ~(1u << j);
    }
  }

  // Top-k by descending choice: K rounds of a warp-wide max (one REDUX). Lane l holds experts
  // [l·VPT, l·VPT + VPT), so the lowest lane holding the maximum has the lowest index, and the
  // strict > keeps a lane's lowest j: exactly the reference's tie rule.
  uint32_t key[VPT];
#pragma unroll
  for (int j = 0; j < VPT; ++j) key[j] = (alive >> j & 1u) ? order_key(choice[j]) : 0u;
  for (int k = 0; k < p.K; ++k) {
    uint32_t best = 0;
    float best_w = 0.f;
    int best_j = 0;
#pragma unroll
    for (int j = 0; j < VPT; ++j)
      if (key[j] > best) {
        best = key[j];
        best_w = score[j];
        best_j = j;
      }
    const uint32_t win = __reduce_max_sync(0xffffffffu, best);
    const unsigned ball = __ballot_sync(0xffffffffu, best != 0u && best == win);
    if (lane == __ffs(ball) - 1) {
#pragma unroll
      for (int j = 0; j < VPT; ++j)
        if (j == best_j) key[j] = 0u;
      s_id[warp][k] = e0 + best_j;
      s_w[warp][k] = best_w;
    }
  }
  __syncwarp();
  float sum = 0.f;  // in slot order, as the reference
  for (int k = 0; k < p.K; ++k) sum += s_w[warp][k];
  if (lane < p.K) {
    float w = s_w[warp][lane];
    if (p.norm) w = w / (sum + 1e-20f);
    ids_out[t * p.Kp + lane] = s_id[warp][lane];
    w_out[t * p.Kp + lane] = w * p.rsf_applied;
  } else if (lane < p.Kp) {
    ids_out[t * p.Kp + lane] = p.E + (lane - p.K);
    w_out[t * p.Kp + lane] = p.shared_weight;
  }
}

// --- unfused baseline: one simple kernel per step --------------------------------------------

__global__ void unfused_score_kernel(float* scores, float* choice, const float* logits,
                                     const float* bias, int64_t T, GateParams p) {
  if (p.sigmoid) {
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= T * p.E) return;
    const float s = exact_sigmoidf(logits[i]);
    scores[i] = s;
    choice[i] = p.has_bias ? s + bias[i % p.E] : s;
  } else {
    const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const float* l = logits + t * p.E;
    float mx = l[0];
    for (int e = 1; e < p.E; ++e) mx = fmaxf(mx, l[e]);
    float sum = 0.f;
    for (int e = 0; e < p.E; ++e) {
      scores[t * p.E + e] = exact_expf(l[e] - mx);
      sum += scores[t * p.E + e];
    }
    for (int e = 0; e < p.E; ++e) {
      scores[t * p.E + e] = scores[t * p.E + e] / sum;
      choice[t * p.E + e] = l[e];
    }
  }
}

__global__ void unfused_group_score_kernel(float* group_score, const float* choice, int64_t T,
                                           GateParams p) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= T * p.G) return;
  const float* c = choice + (i / p.G) * p.E + (i % p.G) * p.P;
  float m1 = -INFINITY, m2 = -INFINITY;
  for (int j = 0; j < p.P; ++j) top2_push(m1, m2, c[j]);
  group_score[i] = (p.sigmoid && p.P >= 2) ? m1 + m2 : m1;
}

__global__ void unfused_group_select_kernel(int32_t* kept, const float* group_score, int64_t T,
                                            GateParams p) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= T) return;
  const float* gs = group_score + t * p.G;
  int32_t* kp = kept + t * p.G;
  for (int g = 0; g < p.G; ++g) kp[g] = 0;
  for (int r = 0; r < p.topk_group; ++r) {
    int best = -1;
    for (int g = 0; g < p.G; ++g)
      if (!kp[g] && (best < 0 || gs[g] > gs[best])) best = g;
    kp[best] = 1;
  }
}

__global__ void unfused_topk_kernel(int32_t* ids, float* weights, const float* scores,
                                    const float* choice, const int32_t* kept, int64_t T,
                                    GateParams p) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= T) return;
  const float* c = choice + t * p.E;
  int32_t* id = ids + t * p.Kp;
  for (int k = 0; k < p.K; ++k) {
    int best = -1;
    for (int e = 0; e < p.E; ++e) {
      if (!kept[t * p.G + e / p.P]) continue;
      bool taken = false;
      for (int j = 0; j < k; ++j) taken |= id[j] == e;
      if (!taken && (best < 0 || c[e] > c[best])) best = e;
    }
    id[k] = best;
    weights[t * p.Kp + k] = scores[t * p.E + best];
  }
}

__global__ void unfused_weights_kernel(int32_t* ids, float* weights, int64_t T, GateParams p) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= T) return;
  float* w = weights + t * p.Kp;
  float sum = 0.f;
  for (int k = 0; k < p.K; ++k) sum += w[k];
  for (int k = 0; k < p.K; ++k) w[k] = (p.norm ? w[k] / (sum + 1e-20f) : w[k]) * p.rsf_applied;
  for (int j = 0; j < p.Kp - p.K; ++j) {
    ids[t * p.Kp + p.K + j] = p.E + j;
    w[p.K + j] = p.shared_weight;
  }
}

// The selection checks of the CPU reference plus the fused kernel's expert limit.
int64_t check_select(const TensorView& topk_ids, const TensorView& topk_weights,
                     const TensorView& logits, const TensorView& bias, const MoeConfig& config,
                     const float** bias_ptr) {
  config.validate();  // an invalid config is reported as such before the expert limit
  EPMOE_CHECK(config.n_routed_experts <= kMaxGateExperts, kUnsupported,
              "the CUDA gate supports up to {} experts, got {}", kMaxGateExperts,
              config.n_routed_experts);
  return check_selection_args(topk_ids, topk_weights, logits, bias, config, bias_ptr);
}

}  // namespace

void gate_gemm(const TensorView& logits, const TensorView& x, const TensorView& weight,
               cublasHandle_t handle, cudaStream_t stream) {
  const NvtxRange nvtx("gate.gate_gemm");
  EPMOE_CHECK(x.shape.rank == 2 && weight.shape.rank == 2 && weight.shape[1] == x.shape[1],
              kInvalidArgument, "gate GEMM: x {} and router weight {} disagree on hidden size",
              x.shape.str(), weight.shape.str());
  EPMOE_CHECK(x.dtype == weight.dtype && (x.dtype == DType::kBF16 || x.dtype == DType::kF32),
              kInvalidArgument, "gate GEMM: x ({}) and router weight ({}) must both be bf16 or f32",
              dtype_name(x.dtype), dtype_name(weight.dtype));
  const int64_t T = x.shape[0], H = x.shape[1], E = weight.shape[0];
  logits.expect("logits", DType::kF32, {T, E});
  if (T == 0) return;
  const cudaDataType_t in_t = x.dtype == DType::kBF16 ? CUDA_R_16BF : CUDA_R_32F;
  const float alpha = 1.f, beta = 0.f;
  EPMOE_CUBLAS_CHECK(cublasSetStream(handle, stream));
  // Row-major logits[T,E] = x[T,H]·W[E,H]ᵀ is column-major logitsᵀ[E,T] = Wᵀ(op T)·xᵀ.
  EPMOE_CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, int(E), int(T), int(H), &alpha,
                                  weight.data, in_t, int(H), x.data, in_t, int(H), &beta,
                                  logits.data, CUDA_R_32F, int(E), CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT));
}

void select_experts(const TensorView& topk_ids, const TensorView& topk_weights,
                    const TensorView& logits, const TensorView& bias, const MoeConfig& config,
                    cudaStream_t stream) {
  const NvtxRange nvtx("gate.select_experts");
  (void)cudaGetLastError();  // NOTES: drop a stale error of an earlier, already-reported call
  const float* bias_ptr = nullptr;
  const int64_t T = check_select(topk_ids, topk_weights, logits, bias, config, &bias_ptr);
  if (T == 0) return;
  const int E = config.n_routed_experts;
  const int vpt = E <= 32 ? 1 : E <= 64 ? 2 : E <= 128 ? 4 : E <= 256 ? 8 : 16;
  const GateParams p = make_params(config, bias_ptr != nullptr, vpt);
  const dim3 grid(unsigned((T + kGateWarps - 1) / kGateWarps)), block(kGateWarps * 32);
  int32_t* ids = topk_ids.as<int32_t>();
  float* w = topk_weights.as<float>();
  const float* lg = logits.as<float>();
  switch (vpt) {  // the one runtime -> template switch
    case 1:
      fused_gate_kernel<1><<<grid, block, 0, stream>>>(ids, w, lg, bias_ptr, T, p);
      break;
    case 2:
      fused_gate_kernel<2><<<grid, block, 0, stream>>>(ids, w, lg, bias_ptr, T, p);
      break;
    case 4:
      fused_gate_kernel<4><<<grid, block, 0, stream>>>(ids, w, lg, bias_ptr, T, p);
      break;
    case 8:
      fused_gate_kernel<8><<<grid, block, 0, stream>>>(ids, w, lg, bias_ptr, T, p);
      break;
    default:
      fused_gate_kernel<16><<<grid, block, 0, stream>>>(ids, w, lg, bias_ptr, T, p);
      break;
  }
  EPMOE_CUDA_CHECK_LAUNCH("fused_gate_kernel");
}

size_t unfused_gate_workspace_bytes(int64_t tokens, const MoeConfig& config) {
  const int64_t E = config.n_routed_experts, G = config.n_group;
  return size_t(tokens) * size_t(2 * E + 2 * G) * 4 + 256;
}

UnfusedGateWorkspace carve_unfused_gate_workspace(void* base, int64_t tokens,
                                                  const MoeConfig& config) {
  const int64_t E = config.n_routed_experts, G = config.n_group;
  float* f = static_cast<float*>(base);
  UnfusedGateWorkspace ws;
  ws.scores = f;
  ws.choice = f + tokens * E;
  ws.group_score = f + 2 * tokens * E;
  ws.group_kept = reinterpret_cast<int32_t*>(f + 2 * tokens * E + tokens * G);
  return ws;
}

void select_experts_unfused(const TensorView& topk_ids, const TensorView& topk_weights,
                            const TensorView& logits, const TensorView& bias,
                            const MoeConfig& config, const UnfusedGateWorkspace& ws,
                            cudaStream_t stream) {
  const NvtxRange nvtx("gate.select_experts_unfused");
  (void)cudaGetLastError();  // NOTES: drop a stale error of an earlier, already-reported call
  const float* bias_ptr = nullptr;
  const int64_t T = check_select(topk_ids, topk_weights, logits, bias, config, &bias_ptr);
  if (T == 0) return;
  const GateParams p = make_params(config, bias_ptr != nullptr, 0);
  constexpr int kThreads = 128;
  auto blocks = [](int64_t n) { return unsigned((n + kThreads - 1) / kThreads); };
  const int64_t score_items = p.sigmoid ? T * p.E : T;
  unfused_score_kernel<<<blocks(score_items), kThreads, 0, stream>>>(
      ws.scores, ws.choice, logits.as<float>(), bias_ptr, T, p);
  EPMOE_CUDA_CHECK_LAUNCH("unfused_score_kernel");
  unfused_group_score_kernel<<<blocks(T * p.G), kThreads, 0, stream>>>(ws.group_score, ws.choice, T,
                                                                       p);
  EPMOE_CUDA_CHECK_LAUNCH("unfused_group_score_kernel");
  unfused_group_select_kernel<<<blocks(T), kThreads, 0, stream>>>(ws.group_kept, ws.group_score, T,
                                                                  p);
  EPMOE_CUDA_CHECK_LAUNCH("unfused_group_select_kernel");
  unfused_topk_kernel<<<blocks(T), kThreads, 0, stream>>>(
      topk_ids.as<int32_t>(), topk_weights.as<float>(), ws.scores, ws.choice, ws.group_kept, T, p);
  EPMOE_CUDA_CHECK_LAUNCH("unfused_topk_kernel");
  unfused_weights_kernel<<<blocks(T), kThreads, 0, stream>>>(topk_ids.as<int32_t>(),
                                                             topk_weights.as<float>(), T, p);
  EPMOE_CUDA_CHECK_LAUNCH("unfused_weights_kernel");
}

}  // namespace epmoe::cuda
