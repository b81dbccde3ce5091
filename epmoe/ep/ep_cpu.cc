#include "epmoe/ep/ep_cpu.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "epmoe/experts/experts_cpu.h"
#include "epmoe/layer/moe_layer_cpu.h"
#include "epmoe/permute/permute_cpu.h"
#include "epmoe/permute/reduce_plan.h"
#include "epmoe/routing/gate_cpu.h"

namespace epmoe {

bool ep_ranks_are_tree_nodes(int num_routed, int num_ranks) {
  if (num_ranks <= 0 || num_routed % num_ranks != 0) return false;
  const int e_loc = num_routed / num_ranks;
  for (int r = 0; r < num_ranks; ++r) {
    int lo = 0, hi = num_routed;
    const int want_lo = r * e_loc, want_hi = want_lo + e_loc;
    while (!(lo == want_lo && hi == want_hi)) {
      if (hi - lo <= 1) return false;
      const int mid = lo + (hi - lo) / 2;
      if (want_hi <= mid) hi = mid;
      else if (want_lo >= mid) lo = mid;
      else return false;
    }
  }
  return true;
}

namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// One token as it crosses the wire: payload (the row, x's dtype) | src token | K' local ids |
// K' weights. Only routed slots of the destination carry an id; the others are -1.
struct RecordLayout {
  size_t payload, src_off, ids_off, w_off, bytes;
  RecordLayout(int64_t h, DType dt, int kp) {
    payload = size_t(h) * dtype_size(dt);
    src_off = (payload + 7) / 8 * 8;
    ids_off = src_off + 4;
    w_off = ids_off + 4 * size_t(kp);
    bytes = (w_off + 4 * size_t(kp) + 7) / 8 * 8;
  }
};

}  // namespace

struct EpRankCpu::Impl {
  Impl(Communicator& c, const MoeWeights& w, const EpConfig& e, int th)
      : comm(c), weights(w), cfg(w.config), ep(e), threads(th) {
    cfg.validate();
    ep.validate(cfg);
    EPMOE_CHECK(comm.size() == ep.num_ranks, kInvalidConfig,
                "the communicator has {} ranks, the EP config {}", comm.size(), ep.num_ranks);
    R = ep.num_ranks;
    rank = comm.rank();
    E = cfg.n_routed_experts;
    E_loc = E / R;
    Kp = cfg.num_slots();
    H = cfg.hidden;
    if (ep.mode == EpMode::kLowLatency) create_ll_window();
  }

  Communicator& comm;
  const MoeWeights& weights;
  MoeConfig cfg;
  EpConfig ep;
  int threads;
  int R = 1, rank = 0, E = 0, E_loc = 0, Kp = 0;
  int64_t H = 0;

  // This rank's tokens (source side) of the current layer call.
  TensorView x;
  Tensor topk_ids, topk_weights;    // copies: [T_r, K']
  Tensor shared_out;                // fused: [T_r, n_shared, H] f32; unfused: [T_r, H] f32
  bool shared_ready = false;
  int64_t T = 0;

  // Normal mode.
  std::vector<std::vector<char>> in_rank;  // [T_r][R]
  std::vector<size_t> send_tokens, recv_tokens;  // per peer
  Tensor recv_x, recv_ids, recv_w, recv_counts, partial;
  // Low-latency mode.
  std::unique_ptr<Window> window;
  uint64_t seq = 0;
  Tensor ll_recv_x, ll_count, ll_src, ll_out;
  size_t disp_flags_off = 0, comb_flags_off = 0, staging_off = 0, combine_off = 0;
  size_t slot_bytes = 0;  // staging stride per token (room for an f32 payload)
  RecordLayout rec{1, DType::kBF16, 1};
  EpTraffic traffic;
  int64_t remote_bytes() { return comm.traffic().remote_bytes(rank); }
  DType payload_dtype = DType::kBF16;

