// Overlap strategies as operation lists with Yield markers, and the executor that runs them over
// one or two micro-batches (DESIGN §6, seeds 000 and 001). The executor is the only place that
// knows the order of a layer's operations: front ends (CLI, benchmarks, tests) pick a strategy
// and call execute().
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "epmoe/core/config.h"
#include "epmoe/layer/layer_rank.h"

namespace epmoe {

// One entry of an operation list.
struct Step {
  enum class Kind : uint8_t { kLayer, kUser, kYield };
  Kind kind = Kind::kYield;
  LayerOp op = LayerOp::kGate;     // kLayer
  std::string name;                // kUser (and a readable name for every kind)
  std::function<void(int mb)> fn;  // kUser: the work, on micro-batch mb

  static Step layer(LayerOp op);
  static Step user(std::string name, std::function<void(int mb)> fn);
  static Step yield();
};

// The parts of a model layer around the MoE that epmoe does not implement (attention and its
// norms). Each may be empty (skipped). Benchmarks pass a stand-in of configurable cost.
struct UserOps {
  std::function<void(int mb)> attn_prepare, attn_core, mlp_prepare, layer_postprocess;
};

enum class OverlapKind : uint8_t { kNone, kTbo, kSbo };
const char* overlap_name(OverlapKind k);  // "none" | "tbo" | "sbo"
// Accepts none|tbo|sbo (auto is resolved by choose_overlap); Error(kInvalidArgument) otherwise.
OverlapKind parse_overlap(const std::string& s);

struct Strategy {
  OverlapKind kind = OverlapKind::kNone;
  std::vector<Step> steps;       // with Yield markers
  int delta = 0;                 // stages micro-batch A runs alone before B starts
  ForwardPlan plan;              // micro-batches, split rule, lanes
  std::string describe() const;  // "tbo (d = 2): [attn_prepare | attn_core, ... ]"
};

// The strategies of DESIGN §6 for an EP mode:
//   none: everything in order on one micro-batch, one lane: [attn_prepare, attn_core,
//         mlp_prepare, gate, select_experts, shared_experts, dispatch_send, dispatch_recv,
//         experts, combine_send, combine_recv, output, layer_postprocess]. (Every list runs
//         shared_experts before combine_recv: fused shared slices join the canonical sum there.)
//   tbo:  low-latency (decode) the d = 2 list of seed 000 (combine_recv a stage of its own);
//         normal (prefill) the d = 0 list; two micro-batches.
//   sbo:  one micro-batch; the shared expert between dispatch_send and dispatch_recv on a lane
//         of its own, communication on its own lane.
Strategy make_strategy(OverlapKind kind, EpMode mode, const UserOps& user = {});

// `auto`: the strategy for `tokens_per_rank` (the largest rank's count) from the thresholds of
// OverlapConfig (set from the layer benchmark, docs/benchmarks/overlap.md).
OverlapKind choose_overlap(const OverlapConfig& cfg, EpMode mode, int64_t tokens_per_rank);

// The stages of a list (split at Yield markers; empty stages kept so that stage indices match
// the list as written).
std::vector<std::vector<const Step*>> stages_of(const Strategy& s);

// The issue order the executor follows for a strategy: (micro-batch, step name) per operation.
// Stage order: A runs `delta` stages alone; then one stage of A and one of B alternately; then
// B runs its last `delta` stages alone. One micro-batch: its stages in order.
std::vector<std::pair<int, std::string>> issue_order(const Strategy& s);

// Runs one forward: layer.begin_forward(plan), every operation in issue order (layer ops through
// layer.run, user ops through layer.run_user), layer.end_forward().
void execute(MoeLayerRank& layer, const Strategy& s);

}  // namespace epmoe
