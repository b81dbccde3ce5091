// Host launchers of the sm90 grouped GEMM family (sm90_grouped_gemm.cuh): argument checks, the
// workspace, and the one runtime -> template switch (input dtype x output dtype). The CUTLASS
// kernels live in the explicit-instantiation units sm90_gemm_<in>_<out>.cu; without CUTLASS
// (EPMOE_WITH_CUTLASS undefined) every entry point reports kUnsupported. The bench-only FP8
// candidates (sm90_gemm_tune.h) go through the same checks; they exist with EPMOE_SM90_TUNING.
#include <algorithm>
#include <utility>

#include "epmoe/cuda/cuda_check.h"
#include "epmoe/cuda/nvtx.h"
#include "epmoe/experts/grouped_gemm_checks.h"
#include "epmoe/experts/sm90/sm90_gemm_params.h"
#include "epmoe/experts/sm90/sm90_gemm_tune.h"
#include "epmoe/experts/sm90/sm90_grouped_gemm.cuh"

namespace epmoe::cuda {

namespace {

constexpr int kScaleBlock = 128;

#if EPMOE_WITH_CUTLASS
constexpr bool kBuilt = true;
#else
constexpr bool kBuilt = false;
#endif

#if EPMOE_WITH_CUTLASS && EPMOE_SM90_TUNING
// The bench-only FP8 candidates, in sm90_fp8_contiguous_variant's numbering.
constexpr sm90::Kernel kTuneKernels[] = {sm90::Kernel::kFp8Bf16TunePingpong,
                                         sm90::Kernel::kFp8Bf16TuneCluster2x1,
                                         sm90::Kernel::kFp8Bf16TuneCluster1x2};
constexpr const char* kTuneNames[] = {"pingpong", "cluster2x1", "cluster1x2"};
constexpr int kTuneVariants = 3;
#else
constexpr const char* kTuneNames[] = {""};
constexpr int kTuneVariants = 0;
#endif

void require_sm90(const char* fn) {
  const NvtxRange nvtx("sm90.require_sm90");
  EPMOE_CHECK(kBuilt, kUnsupported,
              "{}: this build has no sm90 grouped GEMM (CUTLASS headers not found at configure "
              "time; run scripts/fetch-cutlass.sh or set -DEPMOE_CUTLASS_DIR)",
              fn);
  int dev = 0, major = 0, minor = 0;
  EPMOE_CUDA_CHECK(cudaGetDevice(&dev));
  EPMOE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  EPMOE_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  EPMOE_CHECK(major == 9 && minor == 0, kUnsupported,
              "{}: the sm90 grouped GEMM needs an sm_90 GPU (Hopper); device {} is sm_{}{}", fn,
              dev, major, minor);
}

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Checks shared by all entry points; fills everything in p but `masked` and `rows`.
// in's rank and the counts' shape are checked by the caller.
void check_operands(const char* fn, bool fp8, const TensorView& out, const TensorView& in,
                    const TensorView* in_scale, const TensorView& w, const TensorView* w_scale,
                    const TensorView& counts, const char* counts_name, int64_t e_loc,
                    int bank_offset, const Sm90GemmWorkspace& ws, sm90::Params* p) {
  const NvtxRange nvtx("sm90.check_operands");
  const DType in_dt = fp8 ? DType::kF8E4M3 : DType::kBF16;
  for (const TensorView* sc : {in_scale, w_scale})
    EPMOE_CHECK(sc == nullptr || sc->device == Device::kCuda, kInvalidArgument,
                "{}: {} must be a device tensor", fn, sc == in_scale ? "in_scale" : "w_scale");
  const GemmOperandDims dims = check_grouped_gemm_operands(
      fn, in_dt, fp8 ? kScaleBlock : 8, out, in, w, counts, counts_name, e_loc, bank_offset);
  const int64_t K = dims.k, n_out = dims.n_out;
  if (fp8) {
    Shape want_in = in.shape;
    want_in.dims[in.shape.rank - 1] = K / kScaleBlock;
    EPMOE_CHECK(in_scale->dtype == DType::kF32 && in_scale->shape == want_in, kInvalidArgument,
                "{}: in_scale must be {} f32 (one scale per row per 128 of K), got {} {}", fn,
                want_in.str(), in_scale->shape.str(), dtype_name(in_scale->dtype));
    const Shape want_w({w.shape[0], n_out / kScaleBlock, K / kScaleBlock});
    EPMOE_CHECK(w_scale->dtype == DType::kF32 && w_scale->shape == want_w, kInvalidArgument,
                "{}: w_scale must be {} f32 (one scale per 128 x 128 block), got {} {}", fn,
                want_w.str(), w_scale->shape.str(), dtype_name(w_scale->dtype));
    EPMOE_CHECK(aligned(in_scale->data, 16) && aligned(w_scale->data, 16), kInvalidArgument,
                "{}: in_scale and w_scale must be 16-byte aligned ({}, {})", fn, in_scale->data,
                w_scale->data);
  }
  EPMOE_CHECK(ws.data() != nullptr && e_loc <= ws.max_experts(), kInvalidArgument,
              "{}: the workspace holds {} experts, the call has E_loc = {}", fn, ws.max_experts(),
              e_loc);
  int dev = 0;
  EPMOE_CUDA_CHECK(cudaGetDevice(&dev));
  EPMOE_CHECK(ws.device() == dev, kInvalidArgument,
              "{}: the workspace lives on device {}, the current device is {}", fn, ws.device(),
              dev);
  p->out = out.data;
  p->in = in.data;
  p->w = w.data;
  p->in_scale = fp8 ? static_cast<const float*>(in_scale->data) : nullptr;
  p->w_scale = fp8 ? static_cast<const float*>(w_scale->data) : nullptr;
  p->counts = static_cast<const int32_t*>(counts.data);
  p->n_out = int(n_out);
  p->k = int(K);
  p->e_loc = int(e_loc);
  p->bank_offset = bank_offset;
}

// The one runtime -> template switch: input dtype x output dtype (x signals: bf16 output only,
// checked by the caller; x a bench-only FP8 candidate, variant >= 0: FP8 in, bf16 out, checked by
// the caller).
void launch(bool fp8, DType out_dtype, const sm90::Params& p, const Sm90GemmWorkspace& ws,
            cudaStream_t stream, int variant = -1) {
  const NvtxRange nvtx("sm90.launch");
#if EPMOE_WITH_CUTLASS
  using sm90::Kernel;
  const sm90::Scratch s{ws.data(), ws.bytes(), ws.max_sms()};
  const bool f32 = out_dtype == DType::kF32;
  if (variant >= 0) {
#if EPMOE_SM90_TUNING
    switch (kTuneKernels[variant]) {
      case Kernel::kFp8Bf16TunePingpong:
        sm90::run<Kernel::kFp8Bf16TunePingpong>(p, s, stream);
        break;
      case Kernel::kFp8Bf16TuneCluster2x1:
        sm90::run<Kernel::kFp8Bf16TuneCluster2x1>(p, s, stream);
        break;
      case Kernel::kFp8Bf16TuneCluster1x2:
        sm90::run<Kernel::kFp8Bf16TuneCluster1x2>(p, s, stream);
        break;
      default:
        EPMOE_CHECK(false, kInternal, "sm90 launch: FP8 candidate {}", variant);
    }
#endif
  } else if (p.signal != nullptr) {
    if (fp8)
      sm90::run<Kernel::kFp8Bf16Signal>(p, s, stream);
    else
      sm90::run<Kernel::kBf16Bf16Signal>(p, s, stream);
  } else if (fp8) {
    if (f32)
      sm90::run<Kernel::kFp8F32>(p, s, stream);
    else
      sm90::run<Kernel::kFp8Bf16>(p, s, stream);
  } else {
    if (f32)
      sm90::run<Kernel::kBf16F32>(p, s, stream);
    else
      sm90::run<Kernel::kBf16Bf16>(p, s, stream);
  }
#else
  (void)fp8, (void)out_dtype, (void)p, (void)ws, (void)stream, (void)variant;
#endif
}

void contiguous(const char* fn, bool fp8, const TensorView& out, const TensorView& in,
                const TensorView* in_scale, const TensorView& w, const TensorView* w_scale,
                const TensorView& seg_indptr, int bank_offset, Sm90GemmWorkspace& ws,
                cudaStream_t stream, int variant = -1) {
  const NvtxRange nvtx("sm90.contiguous");
  require_sm90(fn);
  EPMOE_CHECK(in.shape.rank == 2, kInvalidArgument, "{}: in must be [N, K], got {}", fn,
              in.shape.str());
  EPMOE_CHECK(
      seg_indptr.shape.rank == 1 && seg_indptr.shape[0] >= 1 && seg_indptr.dtype == DType::kI32,
      kInvalidArgument, "{}: seg_indptr must be [E_loc+1] i32, got {} {}", fn,
      seg_indptr.shape.str(), dtype_name(seg_indptr.dtype));
  const int64_t N = in.shape[0], e_loc = seg_indptr.shape[0] - 1;
  sm90::Params p{};
  check_operands(fn, fp8, out, in, in_scale, w, w_scale, seg_indptr, "seg_indptr", e_loc,
                 bank_offset, ws, &p);
  p.masked = false;
  p.rows = N;
  if (N == 0 || e_loc == 0) return;
  launch(fp8, out.dtype, p, ws, stream, variant);
}

void masked(const char* fn, bool fp8, const TensorView& out, const TensorView* signal,
            const TensorView& in, const TensorView* in_scale, const TensorView& w,
            const TensorView* w_scale, const TensorView& count, int bank_offset,
            Sm90GemmWorkspace& ws, cudaStream_t stream) {
  const NvtxRange nvtx("sm90.masked");
  require_sm90(fn);
  EPMOE_CHECK(in.shape.rank == 3, kInvalidArgument, "{}: in must be [E_loc, M_max, K], got {}", fn,
              in.shape.str());
  const int64_t e_loc = in.shape[0], m_max = in.shape[1];
  EPMOE_CHECK(count.shape == Shape({e_loc}) && count.dtype == DType::kI32, kInvalidArgument,
              "{}: count must be [{}] i32, got {} {}", fn, e_loc, count.shape.str(),
              dtype_name(count.dtype));
  EPMOE_CHECK(m_max <= INT32_MAX, kUnsupported, "{}: M_max = {} exceeds int32", fn, m_max);
  sm90::Params p{};
  check_operands(fn, fp8, out, in, in_scale, w, w_scale, count, "count", e_loc, bank_offset, ws,
                 &p);
  p.masked = true;
  p.rows = m_max;
  if (signal != nullptr) {
    const int64_t nb = (m_max + sm90::kBlockM - 1) / sm90::kBlockM;
    EPMOE_CHECK(signal->device == Device::kCuda && signal->dtype == DType::kI32 &&
                    signal->shape == Shape({e_loc * nb}) && aligned(signal->data, 4),
                kInvalidArgument,
                "{}: signal must be [E_loc · ceil(M_max / {})] = [{}] i32 on the device, got {} {}",
                fn, sm90::kBlockM, e_loc * nb, signal->shape.str(), dtype_name(signal->dtype));
    EPMOE_CHECK(out.dtype == DType::kBF16, kUnsupported,
                "{}: the signalling kernels write bf16 output, got {}", fn, dtype_name(out.dtype));
    p.signal = static_cast<int32_t*>(signal->data);
    p.signal_blocks = int(nb);
  }
  if (e_loc == 0 || m_max == 0) return;
  launch(fp8, out.dtype, p, ws, stream);
}

}  // namespace

bool sm90_gemm_available() noexcept {
  if (!kBuilt) return false;
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    cudaGetLastError();  // no device: leave no sticky error behind
    return false;
  }
  return major == 9 && minor == 0;
}

