// R virtual ranks on one GPU: the whole expert-parallel protocol, with the same kernels as the
// NCCL transport, on a machine with a single GPU. Each virtual rank has its own host thread,
// stream and buffers; peer tables hold plain device pointers.
#include <fmt/ranges.h>

#include <chrono>
#include <condition_variable>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "epmoe/comm/gpu_transport.h"
#include "epmoe/core/env.h"
#include "epmoe/cuda/cuda_check.h"

namespace epmoe::cuda {

namespace {

using Clock = std::chrono::steady_clock;

// The device memory of one collective alloc_symmetric: one buffer and one peer table per rank,
// freed together when the last rank's handle goes. NOTES: a rank that fails (or returns early)
// drops its handle while its peers' kernels may still store into its buffer; the buffer lives
// until those peers have dropped theirs too (the GPU twin of the CPU ThreadGroup's window sets).
struct LoopbackWindowSet {
  LoopbackWindowSet(int n, int dev)
      : device(dev), local(size_t(n), nullptr), peers(size_t(n), nullptr) {}
  ~LoopbackWindowSet() {
    cudaSetDevice(device);  // the last holder may be any thread
    for (void* p : local) cudaFree(p);
    for (void** p : peers) cudaFree(p);
  }
  LoopbackWindowSet(const LoopbackWindowSet&) = delete;
  LoopbackWindowSet& operator=(const LoopbackWindowSet&) = delete;
  int device;
  std::vector<void*> local;   // [R]
  std::vector<void**> peers;  // [R] device tables
};

struct LoopbackState {
  explicit LoopbackState(int n, int dev)
      : num_ranks(n), device(dev), slots(size_t(n)), entered(size_t(n), 0) {}
  const int num_ranks, device;
  std::mutex mutex;
  std::condition_variable cv;
  int arrived = 0;
  uint64_t generation = 0;
  int failed_rank = -1;
  struct Slot {
    const void* send = nullptr;
    const size_t* send_bytes = nullptr;
    const size_t* send_offsets = nullptr;
    cudaEvent_t ready = nullptr;  // the sender's data is complete on its stream
    const int64_t* values = nullptr;
  };
  std::vector<Slot> slots;
  std::vector<uint64_t> entered;  // [R]: barriers each rank has entered
  // The n-th alloc_symmetric of every rank registers into windows[n] (erased once every rank
  // holds it; whatever is left is dropped after the rank threads joined).
  std::map<uint64_t, std::shared_ptr<LoopbackWindowSet>> windows;

  // The first failing rank: every barrier of its peers stops at once.
  void mark_failed_locked(int rank) {
    if (failed_rank < 0) failed_rank = rank;
    cv.notify_all();
  }

  void barrier(int rank) {
    std::unique_lock<std::mutex> lock(mutex);
    const uint64_t gen = generation;
    ++entered[size_t(rank)];
    if (++arrived == num_ranks) {
      arrived = 0;
      ++generation;
      cv.notify_all();
      return;
    }
    const int64_t budget = wait_timeout_ms();
    const auto deadline = Clock::now() + std::chrono::milliseconds(budget);
    // NOTES: a rank that gives up leaves the barrier (un-arrives) under the lock, so late peers
    // cannot complete it and read buffers the leaving rank is about to free.
    while (generation == gen) {
      if (failed_rank >= 0) {
        --arrived;
        EPMOE_FAIL(kTimeout, "rank {}: barrier abandoned, peer rank {} failed", rank, failed_rank);
      }
      cv.wait_for(lock, std::chrono::milliseconds(20));
      if (generation == gen && Clock::now() > deadline) {
        std::vector<int> late;
        for (int r = 0; r < num_ranks; ++r)
          if (entered[size_t(r)] < entered[size_t(rank)]) late.push_back(r);
        --arrived;
        mark_failed_locked(rank);
        EPMOE_FAIL(kTimeout,
                   "rank {} waited {} ms (EPMOE_TIMEOUT_MS) at a loopback barrier: ranks {} "
                   "never arrived",
                   rank, budget, fmt::format("{}", fmt::join(late, ", ")));
      }
    }
  }
};

class LoopbackTransport final : public GpuTransport {
 public:
  LoopbackTransport(LoopbackState* s, int rank) : s_(s), rank_(rank) {
    EPMOE_CUDA_CHECK(cudaSetDevice(s->device));
    EPMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    EPMOE_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming));
  }
  ~LoopbackTransport() override {
    cudaEventDestroy(event_);
    cudaStreamDestroy(stream_);
  }
  int rank() const override { return rank_; }
  int size() const override { return s_->num_ranks; }
  int device() const override { return s_->device; }
  std::string name() const override { return "loopback"; }
  cudaStream_t stream() const override { return stream_; }