  void check_routing(const TensorView& xv, const TensorView& ids, const TensorView& w) {
    EPMOE_CHECK(xv.shape.rank == 2 && xv.shape[1] == H, kInvalidArgument,
                "rank {}: input must be [T, {}], got {}", rank, H, xv.shape.str());
    EPMOE_CHECK(xv.dtype == DType::kBF16 || xv.dtype == DType::kF32, kInvalidArgument,
                "rank {}: input must be bf16 or f32, got {}", rank, dtype_name(xv.dtype));
    const int64_t t = xv.shape[0];
    EPMOE_CHECK(t <= ep.max_tokens_per_rank, kInvalidArgument,
                "rank {} brings {} tokens, more than max_tokens_per_rank = {}", rank, t,
                ep.max_tokens_per_rank);
    ids.expect("topk_ids", DType::kI32, {t, Kp});
    w.expect("topk_weights", DType::kF32, {t, Kp});
    const int32_t* id = ids.as<int32_t>();
    const int max_id = cfg.num_expert_ids();
    for (int64_t i = 0; i < t * Kp; ++i)
      EPMOE_CHECK(id[i] >= -1 && id[i] < max_id, kInvalidArgument,
                  "rank {}: topk_ids[{}, {}] = {} is outside [-1, {})", rank, i / Kp, i % Kp,
                  id[i], max_id);
    x = xv;
    T = t;
    topk_ids = to_dtype(ids, DType::kI32);
    topk_weights = to_dtype(w, DType::kF32);
    shared_ready = false;
  }

  int owner(int id) const { return id >= 0 && id < E ? id / E_loc : -1; }

  void write_record(char* dst, int64_t t, int dest) const {
    std::memcpy(dst, static_cast<const char*>(x.data) + size_t(t) * rec.payload, rec.payload);
    const int32_t src = int32_t(t);
    std::memcpy(dst + rec.src_off, &src, 4);
    const int32_t* id = topk_ids.as<int32_t>() + t * Kp;
    const float* w = topk_weights.as<float>() + t * Kp;
    int32_t* lid = reinterpret_cast<int32_t*>(dst + rec.ids_off);
    float* lw = reinterpret_cast<float*>(dst + rec.w_off);
    for (int k = 0; k < Kp; ++k) {
      lid[k] = owner(id[k]) == dest ? id[k] - dest * E_loc : -1;
      lw[k] = w[k];
    }
  }

  void prepare_layout(DType dt) {
    payload_dtype = dt;
    rec = RecordLayout(H, dt, Kp);
  }

  // ---------------- shared expert ----------------
  void compute_shared() {
    const int ns = cfg.n_shared_experts;
    if (ns == 0) return;
    if (cfg.fuse_shared) {
      shared_out = Tensor(DType::kF32, {T, ns, H});
      std::vector<float> tmp(static_cast<size_t>(T * H));
      for (int j = 0; j < ns; ++j) {
        mlp_rows_cpu(tmp.data(), x, 0, T, bank_slice(weights.w13, E + j),
                     bank_slice(weights.w2, E + j));
        for (int64_t t = 0; t < T; ++t)
          std::memcpy(shared_out.as<float>() + (t * ns + j) * H, tmp.data() + t * H,
                      size_t(H) * 4);
      }
    } else {
      shared_out = Tensor::zeros(DType::kF32, {T, H});
      add_shared_expert_cpu(shared_out, weights, x, threads);
    }
    shared_ready = true;
  }

  // The source-side reduction of one token: items (key, row, weight) → y in the canonical order
  // (reduce_plan.h). An item with is_sum set is a rank's finished partial, added as it is.
  void reduce_token(float* y, int n, const int* keys, const float* const* rows,
                    const float* term_w, const char* is_sum, std::vector<float>& acc) const {
    ReducePlan plan;
    plan_reduce(plan, keys, n, E);
    if (plan.root < 0) {
      std::fill(y, y + H, 0.0f);
      return;
    }
    for (int i = 0; i < n; ++i) {
      if (keys[i] < 0) continue;
      float* a = acc.data() + size_t(i) * H;
      if (is_sum[i]) {
        std::memcpy(a, rows[i], size_t(H) * 4);
      } else {
        for (int64_t j = 0; j < H; ++j) a[j] = term_w[i] * rows[i][j];
      }
    }
    for (int m = 0; m < plan.num_merges; ++m) {
      float* d = acc.data() + size_t(plan.dst[m]) * H;
      const float* s = acc.data() + size_t(plan.src[m]) * H;
      for (int64_t j = 0; j < H; ++j) d[j] += s[j];
    }
    std::memcpy(y, acc.data() + size_t(plan.root) * H, size_t(H) * 4);
  }