int sm90_gemm_block_m(DType in_dtype) {
  EPMOE_CHECK(in_dtype == DType::kBF16 || in_dtype == DType::kF8E4M3, kInvalidArgument,
              "sm90_gemm_block_m: no sm90 GEMM takes {} inputs", dtype_name(in_dtype));
  return sm90::kBlockM;
}

Sm90SignalInfo sm90_gemm_signal_info(DType in_dtype, int64_t n_out) {
  EPMOE_CHECK(in_dtype == DType::kBF16 || in_dtype == DType::kF8E4M3, kInvalidArgument,
              "sm90_gemm_signal_info: no sm90 GEMM takes {} inputs", dtype_name(in_dtype));
  EPMOE_CHECK(n_out > 0, kInvalidArgument, "sm90_gemm_signal_info: Nout = {}", n_out);
  const int64_t block_n = in_dtype == DType::kBF16 ? sm90::kBf16BlockN : sm90::kFp8BlockN;
  return Sm90SignalInfo{sm90::kBlockM, int((n_out + block_n - 1) / block_n)};
}

Sm90GemmWorkspace::Sm90GemmWorkspace(int max_experts) {
  require_sm90("Sm90GemmWorkspace");
  EPMOE_CHECK(max_experts >= 1, kInvalidArgument,
              "Sm90GemmWorkspace: max_experts must be >= 1, got {}", max_experts);
  EPMOE_CUDA_CHECK(cudaGetDevice(&device_));
  EPMOE_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, device_));
  size_t bytes = 0;
