#include "epmoe/ep/ep_runner.h"

#include <algorithm>
#include <numeric>

#include "epmoe/comm/thread_comm.h"
#include "epmoe/core/stats.h"

namespace epmoe {

std::vector<TensorView> split_rows(const TensorView& x, const std::vector<int64_t>& sizes) {
  EPMOE_CHECK(x.shape.rank == 2, kInvalidArgument, "split_rows needs [T, H], got {}",
              x.shape.str());
  const int64_t total = std::accumulate(sizes.begin(), sizes.end(), int64_t(0));
  EPMOE_CHECK(total == x.shape[0], kInvalidArgument,
              "per-rank token counts sum to {}, but the input has {} tokens", total, x.shape[0]);
  std::vector<TensorView> out;
  int64_t row = 0;
  const size_t row_bytes = size_t(x.shape[1]) * dtype_size(x.dtype);
  for (int64_t n : sizes) {
    EPMOE_CHECK(n >= 0, kInvalidArgument, "negative token count {}", n);
    out.push_back(TensorView{static_cast<char*>(x.data) + size_t(row) * row_bytes,
                             {n, x.shape[1]}, x.dtype, x.device});
    row += n;
  }
  return out;
}

EpRunResult run_ep_cpu(const MoeWeights& weights, EpConfig ep, const std::vector<TensorView>& xs,
                       int iters, int threads_per_rank) {
  EPMOE_CHECK(int(xs.size()) == ep.num_ranks, kInvalidArgument,
              "{} per-rank inputs for {} ranks", xs.size(), ep.num_ranks);
  EPMOE_CHECK(iters >= 1, kInvalidArgument, "iterations must be >= 1, got {}", iters);
  if (ep.max_tokens_per_rank == 0)
    for (const auto& x : xs) ep.max_tokens_per_rank = std::max(ep.max_tokens_per_rank, x.shape[0]);
  ep.validate(weights.config);
  const int R = ep.num_ranks;
  EpRunResult res;
  res.y.resize(static_cast<size_t>(R));
  res.median_times.resize(static_cast<size_t>(R));
  res.traffic.resize(static_cast<size_t>(R));
  ThreadGroup group(R);
  group.run([&](Communicator& comm) {
    const int r = comm.rank();
    EpRankCpu rank(comm, weights, ep, threads_per_rank);
    std::vector<EpStageTimes> times(static_cast<size_t>(iters));
    for (int i = 0; i < iters; ++i) res.y[size_t(r)] = rank.forward(xs[size_t(r)], &times[size_t(i)]);
    auto med = [&](double EpStageTimes::*f) {
      std::vector<double> v;
      for (const auto& t : times) v.push_back(t.*f);
      return median(v);
    };
    EpStageTimes m;
    m.gate = med(&EpStageTimes::gate);
    m.dispatch = med(&EpStageTimes::dispatch);
    m.experts = med(&EpStageTimes::experts);
    m.combine = med(&EpStageTimes::combine);
    m.shared = med(&EpStageTimes::shared);
    m.total = med(&EpStageTimes::total);
    res.median_times[size_t(r)] = m;
    res.traffic[size_t(r)] = rank.last_traffic();
  });
  return res;
}

}  // namespace epmoe
