#include "epmoe/experts/experts_cpu.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "epmoe/core/exact_math.h"
#include "epmoe/core/parallel.h"
#include "epmoe/experts/linear_cpu.h"

namespace epmoe {

namespace {
constexpr int64_t kRowChunk = 16;

void silu_mul_rows(float* act, int64_t act_ld, const float* gu, int64_t gu_ld, int64_t rows,
                   int64_t inter) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < inter; ++i)
      act[r * act_ld + i] = exact_silu_mul(gu[r * gu_ld + i], gu[r * gu_ld + inter + i]);
}

void check_bank(const TensorView& w13, const TensorView& w2, int64_t h) {
  EPMOE_CHECK(w13.shape.rank == 3 && w2.shape.rank == 3 && w13.shape[0] == w2.shape[0] &&
                  w13.shape[2] == h && w2.shape[1] == h && w13.shape[1] == 2 * w2.shape[2],
              kInvalidArgument, "expert bank w13 {} / w2 {} do not fit H={}", w13.shape.str(),
              w2.shape.str(), h);
}

int64_t blocks128(int64_t n) { return (n + 127) / 128; }

// An FP8 bank's scales: [E_bank, 2·ceil(I/128), ceil(H/128)] and [E_bank, ceil(H/128),
// ceil(I/128)] f32 (MoeWeights' layout).
void check_bank_scales(const TensorView& w13, const TensorView& w2, const TensorView& w13_scale,
                       const TensorView& w2_scale) {
  if (w13.dtype != DType::kF8E4M3) return;
  const int64_t nb = w13.shape[0], h = w2.shape[1], inter = w2.shape[2];
  EPMOE_CHECK(w2.dtype == DType::kF8E4M3, kInvalidArgument, "FP8 w13 with {} w2",
              dtype_name(w2.dtype));
  w13_scale.expect("w13_scale (FP8 bank)", DType::kF32, {nb, 2 * blocks128(inter), blocks128(h)});
  w2_scale.expect("w2_scale (FP8 bank)", DType::kF32, {nb, blocks128(h), blocks128(inter)});
}

TensorView scale_slice(const TensorView& scale, int64_t e) {
  // An empty scale tensor (numel() == 0, as bf16|f32 banks carry) means no scales.
  return scale.data == nullptr || scale.numel() == 0 ? TensorView{} : bank_slice(scale, e);
}
}  // namespace

void silu_and_mul_cpu(const TensorView& out, const TensorView& in) {
  const int64_t m = in.shape[0], inter = in.shape[1] / 2;
  in.expect("silu input", DType::kF32, {m, 2 * inter});
  out.expect("silu output", DType::kF32, {m, inter});
  silu_mul_rows(out.as<float>(), inter, in.as<float>(), 2 * inter, m, inter);
}

TensorView bank_slice(const TensorView& bank, int64_t e) {
  EPMOE_CHECK(bank.shape.rank == 3 && e >= 0 && e < bank.shape[0], kInvalidArgument,
              "expert {} is outside the bank {}", e, bank.shape.str());
  const size_t stride = size_t(bank.shape[1] * bank.shape[2]) * dtype_size(bank.dtype);
  return TensorView{static_cast<char*>(bank.data) + stride * size_t(e),
                    {bank.shape[1], bank.shape[2]},
                    bank.dtype,
                    bank.device};
}

void mlp_rows_cpu(float* out, const TensorView& in, int64_t row_begin, int64_t rows,
                  const TensorView& w13, const TensorView& w2, const TensorView& w13_scale,
                  const TensorView& w2_scale) {
  const int64_t h = w2.shape[0], inter = w2.shape[1];
  const bool fp8 = w13.dtype == DType::kF8E4M3;
  // FP8: gate and up rows are two matrices, each with its own blocks of w13_scale.
  const int64_t ib = blocks128(inter), hb = blocks128(h);
  TensorView gate{}, up{}, gate_s{}, up_s{};
  if (fp8) {
    w13_scale.expect("w13_scale (FP8 weight)", DType::kF32, {2 * ib, hb});
    auto* q = static_cast<uint8_t*>(w13.data);
    auto* sc = static_cast<float*>(w13_scale.data);
    gate = TensorView{q, {inter, h}, DType::kF8E4M3, Device::kCpu};
    up = TensorView{q + inter * h, {inter, h}, DType::kF8E4M3, Device::kCpu};
    gate_s = TensorView{sc, {ib, hb}, DType::kF32, Device::kCpu};
    up_s = TensorView{sc + ib * hb, {ib, hb}, DType::kF32, Device::kCpu};
  }
  std::vector<float> x(size_t(std::min(rows, kRowChunk) * h));
  std::vector<float> gu(size_t(std::min(rows, kRowChunk) * 2 * inter));
  std::vector<float> act(size_t(std::min(rows, kRowChunk) * inter));
  for (int64_t r0 = 0; r0 < rows; r0 += kRowChunk) {
    const int64_t n = std::min(kRowChunk, rows - r0);
    for (int64_t r = 0; r < n; ++r) {
      const int64_t src = row_begin + r0 + r;
      if (in.dtype == DType::kF32) {
        std::memcpy(&x[r * h], in.as<float>() + src * h, size_t(h) * 4);
      } else {
        const bf16* s = in.as<bf16>() + src * h;
        for (int64_t i = 0; i < h; ++i) x[r * h + i] = bf16_to_f32(s[i]);
      }
    }
    if (fp8) {
      linear_rows_cpu(gu.data(), 2 * inter, x.data(), h, n, gate, gate_s);
      linear_rows_cpu(gu.data() + inter, 2 * inter, x.data(), h, n, up, up_s);
    } else {
      linear_rows_cpu(gu.data(), 2 * inter, x.data(), h, n, w13);
    }
    silu_mul_rows(act.data(), inter, gu.data(), 2 * inter, n, inter);
    linear_rows_cpu(out + (r0)*h, h, act.data(), inter, n, w2, w2_scale);
  }
}

