#include <fmt/format.h>

#include <algorithm>
#include <fstream>
#include <map>
#include <random>

#include "epmoe/bench/layer_bench.h"
#include "epmoe/cuda/device.h"
#include "epmoe/layer/run_layer_cuda.h"
#include "epmoe/weights/moe_weights.h"

namespace epmoe::cuda {

namespace {

MoeConfig bench_config(const LayerBenchOptions& o) {
  MoeConfig cfg = find_preset(o.preset).config;
  cfg.fuse_shared = false;
  if (o.experts_per_rank > 0) {
    cfg.n_routed_experts = o.ranks * o.experts_per_rank;
    cfg.n_group = std::min(cfg.n_group, cfg.n_routed_experts);
    while (cfg.n_routed_experts % cfg.n_group) --cfg.n_group;
    cfg.topk_group = std::min(cfg.topk_group, cfg.n_group);
    cfg.top_k = std::min(cfg.top_k, cfg.topk_group * cfg.experts_per_group());
  }
  cfg.validate();
  return cfg;
}

double max_of(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, x);
  return m;
}

}  // namespace

nlohmann::json run_layer_bench(const LayerBenchOptions& o) {
  require_device();
  const MoeConfig cfg = bench_config(o);
  const EpMode mode = parse_ep_mode(o.mode);
  std::vector<OverlapKind> kinds;
  for (const std::string& s : o.overlap) kinds.push_back(parse_overlap(s));
  EPMOE_CHECK(!kinds.empty() && kinds[0] == OverlapKind::kNone, kInvalidArgument,
              "the layer benchmark needs `none` first (the baseline of every ratio)");
  const MoeWeights weights = random_moe_weights(cfg, o.seed);
  nlohmann::json out = nlohmann::json::array();
  fmt::print("layer benchmark: {} | {} ranks, {} | {} experts{} | attention stand-in {} us{}\n",
             cfg.summary(), o.ranks, ep_mode_name(mode), o.fp8_experts ? "FP8" : "bf16",
             o.fp8 ? ", FP8 dispatch" : "", o.attn_us, o.graph ? " | CUDA graphs" : "");
  bool traced = false;
  for (int64_t T : o.tokens) {
    EPMOE_CHECK(T >= 1, kInvalidArgument, "--tokens must be >= 1, got {}", T);
    std::mt19937_64 rng(o.seed * 977 + uint64_t(T));
    std::normal_distribution<float> nd(0.f, 1.f);
    Tensor x(DType::kBF16, {T * o.ranks, cfg.hidden});
    for (int64_t i = 0; i < x.numel(); ++i) x.as<bf16>()[i] = f32_to_bf16(nd(rng));
    CudaRunSpec sp;
    sp.weights = &weights;
    sp.ep = EpConfig{.num_ranks = o.ranks, .mode = mode, .max_tokens_per_rank = T};
    sp.tokens.assign(size_t(o.ranks), T);
    sp.x_all = &x;
    sp.transport = o.transport;
    sp.options.fp8_dispatch = o.fp8;
    sp.options.fp8_experts = o.fp8_experts;
    sp.options.comm_blocks = o.comm_blocks;
    sp.strategies = kinds;
    sp.iters = o.iters;
    sp.trace_iters = o.trace_iters;
    sp.graph = o.graph;
    sp.attn_us = o.attn_us;
    if (o.attn_us < 0) {
      // "auto": an attention stand-in as long as the sequential MoE layer itself.
      CudaRunSpec cal = sp;
      cal.strategies = {OverlapKind::kNone};
      cal.iters = 5;
      cal.trace_iters = 0;
      cal.attn_us = 0;
      sp.attn_us = max_of(run_layer_cuda(cal).strategies[0].layer_us);
    }
    const CudaRunResult r = run_layer_cuda(sp);
    const StrategyResult& base = r.strategies[0];
    const double none_us = max_of(base.layer_us);
    // Communication time of the sequential layer (rank 0's breakdown): what overlap can hide.
    double comm_us = 0;
    for (const auto& kv : base.op_us[0])
      if (kv.first.rfind("dispatch", 0) == 0 || kv.first.rfind("combine", 0) == 0)
        comm_us += kv.second;
    fmt::print(
        "\n{} tokens/rank | transport {} | attention stand-in {:.0f} us | sequential "
        "communication {:.1f} us\n",
        T, r.transport, sp.attn_us, comm_us);
    fmt::print("{:<6} {:>12} {:>9} {:>8}  {}\n", "overlap", "layer us", "speedup", "hidden",
               "per-op median us (rank 0)");
    nlohmann::json row;
    row["tokens_per_rank"] = T;
    row["transport"] = r.transport;
    row["sequential_comm_us"] = comm_us;
    row["attn_us"] = sp.attn_us;
    for (const StrategyResult& s : r.strategies) {
      const double us = max_of(s.layer_us);
      const double speedup = none_us / us;
      const double hidden = comm_us > 0 ? (none_us - us) / comm_us : 0.0;
      std::string ops;
      for (const auto& kv : s.op_us[0]) ops += fmt::format("{} {:.0f}, ", kv.first, kv.second);
      const bool slower = us > none_us * 1.02;
      fmt::print("{:<6} {:>12.1f} {:>8.3f}x {:>7.0f}%  {}{}\n", overlap_name(s.kind), us, speedup,
                 100 * hidden, slower ? "[SLOWER than none] " : "", ops);
      nlohmann::json ops_json;
      for (const auto& kv : s.op_us[0]) ops_json[kv.first] = kv.second;
      row["strategies"].push_back({{"overlap", overlap_name(s.kind)},
                                   {"layer_us", us},
                                   {"per_rank_us", s.layer_us},
                                   {"speedup_vs_none", speedup},
                                   {"hidden_comm_share", hidden},
                                   {"slower_than_none", slower},
                                   {"op_us_rank0", ops_json}});
      if (!traced && !o.trace_file.empty() && s.kind != OverlapKind::kNone && !s.trace.empty() &&
          !s.trace[0].empty()) {
        std::ofstream f(o.trace_file);
        EPMOE_CHECK(f.good(), kInvalidArgument, "cannot write --trace file '{}'", o.trace_file);
        f << chrome_trace_json(s.trace, fmt::format("{} {} tokens", overlap_name(s.kind), T));
        f.flush();
        EPMOE_CHECK(f.good(), kInvalidArgument, "writing --trace file '{}' failed", o.trace_file);
        fmt::print("trace of {} at {} tokens/rank -> {} (open in ui.perfetto.dev)\n",
                   overlap_name(s.kind), T, o.trace_file);
        traced = true;
      }
    }
    out.push_back(row);
  }
  return out;
}

}  // namespace epmoe::cuda
