#include <cuda_bf16.h>

#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "epmoe/core/env.h"
#include "epmoe/cuda/cuda_check.h"
#include "epmoe/cuda/device.h"
#include "epmoe/cuda/nvtx.h"
#include "epmoe/ep/ep_kernels.cuh"
#include "epmoe/experts/experts.cuh"
#include "epmoe/experts/grouped_gemm.cuh"
#include "epmoe/experts/sm90/sm90_grouped_gemm.cuh"
#include "epmoe/layer/layer_rank_cuda.h"
#include "epmoe/permute/permute.cuh"
#include "epmoe/routing/gate.cuh"
#include "epmoe/weights/fp8_block.h"

namespace epmoe::cuda {

namespace {

// Experts [first, first + n) of a [E_bank, a, b] host tensor as a view.
TensorView bank_rows(const Tensor& bank, int64_t first, int64_t n) {
  const Shape& s = bank.shape();
  const size_t per = size_t(s[1] * s[2]) * dtype_size(bank.dtype());
  return TensorView{static_cast<char*>(bank.view().data) + per * size_t(first),
                    {n, s[1], s[2]},
                    bank.dtype(),
                    Device::kCpu};
}

// Host bank slice [first, first + n) rounded to bf16 (the GPU computes in bf16; an f32 bank is
// rounded once here). FP8 banks are dequantised with their block scales first (exactly, in f32);
// `halves` = 2 for w13, whose gate_proj and up_proj rows have block scales of their own.
DeviceTensor upload_bank(const Tensor& bank, const Tensor& scale, int64_t first, int64_t n,
                         int halves) {
  if (bank.dtype() != DType::kF8E4M3)
    return DeviceTensor::from_host(to_dtype(bank_rows(bank, first, n), DType::kBF16).view());
  const Shape& s = bank.shape();
  const int64_t rows = s[1] / halves, cols = s[2];
  const int64_t srows = scale.shape()[1] / halves, scols = scale.shape()[2];
  Tensor out(DType::kBF16, {n, s[1], cols});
  for (int64_t e = 0; e < n; ++e)
    for (int h = 0; h < halves; ++h) {
      const TensorView q{
          static_cast<uint8_t*>(bank.view().data) + size_t(((first + e) * s[1] + h * rows) * cols),
          {rows, cols},
          DType::kF8E4M3,
          Device::kCpu};
      const TensorView sc{scale.as<float>() + ((first + e) * scale.shape()[1] + h * srows) * scols,
                          {srows, scols},
                          DType::kF32,
                          Device::kCpu};
      const Tensor f = to_dtype(dequantize_fp8_block128(q, sc).view(), DType::kBF16);
      std::memcpy(out.as<bf16>() + (e * s[1] + h * rows) * cols, f.view().data, f.nbytes());
    }
  return DeviceTensor::from_host(out.view());
}

int64_t round_up128(int64_t v) { return (v + 127) / 128 * 128; }

// A [n, a, b] host tensor with its intermediate dimension padded with zeros from `inter` to
// `inter_p` (a multiple of 128, what the FP8 GEMMs' K and N need): halves = 2 (w13: rows [0, I)
// gate_proj and [I, 2I) up_proj go to [0, I) and [Ip, Ip + I)), halves = 1 (w2: columns I → Ip).
// Zero bytes are zero in bf16, f32 and e4m3, so the padded rows give zero activations (silu(0)·0)
// and add nothing; the per-128 block layout of the checkpoints' scales is unchanged by it.
Tensor pad_intermediate(const TensorView& src, int halves, int64_t inter, int64_t inter_p) {
  const int64_t n = src.shape[0], a = src.shape[1], b = src.shape[2];
  const size_t es = dtype_size(src.dtype);
  const char* in = static_cast<const char*>(src.data);
  if (halves == 2) {
    Tensor out = Tensor::zeros(src.dtype, {n, 2 * inter_p, b});
    char* o = static_cast<char*>(out.view().data);
    for (int64_t e = 0; e < n; ++e)
      for (int h = 0; h < 2; ++h)
        std::memcpy(o + size_t((e * 2 * inter_p + h * inter_p) * b) * es,
                    in + size_t((e * a + h * inter) * b) * es, size_t(inter * b) * es);
    return out;
  }
  Tensor out = Tensor::zeros(src.dtype, {n, a, inter_p});
  char* o = static_cast<char*>(out.view().data);
  for (int64_t r = 0; r < n * a; ++r)
    std::memcpy(o + size_t(r * inter_p) * es, in + size_t(r * b) * es, size_t(b) * es);
  return out;
}

// FP8 weights on the device: e4m3 codes [n, ·, ·] and their 128 x 128 block scales.
struct Fp8Upload {
  DeviceTensor q, scale;
};
// src: [n, a, b] host bank slice; scale: its block scales when src is e4m3 (uploaded as they
// are, no dequantisation), else src (bf16|f32) is quantised here (quantize_fp8_block128).
Fp8Upload upload_fp8(const TensorView& src, const TensorView& scale, int halves, int64_t inter,
                     int64_t inter_p) {
  Tensor padded;
  TensorView v = src;
  if (inter_p != inter) {
    padded = pad_intermediate(src, halves, inter, inter_p);
    v = padded.view();
  }
  if (src.dtype == DType::kF8E4M3)
    return {DeviceTensor::from_host(v), DeviceTensor::from_host(scale)};
  const Fp8Tensor f = quantize_fp8_block128(v);
  return {DeviceTensor::from_host(f.q.view()), DeviceTensor::from_host(f.scale.view())};
}

// ---- micro-batch split and merge (device-side counts: capturable) ----
// Range of micro-batch mb of a rank with *rank_tokens tokens, as micro_batch_range() computes it.
__device__ void mb_range(int64_t tokens, int nmb, int mb, bool a_takes_odd, int64_t* begin,
                         int64_t* end) {
  if (nmb == 1) {
    *begin = 0;
    *end = tokens;
    return;
  }
  const int64_t a = a_takes_odd ? (tokens + 1) / 2 : tokens / 2;
  *begin = mb == 0 ? 0 : a;
  *end = mb == 0 ? a : tokens;
}

// mb_x [T_max, H] bf16 <- rows [begin, end) of x; with a routing, mb_ids/mb_w too.
// mb_tokens <- end - begin.
__global__ void split_kernel(__nv_bfloat16* mb_x, int32_t* mb_ids, float* mb_w, int32_t* mb_tokens,
                             const __nv_bfloat16* x, const int32_t* ids, const float* w,
                             const int32_t* rank_tokens, int64_t t_max, int64_t hidden, int kp,
                             int nmb, int mb, bool a_takes_odd) {
  int64_t b, e;
  mb_range(min(int64_t(*rank_tokens), t_max), nmb, mb, a_takes_odd, &b, &e);
  if (blockIdx.x == 0 && threadIdx.x == 0) *mb_tokens = int32_t(e - b);
  const int64_t n8 = (e - b) * hidden / 8;
  const uint4* src = reinterpret_cast<const uint4*>(x + b * hidden);
  uint4* dst = reinterpret_cast<uint4*>(mb_x);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n8; i += stride)
    dst[i] = src[i];
  if (ids)
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (e - b) * kp;
         i += stride) {
      mb_ids[i] = ids[b * kp + i];
      mb_w[i] = w[b * kp + i];
    }
}

