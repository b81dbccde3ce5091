#include "tools/run_command.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <random>
#include <set>
#include <sstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "epmoe/core/checked.h"
#include "epmoe/core/parallel.h"
#include "epmoe/core/stats.h"
#include "epmoe/ep/ep_cpu.h"
#include "epmoe/layer/layer_runner_cpu.h"
#include "epmoe/layer/moe_layer_cpu.h"
#include "epmoe/weights/golden.h"
#include "epmoe/weights/moe_weights.h"
#include "epmoe/weights/safetensors.h"
#include "epmoe/overlap/executor.h"
#if defined(EPMOE_WITH_CUDA)
#include "epmoe/bench/ep_bench.h"
#include "epmoe/bench/gemm_bench.cuh"
#include "epmoe/bench/kernel_bench.h"
#include "epmoe/bench/layer_bench.h"
#include "epmoe/cuda/device.h"
#include "epmoe/layer/run_layer_cuda.h"
#ifdef EPMOE_WITH_NCCL
#include "epmoe/comm/nccl_transport.h"
#endif
#define EPMOE_CLI_CUDA 1
#endif

namespace epmoe::cli {

namespace {

using json = nlohmann::json;

// "a,b,c" -> non-negative integers; names the first bad item.
std::vector<int64_t> parse_count_list(const std::string& spec) {
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

std::vector<int64_t> parse_tokens(const std::string& spec, int ranks) {
  std::vector<int64_t> out;
  if (spec.empty()) {  // uneven by default, with an empty rank when there are several
    for (int r = 0; r < ranks; ++r) out.push_back(ranks > 1 && r == 1 ? 0 : 40 + (61 * r) % 89);
    return out;
  }
  out = parse_count_list(spec);
  if (out.size() == 1) out.assign(size_t(ranks), out[0]);
  EPMOE_CHECK(int(out.size()) == ranks, kInvalidArgument,
              "--tokens lists {} counts for {} ranks", out.size(), ranks);
  return out;
}

Tensor random_input(int64_t t, int64_t h, uint64_t seed) {
  Tensor x(DType::kBF16, {t, h});
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.f, 1.f);
  bf16* p = x.as<bf16>();
  for (int64_t i = 0; i < t * h; ++i) p[i] = f32_to_bf16(d(rng));
  return x;
}

// Compares per-token id sets (and weights matched by id) of two routings.
struct RoutingDiff {
  int64_t tokens_differing = 0;
  double max_weight_diff = 0;
};
RoutingDiff compare_routing(const TensorView& ids_a, const TensorView& w_a, const TensorView& ids_b,
                            const TensorView& w_b, int k_cmp) {
  RoutingDiff d;
  const int64_t T = ids_a.shape[0];
  const int64_t ka = ids_a.shape[1], kb = ids_b.shape[1];
  for (int64_t t = 0; t < T; ++t) {
    std::vector<std::pair<int, float>> a, b;
    for (int k = 0; k < k_cmp; ++k) {
      a.emplace_back(ids_a.as<int32_t>()[t * ka + k], w_a.as<float>()[t * ka + k]);
      b.emplace_back(ids_b.as<int32_t>()[t * kb + k], w_b.as<float>()[t * kb + k]);
    }
    std::sort(a.begin(), a.end());
    std::sort(b.begin(), b.end());
    bool same = true;
    for (int k = 0; k < k_cmp; ++k) {
      same &= a[size_t(k)].first == b[size_t(k)].first;
      if (same)
        d.max_weight_diff =
            std::max(d.max_weight_diff, double(std::fabs(a[size_t(k)].second - b[size_t(k)].second)));
    }
    d.tokens_differing += same ? 0 : 1;
  }
  return d;
}

// `auto` resolves by the busiest rank's tokens (OverlapConfig thresholds); else the name.
OverlapKind resolve_overlap(const std::string& name, EpMode mode,
                            const std::vector<int64_t>& tokens) {
  if (name != "auto") return parse_overlap(name);
  int64_t busiest = 0;
  for (int64_t t : tokens) busiest = std::max(busiest, t);
  return choose_overlap(OverlapConfig{}, mode, busiest);
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
  EPMOE_CHECK(o.iters >= 1, kInvalidArgument, "--iters must be >= 1, got {}", o.iters);
  EPMOE_CHECK(o.ranks >= 1, kInvalidConfig, "--ranks must be >= 1, got {}", o.ranks);
  EPMOE_CHECK(o.backend == "cpu" || o.backend == "cuda", kInvalidArgument,
              "--backend must be 'cpu' or 'cuda', got '{}'", o.backend);
  const EpMode mode = parse_ep_mode(o.mode);
  if (o.backend == "cuda") {
#ifdef EPMOE_CLI_CUDA
    cuda::require_device();
#else
    EPMOE_FAIL(kUnsupported, "this epmoe was built without CUDA (--backend cuda needs nvcc at "
                             "build time and a GPU at run time)");
#endif
  }

  // ---- the layer ----
  MoeWeights weights;
  Tensor x_all, golden_out, golden_ids, golden_w;
  std::string source;
  std::unique_ptr<SafetensorsFile> file;
  if (!o.golden.empty()) {
    file = std::make_unique<SafetensorsFile>(o.golden);
    MoeConfig cfg = config_from_safetensors_metadata(*file);
    cfg.fuse_shared = o.fuse_shared && cfg.n_shared_experts > 0;
    cfg.scale_on_output = o.scale_on_output && cfg.fuse_shared;
    // The expected tensors first (header checks, small): a bad file fails before the weights load.
    GoldenTensors g = read_golden_tensors(*file, cfg);
    weights = load_moe_weights(*file, cfg);
    x_all = std::move(g.input);
    golden_out = std::move(g.output);
    golden_ids = std::move(g.topk_ids);
    golden_w = std::move(g.topk_weights);
    source = o.golden;
  } else {
    MoeConfig cfg = find_preset(o.preset).config;
    cfg.fuse_shared = o.fuse_shared && cfg.n_shared_experts > 0;
    cfg.scale_on_output = o.scale_on_output && cfg.fuse_shared;
    cfg.validate();
    weights = random_moe_weights(cfg, o.seed);
    source = "preset " + o.preset;
  }
  const MoeConfig& cfg = weights.config;
  std::vector<int64_t> tokens;
  if (!o.golden.empty() && o.tokens.empty()) {  // even split of the file's tokens
    const int64_t T = x_all.shape()[0];
    for (int r = 0; r < o.ranks; ++r) tokens.push_back(T / o.ranks + (r < T % o.ranks ? 1 : 0));
  } else {
    tokens = parse_tokens(o.tokens, o.ranks);
  }
  int64_t total = 0;
  for (int64_t t : tokens) total = checked_add(total, t, "the total token count");
  // The input and the output of every token, in one process.
  check_buffer_budget(checked_mul(checked_mul(total, cfg.hidden, "tokens x hidden"), int64_t(6),
                                  "the token buffers"),
                      fmt::format("the input and output of {} tokens x {} (--tokens)", total,
                                  cfg.hidden));
  if (o.golden.empty()) x_all = random_input(total, cfg.hidden, o.seed * 7919 + 1);
  const std::vector<TensorView> xs = split_rows(x_all, tokens);
  EpConfig ep{.num_ranks = o.ranks, .mode = mode, .max_tokens_per_rank = o.max_tokens};
  if (ep.max_tokens_per_rank == 0)
    for (int64_t t : tokens) ep.max_tokens_per_rank = std::max(ep.max_tokens_per_rank, t);
  ep.validate(cfg);
  for (size_t r = 0; r < tokens.size(); ++r)
    EPMOE_CHECK(tokens[r] <= ep.max_tokens_per_rank, kInvalidArgument,
                "rank {} brings {} tokens, more than max_tokens_per_rank = {}", r, tokens[r],
                ep.max_tokens_per_rank);

  fmt::print("epmoe run: {} | {}\n", source, cfg.summary());
  std::string tok;
  for (size_t r = 0; r < tokens.size(); ++r) tok += (r ? "," : "") + std::to_string(tokens[r]);
  fmt::print("backend {} | {} rank(s), mode {} | tokens per rank [{}], T_max {} | {} iteration(s)\n",
             o.backend, o.ranks, ep_mode_name(mode), tok, ep.max_tokens_per_rank, o.iters);

  json out;
  out["source"] = source;
  out["config"] = {{"hidden", cfg.hidden}, {"moe_intermediate", cfg.moe_intermediate},
                   {"n_routed_experts", cfg.n_routed_experts}, {"top_k", cfg.top_k},
                   {"n_group", cfg.n_group}, {"topk_group", cfg.topk_group},
                   {"n_shared_experts", cfg.n_shared_experts},
                   {"routed_scaling_factor", cfg.routed_scaling_factor},
                   {"norm_topk_prob", cfg.norm_topk_prob}, {"scoring", scoring_name(cfg.scoring)},
                   {"fuse_shared", cfg.fuse_shared}, {"scale_on_output", cfg.scale_on_output}};
  out["backend"] = o.backend;
  out["ranks"] = o.ranks;
  out["mode"] = ep_mode_name(mode);
  out["tokens_per_rank"] = tokens;
  out["max_tokens_per_rank"] = ep.max_tokens_per_rank;
  out["iters"] = o.iters;

  // ---- run ----
  Tensor y_all(DType::kF32, {total, cfg.hidden});
  Tensor run_ids, run_w;  // routing of the run (cuda backend reports its own)
  int64_t check_begin = 0, check_end = total;  // rows this process computed (mpirun: its own)
  bool overlap_mismatch = false;                // an overlap run not bitwise equal to `none`
  if (o.backend == "cuda") {
#ifdef EPMOE_CLI_CUDA
    cuda::require_device();
    fmt::print("device: {}\n", cuda::device_description(0));
    const OverlapKind kind = resolve_overlap(o.overlap, mode, tokens);
    cuda::CudaRunSpec sp;
    sp.weights = &weights;
    sp.ep = ep;
    sp.tokens = tokens;
    sp.x_all = &x_all;
    sp.transport = o.transport;
    sp.options = cuda::EpCudaOptions{.fp8_dispatch = o.fp8_dispatch,
                                     .ll_transfer = cuda::parse_ll_transfer(o.ll_transfer)};
    sp.strategies = {kind};
    if (kind != OverlapKind::kNone && o.check) sp.strategies.push_back(OverlapKind::kNone);
    sp.iters = o.iters;
    sp.trace_iters = o.iters;
    cuda::CudaRunResult r = cuda::run_layer_cuda(sp);
    std::string how;
    if (ep.mode == EpMode::kLowLatency)
      how = r.ll_host_ranks ? ", low-latency transfers over the host API"
                            : ", low-latency transfers by load/store into peer windows";
    fmt::print("transport: {}{}{}\n", r.transport, o.fp8_dispatch ? ", FP8 dispatch" : "", how);
    cuda::StrategyResult& main_run = r.strategies[0];
    fmt::print("overlap {}\n", main_run.describe);
    check_begin = r.row_begin;
    check_end = r.row_end;
    print_op_table(main_run.op_us, main_run.layer_us);
    fmt::print("{:<6} {:>8} {:>13} {:>15} {:>15}\n", "rank", "tokens", "copies sent",
               "dispatch bytes", "combine bytes");
    for (int rk = 0; rk < o.ranks; ++rk)
      fmt::print("{:<6} {:>8} {:>13} {:>15} {:>15}\n", rk, tokens[size_t(rk)],
                 r.traffic[size_t(rk)].dispatch_tokens, r.traffic[size_t(rk)].dispatch_bytes,
                 r.traffic[size_t(rk)].combine_bytes);
    out["transport"] = r.transport;
    out["overlap"] = overlap_name(kind);
    out["layer_us"] = main_run.layer_us;
    if (r.strategies.size() > 1) {
      const cuda::StrategyResult& base = r.strategies[1];
      const int64_t n = (check_end - check_begin) * cfg.hidden, off = check_begin * cfg.hidden;
      int64_t diff = 0;
      for (int64_t i = 0; i < n; ++i)
        diff += std::memcmp(main_run.y.as<float>() + off + i, base.y.as<float>() + off + i, 4) != 0;
      fmt::print("check {} vs none (same tokens, same run): {} of {} values differ (bitwise "
                 "required) -> {}\n",
                 overlap_name(kind), diff, n, diff == 0 ? "ok" : "MISMATCH");
      out["overlap_vs_none_mismatches"] = diff;
      overlap_mismatch = diff != 0;
    }
    y_all = std::move(main_run.y);
    run_ids = std::move(main_run.ids);
    run_w = std::move(main_run.w);
#else
    EPMOE_FAIL(kUnsupported, "this epmoe was built without CUDA (--backend cuda needs nvcc at "
                             "build time and a GPU at run time)");
#endif
  } else {
    const int threads = o.threads > 0 ? o.threads : default_cpu_threads();
    const int per_rank = std::max(1, threads / o.ranks);
    if (!ep_ranks_are_tree_nodes(cfg.n_routed_experts, o.ranks))
      fmt::print("note: {} ranks do not split the {} experts along the reduction tree; results "
                 "match the single-rank layer to rounding, not bitwise\n",
                 o.ranks, cfg.n_routed_experts);
    const OverlapKind kind = resolve_overlap(o.overlap, mode, tokens);
    std::vector<RankInput> inputs;
    for (const TensorView& xr : xs) inputs.push_back(RankInput{.x = xr});
    LayerRunOptions lo{.overlap = kind, .iters = o.iters, .threads_per_rank = per_rank};
    const LayerRunResult res = run_layer_cpu(weights, ep, inputs, lo);
    fmt::print("overlap {}\n", res.strategy);
    const int kp = cfg.num_slots();
    run_ids = Tensor(DType::kI32, {total, kp});
    run_w = Tensor(DType::kF32, {total, kp});
    std::vector<std::vector<std::pair<std::string, double>>> op_us(size_t(o.ranks));
    for (int r = 0, row = 0; r < o.ranks; ++r) {
      const size_t rk = size_t(r);
      std::memcpy(y_all.as<float>() + int64_t(row) * cfg.hidden, res.y[rk].view().data,
                  res.y[rk].nbytes());
      std::memcpy(run_ids.as<int32_t>() + int64_t(row) * kp, res.topk_ids[rk].view().data,
                  res.topk_ids[rk].nbytes());
      std::memcpy(run_w.as<float>() + int64_t(row) * kp, res.topk_weights[rk].view().data,
                  res.topk_weights[rk].nbytes());
      for (size_t i = 0; i < res.op_names.size(); ++i)
        op_us[rk].emplace_back(res.op_names[i], res.op_us[rk][i]);
      row += int(tokens[rk]);
    }
    print_op_table(op_us, res.total_us);
    fmt::print("{:<6} {:>8} {:>13} {:>15} {:>15}\n", "rank", "tokens", "copies sent",
               "dispatch bytes", "combine bytes");
    json per_rank_json = json::array();
    for (int r = 0; r < o.ranks; ++r) {
      const EpTraffic& tr = res.traffic[size_t(r)];
      fmt::print("{:<6} {:>8} {:>13} {:>15} {:>15}\n", r, tokens[size_t(r)], tr.dispatch_tokens,
                 tr.dispatch_bytes, tr.combine_bytes);
      json us;
      for (const auto& [name, v] : op_us[size_t(r)]) us[name] = v;
      per_rank_json.push_back({{"rank", r}, {"tokens", tokens[size_t(r)]},
                               {"dispatch_token_copies", tr.dispatch_tokens},
                               {"dispatch_bytes", tr.dispatch_bytes},
                               {"combine_bytes", tr.combine_bytes},
                               {"op_us", us}, {"layer_us", res.total_us[size_t(r)]}});
    }
    out["overlap"] = overlap_name(kind);
    out["strategy"] = res.strategy;
    // With --check an overlapped run is compared bitwise with `none` on the same tokens.
    if (kind != OverlapKind::kNone && o.check) {
      lo.overlap = OverlapKind::kNone;
      lo.iters = 1;
      const LayerRunResult base = run_layer_cpu(weights, ep, inputs, lo);
      int64_t diff = 0, n = 0;
      for (int r = 0; r < o.ranks; ++r) {
        const int64_t m = res.y[size_t(r)].numel();
        for (int64_t i = 0; i < m; ++i)
          diff += std::memcmp(res.y[size_t(r)].as<float>() + i, base.y[size_t(r)].as<float>() + i,
                              4) != 0;
        n += m;
      }
      fmt::print("check {} vs none (same tokens, same run): {} of {} values differ (bitwise "
                 "required) -> {}\n",
                 overlap_name(kind), diff, n, diff == 0 ? "ok" : "MISMATCH");
      out["overlap_vs_none_mismatches"] = diff;
      overlap_mismatch = diff != 0;
    }
    out["per_rank"] = per_rank_json;
  }

  // ---- check ----
  int code = 0;
  if (o.check) {
    LayerResult ref = moe_forward_cpu(weights, x_all);
    // Under mpirun a process checks the rows of its own rank.
    const int64_t rows = check_end - check_begin, n = rows * cfg.hidden, off = check_begin * cfg.hidden;
    auto row_view = [&](const Tensor& t, int64_t width) {
      return TensorView{static_cast<char*>(t.view().data) + size_t(check_begin * width) * dtype_size(t.dtype()),
                        {rows, width}, t.dtype(), Device::kCpu};
    };
    const bool bitwise_expected =
        o.backend == "cpu" && ep_ranks_are_tree_nodes(cfg.n_routed_experts, o.ranks);
    int64_t mismatches = 0;
    for (int64_t i = 0; i < n; ++i)
      mismatches += std::memcmp(y_all.as<float>() + off + i, ref.y.as<float>() + off + i, 4) != 0;
    const double err = rel_l2(y_all.as<float>() + off, ref.y.as<float>() + off, n);
    const double tol_ref = o.backend == "cpu" ? (bitwise_expected ? 0.0 : 1e-6) : 2e-2;
    bool pass = (bitwise_expected ? mismatches == 0 : err <= tol_ref) && !overlap_mismatch;
    if (rows < total) fmt::print("checking rows [{}, {}) of this process\n", check_begin, check_end);
    fmt::print("check vs single-rank CPU reference: rel L2 {:.3e}, {} of {} values differ{} -> {}\n",
               err, mismatches, n, bitwise_expected ? " (bitwise required)" : "",
               pass ? "ok" : "MISMATCH");
    json check = {{"ref_rel_l2", err}, {"ref_mismatches", mismatches},
                  {"bitwise_required", bitwise_expected}};
    if (run_ids.defined()) {
      const RoutingDiff rd =
          compare_routing(row_view(run_ids, cfg.num_slots()), row_view(run_w, cfg.num_slots()),
                          row_view(ref.topk_ids, cfg.num_slots()),
                          row_view(ref.topk_weights, cfg.num_slots()), cfg.top_k);
      fmt::print("routing vs CPU reference: {} token(s) with different expert sets, max weight "
                 "diff {:.2e}\n", rd.tokens_differing, rd.max_weight_diff);
      pass = pass && rd.tokens_differing == 0 && rd.max_weight_diff <= 1e-5;
      check["routing_tokens_differing"] = rd.tokens_differing;
    }
    if (!o.golden.empty()) {
      EPMOE_CHECK(golden_out.shape() == y_all.shape(), kBadFile,
                  "{}: 'output' is {}, the layer produced {}", o.golden, golden_out.shape().str(),
                  y_all.shape().str());
      const double gerr = rel_l2(y_all.as<float>() + off, golden_out.as<float>() + off, n);
      const double gtol = o.backend == "cpu" ? 1e-5 : 2e-2;
      const int kp = cfg.num_slots();
      const TensorView ids_check = row_view(run_ids.defined() ? run_ids : ref.topk_ids, kp);
      const TensorView w_check = row_view(run_ids.defined() ? run_w : ref.topk_weights, kp);
      const RoutingDiff rd = compare_routing(ids_check, w_check, row_view(golden_ids, cfg.top_k),
                                             row_view(golden_w, cfg.top_k), cfg.top_k);
      const bool gpass = gerr < gtol && rd.tokens_differing == 0;
      fmt::print("check vs golden output: rel L2 {:.3e} (tolerance {:.0e}); id sets: {} of {} "
                 "tokens differ; max weight diff {:.2e} -> {}\n",
                 gerr, gtol, rd.tokens_differing, rows, rd.max_weight_diff,
                 gpass ? "ok" : "MISMATCH");
      check["golden_rel_l2"] = gerr;
      check["golden_tokens_with_different_ids"] = rd.tokens_differing;
      check["golden_max_weight_diff"] = rd.max_weight_diff;
      pass = pass && gpass;
    }
    check["pass"] = pass;
    out["check"] = check;
    fmt::print("{}\n", pass ? "PASS" : "FAIL");
    code = pass ? 0 : 1;
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
    if (lo.overlap.empty() || lo.overlap[0] != "none") lo.overlap.insert(lo.overlap.begin(), "none");
    lo.attn_us = o.attn_us;
    lo.graph = o.graph;
    lo.comm_blocks = o.comm_blocks;
    lo.fp8 = o.fp8;
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