  // Adds fused shared slots of token t to the item list.
  void shared_items(int64_t t, int* n, int* keys, const float** rows, float* tw,
                    char* is_sum) const {
    const int32_t* id = topk_ids.as<int32_t>() + t * Kp;
    const float* w = topk_weights.as<float>() + t * Kp;
    for (int k = 0; k < Kp; ++k) {
      if (id[k] < E) continue;
      EPMOE_CHECK(shared_ready, kInternal, "rank {}: fused shared slots but no shared output", rank);
      keys[*n] = id[k];
      rows[*n] = shared_out.as<float>() + (t * cfg.n_shared_experts + (id[k] - E)) * H;
      tw[*n] = w[k];
      is_sum[*n] = 0;
      ++*n;
    }
  }

  // ---------------- normal mode ----------------
  void normal_dispatch(const TensorView& xv, const TensorView& ids, const TensorView& w) {
    check_routing(xv, ids, w);
    prepare_layout(xv.dtype);
    // 1. layout: which ranks each token visits (deduplicated).
    in_rank.assign(size_t(T), std::vector<char>(size_t(R), 0));
    send_tokens.assign(size_t(R), 0);
    const int32_t* id = topk_ids.as<int32_t>();
    for (int64_t t = 0; t < T; ++t)
      for (int k = 0; k < Kp; ++k) {
        const int d = owner(id[t * Kp + k]);
        if (d >= 0 && !in_rank[size_t(t)][size_t(d)]) {
          in_rank[size_t(t)][size_t(d)] = 1;
          ++send_tokens[size_t(d)];
        }
      }
    // 2. count exchange.
    std::vector<uint64_t> cnt_send(send_tokens.begin(), send_tokens.end()), cnt_recv(static_cast<size_t>(R));
    std::vector<size_t> eight(size_t(R), 8), offs(static_cast<size_t>(R));
    for (int p = 0; p < R; ++p) offs[size_t(p)] = size_t(p) * 8;
    comm.all_to_all_v(cnt_send.data(), eight.data(), offs.data(), cnt_recv.data(), eight.data(),
                      offs.data());
    recv_tokens.assign(cnt_recv.begin(), cnt_recv.end());
    // 3. pack per destination in token order; 4. exchange.
    std::vector<size_t> sbytes(static_cast<size_t>(R)), soffs(static_cast<size_t>(R)), rbytes(static_cast<size_t>(R)), roffs(static_cast<size_t>(R));
    size_t stotal = 0, rtotal = 0;
    for (int p = 0; p < R; ++p) {
      soffs[size_t(p)] = stotal;
      sbytes[size_t(p)] = send_tokens[size_t(p)] * rec.bytes;
      stotal += sbytes[size_t(p)];
      roffs[size_t(p)] = rtotal;
      rbytes[size_t(p)] = recv_tokens[size_t(p)] * rec.bytes;
      rtotal += rbytes[size_t(p)];
    }
    std::vector<char> sbuf(stotal), rbuf(rtotal);
    for (int p = 0; p < R; ++p) {
      char* dst = sbuf.data() + soffs[size_t(p)];
      for (int64_t t = 0; t < T; ++t)
        if (in_rank[size_t(t)][size_t(p)]) {
          write_record(dst, t, p);
          dst += rec.bytes;
        }
    }
    const int64_t before = remote_bytes();
    comm.all_to_all_v(sbuf.data(), sbytes.data(), soffs.data(), rbuf.data(), rbytes.data(),
                      roffs.data());
    traffic = EpTraffic{};
    traffic.dispatch_bytes = remote_bytes() - before;
    for (int p = 0; p < R; ++p)
      if (p != rank) traffic.dispatch_tokens += int64_t(send_tokens[size_t(p)]);
    // Receiver: split the records into contiguous tensors (source-rank then token order).
    const int64_t n = int64_t(rtotal / rec.bytes);
    recv_x = Tensor(payload_dtype, {n, H});
    recv_ids = Tensor(DType::kI32, {n, Kp});
    recv_w = Tensor(DType::kF32, {n, Kp});
    recv_counts = Tensor::zeros(DType::kI32, {E_loc});
    for (int64_t i = 0; i < n; ++i) {
      const char* r = rbuf.data() + size_t(i) * rec.bytes;
      std::memcpy(static_cast<char*>(recv_x.view().data) + size_t(i) * rec.payload, r, rec.payload);
      std::memcpy(recv_ids.as<int32_t>() + i * Kp, r + rec.ids_off, 4 * size_t(Kp));
      std::memcpy(recv_w.as<float>() + i * Kp, r + rec.w_off, 4 * size_t(Kp));
      for (int k = 0; k < Kp; ++k) {
        const int32_t le = recv_ids.as<int32_t>()[i * Kp + k];
        if (le >= 0) ++recv_counts.as<int32_t>()[le];
      }
    }
  }

