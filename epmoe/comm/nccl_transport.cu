// NCCL transport: communicators, symmetric windows with device peer tables, host-API exchange,
// bounded waits. See nccl_transport.h for the peer-table contract and the teardown order.
#include <dlfcn.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nccl_device/core.h>
#include <nccl_device/impl/core__funcs.h>
#include <nccl_device/impl/ptr__funcs.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "epmoe/comm/nccl_transport.h"
#include "epmoe/core/env.h"
#include "epmoe/cuda/cuda_check.h"
#include "epmoe/cuda/device.h"

#if EPMOE_WITH_MPI
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#endif

namespace epmoe::cuda {

namespace detail {

std::string nccl_error_text(ncclResult_t result) {
  const char* last = ncclGetLastError(nullptr);
  return fmt::format("{} (ncclResult_t {}); last NCCL error: {}", ncclGetErrorString(result),
                     int(result),
                     last && last[0] ? last : "none recorded (run with NCCL_DEBUG=WARN)");
}

struct NcclThreadGroup {
  explicit NcclThreadGroup(int n) : arrivals(new std::atomic<uint64_t>[n]()), size(n) {}
  std::atomic<int> failed_rank{-1};
  std::unique_ptr<std::atomic<uint64_t>[]> arrivals;  // [R]: host collectives each rank entered
  int size;
  // Window memory of failing ranks, freed by run_nccl_threads once every rank thread has joined
  // (until then a peer's kernel may still store into it).
  std::mutex deferred_mu;
  std::vector<std::function<void()>> deferred_frees;
};

struct NcclCommState {
  ncclComm_t comm = nullptr;
  int device = 0;
  int rank = 0;
  cudaStream_t stream = nullptr;
  std::atomic<bool> aborted{false};
  std::atomic<bool> abort_on_destroy{false};  // a rank of the thread group failed
  std::mutex mu;
  std::map<const void*, ncclWindow_t> windows;  // live windows by local address

