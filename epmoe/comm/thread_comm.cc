#include "epmoe/comm/thread_comm.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <string>
#include <thread>

#include "epmoe/core/checked.h"
#include "epmoe/core/env.h"
#include "epmoe/core/error.h"

namespace epmoe {

namespace {
using Clock = std::chrono::steady_clock;
}  // namespace

// The memory of one collective window creation: one block per rank, freed together.
struct WindowSet {
  explicit WindowSet(int n) : ptrs(size_t(n), nullptr), budget(size_t(n)) {}
  ~WindowSet() {
    for (void* p : ptrs) std::free(p);
  }
  WindowSet(const WindowSet&) = delete;
  WindowSet& operator=(const WindowSet&) = delete;
  std::vector<void*> ptrs;                // [R]
  std::vector<BufferReservation> budget;  // [R] each block's share of the buffer budget
};

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
  // windows: the n-th create_window of a run registers into windows[n]. The set owns the memory
  // of every rank's window; each rank's handle shares it, so a failing rank that drops its handle
  // frees nothing a peer may still write (the set goes with the last handle, or at the end of
  // run() if setup never finished).
  std::map<uint64_t, std::shared_ptr<WindowSet>> windows;

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
    // NOTES: a rank that gives up leaves the barrier (un-arrives) under the lock, so the late
    // peers can never complete it and go on reading memory the leaving rank is about to free.
    auto leave = [&] {
      arrived_mask[size_t(rank)] = 0;
      --arrived;
    };
    while (generation == gen) {
      const int f = failed_rank.load();
      if (f >= 0) {
        leave();
        EPMOE_FAIL(kTimeout, "rank {}: barrier abandoned, peer rank {} failed", rank, f);
      }
      if (cv.wait_until(lock, std::min(deadline, Clock::now() + std::chrono::milliseconds(20))) ==
              std::cv_status::timeout &&
          Clock::now() > deadline) {
        std::string missing;
        for (int r = 0; r < num_ranks; ++r)
          if (!arrived_mask[size_t(r)]) missing += (missing.empty() ? "" : ",") + std::to_string(r);
        const int arrived_now = arrived;
        leave();
        mark_failed_locked(rank);
        EPMOE_FAIL(kTimeout,
                   "rank {} waited {} ms at a barrier: {} of {} ranks arrived, missing {}", rank,
                   timeout_ms, arrived_now, num_ranks, missing);
      }
    }
  }

  // The first failing rank is the group's failed rank: every wait of its peers stops at once.
  void mark_failed_locked(int rank) {
    int expected = -1;
    failed_rank.compare_exchange_strong(expected, rank);
    cv.notify_all();
  }
  void mark_failed(int rank) {
    std::lock_guard<std::mutex> lock(mutex);
    mark_failed_locked(rank);
  }
};

namespace {

// One rank's handle on a window set; the memory lives until every rank's handle is gone.
class HostWindow final : public Window {
 public:
  HostWindow(std::shared_ptr<WindowSet> set, int rank, size_t bytes)
      : set_(std::move(set)), rank_(rank), bytes_(bytes) {}
  size_t bytes() const override { return bytes_; }
  void* local() override { return set_->ptrs[size_t(rank_)]; }
  void* peer(int r) override {
    EPMOE_CHECK(r >= 0 && r < int(set_->ptrs.size()), kInvalidArgument,
                "peer rank {} outside [0, {})", r, set_->ptrs.size());
    return set_->ptrs[size_t(r)];
  }

 private:
  std::shared_ptr<WindowSet> set_;
  int rank_;
  size_t bytes_;
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
    // NOTES: a size mismatch is reported only after the closing barrier: a rank must not unwind
    // (and free its send buffer) while a peer may still be copying from it.
    std::string mismatch;
    for (int p = 0; p < size(); ++p) {
      const auto& post = s_->posts[size_t(p)];
      if (post.send_bytes[rank_] != recv_bytes[p]) {
        if (mismatch.empty())
          mismatch =
              fmt::format("all_to_all_v: rank {} sends {} bytes to rank {}, which expects {}", p,
                          post.send_bytes[rank_], rank_, recv_bytes[p]);
        continue;
      }
      if (recv_bytes[p])
        std::memcpy(static_cast<char*>(recv) + recv_offsets[p],
                    static_cast<const char*>(post.send) + post.send_offsets[rank_], recv_bytes[p]);
    }
    barrier();  // nobody reuses its send buffer while a peer still reads it
    EPMOE_CHECK(mismatch.empty(), kInternal, "{}", mismatch);
  }

  int failed_peer() const override { return s_->failed_rank.load(); }

  std::unique_ptr<Window> create_window(size_t bytes) override {
    BufferReservation reserved(int64_t(std::min<size_t>(bytes, size_t(INT64_MAX))),
                               fmt::format("rank {}'s symmetric window", rank_));
    const size_t alloc = checked_add(bytes, size_t(63 + 64), "window size") / 64 * 64;
    const uint64_t n = creations_++;
    std::shared_ptr<WindowSet> set;
    {
      std::lock_guard<std::mutex> lock(s_->mutex);
      auto& slot = s_->windows[n];
      if (!slot) slot = std::make_shared<WindowSet>(size());
      set = slot;
    }
    // Registered in the set at once: a timeout at the barrier below leaks nothing.
    void* mine = std::aligned_alloc(64, alloc);
    EPMOE_CHECK(mine != nullptr, kInvalidArgument, "rank {} cannot allocate a {}-byte window",
                rank_, bytes);
    std::memset(mine, 0, alloc);
    {
      std::lock_guard<std::mutex> lock(s_->mutex);
      set->ptrs[size_t(rank_)] = mine;
      set->budget[size_t(rank_)] = std::move(reserved);
    }
    barrier();  // every block in the set
    {
      std::lock_guard<std::mutex> lock(s_->mutex);
      s_->windows.erase(n);  // every rank holds the set now; the table forgets it
    }
    return std::make_unique<HostWindow>(std::move(set), rank_, bytes);
  }

 private:
  ThreadGroup::State* s_;
  int rank_;
  uint64_t creations_ = 0;
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
        state_->mark_failed(r);
      }
    });
  }
  for (auto& t : threads) t.join();
  // Reset the barrier for the next run (a failed run may leave ranks counted as arrived) and drop
  // window sets whose creation never completed (every rank thread has joined: nobody writes).
  state_->arrived = 0;
  state_->arrived_mask.clear();
  state_->windows.clear();
  // Prefer the root cause (the first failure) over the peers that gave up waiting for it.
  const int first = state_->failed_rank.load();
  if (first >= 0) std::rethrow_exception(errors[size_t(first)]);
}

}  // namespace epmoe
