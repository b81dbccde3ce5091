// The transport seen by the CUDA expert-parallel kernels. One GpuTransport is one rank's handle on
// a group of R GPU ranks. The dispatch/combine kernels never call a transport: they address peers'
// receive buffers and flags through a device table of peer pointers (SymmetricBuffer::peers), so
// one set of kernels runs over
//   - "nccl":     one rank per GPU; symmetric windows from ncclMemAlloc + ncclCommWindowRegister,
//                 peer pointers from NCCL's device API; host collectives through NCCL;
//   - "loopback": R virtual ranks on ONE GPU, each with its own buffers and stream; the table
//                 holds plain device pointers (NCCL refuses two ranks on one GPU).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

namespace epmoe::cuda {

// Memory every rank of the group allocated with the same size, reachable by load/store from every
// rank's kernels. Zero-initialised. Freed (collectively for nccl) when the last handle goes.
struct SymmetricBuffer {
  void* local = nullptr;         // this rank's buffer (device memory)
  void* const* peers = nullptr;  // device array [R]: peers[r] = rank r's buffer, as seen from here
  size_t bytes = 0;
  std::shared_ptr<void> owner;  // keeps the allocation alive
};

// Where a device-side wait that ran out of time reports what it waited for (pinned host memory,
// written by the kernel, read by the host after the stream synchronises).
struct DeviceWaitError {
  int failed;  // 0 = fine
  int rank, peer;
  unsigned long long expected, observed;
  char what[40];
  int index;  // kernel-specific detail (a GEMM signal wait: the m-block)
};

class GpuTransport {
 public:
  virtual ~GpuTransport() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual int device() const = 0;           // CUDA device this rank's work runs on
  virtual std::string name() const = 0;     // "nccl" | "loopback"
  virtual cudaStream_t stream() const = 0;  // this rank's stream (the transport's own work too)

  // Collective: every rank asks for the same size.
  virtual SymmetricBuffer alloc_symmetric(size_t bytes) = 0;

  // Normal mode's host-API exchange, ordered on stream(): sends send_bytes[p] bytes at
  // send + send_offsets[p] to each peer p; receives recv_bytes[p] from p into
  // recv + recv_offsets[p]. Device buffers; size arrays on the host; sizes agree pairwise.
  virtual void all_to_all_v(const void* send, const size_t* send_bytes, const size_t* send_offsets,
                            void* recv, const size_t* recv_bytes, const size_t* recv_offsets) = 0;

  // Every rank contributes n int64 from the host; out (host, [R * n]) gets all of them in rank
  // order. Synchronous (normal mode learns its receive sizes through it: that mode may sync).
  virtual void all_gather_host(const int64_t* in, int64_t* out, int n) = 0;

  // Host-side barrier of the group (bounded: throws Error(kTimeout) naming missing ranks).
  virtual void barrier() = 0;

  // Waits for this rank's stream, bounded where the stream can depend on other ranks (nccl:
  // EPMOE_TIMEOUT_MS, then Error(kTimeout) naming `what`, and the communicator is aborted).
  virtual void synchronize(const char* what) = 0;

  // Whether every peer's symmetric buffers are load/store reachable from this rank's kernels
  // (one node). Low-latency mode needs it; normal mode only uses the host API.
  virtual bool peers_reachable() const { return true; }

  // Bytes this rank's transfers handed to other ranks through the host API (self excluded).
  int64_t host_api_remote_bytes() const { return host_api_remote_bytes_; }

 protected:
  int64_t host_api_remote_bytes_ = 0;
};

// Runs fn(transport) for each of R virtual ranks on one GPU, a host thread per rank, and joins;
// the first failure is rethrown (the other ranks' bounded waits end early).
void run_loopback(int num_ranks, int device, const std::function<void(GpuTransport&)>& fn);

}  // namespace epmoe::cuda
