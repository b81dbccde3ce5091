// The NCCL GpuTransport: one rank per GPU, launched either as one thread per GPU in a single
// process (run_nccl_threads) or as one process per GPU under mpirun (make_nccl_transport_mpi).
//
// Symmetric buffers are ncclMemAlloc'd and registered as NCCL windows (ncclCommWindowRegister).
// Their peer tables hold, for each world rank p, the address through which THIS rank's kernels
// reach rank p's buffer:
//   peers[rank()]  == local (the ncclMemAlloc address; NCCL's own flat alias of it is not used);
//   peers[p]       == ncclGetLsaPointer(window, 0, p - lsa_base()) for p in this rank's LSA team
//                     (the ranks whose memory NCCL mapped into this process: one node);
//   peers[p]       == nullptr when p is not load/store reachable (another node, or NCCL declined
//                     symmetric windows). all_peers_reachable() says whether any entry is null:
//                     the low-latency EP path must check it and refuse (or fall back) up front.
//
// Teardown (per buffer, in SymmetricBuffer::owner's deleter, on the owning rank's device):
//   1. synchronise this rank's stream (kernels still reading or writing the buffer);
//   2. ncclCommWindowDeregister: unmaps this rank's views of the peers' buffers (local in 2.28;
//      a peer's physical memory stays alive while any rank still maps it, so a late peer write
//      never lands in freed memory);
//   3. ncclMemFree(local), then cudaFree(peers).
// Release buffers in the same order on every rank (NCCL keeps per-rank window bookkeeping that
// later registrations reuse). The communicator outlives every buffer: each buffer holds a
// reference to it, and ncclCommFinalize + ncclCommDestroy run when the last one goes (the
// transport object may be destroyed first). After a timeout or an NCCL error the communicator is
// aborted (ncclCommAbort) and every later call on the transport throws.
#pragma once

#include <nccl.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "epmoe/comm/gpu_transport.h"
#include "epmoe/core/error.h"

namespace epmoe::cuda {
namespace detail {
// "ncclInvalidUsage: invalid usage (run with NCCL_DEBUG=WARN for details); last NCCL error: ..."
std::string nccl_error_text(ncclResult_t result);
}  // namespace detail
}  // namespace epmoe::cuda

// EPMOE_NCCL_CHECK(ncclCall(...)): throws epmoe::Error(kNccl) naming the call, NCCL's error
// string and ncclGetLastError's message.
#define EPMOE_NCCL_CHECK(expr)                                         \
  do {                                                                 \
    ncclResult_t epmoe_nres_ = (expr);                                 \
    if (epmoe_nres_ != ncclSuccess) {                                  \
      EPMOE_FAIL(kNccl, "{} failed: {}", #expr,                        \
                 ::epmoe::cuda::detail::nccl_error_text(epmoe_nres_)); \
    }                                                                  \
  } while (0)

namespace epmoe::cuda {

namespace detail {
struct NcclCommState;    // the communicator, its device and stream; shared with live buffers
struct NcclThreadGroup;  // run_nccl_threads' shared state: first failure, barrier arrivals
}  // namespace detail

class NcclTransport final : public GpuTransport {
 public:
  // Takes ownership of an initialised communicator whose device is `device` (the caller has made
  // it current). `group` is set by run_nccl_threads only.
  NcclTransport(ncclComm_t comm, int device,
                std::shared_ptr<detail::NcclThreadGroup> group = nullptr);
  ~NcclTransport() override;
  NcclTransport(const NcclTransport&) = delete;
  NcclTransport& operator=(const NcclTransport&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int device() const override { return device_; }
  std::string name() const override { return "nccl"; }
  cudaStream_t stream() const override;

  SymmetricBuffer alloc_symmetric(size_t bytes) override;
  void all_to_all_v(const void* send, const size_t* send_bytes, const size_t* send_offsets,
                    void* recv, const size_t* recv_bytes, const size_t* recv_offsets) override;
  void all_gather_host(const int64_t* in, int64_t* out, int n) override;
  void barrier() override;
  void synchronize(const char* what) override;

  // True when every rank's symmetric buffers are load/store reachable from this rank's kernels
  // (no null entry in any peer table). Known from construction (NCCL's LSA team covers the whole
  // communicator) and lowered if NCCL declines a window registration.
  bool all_peers_reachable() const { return all_reachable_; }
  bool peers_reachable() const override { return all_reachable_; }
  // This rank's LSA team: world ranks [lsa_base(), lsa_base() + lsa_size()) share memory.
  int lsa_base() const { return lsa_base_; }
  int lsa_size() const { return lsa_size_; }
  ncclComm_t comm() const;

  // Diagnostics and tests: NCCL's own view of a buffer made by alloc_symmetric, read back from
  // the device: entry i = ncclGetLsaPointer(window, 0, i) for LSA index i (entry lsa rank is
  // NCCL's flat alias of `local`). Empty when NCCL gave no window.
  std::vector<void*> nccl_lsa_pointers(const SymmetricBuffer& buf) const;

 private:
  void check_usable(const char* what) const;
  // Waits for stream() with the EPMOE_TIMEOUT_MS budget, polling NCCL's asynchronous error and
  // the thread group's failure flag; aborts the communicator and throws on timeout or error.
  void wait_stream(const char* what, uint64_t collective_seq = 0);

  std::shared_ptr<detail::NcclCommState> state_;
  std::shared_ptr<detail::NcclThreadGroup> group_;
  int rank_ = 0, size_ = 1, device_ = 0;
  int lsa_base_ = 0, lsa_size_ = 1;
  bool all_reachable_ = true;
  uint64_t collectives_ = 0;  // host collectives so far (barrier, all_gather_host)
  // Scratch of all_gather_host and barrier (grown on demand).
  void* dev_scratch_ = nullptr;
  size_t dev_scratch_bytes_ = 0;
  void* host_scratch_ = nullptr;  // pinned
  size_t host_scratch_bytes_ = 0;
};

// Thread-per-GPU: creates num_ranks communicators on GPUs 0..num_ranks-1 (ncclCommInitAll), runs
// fn(transport) on a host thread per GPU (that GPU current), joins, and rethrows the first
// failure. When one rank fails, the others' bounded waits (barrier, all_gather_host) end early.
// Sets NCCL_NVLS_ENABLE=0 in the environment when it is unset (NVLink multicast stays off).
void run_nccl_threads(int num_ranks, const std::function<void(GpuTransport&)>& fn);

// True when this process was started by mpirun / a PMI launcher (OMPI_COMM_WORLD_SIZE or
// PMI_SIZE set).
bool launched_by_mpi();

// One process per GPU under mpirun: MPI_Init (if not yet initialised; MPI_Finalize then runs at
// exit), rank and size from MPI_COMM_WORLD, the GPU from the node-local rank
// (OMPI_COMM_WORLD_LOCAL_RANK, else MPI_Comm_split_type), the NCCL unique id broadcast from rank
// 0, ncclCommInitRank. Builds without MPI (EPMOE_WITH_MPI unset) throw Error(kUnsupported).
std::unique_ptr<NcclTransport> make_nccl_transport_mpi();

// Sets NCCL_NVLS_ENABLE=0 unless the variable is already set; call before any NCCL call.
void nccl_default_environment();

}  // namespace epmoe::cuda
