// Helpers of the expert-parallel and overlap suites: a small layer shape, routings with the
// awkward cases (-1 ids, a hot expert, fused shared slots), uneven token splits.
#pragma once

#include <algorithm>
#include <random>
#include <set>
#include <vector>

#include "epmoe/core/config.h"
#include "epmoe/core/tensor.h"
#include "epmoe/layer/layer_runner_cpu.h"

namespace epmoe::testing {

inline MoeConfig small_config(int n_shared, bool fuse, bool scale_on_output = false) {
  return MoeConfig{.hidden = 72,
                   .moe_intermediate = 24,
                   .n_routed_experts = 32,
                   .top_k = 4,
                   .n_group = 4,
                   .topk_group = 2,
                   .n_shared_experts = n_shared,
                   .routed_scaling_factor = 2.5f,
                   .norm_topk_prob = true,
                   .scoring = Scoring::kSigmoid,
                   .fuse_shared = fuse,
                   .scale_on_output = scale_on_output};
}

// Random routing: ids [T, K'] i32 with -1 ids, a hot expert (5), no duplicate within a token;
// fused shared slots E + j with weight 1. w [T, K'] f32.
inline void random_routing(const MoeConfig& c, int64_t T, std::mt19937_64& rng, Tensor* ids,
                           Tensor* w) {
  const int Kp = c.num_slots();
  *ids = Tensor(DType::kI32, {T, Kp});
  *w = Tensor(DType::kF32, {T, Kp});
  std::uniform_real_distribution<float> wd(0.05f, 1.f);
  for (int64_t t = 0; t < T; ++t) {
    std::set<int> used;
    for (int k = 0; k < c.top_k; ++k) {
      int id;
      const int kind = int(rng() % 10);
      if (kind == 0)
        id = -1;
      else if (kind < 3)
        id = 5;  // hot expert
      else
        id = int(rng() % uint64_t(c.n_routed_experts));
      if (id >= 0 && used.count(id)) id = -1;
      if (id >= 0) used.insert(id);
      ids->as<int32_t>()[t * Kp + k] = id;
      w->as<float>()[t * Kp + k] = wd(rng);
    }
    for (int j = 0; j < c.fused_shared(); ++j) {
      ids->as<int32_t>()[t * Kp + c.top_k + j] = c.n_routed_experts + j;
      w->as<float>()[t * Kp + c.top_k + j] = 1.f;
    }
  }
}

// Per-rank token counts in [0, t_max]: with several ranks one is empty and one has a single
// token; rank 0 has at least one.
inline std::vector<int64_t> uneven_tokens(int R, int64_t t_max, std::mt19937_64& rng) {
  std::vector<int64_t> t(static_cast<size_t>(R));
  for (auto& v : t) v = int64_t(rng() % uint64_t(t_max + 1));
  if (R > 1) t[rng() % uint64_t(R)] = 0;  // a rank without tokens
  if (R > 2) t[size_t(R - 1)] = t[size_t(R - 2)] == 0 ? 1 : t[size_t(R - 1)];
  if (R > 2 && std::find(t.begin(), t.end(), 1) == t.end()) t[size_t(R - 1)] = 1;
  t[0] = std::max<int64_t>(t[0], 1);
  return t;
}

// Per-rank inputs over rows of x [T, H] and (when given) of the routing [T, K'].
inline std::vector<RankInput> rank_inputs(const Tensor& x, const Tensor* ids, const Tensor* w,
                                          const std::vector<int64_t>& tokens) {
  const std::vector<TensorView> xs = split_rows(x, tokens);
  std::vector<RankInput> in;
  std::vector<TensorView> is, ws;
  if (ids) {
    is = split_rows(*ids, tokens);
    ws = split_rows(*w, tokens);
  }
  for (size_t r = 0; r < tokens.size(); ++r)
    in.push_back(ids ? RankInput{xs[r], is[r], ws[r]} : RankInput{.x = xs[r]});
  return in;
}

// The per-rank outputs of a run, gathered into [T, H] f32.
inline Tensor gather_rows(const std::vector<Tensor>& ys, int64_t h) {
  int64_t total = 0;
  for (const auto& y : ys) total += y.shape()[0];
  Tensor out(DType::kF32, {total, h});
  int64_t row = 0;
  for (const auto& y : ys) {
    std::copy(y.as<float>(), y.as<float>() + y.numel(), out.as<float>() + row * h);
    row += y.shape()[0];
  }
  return out;
}

}  // namespace epmoe::testing
