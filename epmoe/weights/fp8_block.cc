// FP8 block quantisation on the host (fp8_block.h).
#include "epmoe/weights/fp8_block.h"

#include <algorithm>
#include <cmath>

#include "epmoe/core/error.h"

namespace epmoe {

namespace {

int64_t blocks(int64_t n) { return (n + kFp8BlockSize - 1) / kFp8BlockSize; }

float load(const TensorView& t, int64_t i) {
  return t.dtype == DType::kF32 ? static_cast<const float*>(t.data)[i]
                                : bf16_to_f32(static_cast<const bf16*>(t.data)[i]);
}

void check_source(const char* fn, const TensorView& t, int min_rank) {
  EPMOE_CHECK(t.device == Device::kCpu, kInvalidArgument, "{}: expects a host tensor", fn);
  EPMOE_CHECK(t.dtype == DType::kBF16 || t.dtype == DType::kF32, kInvalidArgument,
              "{}: expects bf16 or f32, got {}", fn, dtype_name(t.dtype));
  EPMOE_CHECK(t.shape.rank >= min_rank, kInvalidArgument, "{}: expects rank >= {}, got {}", fn,
              min_rank, t.shape.str());
}

// Quantises the (rows x cols) sub-matrix at `off` (row stride ld) with one scale.
float quantize_block(const TensorView& src, int64_t off, int64_t ld, int64_t rows, int64_t cols,
                     fp8e4m3* q) {
  float amax = 0.f;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const float v = std::fabs(load(src, off + r * ld + c));
      // NOTES: std::max(amax, NaN) keeps amax, so NaN is tested for itself.
      if (!std::isfinite(v)) return -1.f;  // reported by the caller (outside its parallel loop)
      amax = std::max(amax, v);
    }
  const float scale = amax > 0.f ? amax / kFp8E4M3Max : 1.f;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      q[off + r * ld + c] = f32_to_fp8e4m3(load(src, off + r * ld + c) / scale);
  return scale;
}

}  // namespace

Fp8Tensor quantize_fp8_block128(const TensorView& w) {
  check_source("quantize_fp8_block128", w, 2);
  EPMOE_CHECK(w.shape.rank <= 3, kInvalidArgument,
              "quantize_fp8_block128: expects [N, K] or [E, N, K], got {}", w.shape.str());
  const bool batched = w.shape.rank == 3;
  const int64_t E = batched ? w.shape[0] : 1, N = w.shape[w.shape.rank - 2],
                K = w.shape[w.shape.rank - 1], nb = blocks(N), kb = blocks(K);
  Fp8Tensor out{Tensor(DType::kF8E4M3, w.shape),
                Tensor(DType::kF32, batched ? Shape({E, nb, kb}) : Shape({nb, kb}))};
  auto* q = out.q.as<fp8e4m3>();
  auto* s = out.scale.as<float>();
  // Blocks are independent: a bank of DeepSeek-V3 experts (billions of values, quantised at
  // load for FP8 runs) is spread over the cores; small matrices stay on one thread.
  const bool big = E * N * K > (int64_t(1) << 24);
#pragma omp parallel for collapse(2) schedule(static) if (big)
  for (int64_t e = 0; e < E; ++e)
    for (int64_t i = 0; i < nb; ++i)
      for (int64_t j = 0; j < kb; ++j) {
        const int64_t r0 = i * kFp8BlockSize, c0 = j * kFp8BlockSize;
        s[(e * nb + i) * kb + j] =
            quantize_block(w, (e * N + r0) * K + c0, K, std::min(kFp8BlockSize, N - r0),
                           std::min(kFp8BlockSize, K - c0), q);
      }
  for (int64_t i = 0; i < out.scale.numel(); ++i)
    EPMOE_CHECK(s[i] >= 0.f, kNumeric, "quantize_fp8: a block holds NaN or Inf");
  return out;
}

Tensor dequantize_fp8_block128(const TensorView& q, const TensorView& scale) {
  EPMOE_CHECK(q.dtype == DType::kF8E4M3 && (q.shape.rank == 2 || q.shape.rank == 3),
              kInvalidArgument, "dequantize_fp8_block128: q must be [.., N, K] f8e4m3, got {} {}",
              q.shape.str(), dtype_name(q.dtype));
  const bool batched = q.shape.rank == 3;
  const int64_t E = batched ? q.shape[0] : 1, N = q.shape[q.shape.rank - 2],
                K = q.shape[q.shape.rank - 1], nb = blocks(N), kb = blocks(K);
  const Shape want = batched ? Shape({E, nb, kb}) : Shape({nb, kb});
  EPMOE_CHECK(scale.dtype == DType::kF32 && scale.shape == want, kInvalidArgument,
              "dequantize_fp8_block128: scale must be {} f32 for q {}, got {} {}", want.str(),
              q.shape.str(), scale.shape.str(), dtype_name(scale.dtype));
  Tensor out(DType::kF32, q.shape);
  const auto* qp = static_cast<const fp8e4m3*>(q.data);
  const auto* sp = static_cast<const float*>(scale.data);
  float* o = out.as<float>();
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = 0; r < N; ++r)
      for (int64_t c = 0; c < K; ++c) {
        const int64_t i = (e * N + r) * K + c;
        o[i] = fp8e4m3_to_f32(qp[i]) * sp[(e * nb + r / kFp8BlockSize) * kb + c / kFp8BlockSize];
      }
  return out;
}

Fp8Tensor quantize_fp8_rows128(const TensorView& x) {
  check_source("quantize_fp8_rows128", x, 1);
  const int64_t K = x.shape[x.shape.rank - 1], rows = K > 0 ? x.numel() / K : 0, kb = blocks(K);
  Shape sshape = x.shape;
  sshape.dims[x.shape.rank - 1] = kb;
  Fp8Tensor out{Tensor(DType::kF8E4M3, x.shape), Tensor(DType::kF32, sshape)};
  auto* q = out.q.as<fp8e4m3>();
  auto* s = out.scale.as<float>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < kb; ++j) {
      const int64_t c0 = j * kFp8BlockSize;
      s[r * kb + j] = quantize_block(x, r * K + c0, K, 1, std::min(kFp8BlockSize, K - c0), q);
    }
  return out;
}

Tensor dequantize_fp8_rows128(const TensorView& q, const TensorView& scale) {
  EPMOE_CHECK(q.dtype == DType::kF8E4M3 && q.shape.rank >= 1, kInvalidArgument,
              "dequantize_fp8_rows128: q must be [..., K] f8e4m3, got {} {}", q.shape.str(),
              dtype_name(q.dtype));
  const int64_t K = q.shape[q.shape.rank - 1], rows = K > 0 ? q.numel() / K : 0, kb = blocks(K);
  Shape want = q.shape;
  want.dims[q.shape.rank - 1] = kb;
  EPMOE_CHECK(scale.dtype == DType::kF32 && scale.shape == want, kInvalidArgument,
              "dequantize_fp8_rows128: scale must be {} f32 for q {}, got {} {}", want.str(),
              q.shape.str(), scale.shape.str(), dtype_name(scale.dtype));
  Tensor out(DType::kF32, q.shape);
  const auto* qp = static_cast<const fp8e4m3*>(q.data);
  const auto* sp = static_cast<const float*>(scale.data);
  float* o = out.as<float>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < K; ++c)
      o[r * K + c] = fp8e4m3_to_f32(qp[r * K + c]) * sp[r * kb + c / kFp8BlockSize];
  return out;
}

}  // namespace epmoe
