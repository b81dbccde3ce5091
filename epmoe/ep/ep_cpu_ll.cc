// EpMicroBatchCpu, low-latency mode: one-sided writes into the peers' windows, masked receive
// buffers, 64-bit flags with the forward's sequence number (DESIGN §5, low-latency mode).
#include <algorithm>
#include <cstring>

#include "epmoe/core/checked.h"
#include "epmoe/ep/ep_cpu.h"
#include "epmoe/experts/experts_cpu.h"

namespace epmoe {

// Collective, at construction: every rank's window has room for `capacity` tokens of the widest
// payload (f32) from each source, so any input dtype fits without a new allocation.
void EpMicroBatchCpu::ll_create_window() {
  LowLatency& l = ll_;
  l.slot_bytes = Record(H_, DType::kF32, Kp_).bytes;
  l.disp_flags_off = 0;
  l.comb_flags_off = size_t(R_) * 8;
  l.staging_off = l.comb_flags_off + size_t(R_) * 8;
  // Checked: the capacity comes from the user (--max-tokens); the window and the masked receive
  // buffers (allocated at the first dispatch_recv) must fit the buffer budget before anything is
  // allocated.
  const size_t cap = size_t(desc_.capacity);
  const char* what = "low-latency window";
  l.combine_off = checked_add(
      l.staging_off, checked_mul(checked_mul(size_t(R_), cap, what), l.slot_bytes, what), what);
  const size_t total = checked_add(
      l.combine_off, checked_mul(checked_mul(cap, size_t(Kp_) * size_t(H_), what), size_t(4), what),
      what);
  // recv_x (f32 at most) + recv_src + out: [E_loc, R·cap] × (4H + 12 + 4H) bytes.
  const size_t recv =
      checked_mul(checked_mul(size_t(E_loc_) * size_t(R_), cap, "low-latency buffers"),
                  size_t(8) * size_t(H_) + 12, "low-latency buffers");
  check_buffer_budget(
      int64_t(std::min(checked_add(total, recv, "low-latency buffers"), size_t(INT64_MAX))),
      fmt::format("rank {}'s low-latency window and receive buffers of micro-batch {} for {} "
                  "tokens per rank (--max-tokens)",
                  rank_, micro_batch_name(desc_.index), desc_.capacity));
  l.window = comm_.create_window(total);
}

uint64_t* EpMicroBatchCpu::ll_flags(int peer, size_t off) {
  return reinterpret_cast<uint64_t*>(static_cast<char*>(ll_.window->peer(peer)) + off);
}

// Records into each owner's staging (our region: rows [rank·cap, (rank+1)·cap), token order),
// then a flag to every peer, also to those we send nothing: (forward << 32) | tokens sent.
void EpMicroBatchCpu::ll_dispatch_send() {
  LowLatency& l = ll_;
  const int32_t* id = ids_.as<int32_t>();
  std::vector<int64_t> sent(static_cast<size_t>(R_), 0);
  std::vector<uint8_t> visits(static_cast<size_t>(R_));
  const int64_t before = comm_.traffic().remote_bytes(rank_);
  for (int64_t t = 0; t < T_; ++t) {
    std::fill(visits.begin(), visits.end(), 0);
    for (int k = 0; k < Kp_; ++k) {
      const int d = owner(id[t * Kp_ + k]);
      if (d >= 0) visits[size_t(d)] = 1;
    }
    for (int d = 0; d < R_; ++d) {
      if (!visits[size_t(d)]) continue;
      char* dst = static_cast<char*>(l.window->peer(d)) + l.staging_off +
                  (size_t(rank_) * size_t(desc_.capacity) + size_t(sent[size_t(d)])) * l.slot_bytes;
      write_record(dst, t, d);
      ++sent[size_t(d)];
      comm_.traffic().bytes_to_peer[size_t(d)] += int64_t(rec_.bytes);
    }
  }
  traffic_.dispatch_bytes = comm_.traffic().remote_bytes(rank_) - before;
  for (int d = 0; d < R_; ++d)
    if (d != rank_) traffic_.dispatch_tokens += sent[size_t(d)];
  for (int d = 0; d < R_; ++d)
    flag_store_release(ll_flags(d, l.disp_flags_off) + rank_,
                       (seq_ << 32) | uint64_t(sent[size_t(d)]));
}

// Waits (bounded) for every peer's flag, then expands its tokens into per-expert rows in
// (source rank, token, slot) order.
void EpMicroBatchCpu::ll_dispatch_recv() {
  LowLatency& l = ll_;
  const int64_t m_max = int64_t(R_) * desc_.capacity;
  if (!l.recv_x.defined() || l.recv_x.dtype() != x_.dtype) {
    l.recv_x = Tensor(x_.dtype, {E_loc_, m_max, H_});
    l.count = Tensor::zeros(DType::kI32, {E_loc_});
    l.src = Tensor(DType::kI32, {E_loc_, m_max, 3});
    l.out = Tensor(DType::kF32, {E_loc_, m_max, H_});
  }
  std::vector<int64_t> from(static_cast<size_t>(R_));
  uint64_t* mine = ll_flags(rank_, l.disp_flags_off);
  for (int s = 0; s < R_; ++s) {
    // High half: the forward's sequence number; low half: how many tokens peer s sent us.
    const uint64_t v =
        comm_.wait_flag(mine + s, seq_ << 32, s, "dispatch flag", ~uint64_t(0xffffffffu));
    from[size_t(s)] = int64_t(v & 0xffffffffu);
    EPMOE_CHECK(from[size_t(s)] <= desc_.capacity, kInternal,
                "rank {}, micro-batch {}: peer {} sent {} tokens, more than the capacity {}", rank_,
                micro_batch_name(desc_.index), s, from[size_t(s)], desc_.capacity);
  }
  int32_t* cnt = l.count.as<int32_t>();
  std::fill(cnt, cnt + E_loc_, 0);
  const char* staging = static_cast<const char*>(l.window->local()) + l.staging_off;
  for (int s = 0; s < R_; ++s)
    for (int64_t i = 0; i < from[size_t(s)]; ++i) {
      const char* r = staging + (size_t(s) * size_t(desc_.capacity) + size_t(i)) * l.slot_bytes;
      int32_t src_token;
      std::memcpy(&src_token, r + rec_.src_off, 4);
      const int32_t* lid = reinterpret_cast<const int32_t*>(r + rec_.ids_off);
      for (int k = 0; k < Kp_; ++k) {
        const int le = lid[k];
        if (le < 0) continue;
        EPMOE_CHECK(le < E_loc_ && cnt[le] < m_max, kInternal,
                    "rank {}: bad local expert {} from rank {}", rank_, le, s);
        const int64_t row = cnt[le]++;
        std::memcpy(static_cast<char*>(l.recv_x.view().data) +
                        (size_t(le) * size_t(m_max) + size_t(row)) * rec_.payload,
                    r, rec_.payload);
        int32_t* src = l.src.as<int32_t>() + (int64_t(le) * m_max + row) * 3;
        src[0] = s;
        src[1] = src_token;
        src[2] = k;
      }
    }
}

void EpMicroBatchCpu::ll_experts() {
  experts_masked_cpu(ll_.out, ll_.recv_x, ll_.count, weights_.w13, weights_.w2, rank_ * E_loc_,
                     desc_.threads, bank_scale(weights_, weights_.w13_scale),
                     bank_scale(weights_, weights_.w2_scale));
}

// Each row into slot (token, k) of its source's combine area, then a flag to every peer.
void EpMicroBatchCpu::ll_combine_send() {
  LowLatency& l = ll_;
  const int64_t m_max = int64_t(R_) * desc_.capacity;
  const int32_t* cnt = l.count.as<int32_t>();
  const size_t row_bytes = size_t(H_) * 4;
  const int64_t before = comm_.traffic().remote_bytes(rank_);
  for (int e = 0; e < E_loc_; ++e)
    for (int64_t i = 0; i < cnt[e]; ++i) {
      const int32_t* src = l.src.as<int32_t>() + (int64_t(e) * m_max + i) * 3;
      char* dst = static_cast<char*>(l.window->peer(src[0])) + l.combine_off +
                  (size_t(src[1]) * size_t(Kp_) + size_t(src[2])) * row_bytes;
      std::memcpy(dst, l.out.as<float>() + (int64_t(e) * m_max + i) * H_, row_bytes);
      comm_.traffic().bytes_to_peer[size_t(src[0])] += int64_t(row_bytes);
    }
  traffic_.combine_bytes = comm_.traffic().remote_bytes(rank_) - before;
  for (int s = 0; s < R_; ++s) flag_store_release(ll_flags(s, l.comb_flags_off) + rank_, seq_);
}

// Waits for every peer's combine flag; y per token over its routed slots, canonical order.
void EpMicroBatchCpu::ll_combine_recv(const TensorView& routed, std::vector<uint8_t>* has_routed) {
  LowLatency& l = ll_;
  uint64_t* mine = ll_flags(rank_, l.comb_flags_off);
  for (int s = 0; s < R_; ++s) comm_.wait_flag(mine + s, seq_, s, "combine flag");
  const float* rows =
      reinterpret_cast<const float*>(static_cast<const char*>(l.window->local()) + l.combine_off);
  std::vector<ReduceTerm> terms(static_cast<size_t>(Kp_));
  std::vector<float> acc;
  const int32_t* id = ids_.as<int32_t>();
  const float* w = w_.as<float>();
  float* y = routed.as<float>();
  for (int64_t t = 0; t < T_; ++t) {
    int n = 0;
    for (int k = 0; k < Kp_; ++k) {
      const int e = id[t * Kp_ + k];
      if (e < 0 || e >= E_) continue;
      terms[size_t(n++)] = ReduceTerm{e, rows + (t * Kp_ + k) * H_, w[t * Kp_ + k], false};
    }
    (*has_routed)[size_t(t)] = n > 0;
    reduce_terms_cpu(y + t * H_, H_, E_, terms.data(), n, acc);
  }
}

}  // namespace epmoe
