#include "epmoe/routing/gate_cpu.h"

#include <cmath>
#include <vector>

#include "epmoe/core/exact_math.h"
#include "epmoe/core/parallel.h"
#include "epmoe/experts/linear_cpu.h"

namespace epmoe {

void gate_gemm_cpu(const TensorView& logits, const TensorView& x, const TensorView& weight,
                   int threads) {
  const int64_t t = x.shape[0], h = x.shape[1], e = weight.shape[0];
  EPMOE_CHECK(x.shape.rank == 2 && weight.shape.rank == 2 && weight.shape[1] == h, kInvalidArgument,
              "gate GEMM: x {} and router weight {} disagree on hidden size", x.shape.str(),
              weight.shape.str());
  logits.expect("logits", DType::kF32, {t, e});
  float* out = logits.as<float>();
  const int64_t grain = 64;
  parallel_for(t, grain, threads, [&](int64_t begin, int64_t end) {
    std::vector<float> row(static_cast<size_t>((end - begin) * h));
    for (int64_t i = begin; i < end; ++i) {
      float* dst = row.data() + (i - begin) * h;
      if (x.dtype == DType::kF32) {
        const float* src = x.as<float>() + i * h;
        std::copy(src, src + h, dst);
      } else {
        const bf16* src = x.as<bf16>() + i * h;
        for (int64_t k = 0; k < h; ++k) dst[k] = bf16_to_f32(src[k]);
      }
    }
    linear_rows_cpu(out + begin * e, e, row.data(), h, end - begin, weight);
  });
}

namespace {

// Strict "better" of the selection order: larger value, ties to the lower index.
inline bool better(float va, int ia, float vb, int ib) { return va > vb || (va == vb && ia < ib); }

void route_token(int32_t* ids, float* weights, const float* logit, const float* bias,
                 const MoeConfig& cfg, std::vector<float>& score, std::vector<float>& choice,
                 std::vector<float>& group_score, std::vector<char>& group_kept) {
  const int E = cfg.n_routed_experts, G = cfg.n_group, per_group = E / G, K = cfg.top_k;
  // score: the value weights come from; choice: the value experts are ranked by.
  if (cfg.scoring == Scoring::kSigmoid) {
    for (int e = 0; e < E; ++e) {
      score[e] = exact_sigmoidf(logit[e]);
      choice[e] = bias ? score[e] + bias[e] : score[e];
    }
  } else {
    float mx = logit[0];
    for (int e = 1; e < E; ++e) mx = std::fmax(mx, logit[e]);
    float sum = 0.f;
    for (int e = 0; e < E; ++e) {
      score[e] = exact_expf(logit[e] - mx);
      sum += score[e];
    }
    for (int e = 0; e < E; ++e) {
      score[e] = score[e] / sum;
      choice[e] = logit[e];
    }
  }
  // Group scores: sigmoid sums the two best choices of the group (one when a group has a single
  // expert); softmax takes the best.
  for (int g = 0; g < G; ++g) {
    const float* c = choice.data() + g * per_group;
    int b1 = 0;
    for (int j = 1; j < per_group; ++j)
      if (better(c[j], j, c[b1], b1)) b1 = j;
    float s = c[b1];
    if (cfg.scoring == Scoring::kSigmoid && per_group >= 2) {
      int b2 = -1;
      for (int j = 0; j < per_group; ++j)
        if (j != b1 && (b2 < 0 || better(c[j], j, c[b2], b2))) b2 = j;
      s = c[b1] + c[b2];
    }
    group_score[g] = s;
    group_kept[g] = 0;
  }
  for (int kept = 0; kept < cfg.topk_group; ++kept) {
    int best = -1;
    for (int g = 0; g < G; ++g)
      if (!group_kept[g] && (best < 0 || better(group_score[g], g, group_score[best], best)))
        best = g;
    group_kept[best] = 1;
  }
  // Top-k among the kept groups, by descending choice (selection sort: K is small).
  float weight_sum = 0.f;
  for (int k = 0; k < K; ++k) {
    int best = -1;
    for (int e = 0; e < E; ++e) {
      if (!group_kept[e / per_group]) continue;
      bool taken = false;
      for (int j = 0; j < k; ++j) taken |= ids[j] == e;
      if (!taken && (best < 0 || better(choice[e], e, choice[best], best))) best = e;
    }
    ids[k] = best;
    weights[k] = score[best];
    weight_sum += weights[k];
  }
  const bool scale_out = cfg.fuse_shared && cfg.scale_on_output;
  const float rsf = scale_out ? 1.0f : cfg.routed_scaling_factor;
  for (int k = 0; k < K; ++k) {
    float w = weights[k];
    if (cfg.norm_topk_prob) w = w / (weight_sum + 1e-20f);
    weights[k] = w * rsf;
  }
  for (int j = 0; j < cfg.fused_shared(); ++j) {
    ids[K + j] = E + j;
    weights[K + j] = scale_out ? 1.0f / cfg.routed_scaling_factor : 1.0f;
  }
}

}  // namespace

int64_t check_selection_args(const TensorView& topk_ids, const TensorView& topk_weights,
                             const TensorView& logits, const TensorView& bias,
                             const MoeConfig& config, const float** bias_ptr) {
  config.validate();
  const int E = config.n_routed_experts, Kp = config.num_slots();
  EPMOE_CHECK(logits.shape.rank == 2 && logits.shape[1] == E, kInvalidArgument,
              "logits must be [T, {}], got {}", E, logits.shape.str());
  const int64_t T = logits.shape[0];
  logits.expect("logits", DType::kF32, {T, E});
  topk_ids.expect("topk_ids", DType::kI32, {T, Kp});
  topk_weights.expect("topk_weights", DType::kF32, {T, Kp});
  *bias_ptr = nullptr;
  if (bias.data != nullptr && bias.shape.rank > 0 && bias.numel() > 0) {
    EPMOE_CHECK(config.scoring == Scoring::kSigmoid, kInvalidArgument,
                "an e_score_correction_bias applies only to sigmoid scoring");
    bias.expect("e_score_correction_bias", DType::kF32, {E});
    *bias_ptr = bias.as<float>();
  }
  return T;
}

void select_experts_cpu(const TensorView& topk_ids, const TensorView& topk_weights,
                        const TensorView& logits, const TensorView& bias, const MoeConfig& config,
                        int threads) {
  const float* bias_ptr = nullptr;
  const int64_t T = check_selection_args(topk_ids, topk_weights, logits, bias, config, &bias_ptr);
  const int E = config.n_routed_experts, Kp = config.num_slots();
  const float* lg = logits.as<float>();
  for (int64_t i = 0; i < T * E; ++i)
    EPMOE_CHECK(!std::isnan(lg[i]), kNumeric, "router logit of token {}, expert {} is NaN", i / E,
                i % E);
  parallel_for(T, 64, threads, [&](int64_t begin, int64_t end) {
    std::vector<float> score(E), choice(E), group_score(config.n_group);
    std::vector<char> group_kept(config.n_group);
    for (int64_t t = begin; t < end; ++t)
      route_token(topk_ids.as<int32_t>() + t * Kp, topk_weights.as<float>() + t * Kp, lg + t * E,
                  bias_ptr, config, score, choice, group_score, group_kept);
  });
}

}  // namespace epmoe
