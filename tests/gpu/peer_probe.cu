#include <algorithm>

#include "epmoe/cuda/cuda_check.h"
#include "tests/gpu/peer_probe.h"

namespace epmoe::cuda::testing {
namespace {

__device__ uint32_t device_pattern(int writer, size_t i) {
  return (uint32_t(writer) + 1u) * 0x9E3779B1u ^ uint32_t(i) * 0x85EBCA77u ^ 0x5A5A0000u;
}

// peers: [R] device table; the peer's address is loaded on the device.
__global__ void write_peer_pattern_kernel(void* const* peers, int peer, int writer,
                                          size_t word_offset, size_t words) {
  uint32_t* dst = static_cast<uint32_t*>(peers[peer]) + word_offset;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < words;
       i += size_t(gridDim.x) * blockDim.x) {
    dst[i] = device_pattern(writer, i);
  }
  // System-scope release: the owner reads after a host barrier, across GPUs.
  __threadfence_system();
}

__global__ void write_pattern_kernel(uint32_t* dst, int writer, size_t words) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < words;
       i += size_t(gridDim.x) * blockDim.x) {
    dst[i] = device_pattern(writer, i);
  }
  __threadfence_system();
}

int blocks_for(size_t words) { return int(std::min<size_t>((words + 255) / 256, 1024)); }

}  // namespace

void launch_write_peer_pattern(const SymmetricBuffer& buf, int peer, int writer, size_t word_offset,
                               size_t words, cudaStream_t stream) {
  if (words == 0) return;
  write_peer_pattern_kernel<<<blocks_for(words), 256, 0, stream>>>(buf.peers, peer, writer,
                                                                   word_offset, words);
  EPMOE_CUDA_CHECK_LAUNCH("write_peer_pattern_kernel");
}

void launch_write_pattern(void* dst, int writer, size_t words, cudaStream_t stream) {
  if (words == 0) return;
  write_pattern_kernel<<<blocks_for(words), 256, 0, stream>>>(static_cast<uint32_t*>(dst), writer,
                                                              words);
  EPMOE_CUDA_CHECK_LAUNCH("write_pattern_kernel");
}

void read_peer_table(const SymmetricBuffer& buf, int num_ranks, void** out, cudaStream_t stream) {
  EPMOE_CUDA_CHECK(
      cudaMemcpyAsync(out, buf.peers, sizeof(void*) * num_ranks, cudaMemcpyDeviceToHost, stream));
  EPMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
}

}  // namespace epmoe::cuda::testing
