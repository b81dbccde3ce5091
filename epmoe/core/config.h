// MoeConfig describes one MoE layer; EpConfig how it is spread over ranks. Both are plain
// structs (build them with designated initializers) validated in exactly one place.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace epmoe {

enum class Scoring : uint8_t { kSigmoid, kSoftmax };
const char* scoring_name(Scoring s);
Scoring parse_scoring(const std::string& s);

// Most slots (routed top-k plus fused shared experts) one token may carry.
constexpr int kMaxSlots = 32;

struct MoeConfig {
  int64_t hidden = 0;                  // H
  int64_t moe_intermediate = 0;        // I, per routed expert
  int n_routed_experts = 0;            // E
  int top_k = 0;                       // K
  int n_group = 1;                     // G: experts form G consecutive groups of E/G
  int topk_group = 1;                  // groups kept per token
  int n_shared_experts = 0;            // shared MLP has intermediate n_shared * I
  float routed_scaling_factor = 1.0f;  // rsf
  bool norm_topk_prob = false;
  Scoring scoring = Scoring::kSigmoid;
  // Shared-expert fusion (seed 004): the gate appends n_shared slots (ids E..E+n_shared-1) and
  // the shared MLP runs as n_shared more experts of size I.
  bool fuse_shared = false;
  // With fusion: routed weights exclude rsf, shared weight is 1/rsf, the output is scaled by rsf.
  bool scale_on_output = false;

  // Throws Error(kInvalidConfig) naming the first violated rule.
  void validate() const;

  int experts_per_group() const { return n_routed_experts / n_group; }
  int fused_shared() const { return fuse_shared ? n_shared_experts : 0; }
  int num_slots() const { return top_k + fused_shared(); }                  // K'
  int num_expert_ids() const { return n_routed_experts + fused_shared(); }  // ids in topk_ids
  std::string summary() const;
};

enum class EpMode : uint8_t { kNormal, kLowLatency };
const char* ep_mode_name(EpMode m);
EpMode parse_ep_mode(const std::string& s);

struct EpConfig {
  int num_ranks = 1;  // R
  EpMode mode = EpMode::kNormal;
  int64_t max_tokens_per_rank = 0;  // T_max: fixed buffer shapes, never traffic
  void validate(const MoeConfig& moe) const;
  int local_experts(const MoeConfig& moe) const { return moe.n_routed_experts / num_ranks; }
};

// When `--overlap auto` chooses two-batch (TBO) or single-batch (SBO) overlap, by the tokens of
// the busiest rank (SGLang enables TBO above a token threshold). Defaults come from the layer
// benchmark (docs/benchmarks/overlap.md); 0 turns a strategy off.
// Measured on 2 x H200 over NVLink (docs/benchmarks/overlap.md): TBO was slower than `none` at
// every decode size (splitting the batch reads the expert weights twice); SBO with the signalled
// combine-send (its second half, issue 12) was slower than `none` at every decode size measured
// (32-128 tokens per rank, bf16 and FP8 experts: 0.79-0.97x at this code, 0.86-1.015x in an
// earlier variant), so `auto` picks neither and decodes with `none`; `--overlap sbo` stays.
struct OverlapConfig {
  int64_t decode_tbo_min_tokens = 0;   // low-latency: TBO from this many tokens per rank
  int64_t decode_sbo_min_tokens = 0;   // low-latency: SBO from this many (below TBO's threshold)
  int64_t prefill_tbo_min_tokens = 0;  // normal: TBO from this many tokens per rank
};

struct Preset {
  std::string name;
  std::string description;
  MoeConfig config;
};

const std::vector<Preset>& presets();
// Throws Error(kInvalidArgument) listing the known names.
const Preset& find_preset(const std::string& name);

}  // namespace epmoe
