#include "epmoe/layer/moe_layer_cuda.h"

#include <algorithm>
#include <array>
#include <vector>

#include <cuda_bf16.h>

#include "epmoe/cuda/cuda_check.h"
#include "epmoe/cuda/device.h"
#include "epmoe/experts/experts.cuh"
#include "epmoe/permute/permute.cuh"
#include "epmoe/routing/gate.cuh"

namespace epmoe::cuda {

namespace {

__global__ void bf16_to_f32_kernel(float* out, const __nv_bfloat16* in, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __bfloat162float(in[i]);
}

__global__ void scale_kernel(float* y, float s, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    y[i] *= s;
}

unsigned grid_for(int64_t n) {
  return unsigned(std::max<int64_t>(1, std::min<int64_t>((n + 255) / 256, 4096)));
}

// A growable device buffer handing out views of any shape that fits.
struct Buffer {
  DeviceTensor mem;
  size_t bytes = 0;
  TensorView view(DType dt, const Shape& s) {
    const size_t need = size_t(s.numel()) * dtype_size(dt);
    if (need > bytes || mem.numel() == 0) {
      mem = DeviceTensor(DType::kI32, {int64_t((std::max<size_t>(need, 16) + 3) / 4)});
      bytes = size_t(mem.numel()) * 4;
    }
    return TensorView{mem.view().data, s, dt, Device::kCuda};
  }
};

DeviceTensor upload_bf16(const Tensor& t) {
  if (t.dtype() == DType::kBF16) return DeviceTensor::from_host(t.view());
  return DeviceTensor::from_host(to_dtype(t.view(), DType::kBF16).view());
}

double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

struct CudaMoeLayer::Impl {
  MoeConfig cfg;
  int device = 0;
  cudaStream_t stream = nullptr;
  std::unique_ptr<GroupedGemmRunner> gemm;
  DeviceTensor gate, bias, w13, w2, shared_w13, shared_w2;
  bool has_bias = false, shared_unfused = false;
  Buffer x, x32, logits, ids, weights, seg, s2d, pre_ws, sorted, gu, act, down, y, sgu, sact;
  static constexpr int kEvents = 6;
  std::array<cudaEvent_t, kEvents> ev{};

