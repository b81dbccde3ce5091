#include "epmoe/layer/moe_layer_cpu.h"

#include <vector>

#include "epmoe/core/parallel.h"
#include "epmoe/experts/experts_cpu.h"
#include "epmoe/permute/permute_cpu.h"
#include "epmoe/routing/gate_cpu.h"

namespace epmoe {

void add_shared_expert_cpu(const TensorView& out, const MoeWeights& weights, const TensorView& x,
                           int threads) {
  const MoeConfig& cfg = weights.config;
  if (cfg.n_shared_experts == 0 || cfg.fuse_shared) return;
  const int64_t T = x.shape[0], H = cfg.hidden;
  out.expect("shared output", DType::kF32, {T, H});
  parallel_for(T, 16, threads, [&](int64_t begin, int64_t end) {
    std::vector<float> tmp(static_cast<size_t>((end - begin) * H));
    mlp_rows_cpu(tmp.data(), x, begin, end - begin, weights.shared_w13, weights.shared_w2);
    float* o = out.as<float>() + begin * H;
    for (size_t i = 0; i < tmp.size(); ++i) o[i] += tmp[i];
  });
}

Tensor moe_experts_cpu(const MoeWeights& weights, const TensorView& x, const TensorView& topk_ids,
                       const TensorView& topk_weights, int threads) {
  const MoeConfig& cfg = weights.config;
  EPMOE_CHECK(x.shape.rank == 2 && x.shape[1] == cfg.hidden, kInvalidArgument,
              "input must be [T, {}], got {}", cfg.hidden, x.shape.str());
  const int64_t T = x.shape[0], H = cfg.hidden;
  const int Kp = cfg.num_slots(), bank = weights.bank_size();
  topk_ids.expect("topk_ids", DType::kI32, {T, Kp});
  topk_weights.expect("topk_weights", DType::kF32, {T, Kp});
  const int32_t* ids = topk_ids.as<int32_t>();
  for (int64_t i = 0; i < T * Kp; ++i)
    EPMOE_CHECK(ids[i] >= -1 && ids[i] < bank, kInvalidArgument,
                "topk_ids[{}, {}] = {} is outside [-1, {})", i / Kp, i % Kp, ids[i], bank);
  Tensor y(DType::kF32, {T, H});
  Tensor seg(DType::kI32, {bank + 1}), s2d(DType::kI32, {T, Kp});
  preprocess_cpu(seg, s2d, topk_ids, 0, bank);
  const int64_t rows = seg.as<int32_t>()[bank];
  Tensor sorted(DType::kF32, {rows, H}), down(DType::kF32, {rows, H});
  pre_reorder_cpu(sorted, x, s2d);
  experts_contiguous_cpu(down, sorted, seg, weights.w13, weights.w2, 0, threads);
  post_reorder_cpu(y, down, s2d, topk_ids, topk_weights, cfg.n_routed_experts, 0, threads);
  add_shared_expert_cpu(y, weights, x, threads);
  if (cfg.fuse_shared && cfg.scale_on_output) {
    float* yp = y.as<float>();
    for (int64_t i = 0; i < T * H; ++i) yp[i] *= cfg.routed_scaling_factor;
  }
  return y;
}

LayerResult moe_forward_cpu(const MoeWeights& weights, const TensorView& x, int threads) {
  const MoeConfig& cfg = weights.config;
  cfg.validate();
  EPMOE_CHECK(x.shape.rank == 2 && x.shape[1] == cfg.hidden, kInvalidArgument,
              "input must be [T, {}], got {}", cfg.hidden, x.shape.str());
  const int64_t T = x.shape[0];
  const int Kp = cfg.num_slots();
  LayerResult r{Tensor(), Tensor(DType::kI32, {T, Kp}), Tensor(DType::kF32, {T, Kp})};
  Tensor logits(DType::kF32, {T, cfg.n_routed_experts});
  gate_gemm_cpu(logits, x, weights.gate, threads);
  select_experts_cpu(r.topk_ids, r.topk_weights, logits, weights.gate_bias, cfg, threads);
  r.y = moe_experts_cpu(weights, x, r.topk_ids, r.topk_weights, threads);
  return r;
}

}  // namespace epmoe
