#include "epmoe/layer/layer_runner_cpu.h"

#include <algorithm>
#include <chrono>
#include <map>
#include <numeric>

#include "epmoe/comm/thread_comm.h"
#include "epmoe/core/checked.h"
#include "epmoe/core/stats.h"
#include "epmoe/layer/layer_rank_cpu.h"

namespace epmoe {

std::vector<TensorView> split_rows(const TensorView& x, const std::vector<int64_t>& sizes) {
  EPMOE_CHECK(x.shape.rank == 2, kInvalidArgument, "split_rows needs [T, H], got {}",
              x.shape.str());
  int64_t total = 0;
  for (int64_t n : sizes) {
    EPMOE_CHECK(n >= 0, kInvalidArgument, "negative token count {}", n);
    total = checked_add(total, n, "total token count");
  }
  EPMOE_CHECK(total == x.shape[0], kInvalidArgument,
              "per-rank token counts sum to {}, but the input has {} tokens", total, x.shape[0]);
  std::vector<TensorView> out;
  int64_t row = 0;
  const size_t row_bytes = size_t(x.shape[1]) * dtype_size(x.dtype);
  for (int64_t n : sizes) {
    out.push_back(TensorView{
        static_cast<char*>(x.data) + size_t(row) * row_bytes, {n, x.shape[1]}, x.dtype, x.device});
    row += n;
  }
  return out;
}

LayerRunResult run_layer_cpu(const MoeWeights& weights, EpConfig ep,
                             const std::vector<RankInput>& inputs, const LayerRunOptions& o) {
  EPMOE_CHECK(int(inputs.size()) == ep.num_ranks, kInvalidArgument,
              "{} per-rank inputs for {} ranks", inputs.size(), ep.num_ranks);
  EPMOE_CHECK(o.iters >= 1, kInvalidArgument, "iterations must be >= 1, got {}", o.iters);
  if (ep.max_tokens_per_rank == 0)
    for (const auto& in : inputs)
      if (in.x.shape.rank == 2)
        ep.max_tokens_per_rank = std::max(ep.max_tokens_per_rank, in.x.shape[0]);
  ep.validate(weights.config);
  const Strategy strategy = make_strategy(o.overlap, ep.mode, o.user);
  const int R = ep.num_ranks;

  // Row names: the layer's operations in LayerOp order, then the strategy's user operations.
  LayerRunResult res;
  res.strategy = strategy.describe();
  for (int i = 0; i < kNumLayerOps; ++i) res.op_names.push_back(layer_op_name(LayerOp(i)));
  for (const Step& st : strategy.steps)
    if (st.kind == Step::Kind::kUser) res.op_names.push_back(st.name);
  const size_t num_rows = res.op_names.size();
  res.y.resize(size_t(R));
  res.topk_ids.resize(size_t(R));
  res.topk_weights.resize(size_t(R));
  res.op_us.assign(size_t(R), std::vector<double>(num_rows, 0.0));
  res.total_us.assign(size_t(R), 0.0);
  res.traffic.resize(size_t(R));

  ThreadGroup group(R);
  group.run([&](Communicator& comm) {
    if (o.wait_timeout_ms >= 0) comm.set_wait_timeout_ms(o.wait_timeout_ms);
    const size_t r = size_t(comm.rank());
    MoeLayerRankCpu layer(comm, weights, ep, o.threads_per_rank);
    layer.set_tracing(true);
    const RankInput& in = inputs[r];
    if (in.topk_ids.data != nullptr || in.topk_ids.shape.rank != 0)
      layer.set_input(in.x, in.topk_ids, in.topk_weights);
    else
      layer.set_input(in.x);
    std::vector<std::vector<double>> per_iter(num_rows);
    std::vector<double> totals;
    for (int it = 0; it < o.iters; ++it) {
      const auto t0 = std::chrono::steady_clock::now();
      execute(layer, strategy);
      totals.push_back(
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
      std::vector<double> sum(num_rows, 0.0);
      for (const OpTiming& t : layer.last_trace()) {
        const auto row = std::find(res.op_names.begin(), res.op_names.end(), t.name);
        if (row != res.op_names.end())
          sum[size_t(row - res.op_names.begin())] += t.end_us - t.start_us;
      }
      for (size_t i = 0; i < num_rows; ++i) per_iter[i].push_back(sum[i]);
    }
    for (size_t i = 0; i < num_rows; ++i) res.op_us[r][i] = median(per_iter[i]);
    res.total_us[r] = median(totals);
    res.y[r] = to_dtype(layer.output(), DType::kF32);
    res.topk_ids[r] = to_dtype(layer.topk_ids(), DType::kI32);
    res.topk_weights[r] = to_dtype(layer.topk_weights(), DType::kF32);
    res.traffic[r] = layer.last_traffic();
  });
  return res;
}

}  // namespace epmoe