  SymmetricBuffer alloc_symmetric(size_t bytes) override {
    const uint64_t n = allocations_++;
    std::shared_ptr<LoopbackWindowSet> set;
    {
      std::lock_guard<std::mutex> lock(s_->mutex);
      auto& slot = s_->windows[n];
      if (!slot) slot = std::make_shared<LoopbackWindowSet>(size(), s_->device);
      set = slot;
    }
    // Registered in the set as soon as allocated: a failure below leaks nothing.
    void* local = nullptr;
    EPMOE_CUDA_CHECK(cudaMalloc(&local, bytes ? bytes : 16));
    {
      std::lock_guard<std::mutex> lock(s_->mutex);
      set->local[size_t(rank_)] = local;
    }
    EPMOE_CUDA_CHECK(cudaMemset(local, 0, bytes ? bytes : 16));
    s_->barrier(rank_);
    std::vector<void*> table(static_cast<size_t>(size()));
    {
      std::lock_guard<std::mutex> lock(s_->mutex);
      table = set->local;
    }
    void** peers = nullptr;
    EPMOE_CUDA_CHECK(cudaMalloc(&peers, sizeof(void*) * table.size()));
    {
      std::lock_guard<std::mutex> lock(s_->mutex);
      set->peers[size_t(rank_)] = peers;
    }
    EPMOE_CUDA_CHECK(
        cudaMemcpy(peers, table.data(), sizeof(void*) * table.size(), cudaMemcpyHostToDevice));
    EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
    s_->barrier(rank_);  // every rank holds the set: the table forgets it
    {
      std::lock_guard<std::mutex> lock(s_->mutex);
      s_->windows.erase(n);
    }
    SymmetricBuffer b;
    b.local = local;
    b.peers = peers;
    b.bytes = bytes;
    b.owner = set;
    return b;
  }

  void all_to_all_v(const void* send, const size_t* send_bytes, const size_t* send_offsets,
                    void* recv, const size_t* recv_bytes, const size_t* recv_offsets) override {
    EPMOE_CUDA_CHECK(cudaEventRecord(event_, stream_));
    auto& me = s_->slots[size_t(rank_)];
    me.send = send;
    me.send_bytes = send_bytes;
    me.send_offsets = send_offsets;
    me.ready = event_;
    s_->barrier(rank_);
    // NOTES: a size mismatch is reported after the closing barrier: this rank must not unwind
    // (and free its send buffer) while a peer may still be copying from it.
    std::string mismatch;
    for (int p = 0; p < size(); ++p) {
      const auto& peer = s_->slots[size_t(p)];
      if (peer.send_bytes[rank_] != recv_bytes[p]) {
        if (mismatch.empty())
          mismatch =
              fmt::format("all_to_all_v: rank {} sends {} bytes to rank {}, which expects {}", p,
                          peer.send_bytes[rank_], rank_, recv_bytes[p]);
        continue;
      }
      if (!recv_bytes[p]) continue;
      EPMOE_CUDA_CHECK(cudaStreamWaitEvent(stream_, peer.ready, 0));
      EPMOE_CUDA_CHECK(
          cudaMemcpyAsync(static_cast<char*>(recv) + recv_offsets[p],
                          static_cast<const char*>(peer.send) + peer.send_offsets[rank_],
                          recv_bytes[p], cudaMemcpyDeviceToDevice, stream_));
      if (p != rank_) host_api_remote_bytes_ += int64_t(recv_bytes[p]);  // counted at the receiver
    }
    // Senders may reuse their buffers once every receiver's copies are done.
    EPMOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
    s_->barrier(rank_);
    EPMOE_CHECK(mismatch.empty(), kInternal, "{}", mismatch);
  }

  void all_gather_host(const int64_t* in, int64_t* out, int n) override {
    s_->slots[size_t(rank_)].values = in;
    s_->barrier(rank_);
    for (int r = 0; r < size(); ++r)
      for (int i = 0; i < n; ++i) out[r * n + i] = s_->slots[size_t(r)].values[i];
    s_->barrier(rank_);
  }

  // Loopback transfers are local copies that all_to_all_v itself waits for; a stream here only
  // depends on other ranks through the kernels' own bounded flag waits.
  void synchronize(const char* /*what*/) override {
    EPMOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  void barrier() override {
    EPMOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
    s_->barrier(rank_);
  }

 private:
  LoopbackState* s_;
  int rank_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t event_ = nullptr;
  uint64_t allocations_ = 0;
};

}  // namespace

void run_loopback(int num_ranks, int device, const std::function<void(GpuTransport&)>& fn) {
  EPMOE_CHECK(num_ranks >= 1, kInvalidConfig, "loopback needs >= 1 rank, got {}", num_ranks);
  LoopbackState state(num_ranks, device);
  std::vector<std::exception_ptr> errors(static_cast<size_t>(num_ranks));
  std::vector<std::thread> threads;
  for (int r = 0; r < num_ranks; ++r) {
    threads.emplace_back([&, r] {
      try {
        LoopbackTransport t(&state, r);
        fn(t);
        EPMOE_CUDA_CHECK(cudaStreamSynchronize(t.stream()));
      } catch (...) {
        errors[size_t(r)] = std::current_exception();
        std::lock_guard<std::mutex> lock(state.mutex);
        state.mark_failed_locked(r);
      }
    });
  }
  for (auto& t : threads) t.join();
  state.windows.clear();  // sets whose creation never completed (every rank has joined)
  if (state.failed_rank >= 0) std::rethrow_exception(errors[size_t(state.failed_rank)]);
}

}  // namespace epmoe::cuda
