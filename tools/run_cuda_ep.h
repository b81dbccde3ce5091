// `epmoe run --backend cuda --ranks N`: the layer under expert parallelism on GPUs, a thread per
// GPU over NCCL, R virtual ranks on one GPU over loopback, or one process per GPU under mpirun.
#pragma once

#include <string>
#include <vector>

#include "epmoe/ep/ep_cpu.h"
#include "epmoe/weights/moe_weights.h"

namespace epmoe::cli {

struct CudaEpResult {
  Tensor y, ids, w;                        // [T, H] f32, [T, K'] (rows of this process's ranks)
  std::vector<EpStageTimes> times;         // per rank (ms, medians)
  std::vector<EpTraffic> traffic;          // per rank
  std::string transport;
  int ll_host_ranks = 0;                   // low-latency ranks that moved tokens by the host API
  int64_t row_begin = 0, row_end = 0;      // rows this process computed (all, unless mpirun)
};

// transport: "auto" (nccl with a GPU per rank, else loopback), "nccl", "loopback".
// ll_transfer: "auto" | "device" | "host" (low-latency mode; see cuda::LlTransfer).
CudaEpResult run_cuda_ep(const MoeWeights& weights, const EpConfig& ep,
                         const std::vector<int64_t>& tokens, const Tensor& x_all,
                         const std::string& transport, bool fp8,
                         const std::string& ll_transfer, int iters);

}  // namespace epmoe::cli
