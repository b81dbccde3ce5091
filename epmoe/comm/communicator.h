// The transport seen by the expert-parallel code. A Communicator is one rank's handle on a group
// of R ranks. Two kinds of exchange, matching DESIGN §5:
//  - host collectives (barrier, all_to_all_v): normal mode, like grouped ncclSend/ncclRecv;
//  - symmetric windows: every rank allocates the same number of bytes and may load/store into
//    its peers' windows through a table of peer pointers (low-latency mode, like NCCL windows and
//    ncclGetLsaPointer), with 64-bit flags for completion.
// The CPU backend implements it over threads and host memory (ThreadGroup); NCCL comes next.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace epmoe {

// Bytes this rank handed to each peer (self traffic is counted apart: it never crosses a wire).
struct TrafficCounter {
  std::vector<int64_t> bytes_to_peer;  // [R]
  void reset() { std::fill(bytes_to_peer.begin(), bytes_to_peer.end(), 0); }
  int64_t remote_bytes(int self) const {
    int64_t s = 0;
    for (size_t p = 0; p < bytes_to_peer.size(); ++p)
      if (int(p) != self) s += bytes_to_peer[p];
    return s;
  }
};

class Window {
 public:
  virtual ~Window() = default;
  virtual size_t bytes() const = 0;
  virtual void* local() = 0;
  virtual void* peer(int rank) = 0;  // load/store reachable pointer to rank's window
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Bounded: throws Error(kTimeout) naming the ranks that did not arrive.
  virtual void barrier() = 0;
  // Sends send_bytes[p] bytes at send + send_offsets[p] to every peer p and receives
  // recv_bytes[p] bytes from p into recv + recv_offsets[p]. Sizes must agree pairwise.
  virtual void all_to_all_v(const void* send, const size_t* send_bytes, const size_t* send_offsets,
                            void* recv, const size_t* recv_bytes, const size_t* recv_offsets) = 0;
  // Collective: every rank passes the same size; zero-initialised.
  virtual std::unique_ptr<Window> create_window(size_t bytes) = 0;

  // Bounded acquire-wait until (*flag & mask) == expected (flag in a window written by `peer`);
  // returns the flag's value. Throws Error(kTimeout) with rank, peer, expected and observed
  // values when the budget runs out, or at once when the transport knows the peer has failed.
  uint64_t wait_flag(const uint64_t* flag, uint64_t expected, int peer, const char* what,
                     uint64_t mask = ~uint64_t(0));
  // Budget of every wait; EPMOE_TIMEOUT_MS (default 10 s) unless set here.
  void set_wait_timeout_ms(int64_t ms) { timeout_ms_ = ms; }
  int64_t wait_timeout() const;

  TrafficCounter& traffic() { return traffic_; }

 protected:
  // A rank known to have failed (its waiters stop at once), or -1.
  virtual int failed_peer() const { return -1; }
  TrafficCounter traffic_;
  int64_t timeout_ms_ = -1;
};

void flag_store_release(uint64_t* flag, uint64_t value);
uint64_t flag_load_acquire(const uint64_t* flag);

}  // namespace epmoe