// Rows [begin, end) of y (and of the routing) <- micro-batch mb's rows.
__global__ void merge_kernel(float* y, int32_t* ids, float* w, const float* mb_y,
                             const int32_t* mb_ids, const float* mb_w, const int32_t* rank_tokens,
                             int64_t t_max, int64_t hidden, int kp, int nmb, int mb,
                             bool a_takes_odd) {
  int64_t b, e;
  mb_range(min(int64_t(*rank_tokens), t_max), nmb, mb, a_takes_odd, &b, &e);
  const int64_t n4 = (e - b) * hidden / 4;
  const float4* src = reinterpret_cast<const float4*>(mb_y);
  float4* dst = reinterpret_cast<float4*>(y + b * hidden);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n4; i += stride)
    dst[i] = src[i];
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (e - b) * kp; i += stride) {
    ids[b * kp + i] = mb_ids[i];
    w[b * kp + i] = mb_w[i];
  }
}

// x [T_max, H] -> xc [S, T_max, kc] (chunk c holds columns [c·kc, (c+1)·kc)); count[c] = T.
__global__ void chunk_kernel(__nv_bfloat16* xc, int32_t* count, const __nv_bfloat16* x,
                             const int32_t* num_tokens, int64_t t_max, int64_t hidden, int64_t kc) {
  const int64_t T = min(int64_t(*num_tokens), t_max);
  const int64_t S = hidden / kc, per_row = hidden / 8;
  if (blockIdx.x == 0 && int64_t(threadIdx.x) < S) count[threadIdx.x] = int32_t(T);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < T * per_row; i += stride) {
    const int64_t t = i / per_row, col = (i % per_row) * 8, c = col / kc;
    *reinterpret_cast<uint4*>(xc + (c * t_max + t) * kc + (col - c * kc)) =
        *reinterpret_cast<const uint4*>(x + t * hidden + col);
  }
}

// logits[t, e] = Σ_c partial[c, t, e], c ascending (rows < T).
__global__ void sum_chunks_kernel(float* logits, const float* partial, const int32_t* num_tokens,
                                  int64_t t_max, int64_t experts, int chunks) {
  const int64_t n = min(int64_t(*num_tokens), t_max) * experts;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    float acc = partial[i];
    for (int c = 1; c < chunks; ++c) acc = acc + partial[int64_t(c) * t_max * experts + i];
    logits[i] = acc;
  }
}

unsigned grid_for(int64_t items, int threads) {
  const int64_t b = (items + threads - 1) / threads;
  return unsigned(b < 1 ? 1 : (b > 1024 ? 1024 : b));
}