#if EPMOE_WITH_CUTLASS
  using sm90::Kernel;
  bytes = std::max({sm90::workspace_bytes<Kernel::kBf16Bf16>(max_experts, sm_count_),
                    sm90::workspace_bytes<Kernel::kBf16F32>(max_experts, sm_count_),
                    sm90::workspace_bytes<Kernel::kFp8Bf16>(max_experts, sm_count_),
                    sm90::workspace_bytes<Kernel::kFp8F32>(max_experts, sm_count_),
                    sm90::workspace_bytes<Kernel::kBf16Bf16Signal>(max_experts, sm_count_),
                    sm90::workspace_bytes<Kernel::kFp8Bf16Signal>(max_experts, sm_count_)});
#if EPMOE_SM90_TUNING
  bytes =
      std::max({bytes, sm90::workspace_bytes<Kernel::kFp8Bf16TunePingpong>(max_experts, sm_count_),
                sm90::workspace_bytes<Kernel::kFp8Bf16TuneCluster2x1>(max_experts, sm_count_),
                sm90::workspace_bytes<Kernel::kFp8Bf16TuneCluster1x2>(max_experts, sm_count_)});
#endif
#endif
  EPMOE_CUDA_CHECK(cudaMalloc(&data_, bytes));
  EPMOE_CUDA_CHECK(cudaMemset(data_, 0, bytes));
  bytes_ = bytes;
  max_experts_ = max_experts;
  max_sms_ = sm_count_;
}

