#include "epmoe/comm/thread_comm.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <thread>

#include "epmoe/core/env.h"
#include "epmoe/core/error.h"

namespace epmoe {

namespace {
using Clock = std::chrono::steady_clock;
}  // namespace

struct ThreadGroup::State {
  explicit State(int n) : num_ranks(n), arrived(0), generation(0), posts(size_t(n)) {}
  const int num_ranks;
  std::mutex mutex;
  std::condition_variable cv;
  int arrived;
  uint64_t generation;
  std::atomic<int> failed_rank{-1};
  std::vector<char> arrived_mask;
  // all_to_all_v: each rank posts its send side; peers pull.
  struct Post {
    const void* send = nullptr;
    const size_t* send_bytes = nullptr;
    const size_t* send_offsets = nullptr;
  };
  std::vector<Post> posts;
  // windows: one slot per rank per creation.
  std::vector<void*> window_ptrs;

  void barrier(int rank, int64_t timeout_ms) {
    std::unique_lock<std::mutex> lock(mutex);
    if (arrived_mask.empty()) arrived_mask.assign(size_t(num_ranks), 0);
    const uint64_t gen = generation;
    arrived_mask[size_t(rank)] = 1;
    if (++arrived == num_ranks) {
      arrived = 0;
      arrived_mask.assign(size_t(num_ranks), 0);
      ++generation;
      cv.notify_all();
      return;
    }
    const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
    while (generation == gen) {
      const int f = failed_rank.load();
      if (f >= 0) EPMOE_FAIL(kTimeout, "rank {}: barrier abandoned, peer rank {} failed", rank, f);
      if (cv.wait_until(lock, std::min(deadline, Clock::now() + std::chrono::milliseconds(20))) ==
              std::cv_status::timeout &&
          Clock::now() > deadline) {
        std::string missing;
        for (int r = 0; r < num_ranks; ++r)
          if (!arrived_mask[size_t(r)]) missing += (missing.empty() ? "" : ",") + std::to_string(r);
        EPMOE_FAIL(kTimeout, "rank {} waited {} ms at a barrier: {} of {} ranks arrived, missing {}",
                   rank, timeout_ms, arrived, num_ranks, missing);
      }
    }
  }
};

namespace {

class HostWindow final : public Window {
 public:
  HostWindow(std::vector<void*> ptrs, int rank, size_t bytes, bool owner)
      : ptrs_(std::move(ptrs)), rank_(rank), bytes_(bytes), owner_(owner) {}
  ~HostWindow() override {
    if (owner_) std::free(ptrs_[size_t(rank_)]);
  }
  size_t bytes() const override { return bytes_; }
  void* local() override { return ptrs_[size_t(rank_)]; }
  void* peer(int r) override {
    EPMOE_CHECK(r >= 0 && r < int(ptrs_.size()), kInvalidArgument, "peer rank {} outside [0, {})",
                r, ptrs_.size());
    return ptrs_[size_t(r)];
  }

 private:
  std::vector<void*> ptrs_;
  int rank_;
  size_t bytes_;
  bool owner_;
};

class ThreadComm final : public Communicator {
 public:
  ThreadComm(ThreadGroup::State* s, int rank) : s_(s), rank_(rank) {
    traffic_.bytes_to_peer.assign(size_t(s->num_ranks), 0);
  }
  int rank() const override { return rank_; }
  int size() const override { return s_->num_ranks; }
  void barrier() override { s_->barrier(rank_, wait_timeout()); }

  void all_to_all_v(const void* send, const size_t* send_bytes, const size_t* send_offsets,
                    void* recv, const size_t* recv_bytes, const size_t* recv_offsets) override {
    s_->posts[size_t(rank_)] = {send, send_bytes, send_offsets};
    for (int p = 0; p < size(); ++p) traffic_.bytes_to_peer[size_t(p)] += int64_t(send_bytes[p]);
    barrier();  // every post visible
    for (int p = 0; p < size(); ++p) {
      const auto& post = s_->posts[size_t(p)];
      EPMOE_CHECK(post.send_bytes[rank_] == recv_bytes[p], kInternal,
                  "all_to_all_v: rank {} sends {} bytes to rank {}, which expects {}", p,
                  post.send_bytes[rank_], rank_, recv_bytes[p]);
      if (recv_bytes[p])
        std::memcpy(static_cast<char*>(recv) + recv_offsets[p],
                    static_cast<const char*>(post.send) + post.send_offsets[rank_], recv_bytes[p]);
    }
    barrier();  // nobody reuses its send buffer while a peer still reads it
  }

  int failed_peer() const override { return s_->failed_rank.load(); }

  std::unique_ptr<Window> create_window(size_t bytes) override {
    const size_t alloc = ((bytes + 63) / 64) * 64 + 64;
    void* mine = std::aligned_alloc(64, alloc);
    EPMOE_CHECK(mine != nullptr, kInvalidArgument, "cannot allocate a {}-byte window", bytes);
    std::memset(mine, 0, alloc);
    {
      std::lock_guard<std::mutex> lock(s_->mutex);
      if (s_->window_ptrs.size() != size_t(size())) s_->window_ptrs.assign(size_t(size()), nullptr);
      s_->window_ptrs[size_t(rank_)] = mine;
    }
    barrier();
    std::vector<void*> ptrs;
    {
      std::lock_guard<std::mutex> lock(s_->mutex);
      ptrs = s_->window_ptrs;
    }
    barrier();  // all copied before the next creation overwrites the table
    return std::make_unique<HostWindow>(std::move(ptrs), rank_, bytes, true);
  }

 private:
  ThreadGroup::State* s_;
  int rank_;
};

}  // namespace

ThreadGroup::ThreadGroup(int num_ranks) {
  EPMOE_CHECK(num_ranks >= 1, kInvalidConfig, "a thread group needs >= 1 rank, got {}", num_ranks);
  state_ = std::make_shared<State>(num_ranks);
}

ThreadGroup::~ThreadGroup() = default;

int ThreadGroup::size() const { return state_->num_ranks; }

void ThreadGroup::run(const std::function<void(Communicator&)>& fn) {
  const int n = state_->num_ranks;
  state_->failed_rank = -1;
  std::vector<std::exception_ptr> errors(static_cast<size_t>(n));
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(n));
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([this, r, &fn, &errors] {
      try {
        ThreadComm comm(state_.get(), r);
        fn(comm);
      } catch (...) {
        errors[size_t(r)] = std::current_exception();
        int expected = -1;
        state_->failed_rank.compare_exchange_strong(expected, r);
        state_->cv.notify_all();
      }
    });
  }
  for (auto& t : threads) t.join();
  // Reset the barrier for the next run (a failed run may leave ranks counted as arrived).
  state_->arrived = 0;
  state_->arrived_mask.clear();
  // Prefer the root cause (the first failure) over the peers that gave up waiting for it.
  const int first = state_->failed_rank.load();
  if (first >= 0) std::rethrow_exception(errors[size_t(first)]);
}

}  // namespace epmoe
