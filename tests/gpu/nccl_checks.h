// Checks of the NCCL transport shared by the GoogleTest suite (thread-per-GPU) and the mpirun
// smoke program (process-per-GPU). Each check is collective (every rank calls it) and throws
// epmoe::Error(kInternal) naming the rank and the first mismatch; a throwing rank makes the other
// ranks' bounded waits end early.
#pragma once

#include <fmt/format.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "epmoe/comm/nccl_transport.h"
#include "epmoe/cuda/cuda_check.h"
#include "tests/gpu/peer_probe.h"

namespace epmoe::cuda::testing {

struct DeviceBytes {
  explicit DeviceBytes(size_t n) : bytes(n) {
    void* p = nullptr;
    EPMOE_CUDA_CHECK(cudaMalloc(&p, n ? n : 1));
    ptr.reset(static_cast<uint8_t*>(p));
  }
  struct Free {
    void operator()(uint8_t* p) const { cudaFree(p); }
  };
  std::unique_ptr<uint8_t, Free> ptr;
  size_t bytes;
};

inline std::string nccl_env_summary() {
  auto get = [](const char* n) {
    const char* v = std::getenv(n);
    return v ? v : "unset";
  };
  return fmt::format(
      "NCCL_P2P_DISABLE={} NCCL_SHM_DISABLE={} NCCL_WIN_ENABLE={} "
      "NCCL_NVLS_ENABLE={}",
      get("NCCL_P2P_DISABLE"), get("NCCL_SHM_DISABLE"), get("NCCL_WIN_ENABLE"),
      get("NCCL_NVLS_ENABLE"));
}

// Symmetric buffer of R slots of W words: every rank writes its pattern into slot `rank` of
// every peer it can reach (through the device peer table), a barrier, then every rank checks
// each slot: the writer's pattern where the writer could reach it, zeros elsewhere. Returns a
// one-line summary.
inline std::string check_symmetric_exchange(NcclTransport& t) {
  const int R = t.size(), me = t.rank();
  const size_t W = 4096 + 7;  // odd slot size: offsets that are not a power of two
  SymmetricBuffer buf = t.alloc_symmetric(sizeof(uint32_t) * W * R);
  EPMOE_CHECK(buf.local != nullptr && buf.peers != nullptr && buf.bytes == sizeof(uint32_t) * W * R,
              kInternal, "rank {}: alloc_symmetric returned local {} peers {} bytes {}", me,
              buf.local, static_cast<const void*>(buf.peers), buf.bytes);
  std::vector<void*> table(R);
  read_peer_table(buf, R, table.data(), t.stream());
  EPMOE_CHECK(table[me] == buf.local, kInternal, "rank {}: peers[self] = {}, local = {}", me,
              table[me], buf.local);
  int reachable = 0;
  for (int p = 0; p < R; ++p) {
    const bool in_lsa = p >= t.lsa_base() && p < t.lsa_base() + t.lsa_size();
    if (table[p] != nullptr) ++reachable;
    if (t.all_peers_reachable()) {
      EPMOE_CHECK(table[p] != nullptr, kInternal,
                  "rank {}: all_peers_reachable() but peers[{}] is null", me, p);
    }
    if (!in_lsa && p != me) {
      EPMOE_CHECK(table[p] == nullptr, kInternal,
                  "rank {}: peer {} is outside the LSA team [{}, {}) but peers[{}] = {}", me, p,
                  t.lsa_base(), t.lsa_base() + t.lsa_size(), p, table[p]);
    }
  }
  EPMOE_CHECK(t.all_peers_reachable() == (reachable == R), kInternal,
              "rank {}: all_peers_reachable() = {} but {} of {} peer entries are set", me,
              t.all_peers_reachable(), reachable, R);

  std::vector<uint32_t> host(W * R);
  EPMOE_CUDA_CHECK(
      cudaMemcpy(host.data(), buf.local, sizeof(uint32_t) * W * R, cudaMemcpyDeviceToHost));
  for (size_t i = 0; i < host.size(); ++i) {
    EPMOE_CHECK(host[i] == 0, kInternal, "rank {}: new symmetric buffer word {} = {:#x}, not 0", me,
                i, host[i]);
  }
  t.barrier();  // everyone has checked its zeros before anyone writes
  for (int p = 0; p < R; ++p) {
    if (table[p] != nullptr) launch_write_peer_pattern(buf, p, me, size_t(me) * W, W, t.stream());
  }
  t.barrier();  // drains this rank's stream, then waits for every rank's writes
  EPMOE_CUDA_CHECK(
      cudaMemcpy(host.data(), buf.local, sizeof(uint32_t) * W * R, cudaMemcpyDeviceToHost));
  for (int w = 0; w < R; ++w) {
    // NOTES: the LSA team is symmetric: w reaches this rank iff this rank reaches w.
    const bool wrote = table[w] != nullptr;
    for (size_t i = 0; i < W; ++i) {
      const uint32_t want = wrote ? probe_pattern(w, i) : 0u;
      const uint32_t got = host[size_t(w) * W + i];
      EPMOE_CHECK(got == want, kInternal,
                  "rank {}: slot of writer {} word {}: got {:#x}, want {:#x} ({})", me, w, i, got,
                  want, wrote ? "written through the writer's peer table" : "unreachable: zero");
    }
  }
  t.barrier();  // nobody releases the buffer while a peer may still read its slot
  return fmt::format(
      "rank {}/{}: peers reachable {}/{} (LSA team [{}, {})), all_peers_reachable={}", me, R,
      reachable, R, t.lsa_base(), t.lsa_base() + t.lsa_size(), t.all_peers_reachable());
}

// NCCL's own addresses of a window (ncclGetLsaPointer from a kernel): the peer table matches
// them for every other LSA rank, and a write through NCCL's alias of this rank's buffer shows
// up at `local`. Returns false when NCCL gave no window (nothing to check).
inline bool check_nccl_window_view(NcclTransport& t) {
  const int me = t.rank();
  const size_t words = 1000;
  SymmetricBuffer buf = t.alloc_symmetric(sizeof(uint32_t) * words);
  std::vector<void*> lsa = t.nccl_lsa_pointers(buf);
  bool has_window = !lsa.empty();
  if (has_window) {
    EPMOE_CHECK(int(lsa.size()) == t.lsa_size(), kInternal,
                "rank {}: {} NCCL LSA pointers for an LSA team of {}", me, lsa.size(),
                t.lsa_size());
    std::vector<void*> table(t.size());
    read_peer_table(buf, t.size(), table.data(), t.stream());
    for (int i = 0; i < t.lsa_size(); ++i) {
      const int p = t.lsa_base() + i;
      EPMOE_CHECK(lsa[i] != nullptr, kInternal, "rank {}: ncclGetLsaPointer(win, 0, {}) is null",
                  me, i);
      if (p != me) {
        EPMOE_CHECK(table[p] == lsa[i], kInternal,
                    "rank {}: peers[{}] = {} but ncclGetLsaPointer(win, 0, {}) = {}", me, p,
                    table[p], i, lsa[i]);
      }
    }
    // Write through NCCL's flat alias of this rank's own buffer, read through `local`.
    launch_write_pattern(lsa[me - t.lsa_base()], me, words, t.stream());
    EPMOE_CUDA_CHECK(cudaStreamSynchronize(t.stream()));
    std::vector<uint32_t> host(words);
    EPMOE_CUDA_CHECK(
        cudaMemcpy(host.data(), buf.local, sizeof(uint32_t) * words, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < words; ++i) {
      EPMOE_CHECK(host[i] == probe_pattern(me, i), kInternal,
                  "rank {}: word {} written through NCCL's alias reads {:#x} at local, want {:#x}",
                  me, i, host[i], probe_pattern(me, i));
    }
  }
  t.barrier();
  return has_window;
}

// Bytes rank s sends to rank d: uneven, some pairs 0 (with R = 2, 0 -> 1 is empty).
inline size_t a2a_bytes(int s, int d) {
  return (s + 2 * d + 1) % 3 == 0 ? 0 : size_t(1000) * (s + 1) + 17 * size_t(d) + 3;
}
inline uint8_t a2a_byte(int s, int d, size_t k) {
  return uint8_t((s * 31 + d * 7 + k * 13) & 0xff);
}

inline void check_all_to_all(NcclTransport& t) {
  const int R = t.size(), me = t.rank();
  const size_t kSendGap = 5, kRecvGap = 3;  // odd gaps between segments: offsets are honoured
  std::vector<size_t> sb(R), so(R), rb(R), ro(R);
  size_t send_total = 0, recv_total = 0;
  int64_t remote = 0;
  for (int p = 0; p < R; ++p) {
    sb[p] = a2a_bytes(me, p);
    so[p] = send_total;
    send_total += sb[p] + kSendGap;
    rb[p] = a2a_bytes(p, me);
    ro[p] = recv_total;
    recv_total += rb[p] + kRecvGap;
    if (p != me) remote += int64_t(sb[p]);
  }
  std::vector<uint8_t> send_host(send_total, 0xCD), recv_host(recv_total, 0xEE);
  for (int p = 0; p < R; ++p) {
    for (size_t k = 0; k < sb[p]; ++k) send_host[so[p] + k] = a2a_byte(me, p, k);
  }
  DeviceBytes send(send_total), recv(recv_total);
  EPMOE_CUDA_CHECK(
      cudaMemcpy(send.ptr.get(), send_host.data(), send_total, cudaMemcpyHostToDevice));
  EPMOE_CUDA_CHECK(
      cudaMemcpy(recv.ptr.get(), recv_host.data(), recv_total, cudaMemcpyHostToDevice));
  const int64_t before = t.host_api_remote_bytes();
  t.all_to_all_v(send.ptr.get(), sb.data(), so.data(), recv.ptr.get(), rb.data(), ro.data());
  t.barrier();  // bounded drain of the stream the exchange was queued on
  EPMOE_CHECK(t.host_api_remote_bytes() - before == remote, kInternal,
              "rank {}: host_api_remote_bytes grew by {}, want {}", me,
              t.host_api_remote_bytes() - before, remote);
  std::vector<uint8_t> got(recv_total);
  EPMOE_CUDA_CHECK(cudaMemcpy(got.data(), recv.ptr.get(), recv_total, cudaMemcpyDeviceToHost));
  for (int p = 0; p < R; ++p) {
    for (size_t k = 0; k < rb[p] + kRecvGap; ++k) {
      const uint8_t want = k < rb[p] ? a2a_byte(p, me, k) : uint8_t(0xEE);
      EPMOE_CHECK(got[ro[p] + k] == want, kInternal,
                  "rank {}: all_to_all_v from rank {} byte {} (of {}{}): got {:#04x}, want {:#04x}",
                  me, p, k, rb[p], k < rb[p] ? "" : ", gap must stay untouched", got[ro[p] + k],
                  want);
    }
  }
}

inline void check_all_gather(NcclTransport& t) {
  const int R = t.size(), me = t.rank();
  for (int n : {3, 1, 0, 257}) {
    std::vector<int64_t> in(n), out(size_t(R) * n + 1, -999);
    for (int j = 0; j < n; ++j) in[j] = int64_t(me) * 1000003 + j - 7 - (int64_t(1) << 40);
    t.all_gather_host(in.data(), out.data(), n);
    for (int r = 0; r < R; ++r) {
      for (int j = 0; j < n; ++j) {
        const int64_t want = int64_t(r) * 1000003 + j - 7 - (int64_t(1) << 40);
        EPMOE_CHECK(out[size_t(r) * n + j] == want, kInternal,
                    "rank {}: all_gather_host(n={}) out[{}][{}] = {}, want {}", me, n, r, j,
                    out[size_t(r) * n + j], want);
      }
    }
    EPMOE_CHECK(out[size_t(R) * n] == -999, kInternal,
                "rank {}: all_gather_host(n={}) wrote past [R * n]", me, n);
  }
}

}  // namespace epmoe::cuda::testing