  // Enqueues one forward over the T tokens already in `x`; records ev[] when `timed`.
  void run(int64_t T, bool timed) {
    const int64_t H = cfg.hidden, I = cfg.moe_intermediate;
    const int E = cfg.n_routed_experts, Kp = cfg.num_slots();
    const int bank = cfg.n_routed_experts + cfg.fused_shared();
    auto mark = [&](int i) {
      if (timed) EPMOE_CUDA_CHECK(cudaEventRecord(ev[i], stream));
    };
    mark(0);
    TensorView xv = x.view(DType::kBF16, {T, H});
    TensorView lg = logits.view(DType::kF32, {T, E});
    if (gate.dtype() == DType::kF32) {
      TensorView xf = x32.view(DType::kF32, {T, H});
      if (T > 0) {
        bf16_to_f32_kernel<<<grid_for(T * H), 256, 0, stream>>>(
            xf.as<float>(), static_cast<const __nv_bfloat16*>(xv.data), T * H);
        EPMOE_CUDA_CHECK_LAUNCH("bf16_to_f32_kernel");
      }
      gate_gemm(lg, xf, gate.view(), gemm->handle(), stream);
    } else {
      gate_gemm(lg, xv, gate.view(), gemm->handle(), stream);
    }
    TensorView idv = ids.view(DType::kI32, {T, Kp}), wv = weights.view(DType::kF32, {T, Kp});
    select_experts(idv, wv, lg, has_bias ? bias.view() : TensorView{}, cfg, stream);
    mark(1);

    const int64_t n_max = T * Kp;  // fixed max-size buffers: no read-back before dispatch
    TensorView segv = seg.view(DType::kI32, {bank + 1}), s2dv = s2d.view(DType::kI32, {T, Kp});
    TensorView ws = pre_ws.view(DType::kI32, {int64_t(preprocess_workspace_bytes(n_max, bank) / 4) + 1});
    preprocess(segv, s2dv, idv, 0, bank, ws.data, stream);
    TensorView sortedv = sorted.view(DType::kBF16, {n_max, H});
    pre_reorder(sortedv, xv, s2dv, stream);
    mark(2);

    const int32_t* seg_host = gemm->fetch_counts(segv.as<int32_t>(), bank + 1, stream);
    const int64_t n = seg_host[bank];
    TensorView guv = gu.view(DType::kBF16, {n, 2 * I}), actv = act.view(DType::kBF16, {n, I});
    TensorView downv = down.view(DType::kBF16, {n, H});
    TensorView sorted_n{sortedv.data, {n, H}, DType::kBF16, Device::kCuda};
    gemm->contiguous(guv, sorted_n, w13.view(), seg_host, bank, 0, stream);
    silu_and_mul(actv, guv, nullptr, stream);
    gemm->contiguous(downv, actv, w2.view(), seg_host, bank, 0, stream);
    mark(3);

    TensorView yv = y.view(DType::kF32, {T, H});
    post_reorder(yv, downv, s2dv, idv, wv, E, 0, stream);
    mark(4);

    if (shared_unfused && T > 0) {
      const int64_t si = shared_w2.shape()[1];
      TensorView sguv = sgu.view(DType::kBF16, {T, 2 * si}), sactv = sact.view(DType::kBF16, {T, si});
      dense_gemm(sguv, xv, shared_w13.view(), 0.f, gemm->handle(), stream);
      silu_and_mul(sactv, sguv, nullptr, stream);
      dense_gemm(yv, sactv, shared_w2.view(), 1.f, gemm->handle(), stream);
    }
    if (cfg.fuse_shared && cfg.scale_on_output && T > 0) {
      scale_kernel<<<grid_for(T * H), 256, 0, stream>>>(yv.as<float>(), cfg.routed_scaling_factor,
                                                        T * H);
      EPMOE_CUDA_CHECK_LAUNCH("scale_kernel");
    }
    mark(5);
  }

  int64_t upload_x(const TensorView& x_host) {
    EPMOE_CHECK(x_host.shape.rank == 2 && x_host.shape[1] == cfg.hidden, kInvalidArgument,
                "input x must be [T, {}], got {}", cfg.hidden, x_host.shape.str());
    EPMOE_CHECK(x_host.dtype == DType::kBF16 || x_host.dtype == DType::kF32, kInvalidArgument,
                "input x must be bf16 or f32, got {}", dtype_name(x_host.dtype));
    const int64_t T = x_host.shape[0];
    Tensor tmp;
    const TensorView src = x_host.dtype == DType::kBF16
                               ? x_host
                               : (tmp = to_dtype(x_host, DType::kBF16)).view();
    TensorView xv = x.view(DType::kBF16, {T, cfg.hidden});
    if (src.nbytes())
      EPMOE_CUDA_CHECK(cudaMemcpyAsync(xv.data, src.data, src.nbytes(), cudaMemcpyHostToDevice,
                                       stream));
    return T;
  }
};

CudaMoeLayer::CudaMoeLayer(const MoeWeights& w, int device) : impl_(std::make_unique<Impl>()) {
  require_device();
  EPMOE_CHECK(device >= 0 && device < device_count(), kInvalidArgument,
              "CUDA device {} does not exist ({} present)", device, device_count());
  EPMOE_CUDA_CHECK(cudaSetDevice(device));
  Impl& m = *impl_;
  m.cfg = w.config;
  m.cfg.validate();
  m.device = device;
  const MoeConfig& c = m.cfg;
  const int64_t E = c.n_routed_experts, H = c.hidden, I = c.moe_intermediate;
  const int64_t bank = w.bank_size();
  w.gate.view().expect("gate", w.gate.dtype(), {E, H});
  EPMOE_CHECK(w.gate.dtype() == DType::kBF16 || w.gate.dtype() == DType::kF32, kInvalidArgument,
              "router weight must be bf16 or f32, got {}", dtype_name(w.gate.dtype()));
  w.w13.view().expect("w13", w.w13.dtype(), {bank, 2 * I, H});
  w.w2.view().expect("w2", w.w2.dtype(), {bank, H, I});
  EPMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&m.stream, cudaStreamNonBlocking));
  for (auto& e : m.ev) EPMOE_CUDA_CHECK(cudaEventCreate(&e));
  m.gemm = std::make_unique<GroupedGemmRunner>();
  m.gate = DeviceTensor::from_host(w.gate.view());
  // NOTES: a default-constructed Tensor has rank 0 and numel() 1: not a bias.
  m.has_bias = w.gate_bias.shape().rank == 1 && w.gate_bias.numel() > 0;
  if (m.has_bias) m.bias = DeviceTensor::from_host(w.gate_bias.view());
  m.w13 = upload_bf16(w.w13);
  m.w2 = upload_bf16(w.w2);
  m.shared_unfused = c.n_shared_experts > 0 && !c.fuse_shared;
  if (m.shared_unfused) {
    const int64_t si = c.n_shared_experts * I;
    w.shared_w13.view().expect("shared_w13", w.shared_w13.dtype(), {2 * si, H});
    w.shared_w2.view().expect("shared_w2", w.shared_w2.dtype(), {H, si});
    m.shared_w13 = upload_bf16(w.shared_w13);
    m.shared_w2 = upload_bf16(w.shared_w2);
  }
}