// Polls `s` until it drains; Error(kTimeout) naming `what` after the budget.
void drain_bounded(cudaStream_t s, const std::string& what, int rank) {
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(wait_timeout_ms());
  while (true) {
    const cudaError_t q = cudaStreamQuery(s);
    if (q == cudaSuccess) return;
    if (q != cudaErrorNotReady) EPMOE_CUDA_CHECK(q);
    EPMOE_CHECK(std::chrono::steady_clock::now() < deadline, kTimeout,
                "rank {}: the {} stream did not drain within {} ms", rank, what, wait_timeout_ms());
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

constexpr int kLanes = 3;

}  // namespace

struct MoeLayerRankCuda::Impl {
  // One micro-batch: its tokens, routing, expert and shared-expert buffers, EP state, events.
  struct MicroBatch {
    DeviceTensor gate_x, gate_count, gate_partial;  // [S, T_max, kc], [S], [S, T_max, E]
    DeviceTensor x, ids, wts, ntok, logits, y, seg1, seg_shared, shared_gu, shared_act, shared_tmp,
        shared_out;
    // low-latency experts: [E_loc, R·T_max, ·]; normal: grow-only contiguous buffers
    DeviceTensor gu, act;
    DeviceTensor n_seg, n_s2d, n_sorted, n_gu, n_act, n_down, workspace;
    // FP8 experts: e4m3 activations and their per-128 scales (the GEMMs' inputs)
    DeviceTensor xq, xqs, act8, act8s;                    // low-latency (xq: bf16 dispatch)
    DeviceTensor n_sorted8, n_sorted8s, n_act8, n_act8s;  // normal
    DeviceTensor shared_xq, shared_xqs, shared_act8, shared_act8s;
    // Single-batch overlap: the down GEMM's per-tile signals, zeroed before it (low-latency,
    // sm90), and the event the signalled combine-send starts after.
    DeviceTensor signal;
    cudaEvent_t signal_ready = nullptr;
    bool signalled = false;  // this forward's down GEMM signals
    std::unique_ptr<EpMicroBatchCuda> ep;
    // sm90 GEMM scratch: one for the compute lane (gate, experts), one for the shared lane.
    Sm90GemmWorkspace ws_compute, ws_shared;
    cudaEvent_t done[kNumLayerOps] = {};
    bool ran[kNumLayerOps] = {};
    cudaEvent_t split_done = nullptr;
    cudaEvent_t xfer_fork = nullptr, xfer_join = nullptr;  // normal-mode combine transfer
  };

  Impl(GpuTransport& tr, const MoeWeights& w, const EpConfig& e, const EpCudaOptions& o)
      : t(tr), cfg(w.config), ep(e), opt(o) {
    cfg.validate();
    ep.validate(cfg);
    EPMOE_CHECK(tr.size() == ep.num_ranks, kInvalidConfig,
                "the transport has {} ranks, the EP config {}", tr.size(), ep.num_ranks);
    EPMOE_CHECK(ep.max_tokens_per_rank >= 1, kInvalidConfig,
                "max_tokens_per_rank must be >= 1 on the GPU, got {}", ep.max_tokens_per_rank);
    EPMOE_CHECK(
        cfg.hidden % 8 == 0 && cfg.moe_intermediate % 8 == 0 && cfg.n_routed_experts % 8 == 0,
        kUnsupported, "the GPU layer needs H, I and E to be multiples of 8 (got H {}, I {}, E {})",
        cfg.hidden, cfg.moe_intermediate, cfg.n_routed_experts);
    EPMOE_CUDA_CHECK(cudaSetDevice(tr.device()));
    rank = tr.rank();
    // The Hopper grouped GEMM (wgmma + TMA) where this build and device have it; epmoe's portable
    // deterministic kernel otherwise. Both are row-independent (see their headers).
    sm90 = sm90_gemm_available() && env_int("SM90_GEMM", 1) != 0;
    fp8 = opt.fp8_experts;
    EPMOE_CHECK(!fp8 || sm90, kUnsupported,
                "FP8 experts (--weights fp8) run on the sm90 FP8 grouped GEMM: they need an sm_90 "
                "GPU, a build with the CUTLASS headers (scripts/fetch-cutlass.sh) and "
                "EPMOE_SM90_GEMM unset or 1");
    EPMOE_CHECK(!fp8 || cfg.hidden % 128 == 0, kUnsupported,
                "FP8 experts (--weights fp8) need the hidden size to be a multiple of 128 (the "
                "block scales), got H = {}",
                cfg.hidden);
    EPMOE_CUDA_CHECK(
        cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, tr.device()));
    E_loc = cfg.n_routed_experts / ep.num_ranks;
    const int64_t T = ep.max_tokens_per_rank, H = cfg.hidden, I = cfg.moe_intermediate;
    const int64_t Kp = cfg.num_slots(), R = ep.num_ranks;
    // FP8: the intermediate size padded to the 128-wide blocks (zeros; see pad_intermediate).
    inter = fp8 ? round_up128(I) : I;
    const int64_t si = int64_t(cfg.n_shared_experts) * I;  // the unfused shared MLP
    shared_inter = cfg.fuse_shared ? inter : (fp8 ? round_up128(si) : si);

    // The model: this rank's experts, the shared expert(s), the router. FP8: codes and block
    // scales, from the checkpoint as they are or quantised here from bf16.
    auto bank = [&](const Tensor& t, int64_t first, int64_t n) { return bank_rows(t, first, n); };
    if (fp8) {
      const bool q = w.fp8();
      Fp8Upload a =
          upload_fp8(bank(w.w13, rank * E_loc, E_loc),
                     q ? bank(w.w13_scale, rank * E_loc, E_loc) : TensorView{}, 2, I, inter);
      Fp8Upload b =
          upload_fp8(bank(w.w2, rank * E_loc, E_loc),
                     q ? bank(w.w2_scale, rank * E_loc, E_loc) : TensorView{}, 1, I, inter);
      w13 = std::move(a.q), w13s = std::move(a.scale), w2 = std::move(b.q),
      w2s = std::move(b.scale);
      if (cfg.fuse_shared) {
        const int64_t f = cfg.n_routed_experts, n = cfg.n_shared_experts;
        Fp8Upload c =
            upload_fp8(bank(w.w13, f, n), q ? bank(w.w13_scale, f, n) : TensorView{}, 2, I, inter);
        Fp8Upload d =
            upload_fp8(bank(w.w2, f, n), q ? bank(w.w2_scale, f, n) : TensorView{}, 1, I, inter);
        sw13 = std::move(c.q), sw13s = std::move(c.scale), sw2 = std::move(d.q),
        sw2s = std::move(d.scale);
      } else if (cfg.n_shared_experts > 0) {
        // Kept in f32 (or bf16) by the loader, also from an FP8 checkpoint (dequantised exactly):
        // quantised here as one [2·SI, H] / [H, SI] expert. From an FP8 checkpoint this gives the
        // checkpoint's codes back wherever a block's largest code is ±448 (the usual
        // quantisation); a scale may differ by an ulp otherwise.
        const TensorView a13 = w.shared_w13.view(), a2 = w.shared_w2.view();
        Fp8Upload c = upload_fp8(TensorView{a13.data, {1, 2 * si, H}, a13.dtype, Device::kCpu}, {},
                                 2, si, shared_inter);
        Fp8Upload d = upload_fp8(TensorView{a2.data, {1, H, si}, a2.dtype, Device::kCpu}, {}, 1, si,
                                 shared_inter);
        sw13 = std::move(c.q), sw13s = std::move(c.scale), sw2 = std::move(d.q),
        sw2s = std::move(d.scale);
      }
    } else {
      w13 = upload_bank(w.w13, w.w13_scale, rank * E_loc, E_loc, 2);
      w2 = upload_bank(w.w2, w.w2_scale, rank * E_loc, E_loc, 1);
      if (cfg.fuse_shared) {
        sw13 = upload_bank(w.w13, w.w13_scale, cfg.n_routed_experts, cfg.n_shared_experts, 2);
        sw2 = upload_bank(w.w2, w.w2_scale, cfg.n_routed_experts, cfg.n_shared_experts, 1);
      } else if (cfg.n_shared_experts > 0) {
        Tensor a = to_dtype(w.shared_w13, DType::kBF16), b = to_dtype(w.shared_w2, DType::kBF16);
        sw13 = DeviceTensor::from_host(
            TensorView{a.view().data, {1, 2 * si, H}, DType::kBF16, Device::kCpu});
        sw2 = DeviceTensor::from_host(
            TensorView{b.view().data, {1, H, si}, DType::kBF16, Device::kCpu});
      }
    }
    // The router as S = H / kc column chunks [S, E, kc]: the gate GEMM runs as a masked grouped
    // GEMM over the chunks (S times the parallelism of one [T, H] x [H, E] product at decode
    // sizes), then sums the S partial logits in chunk order. Every logit is the same fixed
    // sequence of operations whatever the batch: row-independent, hence bitwise the same for any
    // micro-batch split and rank count.
    gate_kc = H;
    if (H > 512)
      for (int64_t d = 512; d >= 8; d -= 8)
        if (H % d == 0) {
          gate_kc = d;
          break;
        }
    gate_chunks = H / gate_kc;
    if (gate_chunks > 64) gate_kc = H, gate_chunks = 1;  // no usable divisor: one chunk
    {
      const int64_t E = cfg.n_routed_experts, S = gate_chunks, kc = gate_kc;
      Tensor g = to_dtype(w.gate, DType::kBF16);
      Tensor gc(DType::kBF16, {S, E, kc});
      for (int64_t c = 0; c < S; ++c)
        for (int64_t e2 = 0; e2 < E; ++e2)
          std::memcpy(gc.as<bf16>() + (c * E + e2) * kc, g.as<bf16>() + e2 * H + c * kc,
                      size_t(kc) * 2);
      gate_w = DeviceTensor::from_host(gc.view());
    }
    if (w.has_bias()) gate_bias = DeviceTensor::from_host(to_f32(w.gate_bias).view());

    // The rank's tokens and results.
    x = DeviceTensor(DType::kBF16, {T, H});
    x.fill_bytes(0);
    ids = DeviceTensor(DType::kI32, {T, Kp});
    wts = DeviceTensor(DType::kF32, {T, Kp});
    ntok = DeviceTensor(DType::kI32, {1});
    ntok.fill_bytes(0);
    y = DeviceTensor(DType::kF32, {T, H});
    // Pinned staging for upload(): copies from pageable memory go through the driver's own
    // staging and may wait on other work of the device, which a spinning peer never finishes.
    staging_bytes = size_t(T) * size_t(H) * 2 + 2 * size_t(T) * size_t(Kp) * 4 + 64;
    EPMOE_CUDA_CHECK(cudaMallocHost(&staging, staging_bytes));

    EPMOE_CUDA_CHECK(
        cudaStreamCreateWithFlags(&lane[int(OpLane::kCompute)], cudaStreamNonBlocking));
    EPMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&lane[int(OpLane::kShared)], cudaStreamNonBlocking));
    lane[int(OpLane::kComm)] = tr.stream();
    for (auto& e2 : lane_join)
      EPMOE_CUDA_CHECK(cudaEventCreateWithFlags(&e2, cudaEventDisableTiming));
    EPMOE_CUDA_CHECK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
    EPMOE_CUDA_CHECK(cudaEventCreateWithFlags(&user_done, cudaEventDisableTiming));
    ep::prepare_kernels();

    const char* names[2] = {"A", "B"};
    for (int m = 0; m < 2; ++m) {
      MicroBatch& b = mbs[m];
      b.x = DeviceTensor(DType::kBF16, {T, H});
      b.x.fill_bytes(0);
      b.ids = DeviceTensor(DType::kI32, {T, Kp});
      b.ids.fill_bytes(0xff);  // -1: rows past the count never route anywhere
      b.wts = DeviceTensor(DType::kF32, {T, Kp});
      b.wts.fill_bytes(0);
      b.ntok = DeviceTensor(DType::kI32, {1});
      b.ntok.fill_bytes(0);
      b.logits = DeviceTensor(DType::kF32, {T, cfg.n_routed_experts});
      b.logits.fill_bytes(0);
      b.gate_x = DeviceTensor(DType::kBF16, {gate_chunks, T, gate_kc});
      b.gate_count = DeviceTensor(DType::kI32, {gate_chunks});
      b.gate_partial = DeviceTensor(DType::kF32, {gate_chunks, T, cfg.n_routed_experts});
      b.y = DeviceTensor(DType::kF32, {T, H});
      b.seg1 = DeviceTensor(DType::kI32, {2});
      b.seg_shared = DeviceTensor(DType::kI32, {2});
      if (cfg.n_shared_experts > 0) {
        const int64_t sp = shared_inter;
        b.shared_gu = DeviceTensor(DType::kBF16, {T, 2 * sp});
        if (fp8) {
          b.shared_xq = DeviceTensor(DType::kF8E4M3, {T, H});
          b.shared_xqs = DeviceTensor(DType::kF32, {T, H / 128});
          b.shared_act8 = DeviceTensor(DType::kF8E4M3, {T, sp});
          b.shared_act8s = DeviceTensor(DType::kF32, {T, sp / 128});
        } else {
          b.shared_act = DeviceTensor(DType::kBF16, {T, sp});
        }
        b.shared_tmp = DeviceTensor(DType::kF32, {T, H});
        if (cfg.fuse_shared) b.shared_out = DeviceTensor(DType::kF32, {T, cfg.n_shared_experts, H});
      }
      b.ep = std::make_unique<EpMicroBatchCuda>(tr, cfg, ep, opt, names[m]);
      if (ep.mode == EpMode::kLowLatency) {
        const int64_t m_max = R * T;
        b.gu = DeviceTensor(DType::kBF16, {E_loc, m_max, 2 * inter});
        if (fp8) {
          if (!b.ep->recv_x_fp8().data) {  // bf16 dispatch: quantised on the expert side
            b.xq = DeviceTensor(DType::kF8E4M3, {E_loc, m_max, H});
            b.xqs = DeviceTensor(DType::kF32, {E_loc, m_max, H / 128});
          }
          b.act8 = DeviceTensor(DType::kF8E4M3, {E_loc, m_max, inter});
          b.act8s = DeviceTensor(DType::kF32, {E_loc, m_max, inter / 128});
        } else {
          b.act = DeviceTensor(DType::kBF16, {E_loc, m_max, I});
        }
        if (sm90) {
          const Sm90SignalInfo si2 = signal_info();
          b.signal = DeviceTensor(DType::kI32, {E_loc * ((m_max + si2.block_m - 1) / si2.block_m)});
          b.signal.fill_bytes(0);
        }
      } else {
        b.n_seg = DeviceTensor(DType::kI32, {E_loc + 1});
      }
      if (sm90) {
        b.ws_compute = Sm90GemmWorkspace(int(std::max<int64_t>(E_loc, gate_chunks)));
        b.ws_shared = Sm90GemmWorkspace(std::max(1, cfg.n_shared_experts));
      }
      for (auto& ev : b.done)
        EPMOE_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
      EPMOE_CUDA_CHECK(cudaEventCreateWithFlags(&b.split_done, cudaEventDisableTiming));
      EPMOE_CUDA_CHECK(cudaEventCreateWithFlags(&b.signal_ready, cudaEventDisableTiming));
      EPMOE_CUDA_CHECK(cudaEventCreateWithFlags(&b.xfer_fork, cudaEventDisableTiming));
      EPMOE_CUDA_CHECK(cudaEventCreateWithFlags(&b.xfer_join, cudaEventDisableTiming));
    }
    EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
    // Every rank is fully set up before any starts waiting on flags: setup allocates, and an
    // allocation may wait for the device while a peer's kernel spins.
    t.barrier();
  }

  ~Impl() {
    for (MicroBatch& b : mbs) {
      for (auto ev : b.done)
        if (ev) cudaEventDestroy(ev);
      if (b.split_done) cudaEventDestroy(b.split_done);
      if (b.signal_ready) cudaEventDestroy(b.signal_ready);
      if (b.xfer_fork) cudaEventDestroy(b.xfer_fork);
      if (b.xfer_join) cudaEventDestroy(b.xfer_join);
    }
    for (auto e2 : lane_join)
      if (e2) cudaEventDestroy(e2);
    if (fork) cudaEventDestroy(fork);
    if (user_done) cudaEventDestroy(user_done);
    clear_trace_events();
    if (lane[int(OpLane::kCompute)]) cudaStreamDestroy(lane[int(OpLane::kCompute)]);
    if (lane[int(OpLane::kShared)]) cudaStreamDestroy(lane[int(OpLane::kShared)]);
    if (staging) cudaFreeHost(staging);
  }

  GpuTransport& t;
  MoeConfig cfg;
  EpConfig ep;
  EpCudaOptions opt;
  int rank = 0;
  int64_t E_loc = 0;
  bool sm90 = false;
  int sm_count = 0;
  DeviceTensor w13, w2, sw13, sw2, gate_w, gate_bias;  // gate_w: [S, E, kc] bf16
  // FP8 experts: w13/w2/sw13/sw2 hold e4m3 codes, these their 128 x 128 block scales.
  bool fp8 = false;
  DeviceTensor w13s, w2s, sw13s, sw2s;
  int64_t inter = 0, shared_inter = 0;  // GEMM intermediate sizes (FP8: padded to 128)
  int64_t gate_kc = 0, gate_chunks = 1;
  DeviceTensor x, ids, wts, ntok, y;
  bool external_routing = false;
  char* staging = nullptr;
  size_t staging_bytes = 0;
  cudaStream_t lane[kLanes] = {};
  cudaEvent_t lane_join[kLanes] = {};
  cudaEvent_t fork = nullptr;
  MicroBatch mbs[2];
  ForwardPlan plan;
  bool in_forward = false;
  cudaEvent_t last_done = nullptr;  // the previous op's event (sequential plans)
  // tracing
  bool tracing = false;
  cudaEvent_t trace_origin = nullptr;
  struct TraceEntry {
    std::string name;
    int mb;
    OpLane lane;
    cudaEvent_t start, end;
  };
  std::vector<TraceEntry> trace;

  // SMs (and blocks) of the signalled combine-send beside the down GEMM: 16 leaves the slice's
  // 224-tile down GEMM two waves on an H200 (24 made it three).
  static constexpr int kSignalBlocks = 16;
  int gemm_reserve() const {
    return plan.concurrent && plan.num_micro_batches == 2 ? std::max(opt.comm_blocks, 8) : 0;
  }

  Sm90SignalInfo signal_info() const {
    return sm90_gemm_signal_info(fp8 ? DType::kF8E4M3 : DType::kBF16, cfg.hidden);
  }
  // Whether this forward's down GEMM signals its tiles and combine_send waits on them.
  bool signals_on(const MicroBatch& b) const {
    return plan.signalled_combine && plan.concurrent && sm90 && ep.mode == EpMode::kLowLatency &&
           b.ep->can_signal_combine();
  }

  cudaStream_t compute() const { return lane[int(OpLane::kCompute)]; }
  cudaStream_t comm() const { return lane[int(OpLane::kComm)]; }
  bool a_takes_odd() const { return plan.split == SplitRule::kHalves || rank % 2 == 0; }

  void clear_trace_events() {
    for (auto& e2 : trace) {
      cudaEventDestroy(e2.start);
      cudaEventDestroy(e2.end);
    }
    trace.clear();
    if (trace_origin) cudaEventDestroy(trace_origin);
    trace_origin = nullptr;
  }

  OpLane lane_of(LayerOp op, const MicroBatch& b) const {
    // Halves that only lay out, pack or reduce locally (normal mode, low-latency over the host
    // API) are compute work; the ones that move data between ranks get the communication lane.
    if (op == LayerOp::kDispatchSend && b.ep->dispatch_send_is_local()) return OpLane::kCompute;
    if (op == LayerOp::kCombineRecv && b.ep->combine_recv_is_local()) return OpLane::kCompute;
    if (op == LayerOp::kCombineSend && b.ep->combine_transfers_in_recv()) return OpLane::kCompute;
    if (layer_op_is_comm(op)) return OpLane::kComm;
    if (op == LayerOp::kSharedExperts && plan.concurrent && plan.shared_lane)
      return OpLane::kShared;
    return OpLane::kCompute;
  }

  // ---- forward bracket ----
  void begin_forward(const ForwardPlan& p) {
    EPMOE_CHECK(!in_forward, kInvalidArgument, "rank {}: begin_forward twice without end_forward",
                rank);
    EPMOE_CHECK(p.num_micro_batches == 1 || p.num_micro_batches == 2, kInvalidArgument,
                "rank {}: {} micro-batches (1 or 2)", rank, p.num_micro_batches);
    cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
    EPMOE_CUDA_CHECK(cudaStreamIsCapturing(compute(), &cap));
    EPMOE_CHECK(cap == cudaStreamCaptureStatusNone ||
                    (ep.mode == EpMode::kLowLatency && !mbs[0].ep->ll_over_host_api()),
                kUnsupported,
                "rank {}: this forward learns transfer sizes on the host ({}) and cannot be "
                "captured in a CUDA graph; low-latency mode by load/store can",
                rank, ep.mode == EpMode::kNormal ? "normal mode" : "low-latency over the host API");
    plan = p;
    in_forward = true;
    if (sm90) {
      // Overlapped plans leave SMs to the communication kernels (and the shared expert) running
      // beside the persistent GEMMs; the tile configuration, hence every bit, is unchanged.
      // Single-batch overlap runs its communication beside the shared expert (its own lane) and
      // the down GEMM (the signalled combine-send, kSignalBlocks SMs left to it in experts());
      // the other GEMMs take the whole GPU. Two-batch overlap has transfers beside every GEMM.
      const int gemm_sms = std::max(1, sm_count - gemm_reserve());
      for (MicroBatch& b : mbs) {
        b.ws_compute.set_max_sms(gemm_sms);
        b.ws_shared.set_max_sms(plan.shared_lane ? std::max(1, sm_count / 4) : gemm_sms);
      }
    }
    last_done = nullptr;
    if (tracing) {
      clear_trace_events();
      EPMOE_CUDA_CHECK(cudaEventCreate(&trace_origin));
      EPMOE_CUDA_CHECK(cudaEventRecord(trace_origin, compute()));
    }
    // Fork: every lane starts after what the compute stream holds (the inputs, the last forward).
    EPMOE_CUDA_CHECK(cudaEventRecord(fork, compute()));
    for (int l = 1; l < kLanes; ++l) EPMOE_CUDA_CHECK(cudaStreamWaitEvent(lane[l], fork, 0));
    const int64_t T = ep.max_tokens_per_rank, H = cfg.hidden;
    const int Kp = cfg.num_slots();
    for (int m = 0; m < plan.num_micro_batches; ++m) {
      MicroBatch& b = mbs[m];
      for (bool& r : b.ran) r = false;
      b.signalled = false;
      split_kernel<<<grid_for(T * H / 8, 256), 256, 0, compute()>>>(
          reinterpret_cast<__nv_bfloat16*>(b.x.view().data), b.ids.as<int32_t>(), b.wts.as<float>(),
          b.ntok.as<int32_t>(), reinterpret_cast<const __nv_bfloat16*>(x.view().data),
          external_routing ? ids.as<int32_t>() : nullptr, wts.as<float>(), ntok.as<int32_t>(), T, H,
          Kp, plan.num_micro_batches, m, a_takes_odd());
      EPMOE_CUDA_CHECK_LAUNCH("split_kernel");
      EPMOE_CUDA_CHECK(cudaEventRecord(b.split_done, compute()));
    }
  }

  void end_forward() {
    EPMOE_CHECK(in_forward, kInvalidArgument, "rank {}: end_forward without begin_forward", rank);
    for (int l = 1; l < kLanes; ++l) {
      EPMOE_CUDA_CHECK(cudaEventRecord(lane_join[l], lane[l]));
      EPMOE_CUDA_CHECK(cudaStreamWaitEvent(compute(), lane_join[l], 0));
    }
    in_forward = false;
  }

  // ---- one operation ----
  void run(LayerOp op, int m) {
    EPMOE_CHECK(in_forward, kInvalidArgument, "rank {}: {} outside begin/end_forward", rank,
                layer_op_name(op));
    EPMOE_CHECK(m >= 0 && m < plan.num_micro_batches, kInvalidArgument,
                "rank {}: micro-batch {} of a {}-micro-batch forward", rank, m,
                plan.num_micro_batches);
    MicroBatch& b = mbs[m];
    const OpLane l = lane_of(op, b);
    cudaStream_t s = lane[int(l)];
    NvtxRange range(layer_op_name(op));
    wait_dependencies(op, b, s);
    if (l == OpLane::kComm) {
      // Communication kernels keep to their SM budget only while other work runs beside them:
      // every transfer under TBO, the dispatch under SBO (beside the shared expert); a
      // sequential plan lets them use the whole GPU.
      const bool beside_compute =
          plan.concurrent &&
          (plan.num_micro_batches == 2 || op == LayerOp::kDispatchSend ||
           op == LayerOp::kDispatchRecv || (op == LayerOp::kCombineSend && b.signalled));
      b.ep->set_comm_blocks(!beside_compute                              ? 0
                            : op == LayerOp::kCombineSend && b.signalled ? kSignalBlocks
                                                                         : opt.comm_blocks);
    }
    TraceEntry* te = trace_begin(layer_op_name(op), m, l, s);
    switch (op) {
      case LayerOp::kGate:
        gate(b, s);
        break;
      case LayerOp::kSelectExperts:
        select(b, s);
        break;
      case LayerOp::kDispatchSend:
        b.ep->dispatch_send(
            EpTokens{b.x.view().data, b.ids.as<int32_t>(), b.wts.as<float>(), b.ntok.as<int32_t>()},
            s);
        break;
      case LayerOp::kDispatchRecv:
        b.ep->dispatch_recv(s);
        break;
      case LayerOp::kExperts:
        experts(b, s);
        break;
      case LayerOp::kCombineSend:
        if (b.signalled) {
          const Sm90SignalInfo si = signal_info();
          const CombineSignals sig{b.signal.as<int32_t>(), si.block_m, si.threshold};
          b.ep->combine_send(s, &sig);
        } else {
          b.ep->combine_send(s);
        }
        break;
      case LayerOp::kCombineRecv:
        if (b.ep->combine_transfers_in_recv()) {
          // The transfer on the communication stream (after what this op waited for), the
          // reduction back here.
          EPMOE_CUDA_CHECK(cudaEventRecord(b.xfer_fork, s));
          EPMOE_CUDA_CHECK(cudaStreamWaitEvent(comm(), b.xfer_fork, 0));
          b.ep->combine_transfer(comm());
          EPMOE_CUDA_CHECK(cudaEventRecord(b.xfer_join, comm()));
          EPMOE_CUDA_CHECK(cudaStreamWaitEvent(s, b.xfer_join, 0));
        }
        b.ep->combine_recv(b.y.as<float>(), cfg.fuse_shared ? b.shared_out.as<float>() : nullptr,
                           s);
        break;
      case LayerOp::kSharedExperts:
        shared_experts(b, s);
        break;
      case LayerOp::kOutput:
        output(b, m, s);
        break;
    }
    trace_end(te, s);
    EPMOE_CUDA_CHECK(cudaEventRecord(b.done[int(op)], s));
    b.ran[int(op)] = true;
    last_done = b.done[int(op)];
  }

  void run_user(const std::string& name, int m, const std::function<void(int)>& fn) {
    EPMOE_CHECK(in_forward, kInvalidArgument, "rank {}: user operation {} outside a forward", rank,
                name);
    NvtxRange range(name.c_str());
    cudaStream_t s = compute();
    if (!plan.concurrent && last_done) EPMOE_CUDA_CHECK(cudaStreamWaitEvent(s, last_done, 0));
    TraceEntry* te = trace_begin(name, m, OpLane::kCompute, s);
    if (fn) fn(m);
    trace_end(te, s);
    // The user's work is on the compute stream: later compute ops follow it in stream order.
    EPMOE_CUDA_CHECK(cudaEventRecord(user_done, s));
    last_done = user_done;
  }
  cudaEvent_t user_done = nullptr;

  // The data an operation reads, as events of this forward; a sequential plan also waits for
  // the previous operation, whatever its lane.
  void wait_dependencies(LayerOp op, MicroBatch& b, cudaStream_t s) {
    auto after = [&](LayerOp dep) {
      if (b.ran[int(dep)]) EPMOE_CUDA_CHECK(cudaStreamWaitEvent(s, b.done[int(dep)], 0));
    };
    EPMOE_CUDA_CHECK(cudaStreamWaitEvent(s, b.split_done, 0));
    switch (op) {
      case LayerOp::kGate:
        break;
      case LayerOp::kSelectExperts:
        after(LayerOp::kGate);
        break;
      case LayerOp::kDispatchSend:
        after(LayerOp::kSelectExperts);
        break;
      case LayerOp::kDispatchRecv:
        after(LayerOp::kDispatchSend);
        break;
      case LayerOp::kExperts:
        after(LayerOp::kDispatchRecv);
        break;
      case LayerOp::kCombineSend:
        // Signalled: from the moment the down GEMM's signals are zeroed, not after the experts.
        if (b.signalled)
          EPMOE_CUDA_CHECK(cudaStreamWaitEvent(s, b.signal_ready, 0));
        else
          after(LayerOp::kExperts);
        break;
      case LayerOp::kCombineRecv:
        after(LayerOp::kCombineSend);
        after(LayerOp::kSelectExperts);
        if (cfg.fuse_shared) {
          EPMOE_CHECK(b.ran[int(LayerOp::kSharedExperts)], kInvalidArgument,
                      "rank {}: with fused shared experts, shared_experts must run before "
                      "combine_recv (it adds their rows)",
                      rank);
          after(LayerOp::kSharedExperts);
        }
        break;
      case LayerOp::kSharedExperts:
        break;
      case LayerOp::kOutput:
        after(LayerOp::kCombineRecv);
        after(LayerOp::kSharedExperts);
        break;
    }
    if (!plan.concurrent && last_done) EPMOE_CUDA_CHECK(cudaStreamWaitEvent(s, last_done, 0));
  }

  TraceEntry* trace_begin(const std::string& name, int m, OpLane l, cudaStream_t s) {
    if (!tracing) return nullptr;
    TraceEntry e2{name, m, l, nullptr, nullptr};
    EPMOE_CUDA_CHECK(cudaEventCreate(&e2.start));
    EPMOE_CUDA_CHECK(cudaEventCreate(&e2.end));
    EPMOE_CUDA_CHECK(cudaEventRecord(e2.start, s));
    trace.push_back(e2);
    return &trace.back();
  }
  void trace_end(TraceEntry* te, cudaStream_t s) {
    if (te) EPMOE_CUDA_CHECK(cudaEventRecord(trace.back().end, s));
  }

  // ---- GEMMs: the sm90 kernels or the portable ones, same contract ----
  void gemm_masked(const TensorView& out, const TensorView& in, const TensorView& w,
                   const TensorView& count, Sm90GemmWorkspace& ws, cudaStream_t s) {
    if (sm90)
      sm90_grouped_gemm_masked(out, in, w, count, 0, ws, s);
    else
      grouped_gemm_masked(out, in, w, count, 0, s);
  }
  void gemm_contiguous(const TensorView& out, const TensorView& in, const TensorView& w,
                       const TensorView& seg, int bank_offset, Sm90GemmWorkspace& ws,
                       cudaStream_t s) {
    if (sm90)
      sm90_grouped_gemm_contiguous(out, in, w, seg, bank_offset, ws, s);
    else
      grouped_gemm_contiguous(out, in, w, seg, bank_offset, s);
  }

  // ---- the compute operations ----
  void gate(MicroBatch& b, cudaStream_t s) {
    if (external_routing) return;  // the uploaded routing stands
    // logits [T_mb, E] f32 = Σ_c x[:, chunk c] · W[:, chunk c]ᵀ in chunk order (see gate_w).
    const int64_t T = ep.max_tokens_per_rank, E = cfg.n_routed_experts;
    chunk_kernel<<<grid_for(T * cfg.hidden / 8, 256), 256, 0, s>>>(
        reinterpret_cast<__nv_bfloat16*>(b.gate_x.view().data), b.gate_count.as<int32_t>(),
        reinterpret_cast<const __nv_bfloat16*>(b.x.view().data), b.ntok.as<int32_t>(), T,
        cfg.hidden, gate_kc);
    EPMOE_CUDA_CHECK_LAUNCH("chunk_kernel");
    gemm_masked(b.gate_partial.view(), b.gate_x.view(), gate_w.view(), b.gate_count.view(),
                b.ws_compute, s);
    sum_chunks_kernel<<<grid_for(T * E, 256), 256, 0, s>>>(
        b.logits.as<float>(), b.gate_partial.as<float>(), b.ntok.as<int32_t>(), T, E,
        int(gate_chunks));
    EPMOE_CUDA_CHECK_LAUNCH("sum_chunks_kernel");
  }
  void select(MicroBatch& b, cudaStream_t s) {
    if (external_routing) return;
    select_experts(b.ids.view(), b.wts.view(), b.logits.view(),
                   gate_bias.view().data ? gate_bias.view() : TensorView{}, cfg, s);
  }

  void experts(MicroBatch& b, cudaStream_t s) {
    if (ep.mode == EpMode::kLowLatency) {
      const TensorView cnt = b.ep->recv_count();
      const TensorView out = b.ep->ll_expert_out();
      b.signalled = signals_on(b);
      // The signals are zeroed just before the down GEMM; the signalled combine-send (another
      // stream) starts from this event and waits on them block by block.
      // The down GEMM leaves kSignalBlocks SMs to the combine-send blocks waiting on its
      // signals (they must be resident, or they could hold SMs the GEMM's tiles wait for).
      auto arm_signals = [&] {
        if (!b.signalled) return;
        EPMOE_CUDA_CHECK(cudaMemsetAsync(b.signal.view().data, 0, b.signal.nbytes(), s));
        EPMOE_CUDA_CHECK(cudaEventRecord(b.signal_ready, s));
        b.ws_compute.set_max_sms(std::max(1, sm_count - kSignalBlocks));
      };
      auto disarm = [&] {  // the next GEMMs of this micro-batch take the GPU again
        if (b.signalled) b.ws_compute.set_max_sms(std::max(1, sm_count - gemm_reserve()));
      };
      if (fp8) {
        TensorView xq = b.ep->recv_x_fp8(), xs = b.ep->recv_x_scale();
        if (!xq.data) {  // bf16 dispatch: the same per-128 codes an FP8 dispatch would carry
          quantize_rows_fp8_masked(b.xq.view(), b.xqs.view(), b.ep->recv_x(), cnt, s);
          xq = b.xq.view();
          xs = b.xqs.view();
        }
        sm90_grouped_gemm_fp8_masked(b.gu.view(), xq, xs, w13.view(), w13s.view(), cnt, 0,
                                     b.ws_compute, s);
        silu_and_mul_fp8_masked(b.act8.view(), b.act8s.view(), b.gu.view(), cnt, s);
        arm_signals();
        if (b.signalled)
          sm90_grouped_gemm_fp8_masked_signal(out, b.signal.view(), b.act8.view(), b.act8s.view(),
                                              w2.view(), w2s.view(), cnt, 0, b.ws_compute, s);
        else
          sm90_grouped_gemm_fp8_masked(out, b.act8.view(), b.act8s.view(), w2.view(), w2s.view(),
                                       cnt, 0, b.ws_compute, s);
        disarm();
        return;
      }
      gemm_masked(b.gu.view(), b.ep->recv_x(), w13.view(), cnt, b.ws_compute, s);
      silu_and_mul_masked(b.act.view(), b.gu.view(), cnt, s);
      arm_signals();
      if (b.signalled)
        sm90_grouped_gemm_masked_signal(out, b.signal.view(), b.act.view(), w2.view(), cnt, 0,
                                        b.ws_compute, s);
      else
        gemm_masked(out, b.act.view(), w2.view(), cnt, b.ws_compute, s);
      disarm();
      return;
    }
    const int64_t H = cfg.hidden, Kp = cfg.num_slots();
    const int64_t n = b.ep->normal_num_recv(), rows = std::max<int64_t>(1, n * Kp);
    ensure_rows(b.n_s2d, DType::kI32, {std::max<int64_t>(1, n), Kp});
    ensure_rows(b.n_gu, DType::kBF16, {rows, 2 * inter});
    ensure_rows(b.n_down, DType::kBF16, {rows, H});
    const size_t ws = preprocess_workspace_bytes(n * Kp, int(E_loc));
    ensure_rows(b.workspace, DType::kI32, {int64_t(ws / 4 + 1)});
    const TensorView ids_v = b.ep->normal_recv_ids(), w_v = b.ep->normal_recv_weights();
    const TensorView s2d_v{b.n_s2d.view().data, {n, Kp}, DType::kI32, Device::kCuda};
    const TensorView x_v = b.ep->normal_recv_x();
    preprocess(b.n_seg.view(), s2d_v, ids_v, 0, int(E_loc), b.workspace.view().data, s);
    if (fp8) {
      ensure_rows(b.n_sorted8, DType::kF8E4M3, {rows, H});
      ensure_rows(b.n_sorted8s, DType::kF32, {rows, H / 128});
      ensure_rows(b.n_act8, DType::kF8E4M3, {rows, inter});
      ensure_rows(b.n_act8s, DType::kF32, {rows, inter / 128});
      if (n > 0) pre_reorder_fp8(b.n_sorted8.view(), b.n_sorted8s.view(), x_v, s2d_v, s);
      sm90_grouped_gemm_fp8_contiguous(b.n_gu.view(), b.n_sorted8.view(), b.n_sorted8s.view(),
                                       w13.view(), w13s.view(), b.n_seg.view(), 0, b.ws_compute, s);
      silu_and_mul_fp8(b.n_act8.view(), b.n_act8s.view(), b.n_gu.view(),
                       b.n_seg.as<int32_t>() + E_loc, s);
      sm90_grouped_gemm_fp8_contiguous(b.n_down.view(), b.n_act8.view(), b.n_act8s.view(),
                                       w2.view(), w2s.view(), b.n_seg.view(), 0, b.ws_compute, s);
    } else {
      ensure_rows(b.n_sorted, DType::kBF16, {rows, H});
      ensure_rows(b.n_act, DType::kBF16, {rows, inter});
      if (n > 0) pre_reorder(b.n_sorted.view(), x_v, s2d_v, s);
      gemm_contiguous(b.n_gu.view(), b.n_sorted.view(), w13.view(), b.n_seg.view(), 0, b.ws_compute,
                      s);
      silu_and_mul(b.n_act.view(), b.n_gu.view(), b.n_seg.as<int32_t>() + E_loc, s);
      gemm_contiguous(b.n_down.view(), b.n_act.view(), w2.view(), b.n_seg.view(), 0, b.ws_compute,
                      s);
    }
    if (n > 0)
      post_reorder(b.ep->normal_partials(), b.n_down.view(), s2d_v, ids_v, w_v,
                   cfg.n_routed_experts, int(rank * E_loc), s);
  }

  // One MLP (bank expert e of w13b/w2b; FP8: their block scales s13/s2) on the micro-batch's
  // live rows; f32 out [T_max, H]. FP8: the rows were quantised into shared_xq by
  // shared_experts.
  void mlp_rows(MicroBatch& b, const DeviceTensor& out_f32, const DeviceTensor& w13b,
                const DeviceTensor& s13, const DeviceTensor& w2b, const DeviceTensor& s2, int e,
                cudaStream_t s) {
    const int32_t* live = b.seg_shared.as<int32_t>() + 1;
    if (fp8) {
      sm90_grouped_gemm_fp8_contiguous(b.shared_gu.view(), b.shared_xq.view(), b.shared_xqs.view(),
                                       w13b.view(), s13.view(), b.seg_shared.view(), e, b.ws_shared,
                                       s);
      silu_and_mul_fp8(b.shared_act8.view(), b.shared_act8s.view(), b.shared_gu.view(), live, s);
      sm90_grouped_gemm_fp8_contiguous(out_f32.view(), b.shared_act8.view(), b.shared_act8s.view(),
                                       w2b.view(), s2.view(), b.seg_shared.view(), e, b.ws_shared,
                                       s);
      return;
    }
    gemm_contiguous(b.shared_gu.view(), b.x.view(), w13b.view(), b.seg_shared.view(), e,
                    b.ws_shared, s);
    silu_and_mul(b.shared_act.view(), b.shared_gu.view(), live, s);
    gemm_contiguous(out_f32.view(), b.shared_act.view(), w2b.view(), b.seg_shared.view(), e,
                    b.ws_shared, s);
  }

  void shared_experts(MicroBatch& b, cudaStream_t s) {
    if (cfg.n_shared_experts == 0) return;
    // Its own segment array: the gate's may be in use on another lane.
    ep::make_single_segment(b.seg_shared.as<int32_t>(), b.ntok.as<int32_t>(), s);
    if (fp8)  // once for every shared slice: the per-128 codes a dispatch would carry
      quantize_rows_fp8(b.shared_xq.view(), b.shared_xqs.view(), b.x.view(), b.ntok.as<int32_t>(),
                        s);
    if (cfg.fuse_shared) {
      for (int j = 0; j < cfg.n_shared_experts; ++j) {
        mlp_rows(b, b.shared_tmp, sw13, sw13s, sw2, sw2s, j, s);
        ep::scatter_shared(b.shared_out.as<float>(), b.shared_tmp.as<float>(), j,
                           cfg.n_shared_experts, b.ntok.as<int32_t>(), ep.max_tokens_per_rank,
                           cfg.hidden, s);
      }
    } else {
      mlp_rows(b, b.shared_tmp, sw13, sw13s, sw2, sw2s, 0, s);
    }
  }

  void output(MicroBatch& b, int m, cudaStream_t s) {
    const bool unfused = cfg.n_shared_experts > 0 && !cfg.fuse_shared;
    const float scale = cfg.fuse_shared && cfg.scale_on_output ? cfg.routed_scaling_factor : 1.f;
    if (unfused || scale != 1.f)
      ep::add_rows(b.y.as<float>(), unfused ? b.shared_tmp.as<float>() : nullptr, scale,
                   b.ntok.as<int32_t>(), ep.max_tokens_per_rank, cfg.hidden, s);
    const int64_t T = ep.max_tokens_per_rank, H = cfg.hidden;
    merge_kernel<<<grid_for(T * H / 4, 256), 256, 0, s>>>(
        y.as<float>(), ids.as<int32_t>(), wts.as<float>(), b.y.as<float>(), b.ids.as<int32_t>(),
        b.wts.as<float>(), ntok.as<int32_t>(), T, H, cfg.num_slots(), plan.num_micro_batches, m,
        a_takes_odd());
    EPMOE_CUDA_CHECK_LAUNCH("merge_kernel");
  }

  void check() {
    for (int m = 0; m < 2; ++m) mbs[m].ep->check(comm());
    drain_bounded(compute(), "compute", rank);
    drain_bounded(lane[int(OpLane::kShared)], "shared-expert", rank);
  }
};