  void normal_experts() {
    const int64_t n = recv_x.shape()[0];
    Tensor seg(DType::kI32, {E_loc + 1}), s2d(DType::kI32, {n, Kp});
    preprocess_cpu(seg, s2d, recv_ids, 0, E_loc);
    const int64_t rows = seg.as<int32_t>()[E_loc];
    Tensor sorted(DType::kF32, {rows, H}), down(DType::kF32, {rows, H});
    pre_reorder_cpu(sorted, recv_x, s2d);
    experts_contiguous_cpu(down, sorted, seg, weights.w13, weights.w2, rank * E_loc, threads);
    partial = Tensor(DType::kF32, {n, H});
    post_reorder_cpu(partial, down, s2d, recv_ids, recv_w, E, rank * E_loc, threads);
  }

  void normal_combine(const TensorView& y) {
    y.expect("y", DType::kF32, {T, H});
    std::vector<size_t> sbytes(static_cast<size_t>(R)), soffs(static_cast<size_t>(R)), rbytes(static_cast<size_t>(R)), roffs(static_cast<size_t>(R));
    size_t so = 0, ro = 0;
    const size_t row = size_t(H) * 4;
    for (int p = 0; p < R; ++p) {
      soffs[size_t(p)] = so;
      sbytes[size_t(p)] = recv_tokens[size_t(p)] * row;
      so += sbytes[size_t(p)];
      roffs[size_t(p)] = ro;
      rbytes[size_t(p)] = send_tokens[size_t(p)] * row;
      ro += rbytes[size_t(p)];
    }
    std::vector<float> back(ro / 4);
    const int64_t before = remote_bytes();
    comm.all_to_all_v(partial.view().data, sbytes.data(), soffs.data(), back.data(), rbytes.data(),
                      roffs.data());
    traffic.combine_bytes = remote_bytes() - before;
    // Source: partials from each rank in token order; rank partial key = first expert of rank.
    std::vector<size_t> cursor(static_cast<size_t>(R));
    for (int p = 0; p < R; ++p) cursor[size_t(p)] = roffs[size_t(p)] / 4;
    std::vector<float> acc(size_t(R + Kp) * size_t(H));
    std::vector<int> keys(size_t(R + Kp));
    std::vector<const float*> rows(size_t(R + Kp));
    std::vector<float> tw(size_t(R + Kp));
    std::vector<char> is_sum(size_t(R + Kp));
    for (int64_t t = 0; t < T; ++t) {
      int n = 0;
      for (int p = 0; p < R; ++p) {
        if (!in_rank[size_t(t)][size_t(p)]) continue;
        keys[size_t(n)] = p * E_loc;
        rows[size_t(n)] = back.data() + cursor[size_t(p)];
        tw[size_t(n)] = 1.0f;
        is_sum[size_t(n)] = 1;
        cursor[size_t(p)] += size_t(H);
        ++n;
      }
      shared_items(t, &n, keys.data(), rows.data(), tw.data(), is_sum.data());
      reduce_token(y.as<float>() + t * H, n, keys.data(), rows.data(), tw.data(), is_sum.data(),
                   acc);
    }
  }

  // ---------------- low-latency mode ----------------
  // Window of every rank: [dispatch flags R][combine flags R][staging R × T_max records]
  //                       [combine rows T_max × K' × H f32].
  // Collective, at construction: every rank's window has room for T_max tokens of the widest
  // payload (f32) from each source, so any input dtype fits without a new allocation.
  void create_ll_window() {
    slot_bytes = RecordLayout(H, DType::kF32, Kp).bytes;
    disp_flags_off = 0;
    comb_flags_off = size_t(R) * 8;
    staging_off = comb_flags_off + size_t(R) * 8;
    combine_off = staging_off + size_t(R) * size_t(ep.max_tokens_per_rank) * slot_bytes;
    const size_t total = combine_off + size_t(ep.max_tokens_per_rank) * size_t(Kp) * size_t(H) * 4;
    window = comm.create_window(total);
  }