void Sm90GemmWorkspace::set_max_sms(int n) {
  EPMOE_CHECK(n >= 1 && n <= sm_count_, kInvalidArgument,
              "Sm90GemmWorkspace::set_max_sms: {} is outside [1, {}] (the device's SMs)", n,
              sm_count_);
  max_sms_ = n;
}

Sm90GemmWorkspace::~Sm90GemmWorkspace() {
  if (data_) cudaFree(data_);
}

Sm90GemmWorkspace::Sm90GemmWorkspace(Sm90GemmWorkspace&& o) noexcept { *this = std::move(o); }

Sm90GemmWorkspace& Sm90GemmWorkspace::operator=(Sm90GemmWorkspace&& o) noexcept {
  if (this != &o) {
    if (data_) cudaFree(data_);
    data_ = std::exchange(o.data_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
    max_experts_ = std::exchange(o.max_experts_, 0);
    device_ = std::exchange(o.device_, -1);
    sm_count_ = std::exchange(o.sm_count_, 0);
    max_sms_ = std::exchange(o.max_sms_, 0);
  }
  return *this;
}

void sm90_grouped_gemm_contiguous(const TensorView& out, const TensorView& in, const TensorView& w,
                                  const TensorView& seg_indptr, int bank_offset,
                                  Sm90GemmWorkspace& ws, cudaStream_t stream) {
  const NvtxRange nvtx("sm90.sm90_grouped_gemm_contiguous");
  contiguous("sm90_grouped_gemm_contiguous", false, out, in, nullptr, w, nullptr, seg_indptr,
             bank_offset, ws, stream);
}

void sm90_grouped_gemm_masked(const TensorView& out, const TensorView& in, const TensorView& w,
                              const TensorView& count, int bank_offset, Sm90GemmWorkspace& ws,
                              cudaStream_t stream) {
  const NvtxRange nvtx("sm90.sm90_grouped_gemm_masked");
  masked("sm90_grouped_gemm_masked", false, out, nullptr, in, nullptr, w, nullptr, count,
         bank_offset, ws, stream);
}

void sm90_grouped_gemm_masked_signal(const TensorView& out, const TensorView& signal,
                                     const TensorView& in, const TensorView& w,
                                     const TensorView& count, int bank_offset,
                                     Sm90GemmWorkspace& ws, cudaStream_t stream) {
  const NvtxRange nvtx("sm90.sm90_grouped_gemm_masked_signal");
  masked("sm90_grouped_gemm_masked_signal", false, out, &signal, in, nullptr, w, nullptr, count,
         bank_offset, ws, stream);
}

void sm90_grouped_gemm_fp8_masked_signal(const TensorView& out, const TensorView& signal,
                                         const TensorView& in, const TensorView& in_scale,
                                         const TensorView& w, const TensorView& w_scale,
                                         const TensorView& count, int bank_offset,
                                         Sm90GemmWorkspace& ws, cudaStream_t stream) {
  const NvtxRange nvtx("sm90.sm90_grouped_gemm_fp8_masked_signal");
  masked("sm90_grouped_gemm_fp8_masked_signal", true, out, &signal, in, &in_scale, w, &w_scale,
         count, bank_offset, ws, stream);
}

void sm90_grouped_gemm_fp8_contiguous(const TensorView& out, const TensorView& in,
                                      const TensorView& in_scale, const TensorView& w,
                                      const TensorView& w_scale, const TensorView& seg_indptr,
                                      int bank_offset, Sm90GemmWorkspace& ws, cudaStream_t stream) {
  const NvtxRange nvtx("sm90.sm90_grouped_gemm_fp8_contiguous");
  contiguous("sm90_grouped_gemm_fp8_contiguous", true, out, in, &in_scale, w, &w_scale, seg_indptr,
             bank_offset, ws, stream);
}

void sm90_grouped_gemm_fp8_masked(const TensorView& out, const TensorView& in,
                                  const TensorView& in_scale, const TensorView& w,
                                  const TensorView& w_scale, const TensorView& count,
                                  int bank_offset, Sm90GemmWorkspace& ws, cudaStream_t stream) {
  const NvtxRange nvtx("sm90.sm90_grouped_gemm_fp8_masked");
  masked("sm90_grouped_gemm_fp8_masked", true, out, nullptr, in, &in_scale, w, &w_scale, count,
         bank_offset, ws, stream);
}

}  // namespace epmoe::cuda

