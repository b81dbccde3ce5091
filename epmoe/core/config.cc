#include "epmoe/core/config.h"

#include <fmt/format.h>

#include <cmath>

#include "epmoe/core/error.h"

namespace epmoe {

const char* scoring_name(Scoring s) { return s == Scoring::kSigmoid ? "sigmoid" : "softmax"; }

Scoring parse_scoring(const std::string& s) {
  if (s == "sigmoid") return Scoring::kSigmoid;
  if (s == "softmax") return Scoring::kSoftmax;
  EPMOE_FAIL(kInvalidConfig, "scoring must be 'sigmoid' or 'softmax', got '{}'", s);
}

void MoeConfig::validate() const {
  EPMOE_CHECK(hidden > 0, kInvalidConfig, "hidden must be positive, got {}", hidden);
  EPMOE_CHECK(moe_intermediate > 0, kInvalidConfig, "moe_intermediate must be positive, got {}",
              moe_intermediate);
  EPMOE_CHECK(n_routed_experts > 0, kInvalidConfig, "n_routed_experts must be positive, got {}",
              n_routed_experts);
  EPMOE_CHECK(n_group >= 1, kInvalidConfig, "n_group must be >= 1, got {}", n_group);
  EPMOE_CHECK(n_routed_experts % n_group == 0, kInvalidConfig,
              "n_group ({}) must divide n_routed_experts ({})", n_group, n_routed_experts);
  EPMOE_CHECK(topk_group >= 1 && topk_group <= n_group, kInvalidConfig,
              "topk_group ({}) must be in [1, n_group = {}]", topk_group, n_group);
  EPMOE_CHECK(top_k >= 1, kInvalidConfig, "top_k must be >= 1, got {}", top_k);
  EPMOE_CHECK(top_k <= topk_group * experts_per_group(), kInvalidConfig,
              "top_k ({}) exceeds the {} experts of the {} kept groups", top_k,
              topk_group * experts_per_group(), topk_group);
  EPMOE_CHECK(n_shared_experts >= 0, kInvalidConfig, "n_shared_experts must be >= 0, got {}",
              n_shared_experts);
  EPMOE_CHECK(num_slots() <= kMaxSlots, kInvalidConfig,
              "top_k + fused shared experts ({}) exceeds the supported {}", num_slots(), kMaxSlots);
  EPMOE_CHECK(std::isfinite(routed_scaling_factor) && routed_scaling_factor > 0, kInvalidConfig,
              "routed_scaling_factor must be finite and positive, got {}", routed_scaling_factor);
  EPMOE_CHECK(!scale_on_output || fuse_shared, kInvalidConfig,
              "scale_on_output applies only with shared-expert fusion");
  EPMOE_CHECK(!fuse_shared || n_shared_experts > 0, kInvalidConfig,
              "shared-expert fusion needs n_shared_experts > 0");
}

std::string MoeConfig::summary() const {
  return fmt::format(
      "H={} I={} E={} K={} groups={}/{} shared={}{} rsf={} norm={} scoring={}", hidden,
      moe_intermediate, n_routed_experts, top_k, topk_group, n_group, n_shared_experts,
      fuse_shared ? (scale_on_output ? " (fused, scale on output)" : " (fused)") : "",
      routed_scaling_factor, norm_topk_prob ? "yes" : "no", scoring_name(scoring));
}

const char* ep_mode_name(EpMode m) { return m == EpMode::kNormal ? "normal" : "low-latency"; }

EpMode parse_ep_mode(const std::string& s) {
  if (s == "normal") return EpMode::kNormal;
  if (s == "low-latency" || s == "low_latency" || s == "ll") return EpMode::kLowLatency;
  EPMOE_FAIL(kInvalidConfig, "mode must be 'normal' or 'low-latency', got '{}'", s);
}

void EpConfig::validate(const MoeConfig& moe) const {
  EPMOE_CHECK(num_ranks >= 1, kInvalidConfig, "number of ranks must be >= 1, got {}", num_ranks);
  EPMOE_CHECK(moe.n_routed_experts % num_ranks == 0, kInvalidConfig,
              "the rank count ({}) must divide n_routed_experts ({})", num_ranks,
              moe.n_routed_experts);
  // int32 bounds: token indices and ranks travel as int32 (recv_src, flags, peer tables).
  EPMOE_CHECK(max_tokens_per_rank >= 0 && max_tokens_per_rank <= INT32_MAX, kInvalidConfig,
              "max tokens per rank must be in [0, {}], got {}", INT32_MAX, max_tokens_per_rank);
}

const std::vector<Preset>& presets() {
  static const std::vector<Preset> kPresets = {
      {"deepseek-v3", "DeepSeek-V3/R1 MoE layer (sigmoid, 8 groups keep 4, 1 shared, rsf 2.5)",
       MoeConfig{.hidden = 7168,
                 .moe_intermediate = 2048,
                 .n_routed_experts = 256,
                 .top_k = 8,
                 .n_group = 8,
                 .topk_group = 4,
                 .n_shared_experts = 1,
                 .routed_scaling_factor = 2.5f,
                 .norm_topk_prob = true,
                 .scoring = Scoring::kSigmoid}},
      {"deepseek-v3-tiny",
       "DeepSeek-V3 routing (256 experts, top-8, 8/4 groups, 1 shared) at H=256",
       MoeConfig{.hidden = 256,
                 .moe_intermediate = 128,
                 .n_routed_experts = 256,
                 .top_k = 8,
                 .n_group = 8,
                 .topk_group = 4,
                 .n_shared_experts = 1,
                 .routed_scaling_factor = 2.5f,
                 .norm_topk_prob = true,
                 .scoring = Scoring::kSigmoid}},
      {"deepseek-v2-lite", "DeepSeek-V2-Lite MoE layer (softmax, 64 experts top-6, 2 shared)",
       MoeConfig{.hidden = 2048,
                 .moe_intermediate = 1408,
                 .n_routed_experts = 64,
                 .top_k = 6,
                 .n_group = 1,
                 .topk_group = 1,
                 .n_shared_experts = 2,
                 .routed_scaling_factor = 1.0f,
                 .norm_topk_prob = false,
                 .scoring = Scoring::kSoftmax}},
      {"qwen3-30b-a3b", "Qwen3-30B-A3B MoE layer (softmax, 128 experts top-8, no shared)",
       MoeConfig{.hidden = 2048,
                 .moe_intermediate = 768,
                 .n_routed_experts = 128,
                 .top_k = 8,
                 .n_group = 1,
                 .topk_group = 1,
                 .n_shared_experts = 0,
                 .routed_scaling_factor = 1.0f,
                 .norm_topk_prob = true,
                 .scoring = Scoring::kSoftmax}},
      {"mixtral-8x7b", "Mixtral-8x7B MoE layer (softmax of the top-2 logits, 8 experts)",
       MoeConfig{.hidden = 4096,
                 .moe_intermediate = 14336,
                 .n_routed_experts = 8,
                 .top_k = 2,
                 .n_group = 1,
                 .topk_group = 1,
                 .n_shared_experts = 0,
                 .routed_scaling_factor = 1.0f,
                 .norm_topk_prob = true,
                 .scoring = Scoring::kSoftmax}},
  };
  return kPresets;
}

const Preset& find_preset(const std::string& name) {
  std::string known;
  for (const auto& p : presets()) {
    if (p.name == name) return p;
    known += (known.empty() ? "" : ", ") + p.name;
  }
  EPMOE_FAIL(kInvalidArgument, "unknown preset '{}' (known: {})", name, known);
}

}  // namespace epmoe