  void ensure_ll_buffers(DType dt) {
    prepare_layout(dt);
    const int64_t m_max = int64_t(R) * ep.max_tokens_per_rank;
    if (ll_recv_x.defined() && ll_recv_x.dtype() == dt) return;
    ll_recv_x = Tensor(dt, {E_loc, m_max, H});
    ll_count = Tensor::zeros(DType::kI32, {E_loc});
    ll_src = Tensor(DType::kI32, {E_loc, m_max, 3});
    ll_out = Tensor(DType::kF32, {E_loc, m_max, H});
  }

  uint64_t* flags(int peer_rank, size_t off) {
    return reinterpret_cast<uint64_t*>(static_cast<char*>(window->peer(peer_rank)) + off);
  }

  void ll_dispatch_send(const TensorView& xv, const TensorView& ids, const TensorView& w) {
    check_routing(xv, ids, w);
    ensure_ll_buffers(xv.dtype);
    ++seq;
    const int32_t* id = topk_ids.as<int32_t>();
    std::vector<int64_t> sent(size_t(R), 0);
    const int64_t before = remote_bytes();
    std::vector<char> visits(static_cast<size_t>(R));
    for (int64_t t = 0; t < T; ++t) {
      std::fill(visits.begin(), visits.end(), 0);
      for (int k = 0; k < Kp; ++k) {
        const int d = owner(id[t * Kp + k]);
        if (d >= 0) visits[size_t(d)] = 1;
      }
      for (int d = 0; d < R; ++d) {
        if (!visits[size_t(d)]) continue;
        // Our region of d's staging: rows [rank·T_max, (rank+1)·T_max), filled in token order.
        char* dst = static_cast<char*>(window->peer(d)) + staging_off +
                    (size_t(rank) * size_t(ep.max_tokens_per_rank) + size_t(sent[size_t(d)])) *
                        slot_bytes;
        write_record(dst, t, d);
        ++sent[size_t(d)];
        comm.traffic().bytes_to_peer[size_t(d)] += int64_t(rec.bytes);
      }
    }
    traffic = EpTraffic{};
    traffic.dispatch_bytes = remote_bytes() - before;
    for (int d = 0; d < R; ++d)
      if (d != rank) traffic.dispatch_tokens += sent[size_t(d)];
    for (int d = 0; d < R; ++d)  // every peer hears from us, also when we send it nothing
      flag_store_release(flags(d, disp_flags_off) + rank, (seq << 32) | uint64_t(sent[size_t(d)]));
  }

  void ll_dispatch_recv() {
    EPMOE_CHECK(seq > 0 && ll_recv_x.defined(), kInvalidArgument,
                "rank {}: ll_dispatch_recv before ll_dispatch_send", rank);
    const int64_t m_max = int64_t(R) * ep.max_tokens_per_rank;
    std::vector<int64_t> from(static_cast<size_t>(R));
    uint64_t* mine = flags(rank, disp_flags_off);
    for (int s = 0; s < R; ++s) {
      // High half: the call's sequence number; low half: how many tokens peer s sent us.
      const uint64_t v = comm.wait_flag(mine + s, seq << 32, s, "dispatch flag",
                                        ~uint64_t(0xffffffffu));
      from[size_t(s)] = int64_t(v & 0xffffffffu);
    }
    // Expand tokens into per-expert rows, in (source rank, token, slot) order.
    int32_t* cnt = ll_count.as<int32_t>();
    std::fill(cnt, cnt + E_loc, 0);
    const char* staging = static_cast<const char*>(window->local()) + staging_off;
    for (int s = 0; s < R; ++s)
      for (int64_t i = 0; i < from[size_t(s)]; ++i) {
        const char* r =
            staging + (size_t(s) * size_t(ep.max_tokens_per_rank) + size_t(i)) * slot_bytes;
        int32_t src_token;
        std::memcpy(&src_token, r + rec.src_off, 4);
        const int32_t* lid = reinterpret_cast<const int32_t*>(r + rec.ids_off);
        for (int k = 0; k < Kp; ++k) {
          const int le = lid[k];
          if (le < 0) continue;
          EPMOE_CHECK(le < E_loc && cnt[le] < m_max, kInternal,
                      "rank {}: bad local expert {} from rank {}", rank, le, s);
          const int64_t row = cnt[le]++;
          std::memcpy(static_cast<char*>(ll_recv_x.view().data) + (size_t(le) * size_t(m_max) + size_t(row)) * rec.payload,
                      r, rec.payload);
          int32_t* src = ll_src.as<int32_t>() + (int64_t(le) * m_max + row) * 3;
          src[0] = s;
          src[1] = src_token;
          src[2] = k;
        }
      }
  }

