#include "epmoe/layer/layer_rank_cpu.h"

#include <cstring>

#include "epmoe/experts/experts_cpu.h"
#include "epmoe/layer/moe_layer_cpu.h"
#include "epmoe/routing/gate_cpu.h"

namespace epmoe {

namespace {

constexpr uint32_t bit(LayerOp op) { return 1u << unsigned(op); }

// The data each operation needs from the operations before it on the same micro-batch (the
// order itself is the executor's; this only refuses an order that cannot work).
uint32_t needs(LayerOp op) {
  using L = LayerOp;
  switch (op) {
    case L::kGate:
      return 0;
    case L::kSelectExperts:
      return bit(L::kGate);
    case L::kDispatchSend:
      return bit(L::kSelectExperts);
    case L::kDispatchRecv:
      return bit(L::kDispatchSend);
    case L::kExperts:
      return bit(L::kDispatchRecv);
    case L::kCombineSend:
      return bit(L::kExperts);
    case L::kCombineRecv:
      return bit(L::kCombineSend);
    case L::kSharedExperts:
      return 0;
    case L::kOutput:
      return bit(L::kCombineRecv) | bit(L::kSharedExperts);
  }
  return 0;
}

// Rows [begin, begin + n) of a row-major [T, ...] view.
TensorView row_view(const TensorView& t, int64_t begin, int64_t n) {
  TensorView v = t;
  const int64_t row_elems = t.shape[0] > 0 ? t.numel() / t.shape[0] : 0;
  v.data = static_cast<char*>(t.data) + size_t(begin * row_elems) * dtype_size(t.dtype);
  v.shape.dims[0] = n;
  return v;
}

}  // namespace

MoeLayerRankCpu::MoeLayerRankCpu(Communicator& comm, const MoeWeights& weights, const EpConfig& ep,
                                 int threads)
    : comm_(comm), weights_(weights), cfg_(weights.config), ep_(ep), threads_(threads) {
  cfg_.validate();
  ep_.validate(cfg_);
  EPMOE_CHECK(comm_.size() == ep_.num_ranks, kInvalidConfig,
              "the communicator has {} ranks, the EP config {}", comm_.size(), ep_.num_ranks);
  rank_ = comm_.rank();
  // Micro-batch A carries every token of a plain forward (T_max); B at most half of them
  // (micro_batch_range gives either the odd token, so ceil(T_max / 2)).
  const int64_t caps[kMicroBatches] = {ep_.max_tokens_per_rank, (ep_.max_tokens_per_rank + 1) / 2};
  for (int mb = 0; mb < kMicroBatches; ++mb)
    mbs_[size_t(mb)].ep = std::make_unique<EpMicroBatchCpu>(
        comm_, weights_, ep_,
        EpMicroBatchDesc{.index = mb, .capacity = caps[mb], .threads = threads_});
}

MoeLayerRankCpu::~MoeLayerRankCpu() = default;

void MoeLayerRankCpu::check_input(const TensorView& x) const {
  EPMOE_CHECK(x.shape.rank == 2 && x.shape[1] == cfg_.hidden, kInvalidArgument,
              "rank {}: input must be [T, {}], got {}", rank_, cfg_.hidden, x.shape.str());
  EPMOE_CHECK(x.dtype == DType::kBF16 || x.dtype == DType::kF32, kInvalidArgument,
              "rank {}: input must be bf16 or f32, got {}", rank_, dtype_name(x.dtype));
  EPMOE_CHECK(x.data != nullptr || x.shape[0] == 0, kInvalidArgument, "rank {}: input has no data",
              rank_);
  EPMOE_CHECK(x.shape[0] <= ep_.max_tokens_per_rank, kInvalidArgument,
              "rank {} brings {} tokens, more than max_tokens_per_rank = {}", rank_, x.shape[0],
              ep_.max_tokens_per_rank);
}

void MoeLayerRankCpu::set_input(const TensorView& x) {
  check_input(x);
  x_ = x;
  given_routing_ = false;
}

void MoeLayerRankCpu::set_input(const TensorView& x, const TensorView& ids, const TensorView& w) {
  check_input(x);
  const int64_t t = x.shape[0];
  const int kp = cfg_.num_slots();
  ids.expect("topk_ids", DType::kI32, {t, kp});
  w.expect("topk_weights", DType::kF32, {t, kp});
  const int32_t* id = ids.as<int32_t>();
  const int max_id = cfg_.num_expert_ids();
  for (int64_t i = 0; i < t * kp; ++i)
    EPMOE_CHECK(id[i] >= -1 && id[i] < max_id, kInvalidArgument,
                "rank {}: topk_ids[{}, {}] = {} is outside [-1, {})", rank_, i / kp, i % kp, id[i],
                max_id);
  x_ = x;
  given_routing_ = true;
  topk_ids_ = to_dtype(ids, DType::kI32);
  topk_weights_ = to_dtype(w, DType::kF32);
}

const Tensor& MoeLayerRankCpu::output() const {
  EPMOE_CHECK(complete_, kInvalidArgument, "rank {}: no complete forward to read the output of",
              rank_);
  return y_;
}

EpTraffic MoeLayerRankCpu::last_traffic() const {
  EpTraffic t;
  for (int mb = 0; mb < num_mb_; ++mb) t += mbs_[size_t(mb)].ep->traffic();
  return t;
}

const EpMicroBatchCpu& MoeLayerRankCpu::micro_batch(int mb) const {
  EPMOE_CHECK(mb >= 0 && mb < kMicroBatches, kInvalidArgument, "micro-batch {} of {}", mb,
              kMicroBatches);
  return *mbs_[size_t(mb)].ep;
}

TokenRange MoeLayerRankCpu::rows(int mb) const {
  EPMOE_CHECK(mb >= 0 && mb < num_mb_, kInvalidArgument, "micro-batch {} of {}", mb, num_mb_);
  return mbs_[size_t(mb)].rows;
}

void MoeLayerRankCpu::begin_forward(const ForwardPlan& plan) {
  EPMOE_CHECK(plan.num_micro_batches >= 1 && plan.num_micro_batches <= kMicroBatches,
              kInvalidArgument, "rank {}: {} micro-batches (this layer holds {})", rank_,
              plan.num_micro_batches, kMicroBatches);
  EPMOE_CHECK(x_.shape.rank == 2, kInvalidArgument, "rank {}: begin_forward before set_input",
              rank_);
  const int64_t T = x_.shape[0], H = cfg_.hidden;
  const int kp = cfg_.num_slots();
  if (!given_routing_) {
    topk_ids_ = Tensor(DType::kI32, {T, kp});
    topk_weights_ = Tensor(DType::kF32, {T, kp});
  }
  y_ = Tensor(DType::kF32, {T, H});
  num_mb_ = plan.num_micro_batches;
  complete_ = false;
  trace_.clear();
  for (int mb = 0; mb < num_mb_; ++mb) {
    MicroBatch& m = mbs_[size_t(mb)];
    m.rows = micro_batch_range(T, num_mb_, mb, plan.split, rank_);
    EPMOE_CHECK(m.rows.size() <= m.ep->capacity(), kInternal,
                "rank {}: micro-batch {} has {} tokens, its capacity is {}", rank_,
                micro_batch_name(mb), m.rows.size(), m.ep->capacity());
    const int64_t n = m.rows.size();
    m.x = row_view(x_, m.rows.begin, n);
    m.ids = row_view(topk_ids_.view(), m.rows.begin, n);
    m.w = row_view(topk_weights_.view(), m.rows.begin, n);
    m.logits = Tensor();
    m.routed = Tensor(DType::kF32, {n, H});
    m.has_routed.clear();
    m.shared = Tensor();
    m.done = 0;
  }
  t_begin_ = Clock::now();
}

void MoeLayerRankCpu::record(const std::string& name, int mb, Clock::time_point t0) {
  if (!tracing_) return;
  auto us = [&](Clock::time_point t) {
    return std::chrono::duration<double, std::micro>(t - t_begin_).count();
  };
  trace_.push_back(OpTiming{name, mb, OpLane::kCompute, us(t0), us(Clock::now())});
}

void MoeLayerRankCpu::run(LayerOp op, int mb) {
  EPMOE_CHECK(mb >= 0 && mb < num_mb_, kInvalidArgument,
              "rank {}: {} on micro-batch {}, but the forward has {} (begin_forward first)", rank_,
              layer_op_name(op), mb, num_mb_);
  MicroBatch& m = mbs_[size_t(mb)];
  const auto t0 = Clock::now();
  try {
    EPMOE_CHECK(!(m.done & bit(op)), kInvalidArgument, "{} ran twice in one forward",
                layer_op_name(op));
    const uint32_t missing = needs(op) & ~m.done;
    for (int o = 0; o < kNumLayerOps; ++o)
      EPMOE_CHECK(!(missing & bit(LayerOp(o))), kInvalidArgument, "{} needs {}, which has not run",
                  layer_op_name(op), layer_op_name(LayerOp(o)));
    run_op(op, m);
  } catch (const Error& e) {
    // NOTES: the context a failure needs to be acted on (which rank, which micro-batch, which
    // operation) is known here, not in the transport that noticed it.
    throw Error(e.kind(), fmt::format("rank {}, micro-batch {}, {}: {}", rank_,
                                      micro_batch_name(mb), layer_op_name(op), e.what()));
  }
  m.done |= bit(op);
  record(layer_op_name(op), mb, t0);
}

void MoeLayerRankCpu::run_user(const std::string& name, int mb,
                               const std::function<void(int)>& fn) {
  EPMOE_CHECK(mb >= 0 && mb < num_mb_, kInvalidArgument,
              "rank {}: {} on micro-batch {}, but the forward has {}", rank_, name, mb, num_mb_);
  const auto t0 = Clock::now();
  if (fn) fn(mb);
  record(name, mb, t0);
}

void MoeLayerRankCpu::end_forward() {
  for (int mb = 0; mb < num_mb_; ++mb)
    EPMOE_CHECK(mbs_[size_t(mb)].done & bit(LayerOp::kOutput), kInvalidArgument,
                "rank {}: end_forward, but micro-batch {}'s output has not run", rank_,
                micro_batch_name(mb));
  complete_ = true;
}

void MoeLayerRankCpu::run_op(LayerOp op, MicroBatch& m) {
  switch (op) {
    case LayerOp::kGate:
      gate(m);
      break;
    case LayerOp::kSelectExperts:
      select_experts(m);
      break;
    case LayerOp::kDispatchSend:
      m.ep->dispatch_send(m.x, m.ids, m.w);
      break;
    case LayerOp::kDispatchRecv:
      m.ep->dispatch_recv();
      break;
    case LayerOp::kExperts:
      m.ep->experts();
      break;
    case LayerOp::kCombineSend:
      m.ep->combine_send();
      break;
    case LayerOp::kCombineRecv:
      m.ep->combine_recv(m.routed, &m.has_routed);
      break;
    case LayerOp::kSharedExperts:
      shared_experts(m);
      break;
    case LayerOp::kOutput:
      output(m);
      break;
  }
}

// Router GEMM on the micro-batch's rows (nothing when the caller gave the routing).
void MoeLayerRankCpu::gate(MicroBatch& m) {
  if (given_routing_) return;
  m.logits = Tensor(DType::kF32, {m.rows.size(), cfg_.n_routed_experts});
  gate_gemm_cpu(m.logits, m.x, weights_.gate, threads_);
}

// Grouped top-k into the micro-batch's rows of the rank's routing.
void MoeLayerRankCpu::select_experts(MicroBatch& m) {
  if (given_routing_) return;
  select_experts_cpu(m.ids, m.w, m.logits, weights_.gate_bias, cfg_, threads_);
}

// The shared expert on the micro-batch's own tokens: the unfused MLP, or the fused slices (one
// [T_mb, H] block per shared expert, added in the output step in the canonical order).
void MoeLayerRankCpu::shared_experts(MicroBatch& m) {
  const int ns = cfg_.n_shared_experts;
  if (ns == 0) return;
  const int64_t T = m.rows.size(), H = cfg_.hidden;
  if (!cfg_.fuse_shared) {
    m.shared = Tensor::zeros(DType::kF32, {T, H});
    add_shared_expert_cpu(m.shared, weights_, m.x, threads_);
    return;
  }
  m.shared = Tensor(DType::kF32, {T, ns, H});
  std::vector<float> tmp(static_cast<size_t>(T * H));
  const int E = cfg_.n_routed_experts;
  for (int j = 0; j < ns; ++j) {
    // FP8 banks: the shared slices carry their block scales (whole blocks: I % 128 == 0).
    const bool fp8 = weights_.fp8();
    mlp_rows_cpu(tmp.data(), m.x, 0, T, bank_slice(weights_.w13, E + j),
                 bank_slice(weights_.w2, E + j),
                 fp8 ? bank_slice(weights_.w13_scale, E + j) : TensorView{},
                 fp8 ? bank_slice(weights_.w2_scale, E + j) : TensorView{});
    for (int64_t t = 0; t < T; ++t)
      std::memcpy(m.shared.as<float>() + (t * ns + j) * H, tmp.data() + t * H, size_t(H) * 4);
  }
}

// y rows = routed part (+ fused shared slots, in the canonical order after the routed tree)
// (+ the unfused shared expert) (x rsf with scale-on-output).
void MoeLayerRankCpu::output(MicroBatch& m) {
  const int64_t T = m.rows.size(), H = cfg_.hidden;
  const int kp = cfg_.num_slots(), E = cfg_.n_routed_experts, ns = cfg_.n_shared_experts;
  float* y = y_.as<float>() + m.rows.begin * H;
  const float* routed = m.routed.as<float>();
  if (cfg_.fuse_shared && ns > 0) {
    const int32_t* id = m.ids.as<int32_t>();
    const float* w = m.w.as<float>();
    std::vector<ReduceTerm> terms(size_t(kp) + 1);
    std::vector<float> acc;
    for (int64_t t = 0; t < T; ++t) {
      int n = 0;
      if (m.has_routed[size_t(t)]) terms[size_t(n++)] = ReduceTerm{0, routed + t * H, 1.0f, true};
      for (int k = 0; k < kp; ++k) {
        const int e = id[t * kp + k];
        if (e < E) continue;
        terms[size_t(n++)] =
            ReduceTerm{e, m.shared.as<float>() + (t * ns + (e - E)) * H, w[t * kp + k], false};
      }
      reduce_terms_cpu(y + t * H, H, E, terms.data(), n, acc);
    }
  } else {
    std::memcpy(y, routed, size_t(T * H) * 4);
  }
  if (ns > 0 && !cfg_.fuse_shared) {
    const float* s = m.shared.as<float>();
    for (int64_t i = 0; i < T * H; ++i) y[i] += s[i];
  }
  if (cfg_.fuse_shared && cfg_.scale_on_output) {
    for (int64_t i = 0; i < T * H; ++i) y[i] *= cfg_.routed_scaling_factor;
  }
}

}  // namespace epmoe