CudaMoeLayer::~CudaMoeLayer() {
  if (!impl_) return;
  if (impl_->stream) cudaStreamSynchronize(impl_->stream);
  for (auto& e : impl_->ev)
    if (e) cudaEventDestroy(e);
  if (impl_->stream) cudaStreamDestroy(impl_->stream);
}

LayerResult CudaMoeLayer::forward(const TensorView& x_host) {
  Impl& m = *impl_;
  EPMOE_CUDA_CHECK(cudaSetDevice(m.device));
  const int64_t T = m.upload_x(x_host);
  m.run(T, false);
  const int64_t H = m.cfg.hidden;
  const int Kp = m.cfg.num_slots();
  LayerResult r{Tensor(DType::kF32, {T, H}), Tensor(DType::kI32, {T, Kp}),
                Tensor(DType::kF32, {T, Kp})};
  auto get = [&](Tensor& dst, Buffer& src) {
    if (dst.nbytes())
      EPMOE_CUDA_CHECK(cudaMemcpyAsync(dst.view().data, src.mem.view().data, dst.nbytes(),
                                       cudaMemcpyDeviceToHost, m.stream));
  };
  get(r.y, m.y);
  get(r.topk_ids, m.ids);
  get(r.topk_weights, m.weights);
  EPMOE_CUDA_CHECK(cudaStreamSynchronize(m.stream));
  return r;
}

CudaStageTimes CudaMoeLayer::time_forward(const TensorView& x_host, int iters) {
  EPMOE_CHECK(iters >= 1, kInvalidArgument, "time_forward needs iters >= 1, got {}", iters);
  Impl& m = *impl_;
  EPMOE_CUDA_CHECK(cudaSetDevice(m.device));
  const int64_t T = m.upload_x(x_host);
  for (int i = 0; i < 3; ++i) m.run(T, false);  // warm-up: buffers, cuBLAS heuristics
  std::array<std::vector<double>, 6> d;
  for (int it = 0; it < iters; ++it) {
    m.run(T, true);
    EPMOE_CUDA_CHECK(cudaEventSynchronize(m.ev[5]));
    float ms = 0.f;
    for (int s = 0; s < 5; ++s) {
      EPMOE_CUDA_CHECK(cudaEventElapsedTime(&ms, m.ev[s], m.ev[s + 1]));
      d[s].push_back(ms * 1e3);
    }
    EPMOE_CUDA_CHECK(cudaEventElapsedTime(&ms, m.ev[0], m.ev[5]));
    d[5].push_back(ms * 1e3);
  }
  return CudaStageTimes{median(d[0]), median(d[1]), median(d[2]),
                        median(d[3]), median(d[4]), median(d[5])};
}

}  // namespace epmoe::cuda