  void ll_experts() {
    experts_masked_cpu(ll_out, ll_recv_x, ll_count, weights.w13, weights.w2, rank * E_loc, threads);
  }

  void ll_combine_send() {
    const int64_t m_max = int64_t(R) * ep.max_tokens_per_rank;
    const int32_t* cnt = ll_count.as<int32_t>();
    const size_t row_bytes = size_t(H) * 4;
    const int64_t before = remote_bytes();
    for (int e = 0; e < E_loc; ++e)
      for (int64_t i = 0; i < cnt[e]; ++i) {
        const int32_t* src = ll_src.as<int32_t>() + (int64_t(e) * m_max + i) * 3;
        char* dst = static_cast<char*>(window->peer(src[0])) + combine_off +
                    (size_t(src[1]) * size_t(Kp) + size_t(src[2])) * row_bytes;
        std::memcpy(dst, ll_out.as<float>() + (int64_t(e) * m_max + i) * H, row_bytes);
        comm.traffic().bytes_to_peer[size_t(src[0])] += int64_t(row_bytes);
      }
    traffic.combine_bytes = remote_bytes() - before;
    for (int s = 0; s < R; ++s) flag_store_release(flags(s, comb_flags_off) + rank, seq);
  }

  void ll_combine_recv(const TensorView& y) {
    y.expect("y", DType::kF32, {T, H});
    uint64_t* mine = flags(rank, comb_flags_off);
    for (int s = 0; s < R; ++s) comm.wait_flag(mine + s, seq, s, "combine flag");
    const float* rows_base = reinterpret_cast<const float*>(static_cast<const char*>(window->local()) + combine_off);
    std::vector<float> acc(size_t(Kp) * size_t(H));
    std::vector<int> keys(static_cast<size_t>(Kp));
    std::vector<const float*> rows(static_cast<size_t>(Kp));
    std::vector<float> tw(static_cast<size_t>(Kp));
    std::vector<char> is_sum(size_t(Kp), 0);
    const int32_t* id = topk_ids.as<int32_t>();
    const float* w = topk_weights.as<float>();
    for (int64_t t = 0; t < T; ++t) {
      int n = 0;
      for (int k = 0; k < Kp; ++k) {
        const int e = id[t * Kp + k];
        if (e < 0 || e >= E) continue;
        keys[size_t(n)] = e;
        rows[size_t(n)] = rows_base + (t * Kp + k) * H;
        tw[size_t(n)] = w[t * Kp + k];
        is_sum[size_t(n)] = 0;
        ++n;
      }
      shared_items(t, &n, keys.data(), rows.data(), tw.data(), is_sum.data());
      reduce_token(y.as<float>() + t * H, n, keys.data(), rows.data(), tw.data(), is_sum.data(),
                   acc);
    }
  }

};

}  // namespace epmoe