  // Idempotent; after it the communicator is gone and no NCCL call may use it.
  void abort() {
    if (comm != nullptr && !aborted.exchange(true)) ncclCommAbort(comm);
  }
  ~NcclCommState();
};

}  // namespace detail

namespace {

using detail::NcclCommState;
using detail::NcclThreadGroup;
using Clock = std::chrono::steady_clock;

// Makes `device` current for the scope (deleters and destructors may run on any thread).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&prev_) != cudaSuccess) prev_ = -1;
    if (prev_ != device) cudaSetDevice(device);
  }
  ~DeviceGuard() {
    if (prev_ >= 0) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1;
};

// Polls `stream` until it drains or `timeout_ms` passes; true when it drained.
bool drain_stream_bounded(cudaStream_t stream, int64_t timeout_ms) {
  auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  while (true) {
    cudaError_t q = cudaStreamQuery(stream);
    if (q != cudaErrorNotReady) return q == cudaSuccess;
    if (Clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

void warn(const std::string& msg) { std::fprintf(stderr, "epmoe nccl: %s\n", msg.c_str()); }

// One block fills the peer table [R] of a new symmetric buffer. `win` may be null (NCCL gave no
// window: only the self entry is set). LSA index of world rank p is p - lsa_base.
__global__ void fill_peer_table_kernel(void** peers, ncclWindow_t win, void* local, int rank,
                                       int size, int lsa_base, int lsa_size) {
  for (int p = threadIdx.x; p < size; p += blockDim.x) {
    void* ptr = nullptr;
    if (p == rank) {
      ptr = local;
    } else if (win != nullptr && p >= lsa_base && p < lsa_base + lsa_size) {
      ptr = ncclGetLsaPointer(win, 0, p - lsa_base);
    }
    peers[p] = ptr;
  }
}

// out: [lsa_size] NCCL's addresses of the window for each LSA index.
__global__ void read_lsa_pointers_kernel(void** out, ncclWindow_t win, int lsa_size) {
  for (int i = threadIdx.x; i < lsa_size; i += blockDim.x) out[i] = ncclGetLsaPointer(win, 0, i);
}

void check_nccl_runtime_version() {
  int runtime = 0;
  EPMOE_NCCL_CHECK(ncclGetVersion(&runtime));
  // NOTES: the device API (ncclGetLsaPointer) is inlined from the headers and reads NCCL's window
  // struct directly; a library of another version lays it out differently (a 2.28.3 library
  // under 2.28.9 headers faulted on peer writes). Refuse any mismatch up front.
  Dl_info info{};
  const char* path = dladdr(reinterpret_cast<void*>(&ncclGetVersion), &info) && info.dli_fname
                         ? info.dli_fname
                         : "?";
  EPMOE_CHECK(runtime == NCCL_VERSION_CODE, kNccl,
              "NCCL library {} reports version code {} but epmoe was compiled against NCCL "
              "headers {}.{}.{} (code {}); point EPMOE_NCCL_ROOT (CMake) and the loader at one "
              "NCCL",
              path, runtime, NCCL_MAJOR, NCCL_MINOR, NCCL_PATCH, NCCL_VERSION_CODE);
}

size_t round_up(size_t x, size_t to) { return (x + to - 1) / to * to; }

}  // namespace

namespace detail {

NcclCommState::~NcclCommState() {
  if (comm == nullptr) return;
  DeviceGuard guard(device);
  if (stream != nullptr && !aborted.load() && !drain_stream_bounded(stream, wait_timeout_ms())) {
    warn(
        fmt::format("rank {}: work still pending on the stream at teardown after {} ms; "
                    "aborting the communicator",
                    rank, wait_timeout_ms()));
    abort();
  }
  if (!aborted.load()) {
    if (abort_on_destroy.load()) {
      abort();
    } else {
      ncclResult_t r = ncclCommFinalize(comm);
      if (r == ncclSuccess) r = ncclCommDestroy(comm);
      if (r != ncclSuccess) {
        warn(fmt::format("rank {}: communicator teardown failed: {}", rank, nccl_error_text(r)));
      }
    }
  }
  if (stream != nullptr) cudaStreamDestroy(stream);
}

}  // namespace detail

// --- NcclTransport --------------------------------------------------------------------------

NcclTransport::NcclTransport(ncclComm_t comm, int device, std::shared_ptr<NcclThreadGroup> group)
    : state_(std::make_shared<NcclCommState>()), group_(std::move(group)), device_(device) {
  state_->comm = comm;
  state_->device = device;
  EPMOE_CHECK(comm != nullptr, kInvalidArgument, "NcclTransport: null communicator");
  DeviceGuard guard(device_);
  EPMOE_NCCL_CHECK(ncclCommUserRank(comm, &rank_));
  EPMOE_NCCL_CHECK(ncclCommCount(comm, &size_));
  state_->rank = rank_;
  int comm_device = -1;
  EPMOE_NCCL_CHECK(ncclCommCuDevice(comm, &comm_device));
  EPMOE_CHECK(comm_device == device_, kInvalidArgument,
              "NcclTransport: rank {}'s communicator is on GPU {}, not GPU {}", rank_, comm_device,
              device_);
  EPMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&state_->stream, cudaStreamNonBlocking));

  // NOTES: NCCL's LSA team is the block of consecutive world ranks whose memory NCCL maps into
  // this process (one node: lsaSize = gcd of the per-node rank counts). ncclTeamLsa returns an
  // empty team when NCCL's device runtime cannot start; then only the self entry is reachable.
  ncclTeam_t lsa = ncclTeamLsa(comm);
  if (lsa.nRanks >= 1 && lsa.stride == 1 && lsa.rank >= 0 && lsa.rank < lsa.nRanks) {
    lsa_base_ = rank_ - lsa.rank;
    lsa_size_ = lsa.nRanks;
  } else {
    warn(
        fmt::format("rank {}: NCCL reported no LSA team ({} ranks, rank {}, stride {}); peers "
                    "are not load/store reachable",
                    rank_, lsa.nRanks, lsa.rank, lsa.stride));
    lsa_base_ = rank_;
    lsa_size_ = 1;
  }
  all_reachable_ = lsa_base_ == 0 && lsa_size_ == size_;
}

NcclTransport::~NcclTransport() {
  DeviceGuard guard(device_);
  if (group_ && group_->failed_rank.load() >= 0) state_->abort_on_destroy = true;
  if (!state_->aborted.load()) drain_stream_bounded(state_->stream, wait_timeout_ms());
  if (dev_scratch_ != nullptr) cudaFree(dev_scratch_);
  if (host_scratch_ != nullptr) cudaFreeHost(host_scratch_);
  // state_ (communicator, stream) goes when the last SymmetricBuffer of this rank goes.
}

cudaStream_t NcclTransport::stream() const { return state_->stream; }
ncclComm_t NcclTransport::comm() const { return state_->comm; }

void NcclTransport::check_usable(const char* what) const {
  EPMOE_CHECK(!state_->aborted.load(), kInvalidArgument,
              "rank {}: {} on an NCCL communicator that was aborted after an earlier failure",
              rank_, what);
}

void NcclTransport::wait_stream(const char* what, uint64_t collective_seq) {
  const int64_t budget_ms = wait_timeout_ms();
  auto deadline = Clock::now() + std::chrono::milliseconds(budget_ms);
  for (int spin = 0;; ++spin) {
    cudaError_t q = cudaStreamQuery(state_->stream);
    if (q == cudaSuccess) return;
    if (q != cudaErrorNotReady) {
      state_->abort();
      EPMOE_FAIL(kCuda, "rank {}: {}: stream failed: {} ({}); NCCL communicator aborted", rank_,
                 what, cudaGetErrorString(q), cudaGetErrorName(q));
    }
    ncclResult_t async = ncclSuccess;
    ncclResult_t r = ncclCommGetAsyncError(state_->comm, &async);
    if (r != ncclSuccess || (async != ncclSuccess && async != ncclInProgress)) {
      std::string text = detail::nccl_error_text(r != ncclSuccess ? r : async);
      state_->abort();
      EPMOE_FAIL(kNccl, "rank {}: {}: NCCL asynchronous error: {}; communicator aborted", rank_,
                 what, text);
    }
    if (group_) {
      int failed = group_->failed_rank.load();
      if (failed >= 0 && failed != rank_) {
        state_->abort();
        EPMOE_FAIL(kTimeout,
                   "rank {}: {} abandoned: rank {} of the group failed; communicator "
                   "aborted",
                   rank_, what, failed);
      }
    }
    if (Clock::now() > deadline) {
      std::string missing;
      if (group_ && collective_seq > 0) {
        std::vector<int> late;
        for (int r2 = 0; r2 < group_->size; ++r2) {
          if (group_->arrivals[r2].load() < collective_seq) late.push_back(r2);
        }
        missing = late.empty() ? "; every rank entered it (NCCL stalled)"
                               : fmt::format("; ranks {} never entered it", late);
      } else if (collective_seq > 0) {
        missing = "; which ranks are missing is not known across processes";
      }
      state_->abort();
      EPMOE_FAIL(kTimeout,
                 "rank {} of {}: {} did not complete within {} ms (EPMOE_TIMEOUT_MS){}; NCCL "
                 "communicator aborted",
                 rank_, size_, what, budget_ms, missing);
    }
    if (spin < 64) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
}

SymmetricBuffer NcclTransport::alloc_symmetric(size_t bytes) {
  check_usable("alloc_symmetric");
  DeviceGuard guard(device_);
  const size_t alloc_bytes = round_up(std::max<size_t>(bytes, 1), NCCL_WIN_REQUIRED_ALIGNMENT);
  cudaStream_t s = state_->stream;

  void* local = nullptr;
  EPMOE_NCCL_CHECK(ncclMemAlloc(&local, alloc_bytes));
  void** peers = nullptr;
  ncclWindow_t win = nullptr;
  try {
    // NOTES: zero before registering: registration ends with a barrier of all ranks, so no peer
    // can write into this buffer before the zeros have landed.
    EPMOE_CUDA_CHECK(cudaMemsetAsync(local, 0, alloc_bytes, s));
    wait_stream("alloc_symmetric (zeroing)");
    // Collective. A communicator without symmetric-memory support (NCCL_WIN_ENABLE=0, no cuMem,
    // GPUs without CUDA P2P) returns success and leaves the window null.
    EPMOE_NCCL_CHECK(
        ncclCommWindowRegister(state_->comm, local, alloc_bytes, &win, NCCL_WIN_COLL_SYMMETRIC));
    EPMOE_CUDA_CHECK(cudaMalloc(&peers, sizeof(void*) * size_));
    const int lsa_size = win != nullptr ? lsa_size_ : 0;
    fill_peer_table_kernel<<<1, 32 * std::min(32, (size_ + 31) / 32), 0, s>>>(
        peers, win, local, rank_, size_, lsa_base_, lsa_size);
    EPMOE_CUDA_CHECK_LAUNCH("fill_peer_table_kernel");
    wait_stream("alloc_symmetric (peer table)");
  } catch (...) {
    if (win != nullptr && !state_->aborted.load()) ncclCommWindowDeregister(state_->comm, win);
    if (peers != nullptr) cudaFree(peers);
    ncclMemFree(local);
    throw;
  }
  if (win == nullptr && size_ > 1) {
    if (all_reachable_) {
      warn(
          fmt::format("rank {}: NCCL registered no symmetric window (communicator without "
                      "symmetric-memory support); peers are not load/store reachable",
                      rank_));
    }
    all_reachable_ = false;
  }
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->windows[local] = win;
  }

  std::shared_ptr<NcclCommState> state = state_;
  std::weak_ptr<NcclThreadGroup> weak_group = group_;
  auto release = [state, win, peers, weak_group](void* p) {
    DeviceGuard g(state->device);
    auto free_memory = [state, peers, p] {
      DeviceGuard g2(state->device);
      ncclResult_t r = ncclMemFree(p);
      if (r != ncclSuccess) {
        warn(fmt::format("rank {}: ncclMemFree failed: {}", state->rank,
                         detail::nccl_error_text(r)));
      }
      cudaFree(peers);
    };
    // NOTES: released while an exception unwinds this rank: the rank is failing, and its peers'
    // kernels may still be storing into this buffer. Tell the group and abort the communicator at
    // once (peers inside NCCL get an error, not a hang); in a thread group the memory itself is
    // freed only after every rank's thread has joined.
    if (std::uncaught_exceptions() > 0) {
      const std::shared_ptr<NcclThreadGroup> group = weak_group.lock();
      if (group) {
        int expected = -1;
        group->failed_rank.compare_exchange_strong(expected, state->rank);
      }
      state->abort();
      {
        std::lock_guard<std::mutex> lock(state->mu);
        state->windows.erase(p);
      }
      if (group) {
        std::lock_guard<std::mutex> lock(group->deferred_mu);
        group->deferred_frees.push_back(free_memory);
      } else {
        free_memory();  // a process of its own: peers map the memory through their own handles
      }
      return;
    }
    if (!state->aborted.load() && !drain_stream_bounded(state->stream, wait_timeout_ms())) {
      warn(
          fmt::format("rank {}: stream still busy when a symmetric buffer was released; "
                      "aborting the communicator",
                      state->rank));
      state->abort();
    }
    {
      std::lock_guard<std::mutex> lock(state->mu);
      state->windows.erase(p);
    }
    // After an abort NCCL has already destroyed the window (and must not be called again).
    if (win != nullptr && !state->aborted.load()) {
      ncclResult_t r = ncclCommWindowDeregister(state->comm, win);
      if (r != ncclSuccess) {
        warn(fmt::format("rank {}: ncclCommWindowDeregister failed: {}", state->rank,
                         detail::nccl_error_text(r)));
      }
    }
    free_memory();
  };
  SymmetricBuffer buf;
  buf.local = local;
  buf.peers = peers;
  buf.bytes = bytes;
  buf.owner = std::shared_ptr<void>(local, release);
  return buf;
}

std::vector<void*> NcclTransport::nccl_lsa_pointers(const SymmetricBuffer& buf) const {
  check_usable("nccl_lsa_pointers");
  ncclWindow_t win = nullptr;
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    auto it = state_->windows.find(buf.local);
    EPMOE_CHECK(it != state_->windows.end(), kInvalidArgument,
                "nccl_lsa_pointers: {} is not a live symmetric buffer of rank {}", buf.local,
                rank_);
    win = it->second;
  }
  if (win == nullptr) return {};
  DeviceGuard guard(device_);
  void** dev = nullptr;
  EPMOE_CUDA_CHECK(cudaMalloc(&dev, sizeof(void*) * lsa_size_));
  read_lsa_pointers_kernel<<<1, 32, 0, state_->stream>>>(dev, win, lsa_size_);
  cudaError_t launch = cudaGetLastError();
  std::vector<void*> out(lsa_size_);
  cudaError_t copy = cudaMemcpyAsync(out.data(), dev, sizeof(void*) * lsa_size_,
                                     cudaMemcpyDeviceToHost, state_->stream);
  cudaError_t sync = cudaStreamSynchronize(state_->stream);
  cudaFree(dev);
  EPMOE_CUDA_CHECK(launch);
  EPMOE_CUDA_CHECK(copy);
  EPMOE_CUDA_CHECK(sync);
  return out;
}

