#include "epmoe/experts/linear_cpu.h"

#include <algorithm>
#include <vector>

namespace epmoe {

namespace {
constexpr int kLanes = 16;
constexpr int kRowBlock = 4;

inline float load_f32(const float* p) { return *p; }
inline float load_f32(const bf16* p) { return bf16_to_f32(*p); }

// Rows [0, rows) of the block, rows <= kRowBlock; the code for every row is the same loop body.
template <typename WT>
void linear_block(float* out, int64_t ldo, const float* in, int64_t ldi, int rows, const WT* w,
                  int64_t n_out, int64_t k_in) {
  const int64_t k_full = k_in / kLanes * kLanes;
  for (int64_t n = 0; n < n_out; ++n) {
    const WT* wn = w + n * k_in;
    float acc[kRowBlock][kLanes] = {};
    for (int64_t k0 = 0; k0 < k_full; k0 += kLanes) {
      float wv[kLanes];
      for (int j = 0; j < kLanes; ++j) wv[j] = load_f32(wn + k0 + j);
      for (int r = 0; r < rows; ++r) {
        const float* x = in + r * ldi + k0;
        for (int j = 0; j < kLanes; ++j) acc[r][j] += x[j] * wv[j];
      }
    }
    for (int64_t k = k_full; k < k_in; ++k) {
      const float wk = load_f32(wn + k);
      for (int r = 0; r < rows; ++r) acc[r][k - k_full] += in[r * ldi + k] * wk;
    }
    for (int r = 0; r < rows; ++r) {
      for (int width = kLanes / 2; width >= 1; width /= 2)
        for (int j = 0; j < width; ++j) acc[r][j] += acc[r][j + width];
      out[r * ldo + n] = acc[r][0];
    }
  }
}
}  // namespace

void linear_rows_cpu(float* out, int64_t ldo, const float* in, int64_t ldi, int64_t m,
                     const TensorView& w, const TensorView& w_scale) {
  if (w.dtype != DType::kF8E4M3) return linear_rows_cpu(out, ldo, in, ldi, m, w);
  EPMOE_CHECK(w.shape.rank == 2, kInvalidArgument, "linear weight must be 2-D, got {}",
              w.shape.str());
  const int64_t n_out = w.shape[0], k_in = w.shape[1], kb = (k_in + 127) / 128;
  w_scale.expect("FP8 weight scale", DType::kF32, {(n_out + 127) / 128, kb});
  // NOTES: one output feature at a time through the f32 path (its loop over n is per row of w),
  // so every product sees exactly the dequantised weight.
  std::vector<float> row(static_cast<size_t>(k_in));
  const fp8e4m3* q = w.as<fp8e4m3>();
  const float* sc = w_scale.as<float>();
  for (int64_t n = 0; n < n_out; ++n) {
    for (int64_t k = 0; k < k_in; ++k)
      row[size_t(k)] = fp8e4m3_to_f32(q[n * k_in + k]) * sc[(n / 128) * kb + k / 128];
    for (int64_t r0 = 0; r0 < m; r0 += kRowBlock) {
      const int rows = int(std::min<int64_t>(kRowBlock, m - r0));
      linear_block(out + r0 * ldo + n, ldo, in + r0 * ldi, ldi, rows, row.data(), 1, k_in);
    }
  }
}

void linear_rows_cpu(float* out, int64_t ldo, const float* in, int64_t ldi, int64_t m,
                     const TensorView& w) {
  EPMOE_CHECK(w.shape.rank == 2, kInvalidArgument, "linear weight must be 2-D, got {}",
              w.shape.str());
  const int64_t n_out = w.shape[0], k_in = w.shape[1];
  for (int64_t r0 = 0; r0 < m; r0 += kRowBlock) {
    const int rows = int(std::min<int64_t>(kRowBlock, m - r0));
    if (w.dtype == DType::kBF16)
      linear_block(out + r0 * ldo, ldo, in + r0 * ldi, ldi, rows, w.as<bf16>(), n_out, k_in);
    else if (w.dtype == DType::kF32)
      linear_block(out + r0 * ldo, ldo, in + r0 * ldi, ldi, rows, w.as<float>(), n_out, k_in);
    else
      EPMOE_FAIL(kInvalidArgument, "linear weight must be bf16 or f32, got {}",
                 dtype_name(w.dtype));
  }
}

}  // namespace epmoe