MoeLayerRankCuda::MoeLayerRankCuda(GpuTransport& transport, const MoeWeights& weights,
                                   const EpConfig& ep, const EpCudaOptions& options)
    : impl_(std::make_unique<Impl>(transport, weights, ep, options)) {}
MoeLayerRankCuda::~MoeLayerRankCuda() = default;

int MoeLayerRankCuda::rank() const { return impl_->rank; }
int MoeLayerRankCuda::num_ranks() const { return impl_->ep.num_ranks; }
const MoeConfig& MoeLayerRankCuda::config() const { return impl_->cfg; }
const EpConfig& MoeLayerRankCuda::ep() const { return impl_->ep; }
void MoeLayerRankCuda::begin_forward(const ForwardPlan& plan) { impl_->begin_forward(plan); }
void MoeLayerRankCuda::run(LayerOp op, int mb) { impl_->run(op, mb); }
void MoeLayerRankCuda::run_user(const std::string& name, int mb,
                                const std::function<void(int)>& fn) {
  impl_->run_user(name, mb, fn);
}
void MoeLayerRankCuda::end_forward() { impl_->end_forward(); }
void MoeLayerRankCuda::set_tracing(bool on) { impl_->tracing = on; }

std::vector<OpTiming> MoeLayerRankCuda::last_trace() {
  Impl& m = *impl_;
  std::vector<OpTiming> out;
  if (!m.trace_origin) return out;
  m.check();
  for (const auto& e : m.trace) {
    float a = 0, b = 0;
    EPMOE_CUDA_CHECK(cudaEventElapsedTime(&a, m.trace_origin, e.start));
    EPMOE_CUDA_CHECK(cudaEventElapsedTime(&b, m.trace_origin, e.end));
    out.push_back(OpTiming{e.name, e.mb, e.lane, double(a) * 1e3, double(b) * 1e3});
  }
  return out;
}