void NcclTransport::all_to_all_v(const void* send, const size_t* send_bytes,
                                 const size_t* send_offsets, void* recv, const size_t* recv_bytes,
                                 const size_t* recv_offsets) {
  check_usable("all_to_all_v");
  DeviceGuard guard(device_);
  EPMOE_CHECK(send_bytes[rank_] == recv_bytes[rank_], kInvalidArgument,
              "all_to_all_v: rank {} sends {} bytes to itself but expects {}", rank_,
              send_bytes[rank_], recv_bytes[rank_]);
  cudaStream_t s = state_->stream;
  const char* src = static_cast<const char*>(send);
  char* dst = static_cast<char*>(recv);
  if (send_bytes[rank_] > 0) {
    EPMOE_CUDA_CHECK(cudaMemcpyAsync(dst + recv_offsets[rank_], src + send_offsets[rank_],
                                     send_bytes[rank_], cudaMemcpyDeviceToDevice, s));
  }
  int64_t remote = 0;
  EPMOE_NCCL_CHECK(ncclGroupStart());
  try {
    for (int p = 0; p < size_; ++p) {
      if (p == rank_) continue;
      if (send_bytes[p] > 0) {
        EPMOE_NCCL_CHECK(
            ncclSend(src + send_offsets[p], send_bytes[p], ncclUint8, p, state_->comm, s));
        remote += int64_t(send_bytes[p]);
      }
      if (recv_bytes[p] > 0) {
        EPMOE_NCCL_CHECK(
            ncclRecv(dst + recv_offsets[p], recv_bytes[p], ncclUint8, p, state_->comm, s));
      }
    }
  } catch (...) {
    ncclGroupEnd();  // leave NCCL's per-thread group state balanced
    throw;
  }
  EPMOE_NCCL_CHECK(ncclGroupEnd());
  host_api_remote_bytes_ += remote;
}