void experts_contiguous_cpu(const TensorView& out, const TensorView& in,
                            const TensorView& seg_indptr, const TensorView& w13,
                            const TensorView& w2, int bank_offset, int threads,
                            const TensorView& w13_scale, const TensorView& w2_scale) {
  const int64_t n = in.shape[0], h = in.shape[1];
  check_bank(w13, w2, h);
  check_bank_scales(w13, w2, w13_scale, w2_scale);
  const int64_t e_loc = seg_indptr.shape[0] - 1;
  seg_indptr.expect("seg_indptr", DType::kI32, {e_loc + 1});
  out.expect("expert output", DType::kF32, {n, h});
  const int32_t* seg = seg_indptr.as<int32_t>();
  EPMOE_CHECK(seg[0] == 0 && seg[e_loc] <= n, kInvalidArgument,
              "seg_indptr spans [{}, {}) but the buffer has {} rows", seg[0], seg[e_loc], n);
  EPMOE_CHECK(bank_offset >= 0 && bank_offset + e_loc <= w13.shape[0], kInvalidArgument,
              "local experts [{}, {}) exceed the bank of {}", bank_offset, bank_offset + e_loc,
              w13.shape[0]);
  // Work items: (expert, chunk of rows) so skewed routing still spreads over threads.
  std::vector<std::pair<int, int64_t>> items;
  for (int e = 0; e < e_loc; ++e) {
    EPMOE_CHECK(seg[e + 1] >= seg[e], kInvalidArgument, "seg_indptr decreases at expert {}", e);
    for (int64_t r = seg[e]; r < seg[e + 1]; r += kRowChunk) items.emplace_back(e, r);
  }
  parallel_for(int64_t(items.size()), 1, threads, [&](int64_t b, int64_t end) {
    for (int64_t i = b; i < end; ++i) {
      const int e = items[i].first;
      const int64_t r = items[i].second, rows = std::min<int64_t>(kRowChunk, seg[e + 1] - r);
      mlp_rows_cpu(out.as<float>() + r * h, in, r, rows, bank_slice(w13, bank_offset + e),
                   bank_slice(w2, bank_offset + e), scale_slice(w13_scale, bank_offset + e),
                   scale_slice(w2_scale, bank_offset + e));
    }
  });
}

void experts_masked_cpu(const TensorView& out, const TensorView& in, const TensorView& count,
                        const TensorView& w13, const TensorView& w2, int bank_offset, int threads,
                        const TensorView& w13_scale, const TensorView& w2_scale) {
  EPMOE_CHECK(in.shape.rank == 3, kInvalidArgument,
              "masked input must be [E_loc, M_max, H], got {}", in.shape.str());
  const int64_t e_loc = in.shape[0], m_max = in.shape[1], h = in.shape[2];
  check_bank(w13, w2, h);
  check_bank_scales(w13, w2, w13_scale, w2_scale);
  count.expect("count", DType::kI32, {e_loc});
  out.expect("masked expert output", DType::kF32, {e_loc, m_max, h});
  EPMOE_CHECK(bank_offset >= 0 && bank_offset + e_loc <= w13.shape[0], kInvalidArgument,
              "local experts [{}, {}) exceed the bank of {}", bank_offset, bank_offset + e_loc,
              w13.shape[0]);
  const int32_t* cnt = count.as<int32_t>();
  std::vector<std::pair<int, int64_t>> items;
  for (int e = 0; e < e_loc; ++e) {
    EPMOE_CHECK(cnt[e] >= 0 && cnt[e] <= m_max, kInvalidArgument,
                "count[{}] = {} is outside [0, {}]", e, cnt[e], m_max);
    for (int64_t r = 0; r < cnt[e]; r += kRowChunk) items.emplace_back(e, r);
  }
  // Rows of expert e live at [e * m_max, e * m_max + count[e]) of the flattened buffers.
  TensorView flat_in{in.data, {e_loc * m_max, h}, in.dtype, in.device};
  parallel_for(int64_t(items.size()), 1, threads, [&](int64_t b, int64_t end) {
    for (int64_t i = b; i < end; ++i) {
      const int e = items[i].first;
      const int64_t r = items[i].second, rows = std::min<int64_t>(kRowChunk, cnt[e] - r);
      const int64_t row0 = e * m_max + r;
      mlp_rows_cpu(out.as<float>() + row0 * h, flat_in, row0, rows,
                   bank_slice(w13, bank_offset + e), bank_slice(w2, bank_offset + e),
                   scale_slice(w13_scale, bank_offset + e), scale_slice(w2_scale, bank_offset + e));
    }
  });
}

}  // namespace epmoe