void MoeLayerRankCuda::upload(const TensorView& xh, const TensorView& idh, const TensorView& wh) {
  Impl& m = *impl_;
  const int64_t H = m.cfg.hidden;
  const int Kp = m.cfg.num_slots();
  EPMOE_CHECK(xh.shape.rank == 2 && xh.shape[1] == H && xh.dtype == DType::kBF16, kInvalidArgument,
              "rank {}: tokens must be [T, {}] bf16, got {} {}", m.rank, H, xh.shape.str(),
              dtype_name(xh.dtype));
  const int64_t T = xh.shape[0];
  EPMOE_CHECK(T <= m.ep.max_tokens_per_rank, kInvalidArgument,
              "rank {} brings {} tokens, more than max_tokens_per_rank = {}", m.rank, T,
              m.ep.max_tokens_per_rank);
  cudaStream_t s = m.compute();
  char* st = m.staging;
  const size_t xb = xh.nbytes(), ib = size_t(T) * size_t(Kp) * 4;
  if (T) {
    std::memcpy(st, xh.data, xb);
    EPMOE_CUDA_CHECK(cudaMemcpyAsync(m.x.view().data, st, xb, cudaMemcpyHostToDevice, s));
  }
  m.external_routing = idh.data != nullptr;
  if (m.external_routing) {
    idh.expect("topk_ids", DType::kI32, {T, Kp});
    wh.expect("topk_weights", DType::kF32, {T, Kp});
    const int32_t* id = idh.as<int32_t>();
    const int max_id = m.cfg.num_expert_ids();
    for (int64_t i = 0; i < T * Kp; ++i) {
      EPMOE_CHECK(id[i] >= -1 && id[i] < max_id, kInvalidArgument,
                  "rank {}: topk_ids[{}, {}] = {} is outside [-1, {})", m.rank, i / Kp, i % Kp,
                  id[i], max_id);
      // Low-latency receive buffers hold each token at most once per expert.
      for (int64_t j = i - i % Kp; m.ep.mode == EpMode::kLowLatency && id[i] >= 0 && j < i; ++j)
        EPMOE_CHECK(id[j] != id[i], kInvalidArgument,
                    "rank {}: token {} names expert {} twice (slots {} and {})", m.rank, i / Kp,
                    id[i], j % Kp, i % Kp);
    }
    if (T) {
      std::memcpy(st + xb, idh.data, ib);
      std::memcpy(st + xb + ib, wh.data, ib);
      EPMOE_CUDA_CHECK(cudaMemcpyAsync(m.ids.view().data, st + xb, ib, cudaMemcpyHostToDevice, s));
      EPMOE_CUDA_CHECK(
          cudaMemcpyAsync(m.wts.view().data, st + xb + ib, ib, cudaMemcpyHostToDevice, s));
    }
  }
  int32_t* tn = reinterpret_cast<int32_t*>(st + m.staging_bytes - 16);
  *tn = int32_t(T);
  EPMOE_CUDA_CHECK(cudaMemcpyAsync(m.ntok.view().data, tn, 4, cudaMemcpyHostToDevice, s));
  drain_bounded(s, "compute (upload of the tokens)", m.rank);
}