namespace epmoe::cuda {

int sm90_fp8_tune_variants() noexcept { return kTuneVariants; }

const char* sm90_fp8_tune_name(int variant) {
  EPMOE_CHECK(variant >= 0 && variant < kTuneVariants, kInvalidArgument,
              "sm90_fp8_tune_name: variant {} outside [0, {})", variant, kTuneVariants);
  return kTuneNames[variant];
}

void sm90_fp8_contiguous_variant(int variant, const TensorView& out, const TensorView& in,
                                 const TensorView& in_scale, const TensorView& w,
                                 const TensorView& w_scale, const TensorView& seg_indptr,
                                 int bank_offset, Sm90GemmWorkspace& ws, cudaStream_t stream) {
  const NvtxRange nvtx("sm90.sm90_fp8_contiguous_variant");
  EPMOE_CHECK(variant >= 0 && variant < kTuneVariants, kUnsupported,
              "sm90_fp8_contiguous_variant: variant {} not in this build ({} candidates; "
              "configure with -DEPMOE_SM90_TUNING=ON)",
              variant, kTuneVariants);
  EPMOE_CHECK(out.dtype == DType::kBF16, kUnsupported,
              "sm90_fp8_contiguous_variant: the candidates write bf16 output, got {}",
              dtype_name(out.dtype));
  contiguous("sm90_fp8_contiguous_variant", true, out, in, &in_scale, w, &w_scale, seg_indptr,
             bank_offset, ws, stream, variant);
}

}  // namespace epmoe::cuda