void NcclTransport::all_gather_host(const int64_t* in, int64_t* out, int n) {
  check_usable("all_gather_host");
  EPMOE_CHECK(n >= 0, kInvalidArgument, "all_gather_host: n = {} < 0", n);
  if (n == 0) return;
  DeviceGuard guard(device_);
  const uint64_t seq = ++collectives_;
  if (group_) group_->arrivals[rank_].store(seq);
  const size_t part = sizeof(int64_t) * size_t(n);
  const size_t total = part * size_t(size_);
  // Grown only here, after the previous users of the scratch have been waited for.
  if (dev_scratch_bytes_ < total) {
    if (dev_scratch_ != nullptr) cudaFree(dev_scratch_);
    dev_scratch_ = nullptr;
    dev_scratch_bytes_ = 0;
    EPMOE_CUDA_CHECK(cudaMalloc(&dev_scratch_, total));
    dev_scratch_bytes_ = total;
  }
  if (host_scratch_bytes_ < total) {
    if (host_scratch_ != nullptr) cudaFreeHost(host_scratch_);
    host_scratch_ = nullptr;
    host_scratch_bytes_ = 0;
    EPMOE_CUDA_CHECK(cudaMallocHost(&host_scratch_, total));
    host_scratch_bytes_ = total;
  }
  // NOTES: pinned staging both ways: a pageable device-to-host copy would block this thread
  // inside CUDA until the all-gather finished, outside the bounded wait.
  char* host = static_cast<char*>(host_scratch_);
  char* dev = static_cast<char*>(dev_scratch_);
  std::memcpy(host + part * rank_, in, part);
  cudaStream_t s = state_->stream;
  EPMOE_CUDA_CHECK(
      cudaMemcpyAsync(dev + part * rank_, host + part * rank_, part, cudaMemcpyHostToDevice, s));
  EPMOE_NCCL_CHECK(ncclAllGather(dev + part * rank_, dev, size_t(n), ncclInt64, state_->comm, s));
  EPMOE_CUDA_CHECK(cudaMemcpyAsync(host, dev, total, cudaMemcpyDeviceToHost, s));
  wait_stream(fmt::format("all_gather_host (host collective #{})", seq).c_str(), seq);
  std::memcpy(out, host, total);
}

