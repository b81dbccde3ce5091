// EpMicroBatchCpu, normal mode: deduplicated dispatch over all_to_all_v, contiguous receive,
// partial sums back (DESIGN §5, normal mode).
#include <algorithm>
#include <cstring>

#include "epmoe/core/checked.h"
#include "epmoe/ep/ep_cpu.h"
#include "epmoe/experts/experts_cpu.h"
#include "epmoe/permute/permute_cpu.h"

namespace epmoe {

namespace {

enum Step : uint64_t { kStepDispatch = 1, kStepCombine = 2 };
const char* step_name(uint64_t s) {
  return s == kStepDispatch ? "dispatch counts" : s == kStepCombine ? "combine row counts" : "?";
}

// One count exchanged with a peer, with what it belongs to (a rank that runs another step pairs
// its collective with ours: the tag says so instead of a silent mix-up).
struct CountMsg {
  uint64_t step = 0, micro_batch = 0, forward = 0, value = 0;
};

// Per-peer byte counts and offsets of one all_to_all_v: rows[p] items of `item_bytes` each.
struct A2aLayout {
  std::vector<size_t> bytes, offsets;
  size_t total = 0;
  A2aLayout(const std::vector<uint64_t>& rows, size_t item_bytes) {
    for (uint64_t n : rows) {
      offsets.push_back(total);
      bytes.push_back(checked_mul(size_t(n), item_bytes, "all_to_all_v block"));
      total = checked_add(total, bytes.back(), "all_to_all_v buffer");
    }
  }
};

}  // namespace

std::vector<uint64_t> EpMicroBatchCpu::exchange_counts(int step,
                                                       const std::vector<uint64_t>& to_peer) {
  std::vector<CountMsg> send(static_cast<size_t>(R_)), recv(static_cast<size_t>(R_));
  for (int p = 0; p < R_; ++p)
    send[size_t(p)] = CountMsg{uint64_t(step), uint64_t(desc_.index), seq_, to_peer[size_t(p)]};
  const std::vector<uint64_t> one(static_cast<size_t>(R_), 1);
  const A2aLayout lay(one, sizeof(CountMsg));
  comm_.all_to_all_v(send.data(), lay.bytes.data(), lay.offsets.data(), recv.data(),
                     lay.bytes.data(), lay.offsets.data());
  std::vector<uint64_t> out(static_cast<size_t>(R_));
  for (int p = 0; p < R_; ++p) {
    const CountMsg& m = recv[size_t(p)];
    EPMOE_CHECK(
        m.step == uint64_t(step) && m.micro_batch == uint64_t(desc_.index) && m.forward == seq_,
        kInvalidArgument,
        "rank {}, micro-batch {}: expected the {} of peer {} (forward {}), but the peer "
        "sent micro-batch {}'s {} (forward {}): the ranks run different operation lists",
        rank_, micro_batch_name(desc_.index), step_name(uint64_t(step)), p, seq_,
        micro_batch_name(int(m.micro_batch)), step_name(m.step), m.forward);
    out[size_t(p)] = m.value;
  }
  return out;
}

// Layout and pack: which ranks each token visits (once per rank, whatever the number of its
// experts there), records per destination in token order. No peer is involved.
void EpMicroBatchCpu::normal_dispatch_send() {
  Normal& n = n_;
  n.visits.assign(size_t(checked_mul(T_, int64_t(R_), "dispatch layout")), 0);
  n.send_tokens.assign(size_t(R_), 0);
  const int32_t* id = ids_.as<int32_t>();
  for (int64_t t = 0; t < T_; ++t)
    for (int k = 0; k < Kp_; ++k) {
      const int d = owner(id[t * Kp_ + k]);
      if (d < 0 || n.visits[size_t(t * R_ + d)]) continue;
      n.visits[size_t(t * R_ + d)] = 1;
      ++n.send_tokens[size_t(d)];
    }
  const A2aLayout lay(n.send_tokens, rec_.bytes);
  n.send_buf.assign(lay.total, 0);
  std::vector<size_t> cursor = lay.offsets;
  for (int64_t t = 0; t < T_; ++t)
    for (int d = 0; d < R_; ++d) {
      if (!n.visits[size_t(t * R_ + d)]) continue;
      write_record(n.send_buf.data() + cursor[size_t(d)], t, d);
      cursor[size_t(d)] += rec_.bytes;
    }
  for (int d = 0; d < R_; ++d)
    if (d != rank_) traffic_.dispatch_tokens += int64_t(n.send_tokens[size_t(d)]);
}

// Count exchange (the host learns N_recv), the records, and the contiguous receive tensors in
// (source rank, token) order.
void EpMicroBatchCpu::normal_dispatch_recv() {
  Normal& n = n_;
  n.recv_tokens = exchange_counts(kStepDispatch, n.send_tokens);
  for (int p = 0; p < R_; ++p)
    EPMOE_CHECK(n.recv_tokens[size_t(p)] <= uint64_t(std::max<int64_t>(desc_.capacity, 0)),
                kInvalidArgument,
                "rank {}, micro-batch {}: peer {} announces {} tokens, more than the capacity {}",
                rank_, micro_batch_name(desc_.index), p, n.recv_tokens[size_t(p)], desc_.capacity);
  const A2aLayout send(n.send_tokens, rec_.bytes), recv(n.recv_tokens, rec_.bytes);
  check_buffer_budget(int64_t(recv.total),
                      fmt::format("rank {}'s normal-mode receive buffer", rank_));
  std::vector<char> rbuf(recv.total);
  const int64_t before = comm_.traffic().remote_bytes(rank_);
  comm_.all_to_all_v(n.send_buf.data(), send.bytes.data(), send.offsets.data(), rbuf.data(),
                     recv.bytes.data(), recv.offsets.data());
  traffic_.dispatch_bytes = comm_.traffic().remote_bytes(rank_) - before;

  const int64_t rows = int64_t(recv.total / rec_.bytes);
  n.recv_x = Tensor(x_.dtype, {rows, H_});
  n.recv_ids = Tensor(DType::kI32, {rows, Kp_});
  n.recv_w = Tensor(DType::kF32, {rows, Kp_});
  n.recv_counts = Tensor::zeros(DType::kI32, {E_loc_});
  int32_t* counts = n.recv_counts.as<int32_t>();
  for (int64_t i = 0; i < rows; ++i) {
    const char* r = rbuf.data() + size_t(i) * rec_.bytes;
    std::memcpy(static_cast<char*>(n.recv_x.view().data) + size_t(i) * rec_.payload, r,
                rec_.payload);
    int32_t* lid = n.recv_ids.as<int32_t>() + i * Kp_;
    std::memcpy(lid, r + rec_.ids_off, 4 * size_t(Kp_));
    std::memcpy(n.recv_w.as<float>() + i * Kp_, r + rec_.w_off, 4 * size_t(Kp_));
    for (int k = 0; k < Kp_; ++k) {
      EPMOE_CHECK(lid[k] >= -1 && lid[k] < E_loc_, kInternal,
                  "rank {}: local expert {} received in row {}", rank_, lid[k], i);
      if (lid[k] >= 0) ++counts[lid[k]];
    }
  }
}

// preprocess -> pre_reorder -> contiguous expert MLP on the received rows.
void EpMicroBatchCpu::normal_experts() {
  Normal& n = n_;
  const int64_t rows_in = n.recv_x.shape()[0];
  Tensor seg(DType::kI32, {E_loc_ + 1});
  n.src2dst = Tensor(DType::kI32, {rows_in, Kp_});
  preprocess_cpu(seg, n.src2dst, n.recv_ids, 0, E_loc_);
  const int64_t rows = seg.as<int32_t>()[E_loc_];
  Tensor sorted(DType::kF32, {rows, H_});
  n.down = Tensor(DType::kF32, {rows, H_});
  pre_reorder_cpu(sorted, n.recv_x, n.src2dst);
  experts_contiguous_cpu(n.down, sorted, seg, weights_.w13, weights_.w2, rank_ * E_loc_,
                         desc_.threads, bank_scale(weights_, weights_.w13_scale),
                         bank_scale(weights_, weights_.w2_scale));
}

// One partial sum per received token over this rank's experts (a node of the reduction tree).
void EpMicroBatchCpu::normal_combine_send() {
  Normal& n = n_;
  n.partial = Tensor(DType::kF32, {n.recv_x.shape()[0], H_});
  post_reorder_cpu(n.partial, n.down, n.src2dst, n.recv_ids, n.recv_w, E_, rank_ * E_loc_,
                   desc_.threads);
}

// The partials travel back; the source adds them in the canonical order (rank ranges are tree
// nodes, so the sum groups as the single-rank one does).
void EpMicroBatchCpu::normal_combine_recv(const TensorView& routed,
                                          std::vector<uint8_t>* has_routed) {
  Normal& n = n_;
  const std::vector<uint64_t> back_rows = exchange_counts(kStepCombine, n.recv_tokens);
  for (int p = 0; p < R_; ++p)
    EPMOE_CHECK(back_rows[size_t(p)] == n.send_tokens[size_t(p)], kInternal,
                "rank {}, micro-batch {}: peer {} returns {} rows for the {} tokens it received",
                rank_, micro_batch_name(desc_.index), p, back_rows[size_t(p)],
                n.send_tokens[size_t(p)]);
  const size_t row_bytes = size_t(H_) * 4;
  const A2aLayout send(n.recv_tokens, row_bytes), recv(n.send_tokens, row_bytes);
  std::vector<float> back(recv.total / 4);
  const int64_t before = comm_.traffic().remote_bytes(rank_);
  comm_.all_to_all_v(n.partial.view().data, send.bytes.data(), send.offsets.data(), back.data(),
                     recv.bytes.data(), recv.offsets.data());
  traffic_.combine_bytes = comm_.traffic().remote_bytes(rank_) - before;

  // Partials from each rank in token order; a rank's partial is keyed by its first expert.
  std::vector<size_t> cursor(static_cast<size_t>(R_));
  for (int p = 0; p < R_; ++p) cursor[size_t(p)] = recv.offsets[size_t(p)] / 4;
  std::vector<ReduceTerm> terms(static_cast<size_t>(R_));
  std::vector<float> acc;
  float* y = routed.as<float>();
  for (int64_t t = 0; t < T_; ++t) {
    int cnt = 0;
    for (int p = 0; p < R_; ++p) {
      if (!n.visits[size_t(t * R_ + p)]) continue;
      terms[size_t(cnt++)] = ReduceTerm{p * E_loc_, back.data() + cursor[size_t(p)], 1.0f, true};
      cursor[size_t(p)] += size_t(H_);
    }
    (*has_routed)[size_t(t)] = cnt > 0;
    reduce_terms_cpu(y + t * H_, H_, E_, terms.data(), cnt, acc);
  }
}

}  // namespace epmoe
