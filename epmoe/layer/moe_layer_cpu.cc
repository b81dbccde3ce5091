#include "epmoe/layer/moe_layer_cpu.h"

#include <algorithm>
#include <vector>

#include "epmoe/core/parallel.h"
#include "epmoe/experts/experts_cpu.h"
#include "epmoe/layer/layer_runner_cpu.h"

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

namespace {

// One rank, the sequential strategy: normal mode (a single rank sends nothing anywhere).
LayerResult run_single_rank(const MoeWeights& weights, const RankInput& in, int threads) {
  const MoeConfig& cfg = weights.config;
  cfg.validate();
  EPMOE_CHECK(in.x.shape.rank == 2 && in.x.shape[1] == cfg.hidden, kInvalidArgument,
              "input must be [T, {}], got {}", cfg.hidden, in.x.shape.str());
  const EpConfig ep{.num_ranks = 1,
                    .mode = EpMode::kNormal,
                    .max_tokens_per_rank = std::max<int64_t>(in.x.shape[0], 1)};
  LayerRunResult r = run_layer_cpu(
      weights, ep, {in},
      LayerRunOptions{.overlap = OverlapKind::kNone, .iters = 1, .threads_per_rank = threads});
  return LayerResult{std::move(r.y[0]), std::move(r.topk_ids[0]), std::move(r.topk_weights[0])};
}

}  // namespace

LayerResult moe_forward_cpu(const MoeWeights& weights, const TensorView& x, int threads) {
  return run_single_rank(weights, RankInput{.x = x}, threads);
}

Tensor moe_experts_cpu(const MoeWeights& weights, const TensorView& x, const TensorView& topk_ids,
                       const TensorView& topk_weights, int threads) {
  return run_single_rank(weights, RankInput{x, topk_ids, topk_weights}, threads).y;
}

}  // namespace epmoe