void NcclTransport::synchronize(const char* what) {
  check_usable(what);
  DeviceGuard guard(device_);
  wait_stream(what);
}

void NcclTransport::barrier() {
  check_usable("barrier");
  DeviceGuard guard(device_);
  const uint64_t seq = ++collectives_;
  if (group_) group_->arrivals[rank_].store(seq);
  if (dev_scratch_bytes_ < sizeof(int64_t)) {
    if (dev_scratch_ != nullptr) cudaFree(dev_scratch_);
    dev_scratch_ = nullptr;
    EPMOE_CUDA_CHECK(cudaMalloc(&dev_scratch_, 256));
    dev_scratch_bytes_ = 256;
    EPMOE_CUDA_CHECK(cudaMemsetAsync(dev_scratch_, 0, 256, state_->stream));
  }
  EPMOE_NCCL_CHECK(ncclAllReduce(dev_scratch_, dev_scratch_, 1, ncclInt32, ncclSum, state_->comm,
                                 state_->stream));
  wait_stream(fmt::format("barrier (host collective #{})", seq).c_str(), seq);
}

// --- construction ---------------------------------------------------------------------------

void nccl_default_environment() {
  // NOTES: NVLink multicast (NVLS) can take the host's shared GPUs out of service; NCCL reads
  // its parameters once, so this must precede the first NCCL call of the process.
  setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);
}

