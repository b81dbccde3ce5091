#include "tools/run_command.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>

#include "epmoe/core/checked.h"
#include "epmoe/layer/layer_job.h"
#if defined(EPMOE_WITH_CUDA)
#include "epmoe/bench/ep_bench.h"
#include "epmoe/bench/gemm_bench.cuh"
#include "epmoe/bench/kernel_bench.h"
#include "epmoe/bench/layer_bench.h"
#define EPMOE_CLI_CUDA 1
#endif

namespace epmoe::cli {

namespace {

using json = nlohmann::json;

// "a,b,c" -> non-negative integers; names the first bad item. (Used by `bench`, CUDA builds only.)
[[maybe_unused]] std::vector<int64_t> parse_count_list(const std::string& spec) {
  std::vector<int64_t> out;
  std::stringstream ss(spec);
  std::string item;
  while (std::getline(ss, item, ',')) {
    // int32 bound: token indices travel as int32 (recv_src, topk_ids rows).
    out.push_back(parse_int_in_range(item, 0, INT32_MAX, "--tokens"));
  }
  return out;
}

}  // namespace

void open_json_output(const std::string& path) {
  // O_NONBLOCK: a FIFO without a reader fails (ENXIO) instead of blocking.
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC | O_NONBLOCK, 0644);
  EPMOE_CHECK(fd >= 0, kInvalidArgument, "cannot write --json file '{}': {}", path,
              std::strerror(errno));
  struct stat st {};
  const bool ok = ::fstat(fd, &st) == 0 && (S_ISREG(st.st_mode) || S_ISCHR(st.st_mode));
  ::close(fd);
  EPMOE_CHECK(ok, kInvalidArgument, "--json file '{}' is not a regular file", path);
}

namespace {

// Writes `j` to `path`; a failed write (a full disk, /dev/full) is an error, not a silent loss.
void write_json_file(const std::string& path, const json& j) {
  std::ofstream f(path);
  EPMOE_CHECK(f.good(), kInvalidArgument, "cannot write --json file '{}': {}", path,
              std::strerror(errno));
  f << j.dump(2) << "\n";
  f.flush();
  EPMOE_CHECK(f.good(), kInvalidArgument, "writing --json file '{}' failed: {}", path,
              std::strerror(errno));
  f.close();
  EPMOE_CHECK(!f.fail(), kInvalidArgument, "closing --json file '{}' failed: {}", path,
              std::strerror(errno));
}

// Median µs per operation (rows) and rank (columns), then the whole layer per rank.
void print_op_table(const std::vector<std::vector<std::pair<std::string, double>>>& op_us,
                    const std::vector<double>& layer_us) {
  const size_t R = op_us.size();
  std::vector<std::string> names;
  for (const auto& rank_ops : op_us)
    for (const auto& kv : rank_ops)
      if (std::find(names.begin(), names.end(), kv.first) == names.end()) names.push_back(kv.first);
  std::string head = fmt::format("{:<20}", "op (median us)");
  for (size_t r = 0; r < R; ++r) head += fmt::format(" {:>9}", fmt::format("rank {}", r));
  fmt::print("{}\n", head);
  for (const std::string& n : names) {
    std::string line = fmt::format("{:<20}", n);
    for (size_t r = 0; r < R; ++r) {
      double v = 0;
      for (const auto& kv : op_us[r])
        if (kv.first == n) v = kv.second;
      line += fmt::format(" {:>9.1f}", v);
    }
    fmt::print("{}\n", line);
  }
  std::string line = fmt::format("{:<20}", "layer");
  for (double v : layer_us) line += fmt::format(" {:>9.1f}", v);
  fmt::print("{}\n", line);
}

}  // namespace

