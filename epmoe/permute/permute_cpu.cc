#include "epmoe/permute/permute_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "epmoe/core/parallel.h"
#include "epmoe/permute/reduce_plan.h"

namespace epmoe {

void preprocess_cpu(const TensorView& seg_indptr, const TensorView& src2dst,
                    const TensorView& topk_ids, int expert_start, int expert_end) {
  EPMOE_CHECK(topk_ids.shape.rank == 2, kInvalidArgument, "topk_ids must be [T, K], got {}",
              topk_ids.shape.str());
  EPMOE_CHECK(expert_start >= 0 && expert_end >= expert_start, kInvalidArgument,
              "bad expert range [{}, {})", expert_start, expert_end);
  const int64_t T = topk_ids.shape[0], K = topk_ids.shape[1];
  const int e_loc = expert_end - expert_start;
  topk_ids.expect("topk_ids", DType::kI32, {T, K});
  seg_indptr.expect("seg_indptr", DType::kI32, {e_loc + 1});
  src2dst.expect("src2dst", DType::kI32, {T, K});
  const int32_t* ids = topk_ids.as<int32_t>();
  int32_t* seg = seg_indptr.as<int32_t>();
  int32_t* s2d = src2dst.as<int32_t>();
  std::vector<int32_t> fill(size_t(e_loc) + 1, 0);
  for (int64_t i = 0; i < T * K; ++i)
    if (ids[i] >= expert_start && ids[i] < expert_end) ++fill[ids[i] - expert_start + 1];
  for (int e = 0; e < e_loc; ++e) fill[e + 1] += fill[e];
  std::copy(fill.begin(), fill.end(), seg);
  for (int64_t i = 0; i < T * K; ++i)  // (t, k) order: the sort is stable
    s2d[i] = (ids[i] >= expert_start && ids[i] < expert_end) ? fill[ids[i] - expert_start]++ : -1;
}

namespace {
void load_row_f32(float* dst, const TensorView& t, int64_t row, int64_t h) {
  if (t.dtype == DType::kF32) {
    std::memcpy(dst, t.as<float>() + row * h, size_t(h) * 4);
  } else if (t.dtype == DType::kBF16) {
    const bf16* s = t.as<bf16>() + row * h;
    for (int64_t i = 0; i < h; ++i) dst[i] = bf16_to_f32(s[i]);
  } else {
    EPMOE_FAIL(kInvalidArgument, "expected a bf16 or f32 tensor, got {}", dtype_name(t.dtype));
  }
}

void check_reorder_shapes(const TensorView& sorted, const TensorView& x, const TensorView& s2d) {
  EPMOE_CHECK(x.shape.rank == 2 && sorted.shape.rank == 2 && sorted.shape[1] == x.shape[1],
              kInvalidArgument, "reorder: x {} and sorted {} must be 2-D with equal H",
              x.shape.str(), sorted.shape.str());
  EPMOE_CHECK(s2d.dtype == DType::kI32 && s2d.shape.rank == 2 && s2d.shape[0] == x.shape[0],
              kInvalidArgument, "src2dst must be [T={}, K] i32, got {} {}", x.shape[0],
              s2d.shape.str(), dtype_name(s2d.dtype));
}
}  // namespace

void pre_reorder_cpu(const TensorView& sorted, const TensorView& x, const TensorView& src2dst) {
  check_reorder_shapes(sorted, x, src2dst);
  const int64_t T = x.shape[0], H = x.shape[1], K = src2dst.shape[1], N = sorted.shape[0];
  const int32_t* s2d = src2dst.as<int32_t>();
  std::vector<float> row(static_cast<size_t>(H));
  for (int64_t t = 0; t < T; ++t) {
    load_row_f32(row.data(), x, t, H);
    for (int64_t k = 0; k < K; ++k) {
      const int32_t dst = s2d[t * K + k];
      if (dst < 0) continue;
      EPMOE_CHECK(dst < N, kInvalidArgument, "src2dst[{}, {}] = {} is outside the {} rows", t, k,
                  dst, N);
      if (sorted.dtype == DType::kF32) {
        std::memcpy(sorted.as<float>() + dst * H, row.data(), size_t(H) * 4);
      } else {
        bf16* d = sorted.as<bf16>() + dst * H;
        for (int64_t i = 0; i < H; ++i) d[i] = f32_to_bf16(row[i]);
      }
    }
  }
}

void quantize_row_fp8(fp8e4m3* q, float* scales, const float* v, int64_t h) {
  for (int64_t b0 = 0, b = 0; b0 < h; b0 += kFp8Block, ++b) {
    const int64_t b1 = std::min(h, b0 + kFp8Block);
    float amax = 1e-4f;
    for (int64_t i = b0; i < b1; ++i) amax = std::fmax(amax, std::fabs(v[i]));
    const float scale = amax / kFp8E4M3Max;
    scales[b] = scale;
    for (int64_t i = b0; i < b1; ++i) q[i] = f32_to_fp8e4m3(v[i] / scale);
  }
}

void pre_reorder_fp8_cpu(const TensorView& sorted, const TensorView& scales, const TensorView& x,
                         const TensorView& src2dst) {
  check_reorder_shapes(sorted, x, src2dst);
  const int64_t T = x.shape[0], H = x.shape[1], K = src2dst.shape[1], N = sorted.shape[0];
  const int64_t nb = (H + kFp8Block - 1) / kFp8Block;
  sorted.expect("sorted", DType::kF8E4M3, {N, H});
  scales.expect("scales", DType::kF32, {N, nb});
  const int32_t* s2d = src2dst.as<int32_t>();
  std::vector<float> row(static_cast<size_t>(H));
  std::vector<fp8e4m3> q(static_cast<size_t>(H));
  std::vector<float> sc(static_cast<size_t>(nb));
  for (int64_t t = 0; t < T; ++t) {
    load_row_f32(row.data(), x, t, H);
    quantize_row_fp8(q.data(), sc.data(), row.data(), H);
    for (int64_t k = 0; k < K; ++k) {
      const int32_t dst = s2d[t * K + k];
      if (dst < 0) continue;
      EPMOE_CHECK(dst < N, kInvalidArgument, "src2dst[{}, {}] = {} is outside the {} rows", t, k,
                  dst, N);
      std::memcpy(sorted.as<fp8e4m3>() + dst * H, q.data(), size_t(H));
      std::memcpy(scales.as<float>() + dst * nb, sc.data(), size_t(nb) * 4);
    }
  }
}

void post_reorder_cpu(const TensorView& out, const TensorView& down_out, const TensorView& src2dst,
                      const TensorView& topk_ids, const TensorView& topk_weights, int num_routed,
                      int id_offset, int threads) {
  const int64_t T = out.shape[0], H = out.shape[1], K = src2dst.shape[1], N = down_out.shape[0];
  EPMOE_CHECK(out.shape.rank == 2 && down_out.shape.rank == 2 && down_out.shape[1] == H,
              kInvalidArgument, "post_reorder: out {} and down_out {} must be 2-D with equal H",
              out.shape.str(), down_out.shape.str());
  EPMOE_CHECK(K <= kMaxSlots, kInvalidArgument, "post_reorder supports up to {} slots, got {}",
              kMaxSlots, K);
  src2dst.expect("src2dst", DType::kI32, {T, K});
  topk_ids.expect("topk_ids", DType::kI32, {T, K});
  topk_weights.expect("topk_weights", DType::kF32, {T, K});
  EPMOE_CHECK(out.dtype == DType::kF32 || out.dtype == DType::kBF16, kInvalidArgument,
              "post_reorder output must be f32 or bf16, got {}", dtype_name(out.dtype));
  const int32_t* s2d = src2dst.as<int32_t>();
  const int32_t* ids = topk_ids.as<int32_t>();
  const float* w = topk_weights.as<float>();
  parallel_for(T, 16, threads, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(static_cast<size_t>(K * H)), row(static_cast<size_t>(H));
    for (int64_t t = begin; t < end; ++t) {
      int keys[kMaxSlots];
      for (int64_t k = 0; k < K; ++k) {
        const int32_t dst = s2d[t * K + k];
        EPMOE_CHECK(dst < N, kInvalidArgument, "src2dst[{}, {}] = {} is outside the {} rows", t, k,
                    dst, N);
        keys[k] = dst >= 0 ? ids[t * K + k] + id_offset : -1;
        if (dst < 0) continue;
        load_row_f32(row.data(), down_out, dst, H);
        const float wk = w[t * K + k];
        float* a = acc.data() + k * H;
        for (int64_t i = 0; i < H; ++i) a[i] = wk * row[i];
      }
      ReducePlan plan;
      plan_reduce(plan, keys, int(K), num_routed);
      for (int i = 0; i < plan.num_merges; ++i) {
        float* d = acc.data() + plan.dst[i] * H;
        const float* s = acc.data() + plan.src[i] * H;
        for (int64_t j = 0; j < H; ++j) d[j] += s[j];
      }
      const float* res = plan.root >= 0 ? acc.data() + plan.root * H : nullptr;
      if (out.dtype == DType::kF32) {
        float* o = out.as<float>() + t * H;
        for (int64_t j = 0; j < H; ++j) o[j] = res ? res[j] : 0.0f;
      } else {
        bf16* o = out.as<bf16>() + t * H;
        for (int64_t j = 0; j < H; ++j) o[j] = f32_to_bf16(res ? res[j] : 0.0f);
      }
    }
  });
}

}  // namespace epmoe
