// Routing (DESIGN §2): the CPU gate against an independent sort-based implementation, tie rules,
// shared-expert fusion, invariants and bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <set>

#include "epmoe/core/config.h"
#include "epmoe/core/exact_math.h"
#include "epmoe/routing/gate_cpu.h"
#include "tests/test_util.h"

namespace epmoe {
namespace {

using testing::fresh_seed;

// Sort-based restatement of steps 1-5, written apart from the reference on purpose.
void brute_route(const MoeConfig& c, const float* logit, const float* bias, std::vector<int>* ids,
                 std::vector<float>* w) {
  const int E = c.n_routed_experts, per = E / c.n_group;
  std::vector<double> s(E), choice(E);
  if (c.scoring == Scoring::kSigmoid) {
    for (int e = 0; e < E; ++e) {
      s[e] = exact_sigmoidf(logit[e]);
      choice[e] = float(float(s[e]) + (bias ? bias[e] : 0.f));
    }
  } else {
    const float mx = *std::max_element(logit, logit + E);
    float sum = 0;
    std::vector<float> ex(E);
    for (int e = 0; e < E; ++e) sum += (ex[e] = exact_expf(logit[e] - mx));
    for (int e = 0; e < E; ++e) {
      s[e] = ex[e] / sum;
      choice[e] = logit[e];
    }
  }
  auto by_value = [&](const std::vector<double>& v) {
    return [&v](int a, int b) { return v[a] != v[b] ? v[a] > v[b] : a < b; };
  };
  std::vector<double> gscore(c.n_group);
  for (int g = 0; g < c.n_group; ++g) {
    std::vector<int> idx(per);
    std::iota(idx.begin(), idx.end(), g * per);
    std::sort(idx.begin(), idx.end(), by_value(choice));
    gscore[g] = (c.scoring == Scoring::kSigmoid && per >= 2)
                    ? double(float(float(choice[idx[0]]) + float(choice[idx[1]])))
                    : choice[idx[0]];
  }
  std::vector<int> groups(c.n_group);
  std::iota(groups.begin(), groups.end(), 0);
  std::sort(groups.begin(), groups.end(), by_value(gscore));
  std::vector<int> cand;
  for (int i = 0; i < c.topk_group; ++i)
    for (int e = groups[i] * per; e < (groups[i] + 1) * per; ++e) cand.push_back(e);
  std::sort(cand.begin(), cand.end(), by_value(choice));
  ids->assign(cand.begin(), cand.begin() + c.top_k);
  double sum = 0;
  for (int id : *ids) sum += s[id];
  w->clear();
  for (int id : *ids) {
    double v = s[id];
    if (c.norm_topk_prob) v /= (sum + 1e-20);
    w->push_back(float(v * ((c.fuse_shared && c.scale_on_output) ? 1.0 : c.routed_scaling_factor)));
  }
}

struct Routed {
  Tensor ids, w;
};

Routed route(const MoeConfig& c, const Tensor& logits, const Tensor& bias) {
  const int64_t T = logits.shape()[0];
  Routed r{Tensor(DType::kI32, {T, c.num_slots()}), Tensor(DType::kF32, {T, c.num_slots()})};
  select_experts_cpu(r.ids, r.w, logits, bias, c);
  return r;
}

void check_against_brute(const MoeConfig& c, int64_t T, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Tensor logits = testing::random_tensor(DType::kF32, {T, c.n_routed_experts}, rng, 2.f);
  Tensor bias = c.scoring == Scoring::kSigmoid
                    ? testing::random_tensor(DType::kF32, {c.n_routed_experts}, rng, 0.1f)
                    : Tensor();
  Routed r = route(c, logits, bias);
  const int Kp = c.num_slots();
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int> ids;
    std::vector<float> w;
    brute_route(c, logits.as<float>() + t * c.n_routed_experts,
                bias.numel() ? bias.as<float>() : nullptr, &ids, &w);
    for (int k = 0; k < c.top_k; ++k) {
      ASSERT_EQ(r.ids.as<int32_t>()[t * Kp + k], ids[k])
          << "token " << t << " slot " << k << " seed " << seed;
      ASSERT_NEAR(r.w.as<float>()[t * Kp + k], w[k], 1e-6f * std::max(1.f, std::fabs(w[k])));
    }
    for (int j = 0; j < c.fused_shared(); ++j) {
      EXPECT_EQ(r.ids.as<int32_t>()[t * Kp + c.top_k + j], c.n_routed_experts + j);
      EXPECT_FLOAT_EQ(r.w.as<float>()[t * Kp + c.top_k + j],
                      c.scale_on_output ? 1.f / c.routed_scaling_factor : 1.f);
    }
  }
}

TEST(Routing, EveryPresetMatchesIndependentImplementation) {
  for (const auto& p : presets()) {
    SCOPED_TRACE(p.name);
    check_against_brute(p.config, 257, fresh_seed());
  }
}

TEST(Routing, OddShapesAndFusionConventions) {
  const uint64_t seed = fresh_seed();
  // one expert per group, many groups; and E = 512.
  MoeConfig a{.hidden = 8,
              .moe_intermediate = 8,
              .n_routed_experts = 16,
              .top_k = 3,
              .n_group = 16,
              .topk_group = 5,
              .n_shared_experts = 2,
              .routed_scaling_factor = 2.5f,
              .norm_topk_prob = true};
  check_against_brute(a, 99, seed);
  MoeConfig b{.hidden = 8,
              .moe_intermediate = 8,
              .n_routed_experts = 512,
              .top_k = 8,
              .n_group = 16,
              .topk_group = 4,
              .n_shared_experts = 1,
              .routed_scaling_factor = 1.5f,
              .norm_topk_prob = false};
  check_against_brute(b, 64, seed + 1);
  b.fuse_shared = true;
  check_against_brute(b, 64, seed + 2);
  b.scale_on_output = true;
  check_against_brute(b, 64, seed + 3);
  MoeConfig sm{.hidden = 8,
               .moe_intermediate = 8,
               .n_routed_experts = 64,
               .top_k = 6,
               .n_group = 8,
               .topk_group = 3,
               .n_shared_experts = 2,
               .routed_scaling_factor = 1.0f,
               .norm_topk_prob = true,
               .scoring = Scoring::kSoftmax,
               .fuse_shared = true};
  check_against_brute(sm, 130, seed + 4);
}

TEST(Routing, TiesGoToTheLowerIndexAndSlotsDescend) {
  MoeConfig c = find_preset("deepseek-v3-tiny").config;
  Tensor logits = Tensor::zeros(DType::kF32, {1, 256});  // every expert ties
  Routed r = route(c, logits, Tensor());
  // All groups tie: groups 0..3 kept; all experts tie: 0..7 chosen in index order.
  for (int k = 0; k < 8; ++k) EXPECT_EQ(r.ids.as<int32_t>()[k], k);
  for (int k = 0; k < 8; ++k) EXPECT_FLOAT_EQ(r.w.as<float>()[k], 2.5f / 8);

  std::mt19937_64 rng(fresh_seed());
  Tensor l2 = testing::random_tensor(DType::kF32, {50, 256}, rng);
  Routed r2 = route(c, l2, Tensor());
  for (int64_t t = 0; t < 50; ++t) {
    std::set<int> groups, uniq;
    float prev = 2.f;
    for (int k = 0; k < 8; ++k) {
      const int id = r2.ids.as<int32_t>()[t * 8 + k];
      const float s = exact_sigmoidf(l2.as<float>()[t * 256 + id]);
      EXPECT_LE(s, prev);  // descending choice (no bias)
      prev = s;
      groups.insert(id / 32);
      uniq.insert(id);
    }
    EXPECT_LE(groups.size(), 4u);
    EXPECT_EQ(uniq.size(), 8u);
    float sum = 0;
    for (int k = 0; k < 8; ++k) sum += r2.w.as<float>()[t * 8 + k];
    EXPECT_NEAR(sum, 2.5f, 1e-5f);
  }
}

TEST(Routing, AllTokensToOneExpertAndZeroTokens) {
  MoeConfig c = find_preset("qwen3-30b-a3b").config;
  Tensor logits = Tensor::zeros(DType::kF32, {33, 128});
  for (int t = 0; t < 33; ++t) logits.as<float>()[t * 128 + 77] = 30.f;
  Routed r = route(c, logits, Tensor());
  for (int t = 0; t < 33; ++t) EXPECT_EQ(r.ids.as<int32_t>()[t * 8], 77);
  Routed empty = route(c, Tensor(DType::kF32, {0, 128}), Tensor());
  EXPECT_EQ(empty.ids.numel(), 0);
}

TEST(Routing, BadInputNamesTheProblem) {
  MoeConfig c = find_preset("deepseek-v3-tiny").config;
  std::mt19937_64 rng(fresh_seed());
  Tensor logits = testing::random_tensor(DType::kF32, {4, 256}, rng);
  logits.as<float>()[2 * 256 + 17] = NAN;
  try {
    route(c, logits, Tensor());
    FAIL() << "NaN logit accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kNumeric);
    EXPECT_NE(std::string(e.what()).find("token 2, expert 17 is NaN"), std::string::npos);
  }
  Tensor wrong(DType::kF32, {4, 128});
  EXPECT_THROW(route(c, wrong, Tensor()), Error);
  MoeConfig sm = find_preset("mixtral-8x7b").config;
  Tensor lg = testing::random_tensor(DType::kF32, {2, 8}, rng);
  Tensor bias = testing::random_tensor(DType::kF32, {8}, rng);
  EXPECT_THROW(route(sm, lg, bias), Error);  // a bias only steers sigmoid scoring
}

TEST(Routing, GateGemmIsRowIndependent) {
  std::mt19937_64 rng(fresh_seed());
  Tensor x = testing::random_tensor(DType::kBF16, {37, 200}, rng);
  Tensor w = testing::random_tensor(DType::kBF16, {64, 200}, rng, 0.05f);
  Tensor all(DType::kF32, {37, 64});
  gate_gemm_cpu(all, x, w, 2);
  // Each row alone gives the same bits as inside the batch.
  for (int64_t t : {0, 5, 36}) {
    TensorView row{x.as<bf16>() + t * 200, {1, 200}, DType::kBF16, Device::kCpu};
    Tensor one(DType::kF32, {1, 64});
    gate_gemm_cpu(one, row, w, 1);
    EXPECT_EQ(std::memcmp(one.as<float>(), all.as<float>() + t * 64, 64 * 4), 0) << t;
    double ref = 0;
    for (int k = 0; k < 200; ++k)
      ref +=
          double(bf16_to_f32(x.as<bf16>()[t * 200 + k])) * bf16_to_f32(w.as<bf16>()[3 * 200 + k]);
    EXPECT_NEAR(all.as<float>()[t * 64 + 3], ref, 1e-4);
  }
}

}  // namespace
}  // namespace epmoe
