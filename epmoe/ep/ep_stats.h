// What a forward of the expert-parallel layer measured: the traffic each rank sent and the stage
// times of the runners that report stages (the CUDA runners; the CPU layer reports per operation,
// layer_rank.h OpTiming).
#pragma once

#include <cstdint>

namespace epmoe {

// What one forward sent to other ranks (self traffic excluded), as the transport counted it.
struct EpTraffic {
  int64_t dispatch_tokens = 0;  // token copies sent (one per (token, remote rank) pair)
  int64_t dispatch_bytes = 0;   // their bytes (row + ids + weights), count exchange excluded
  int64_t combine_bytes = 0;    // partial sums (normal) or expert rows (low-latency) sent back

  EpTraffic& operator+=(const EpTraffic& o) {
    dispatch_tokens += o.dispatch_tokens;
    dispatch_bytes += o.dispatch_bytes;
    combine_bytes += o.combine_bytes;
    return *this;
  }
};

// Stage wall times of one forward on one rank, milliseconds.
struct EpStageTimes {
  double gate = 0, dispatch = 0, experts = 0, combine = 0, shared = 0, total = 0;
};

}  // namespace epmoe