namespace epmoe {

EpRankCpu::EpRankCpu(Communicator& comm, const MoeWeights& weights, const EpConfig& ep,
                     int threads)
    : comm_(comm), impl_(std::make_unique<Impl>(comm, weights, ep, threads)) {}

EpRankCpu::~EpRankCpu() = default;

void EpRankCpu::normal_dispatch(const TensorView& x, const TensorView& ids, const TensorView& w) {
  impl_->normal_dispatch(x, ids, w);
}
void EpRankCpu::normal_experts() { impl_->normal_experts(); }
void EpRankCpu::normal_combine(const TensorView& y) { impl_->normal_combine(y); }
void EpRankCpu::ll_dispatch_send(const TensorView& x, const TensorView& ids,
                                 const TensorView& w) {
  impl_->ll_dispatch_send(x, ids, w);
}
void EpRankCpu::ll_dispatch_recv() { impl_->ll_dispatch_recv(); }
void EpRankCpu::ll_experts() { impl_->ll_experts(); }
void EpRankCpu::ll_combine_send() { impl_->ll_combine_send(); }
void EpRankCpu::ll_combine_recv(const TensorView& y) { impl_->ll_combine_recv(y); }
void EpRankCpu::compute_shared(const TensorView& x) {
  EPMOE_CHECK(x.data == impl_->x.data && x.shape == impl_->x.shape, kInvalidArgument,
              "compute_shared must get the tokens of the current dispatch");
  impl_->compute_shared();
}

const Tensor& EpRankCpu::recv_x() const {
  return impl_->ep.mode == EpMode::kNormal ? impl_->recv_x : impl_->ll_recv_x;
}
const Tensor& EpRankCpu::recv_topk_ids() const { return impl_->recv_ids; }
const Tensor& EpRankCpu::recv_topk_weights() const { return impl_->recv_w; }
const Tensor& EpRankCpu::recv_expert_counts() const { return impl_->recv_counts; }
const Tensor& EpRankCpu::recv_count() const { return impl_->ll_count; }
const Tensor& EpRankCpu::recv_src() const { return impl_->ll_src; }
const EpTraffic& EpRankCpu::last_traffic() const { return impl_->traffic; }

Tensor EpRankCpu::forward(const TensorView& x, EpStageTimes* times) {
  Impl& im = *impl_;
  const MoeConfig& cfg = im.cfg;
  EPMOE_CHECK(x.shape.rank == 2 && x.shape[1] == cfg.hidden, kInvalidArgument,
              "rank {}: input must be [T, {}], got {}", im.rank, cfg.hidden, x.shape.str());
  const int64_t T = x.shape[0];
  EPMOE_CHECK(T <= im.ep.max_tokens_per_rank, kInvalidArgument,
              "rank {} brings {} tokens, more than max_tokens_per_rank = {}", im.rank, T,
              im.ep.max_tokens_per_rank);
  const auto t0 = Clock::now();
  Tensor logits(DType::kF32, {T, cfg.n_routed_experts});
  Tensor ids(DType::kI32, {T, cfg.num_slots()}), w(DType::kF32, {T, cfg.num_slots()});
  gate_gemm_cpu(logits, x, im.weights.gate, im.threads);
  select_experts_cpu(ids, w, logits, im.weights.gate_bias, cfg, im.threads);
  const double gate_ms = ms_since(t0);
  Tensor y = forward(x, ids, w, times);
  if (times) {
    times->gate = gate_ms;
    times->total += gate_ms;
  }
  return y;
}

Tensor EpRankCpu::forward(const TensorView& x, const TensorView& ids, const TensorView& w,
                          EpStageTimes* times) {
  Impl& im = *impl_;
  const MoeConfig& cfg = im.cfg;
  EpStageTimes st;
  const auto t_start = Clock::now();
  auto t0 = Clock::now();
  const int64_t T = x.shape.rank == 2 ? x.shape[0] : 0;
  Tensor y(DType::kF32, {T, cfg.hidden});
  if (im.ep.mode == EpMode::kNormal) {
    t0 = Clock::now();
    normal_dispatch(x, ids, w);
    st.dispatch = ms_since(t0);
    t0 = Clock::now();
    im.compute_shared();
    st.shared = ms_since(t0);
    t0 = Clock::now();
    normal_experts();
    st.experts = ms_since(t0);
    t0 = Clock::now();
    normal_combine(y);
    st.combine = ms_since(t0);
  } else {
    t0 = Clock::now();
    ll_dispatch_send(x, ids, w);
    st.dispatch = ms_since(t0);
    t0 = Clock::now();
    im.compute_shared();  // between the halves: hides the dispatch latency
    st.shared = ms_since(t0);
    t0 = Clock::now();
    ll_dispatch_recv();
    st.dispatch += ms_since(t0);
    t0 = Clock::now();
    ll_experts();
    st.experts = ms_since(t0);
    t0 = Clock::now();
    ll_combine_send();
    ll_combine_recv(y);
    st.combine = ms_since(t0);
  }
  t0 = Clock::now();
  if (cfg.n_shared_experts > 0 && !cfg.fuse_shared) {
    float* yp = y.as<float>();
    const float* sp = im.shared_out.as<float>();
    for (int64_t i = 0; i < T * cfg.hidden; ++i) yp[i] += sp[i];
  }
  if (cfg.fuse_shared && cfg.scale_on_output) {
    float* yp = y.as<float>();
    for (int64_t i = 0; i < T * cfg.hidden; ++i) yp[i] *= cfg.routed_scaling_factor;
  }
  st.shared += ms_since(t0);
  st.total = ms_since(t_start);
  if (times) *times = st;
  return y;
}

}  // namespace epmoe
