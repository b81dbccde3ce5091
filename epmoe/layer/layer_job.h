// `epmoe run` as one library call: builds the layer (a golden file, or a preset with random
// weights), cuts the tokens over the ranks, runs the chosen backend (the CPU reference over
// threads, or GPUs over loopback / NCCL / mpirun) through the executor with one overlap
// strategy, and checks the result — against `none` bitwise, against the single-rank CPU
// reference and against the golden file, with the tolerances each backend is held to.
// Front ends parse options into a LayerJobSpec and print the LayerJobReport.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "epmoe/core/config.h"
#include "epmoe/ep/ep_stats.h"
#include "epmoe/overlap/executor.h"

namespace epmoe {

struct LayerJobSpec {
  std::string preset = "deepseek-v3-tiny";
  std::string golden;            // safetensors layer with expected outputs; overrides preset
  bool fuse_shared = false;      // the shared expert as extra experts (seed 004)
  bool scale_on_output = false;  // with fuse_shared
  uint64_t seed = 1;             // random weights and tokens
  int ranks = 4;
  // Tokens per rank: "N" (every rank), "a,b,c" (one per rank) or "" (golden: an even split of
  // the file's tokens; else an uneven default with an empty rank).
  std::string tokens;
  int64_t max_tokens = 0;  // T_max; 0 = the largest count
  EpMode mode = EpMode::kNormal;
  std::string backend = "cpu";     // cpu | cuda
  std::string transport = "auto";  // cuda: auto | nccl | loopback (comm/launch.h chooses)
  bool fp8_dispatch = false;       // cuda: FP8 dispatch payload
  // cuda: expert GEMMs in "bf16" or "fp8" (e4m3, DeepSeek's block scales: an FP8 checkpoint is
  // uploaded as it is, a bf16 one quantised at load); the check's tolerance is then 8e-2.
  std::string weights = "bf16";
  std::string ll_transfer = "auto";  // cuda, low-latency: auto | device | host
  std::string overlap = "none";      // none | tbo | sbo | auto
  int iters = 3;
  int threads = 0;  // cpu: threads in all (0 = every core)
  bool check = true;
};

// Relative L2 and bitwise counts of the output against one reference.
struct OutputCheck {
  bool run = false;
  double rel_l2 = 0, tolerance = 0;
  int64_t mismatches = 0, values = 0;
  bool bitwise_required = false;
  int64_t tokens_with_other_ids = 0;  // routing: tokens whose expert-id set differs
  double max_weight_diff = 0;
  bool pass = true;
};

struct LayerJobReport {
  std::string source;  // "preset NAME" or the golden file
  MoeConfig config;
  EpConfig ep;
  std::vector<int64_t> tokens;    // per rank
  std::string device;             // cuda: the GPU; cpu: empty
  std::string transport;          // how the ranks were joined
  bool ll_over_host_api = false;  // cuda, low-latency: some rank moved tokens over the host API
  OverlapKind overlap = OverlapKind::kNone;
  std::string strategy;    // Strategy::describe()
  bool tree_ranks = true;  // R splits the experts along the reduction tree (bitwise EP)
  // Per rank: median µs per operation ("op" or "op/A", "op/B") and of the whole forward.
  std::vector<std::vector<std::pair<std::string, double>>> op_us;
  std::vector<double> layer_us;
  std::vector<EpTraffic> traffic;
  int64_t row_begin = 0, row_end = 0;  // rows this process computed (mpirun: its rank's)
  // Checks (spec.check): the overlapped run vs `none` (same tokens, same run, bitwise), the
  // output and routing vs the single-rank CPU reference, and vs the golden file.
  OutputCheck vs_none, vs_reference, vs_golden;
  bool pass = true;
};

// Throws epmoe::Error for bad input (unknown preset, malformed file, impossible split, ...).
LayerJobReport run_layer_job(const LayerJobSpec& spec);

}  // namespace epmoe
