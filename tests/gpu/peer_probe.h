// Probe kernels for transport tests: write a rank-tagged pattern into a peer's symmetric buffer
// through the device peer table (exactly how the EP kernels address peers), and the host-side
// expected values. Works over any GpuTransport (nccl or loopback).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "epmoe/comm/gpu_transport.h"

namespace epmoe::cuda::testing {

// Word i written by rank `writer`.
inline uint32_t probe_pattern(int writer, size_t i) {
  return (uint32_t(writer) + 1u) * 0x9E3779B1u ^ uint32_t(i) * 0x85EBCA77u ^ 0x5A5A0000u;
}

// Writes probe_pattern(writer, i) for i in [0, words) at word offset `word_offset` of the buffer
// of rank `peer`, reading that rank's address from buf.peers on the device. Async on `stream`.
void launch_write_peer_pattern(const SymmetricBuffer& buf, int peer, int writer, size_t word_offset,
                               size_t words, cudaStream_t stream);

// The same, through a raw device address (NCCL's own view of a window, in tests).
void launch_write_pattern(void* dst, int writer, size_t words, cudaStream_t stream);

// Host copy of the device peer table [num_ranks].
void read_peer_table(const SymmetricBuffer& buf, int num_ranks, void** out, cudaStream_t stream);

}  // namespace epmoe::cuda::testing