int run_command(const RunOptions& o) {
  LayerJobSpec spec;
  spec.preset = o.preset;
  spec.golden = o.golden;
  spec.fuse_shared = o.fuse_shared;
  spec.scale_on_output = o.scale_on_output;
  spec.seed = o.seed;
  spec.ranks = o.ranks;
  spec.tokens = o.tokens;
  spec.max_tokens = o.max_tokens;
  spec.mode = parse_ep_mode(o.mode);
  spec.backend = o.backend;
  spec.transport = o.transport;
  spec.fp8_dispatch = o.fp8_dispatch;
  spec.weights = o.weights;
  spec.ll_transfer = o.ll_transfer;
  spec.overlap = o.overlap;
  spec.iters = o.iters;
  spec.threads = o.threads;
  spec.check = o.check;
  const LayerJobReport r = run_layer_job(spec);
  const MoeConfig& cfg = r.config;

  fmt::print("epmoe run: {} | {}\n", r.source, cfg.summary());
  std::string tok;
  for (size_t i = 0; i < r.tokens.size(); ++i) tok += (i ? "," : "") + std::to_string(r.tokens[i]);
  fmt::print(
      "backend {} | {} rank(s), mode {} | tokens per rank [{}], T_max {} | {} iteration(s)\n",
      o.backend, o.ranks, ep_mode_name(r.ep.mode), tok, r.ep.max_tokens_per_rank, o.iters);
  if (!r.device.empty()) fmt::print("device: {}\n", r.device);
  std::string how;
  if (o.backend == "cuda" && r.ep.mode == EpMode::kLowLatency)
    how = r.ll_over_host_api ? ", low-latency transfers over the host API"
                             : ", low-latency transfers by load/store into peer windows";
  fmt::print("transport: {}{}{}\n", r.transport, o.fp8_dispatch ? ", FP8 dispatch" : "", how);
  if (o.backend == "cuda")
    fmt::print(
        "experts: {} weights and activations{}\n", o.weights,
        o.weights == "fp8" ? " (e4m3, 128 x 128 weight blocks, 1 x 128 activation groups)" : "");
  if (!r.tree_ranks)
    fmt::print(
        "note: {} ranks do not split the {} experts along the reduction tree; results "
        "match the single-rank layer to rounding, not bitwise\n",
        o.ranks, cfg.n_routed_experts);
  fmt::print("overlap {}\n", r.strategy);
  print_op_table(r.op_us, r.layer_us);
  fmt::print("{:<6} {:>8} {:>13} {:>15} {:>15}\n", "rank", "tokens", "copies sent",
             "dispatch bytes", "combine bytes");
  json per_rank = json::array();
  for (size_t rk = 0; rk < r.traffic.size(); ++rk) {
    const EpTraffic& tr = r.traffic[rk];
    fmt::print("{:<6} {:>8} {:>13} {:>15} {:>15}\n", rk, r.tokens[rk], tr.dispatch_tokens,
               tr.dispatch_bytes, tr.combine_bytes);
    json us;
    for (const auto& [name, v] : r.op_us[rk]) us[name] = v;
    per_rank.push_back({{"rank", rk},
                        {"tokens", r.tokens[rk]},
                        {"dispatch_token_copies", tr.dispatch_tokens},
                        {"dispatch_bytes", tr.dispatch_bytes},
                        {"combine_bytes", tr.combine_bytes},
                        {"op_us", us},
                        {"layer_us", r.layer_us[rk]}});
  }

  json out;
  out["source"] = r.source;
  out["config"] = {{"hidden", cfg.hidden},
                   {"moe_intermediate", cfg.moe_intermediate},
                   {"n_routed_experts", cfg.n_routed_experts},
                   {"top_k", cfg.top_k},
                   {"n_group", cfg.n_group},
                   {"topk_group", cfg.topk_group},
                   {"n_shared_experts", cfg.n_shared_experts},
                   {"routed_scaling_factor", cfg.routed_scaling_factor},
                   {"norm_topk_prob", cfg.norm_topk_prob},
                   {"scoring", scoring_name(cfg.scoring)},
                   {"fuse_shared", cfg.fuse_shared},
                   {"scale_on_output", cfg.scale_on_output}};
  out["backend"] = o.backend;
  out["ranks"] = o.ranks;
  out["mode"] = ep_mode_name(r.ep.mode);
  out["tokens_per_rank"] = r.tokens;
  out["max_tokens_per_rank"] = r.ep.max_tokens_per_rank;
  out["iters"] = o.iters;
  out["transport"] = r.transport;
  out["overlap"] = overlap_name(r.overlap);
  out["weights"] = o.weights;
  out["strategy"] = r.strategy;
  out["per_rank"] = per_rank;

  int code = 0;
  if (o.check) {
    const int64_t rows = r.row_end - r.row_begin;
    json check;
    if (r.vs_none.run) {
      fmt::print(
          "check {} vs none (same tokens, same run): {} of {} values differ (bitwise "
          "required) -> {}\n",
          overlap_name(r.overlap), r.vs_none.mismatches, r.vs_none.values,
          r.vs_none.pass ? "ok" : "MISMATCH");
      out["overlap_vs_none_mismatches"] = r.vs_none.mismatches;
    }
    const OutputCheck& c = r.vs_reference;
    int64_t total = 0;
    for (int64_t t : r.tokens) total += t;
    if (rows < total)
      fmt::print("checking rows [{}, {}) of this process\n", r.row_begin, r.row_end);
    fmt::print(
        "check vs single-rank CPU reference: rel L2 {:.3e}, {} of {} values differ{} -> {}\n",
        c.rel_l2, c.mismatches, c.values, c.bitwise_required ? " (bitwise required)" : "",
        (c.bitwise_required ? c.mismatches == 0 : c.rel_l2 <= c.tolerance) ? "ok" : "MISMATCH");
    fmt::print(
        "routing vs CPU reference: {} token(s) with different expert sets, max weight "
        "diff {:.2e}\n",
        c.tokens_with_other_ids, c.max_weight_diff);
    check["ref_rel_l2"] = c.rel_l2;
    check["ref_mismatches"] = c.mismatches;
    check["bitwise_required"] = c.bitwise_required;
    check["routing_tokens_differing"] = c.tokens_with_other_ids;
    if (r.vs_golden.run) {
      const OutputCheck& g = r.vs_golden;
      fmt::print(
          "check vs golden output: rel L2 {:.3e} (tolerance {:.0e}); id sets: {} of {} "
          "tokens differ; max weight diff {:.2e} -> {}\n",
          g.rel_l2, g.tolerance, g.tokens_with_other_ids, rows, g.max_weight_diff,
          g.pass ? "ok" : "MISMATCH");
      check["golden_rel_l2"] = g.rel_l2;
      check["golden_tokens_with_different_ids"] = g.tokens_with_other_ids;
      check["golden_max_weight_diff"] = g.max_weight_diff;
    }
    check["pass"] = r.pass;
    out["check"] = check;
    fmt::print("{}\n", r.pass ? "PASS" : "FAIL");
    code = r.pass ? 0 : 1;
  }
  if (!o.json.empty()) write_json_file(o.json, out);
  return code;
}