TensorView MoeLayerRankCuda::x() const { return impl_->x.view(); }
int32_t* MoeLayerRankCuda::num_tokens() const { return impl_->ntok.as<int32_t>(); }
TensorView MoeLayerRankCuda::y() const { return impl_->y.view(); }
TensorView MoeLayerRankCuda::topk_ids() const { return impl_->ids.view(); }
TensorView MoeLayerRankCuda::topk_weights() const { return impl_->wts.view(); }
cudaStream_t MoeLayerRankCuda::compute_stream() const { return impl_->compute(); }
void MoeLayerRankCuda::check() { impl_->check(); }
bool MoeLayerRankCuda::ll_over_host_api() const { return impl_->mbs[0].ep->ll_over_host_api(); }
EpMicroBatchCuda& MoeLayerRankCuda::ep_micro_batch(int mb) {
  EPMOE_CHECK(mb == 0 || mb == 1, kInvalidArgument, "micro-batch {} (0 or 1)", mb);
  return *impl_->mbs[mb].ep;
}

bool MoeLayerRankCuda::combine_was_signalled(int mb) const {
  EPMOE_CHECK(mb == 0 || mb == 1, kInvalidArgument, "micro-batch {} (0 or 1)", mb);
  return impl_->mbs[mb].signalled;
}
bool MoeLayerRankCuda::fp8_experts() const { return impl_->fp8; }

EpCudaTraffic MoeLayerRankCuda::last_traffic() {
  Impl& m = *impl_;
  m.check();
  EpCudaTraffic sum;
  for (int i = 0; i < m.plan.num_micro_batches; ++i) {
    const EpCudaTraffic t = m.mbs[i].ep->last_traffic(m.comm());
    sum.dispatch_tokens += t.dispatch_tokens;
    sum.dispatch_bytes += t.dispatch_bytes;
    sum.combine_bytes += t.combine_bytes;
  }
  return sum;
}

}  // namespace epmoe::cuda