void run_nccl_threads(int num_ranks, const std::function<void(GpuTransport&)>& fn) {
  EPMOE_CHECK(num_ranks >= 1, kInvalidArgument, "run_nccl_threads: num_ranks = {} < 1", num_ranks);
  const int gpus = device_count();
  EPMOE_CHECK(gpus >= num_ranks, kUnsupported,
              "run_nccl_threads: {} ranks need {} GPUs (one rank per GPU); this machine has {}",
              num_ranks, num_ranks, gpus);
  nccl_default_environment();
  check_nccl_runtime_version();

  std::vector<ncclComm_t> comms(num_ranks, nullptr);
  std::vector<int> devices(num_ranks);
  for (int r = 0; r < num_ranks; ++r) devices[r] = r;
  EPMOE_NCCL_CHECK(ncclCommInitAll(comms.data(), num_ranks, devices.data()));

  auto group = std::make_shared<NcclThreadGroup>(num_ranks);
  std::mutex error_mu;
  std::exception_ptr first_error;
  auto record = [&](int r, std::exception_ptr e) {
    int expected = -1;
    group->failed_rank.compare_exchange_strong(expected, r);
    std::lock_guard<std::mutex> lock(error_mu);
    if (!first_error) first_error = e;
  };

  std::vector<std::thread> threads;
  threads.reserve(num_ranks);
  for (int r = 0; r < num_ranks; ++r) {
    threads.emplace_back([&, r] {
      try {
        EPMOE_CUDA_CHECK(cudaSetDevice(devices[r]));
        NcclTransport transport(comms[r], devices[r], group);
        try {
          fn(transport);
        } catch (...) {
          // Marked before the transport goes, so its teardown aborts instead of finalizing
          // against peers that may still be waiting for this rank.
          record(r, std::current_exception());
          throw;
        }
      } catch (...) {
        record(r, std::current_exception());
      }
    });
  }
  for (auto& t : threads) t.join();
  // Every rank's kernels and threads are done: the failed ranks' windows can go.
  for (auto& free_memory : group->deferred_frees) free_memory();
  group->deferred_frees.clear();
  if (first_error) std::rethrow_exception(first_error);
}