int bench_command(const BenchOptions& o) {
#ifdef EPMOE_CLI_CUDA
  std::vector<int64_t> tokens = parse_count_list(o.tokens);
  EPMOE_CHECK(o.iters >= 1 && o.warmup >= 0, kInvalidArgument,
              "--iters must be >= 1 and --warmup >= 0");
  json result;
  if (o.kernel == "dispatch" || o.kernel == "combine" || o.kernel == "ep") {
    cuda::EpBenchOptions eo;
    eo.preset = o.preset;
    eo.ranks = o.ranks;
    eo.transport = o.transport;
    eo.mode = o.mode;
    eo.fp8 = o.fp8;
    eo.ll_transfer = o.ll_transfer;
    eo.iters = o.iters;
    eo.warmup = o.warmup;
    if (tokens.empty()) tokens = {parse_ep_mode(o.mode) == EpMode::kNormal ? 4096 : 128};
    result = json::array();
    for (int64_t t : tokens) {
      eo.tokens = t;
      result.push_back(cuda::run_ep_bench(eo));
    }
  } else if (o.kernel == "layer") {
    cuda::LayerBenchOptions lo;
    lo.preset = o.preset;
    lo.experts_per_rank = o.experts_per_rank;
    lo.ranks = o.ranks;
    lo.transport = o.transport;
    lo.mode = o.mode;
    if (!tokens.empty()) lo.tokens = tokens;
    lo.overlap.clear();
    std::stringstream ss(o.overlap == "all" ? std::string("none,tbo,sbo") : o.overlap);
    for (std::string item; std::getline(ss, item, ',');) lo.overlap.push_back(item);
    if (lo.overlap.empty() || lo.overlap[0] != "none")
      lo.overlap.insert(lo.overlap.begin(), "none");
    lo.attn_us = o.attn_us;
    lo.graph = o.graph;
    lo.comm_blocks = o.comm_blocks;
    lo.fp8 = o.fp8;
    lo.fp8_experts = o.weights == "fp8";
    lo.iters = o.iters;
    lo.trace_file = o.trace;
    result = cuda::run_layer_bench(lo);
  } else if (o.kernel == "gemm") {
    if (tokens.empty()) tokens = {128, 4096, 16384};
    result = cuda::run_grouped_gemm_bench(tokens, o.iters, o.warmup);
  } else {
    cuda::KernelBenchOptions ko;
    ko.kernel = o.kernel;
    ko.preset = o.preset;
    if (!tokens.empty()) ko.tokens = tokens;
    ko.iters = o.iters;
    ko.warmup = o.warmup;
    result = cuda::run_kernel_bench(ko);
  }
  if (!o.json.empty()) write_json_file(o.json, result);
  return 0;
#else
  (void)o;
  EPMOE_FAIL(kUnsupported, "epmoe bench needs a CUDA build and a GPU");
#endif
}

}  // namespace epmoe::cli
