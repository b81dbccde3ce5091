// A consumer of the sm90 GEMM's per-tile completion signals, for tests: the way the
// single-batch-overlap combine-send reads them.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace epmoe::cuda::testing {

// `blocks` CTAs walk the entries (e, m) of signal [E_loc · nb]; for each m-block with rows
// (m·block_m < count[e]) one thread waits (acquire loads, bounded by timeout_cycles) until the
// entry reaches `threshold`, then the CTA copies those rows of out [E_loc, M_max, cols] bf16
// into snapshot (same shape). On timeout it records the entry in *failed (first one wins, -1
// stays when none) and copies nothing. Launched on `stream` before the GEMM, it sees each block
// the moment it is published.
void launch_signal_consumer(uint16_t* snapshot, int* failed, const uint16_t* out,
                            const int32_t* signal, const int32_t* count, int e_loc, int64_t m_max,
                            int64_t cols, int block_m, int threshold, long long timeout_cycles,
                            int blocks, cudaStream_t stream);

}  // namespace epmoe::cuda::testing