bool launched_by_mpi() {
  return std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr || std::getenv("PMI_SIZE") != nullptr;
}

#if EPMOE_WITH_MPI
namespace {
void finalize_mpi_at_exit() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

void mpi_check(int rc, const char* what) {
  if (rc != MPI_SUCCESS) {
    char text[MPI_MAX_ERROR_STRING] = {0};
    int len = 0;
    MPI_Error_string(rc, text, &len);
    EPMOE_FAIL(kNccl, "{} failed: MPI error {}: {}", what, rc, text);
  }
}
}  // namespace

std::unique_ptr<NcclTransport> make_nccl_transport_mpi() {
  int initialized = 0;
  mpi_check(MPI_Initialized(&initialized), "MPI_Initialized");
  if (!initialized) {
    mpi_check(MPI_Init(nullptr, nullptr), "MPI_Init");
    std::atexit(finalize_mpi_at_exit);
  }
  int rank = 0, size = 1;
  mpi_check(MPI_Comm_rank(MPI_COMM_WORLD, &rank), "MPI_Comm_rank");
  mpi_check(MPI_Comm_size(MPI_COMM_WORLD, &size), "MPI_Comm_size");

  int local_rank = -1, local_size = 0;
  if (const char* v = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK")) local_rank = std::atoi(v);
  {
    MPI_Comm node;
    mpi_check(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node),
              "MPI_Comm_split_type");
    int node_rank = 0;
    MPI_Comm_rank(node, &node_rank);
    MPI_Comm_size(node, &local_size);
    MPI_Comm_free(&node);
    if (local_rank < 0) local_rank = node_rank;
  }
  const int gpus = device_count();
  // Agreed by every rank before anyone blocks in NCCL: one rank per GPU on each node.
  int ok = gpus > 0 && local_rank < gpus ? 1 : 0, all_ok = 0;
  mpi_check(MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD), "MPI_Allreduce");
  EPMOE_CHECK(all_ok == 1, kUnsupported,
              "mpirun: rank {} of {} (node-local rank {} of {}) sees {} GPU(s); every node needs "
              "one GPU per local rank{}",
              rank, size, local_rank, local_size, gpus, ok ? " (another rank lacks one)" : "");
  const int device = local_rank;
  EPMOE_CUDA_CHECK(cudaSetDevice(device));
  nccl_default_environment();
  check_nccl_runtime_version();

  // The id travels with rank 0's result, so a failure there fails every rank instead of
  // leaving them blocked in ncclCommInitRank.
  struct {
    int result;
    ncclUniqueId id;
  } msg{};
  if (rank == 0) msg.result = int(ncclGetUniqueId(&msg.id));
  mpi_check(MPI_Bcast(&msg, sizeof(msg), MPI_BYTE, 0, MPI_COMM_WORLD), "MPI_Bcast");
  EPMOE_CHECK(msg.result == int(ncclSuccess), kNccl,
              "rank 0 could not create the NCCL unique id: {}",
              ncclGetErrorString(ncclResult_t(msg.result)));
  ncclComm_t comm = nullptr;
  EPMOE_NCCL_CHECK(ncclCommInitRank(&comm, size, msg.id, rank));
  return std::make_unique<NcclTransport>(comm, device);
}
#else
std::unique_ptr<NcclTransport> make_nccl_transport_mpi() {
  EPMOE_FAIL(kUnsupported,
             "make_nccl_transport_mpi: this build has no MPI (CMake found none; EPMOE_WITH_MPI "
             "is off); use run_nccl_threads for one process");
}
#endif

}  // namespace epmoe::cuda
