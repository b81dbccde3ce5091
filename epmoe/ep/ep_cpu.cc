// EpMicroBatchCpu: what both modes share (construction, the halves' order, records, the
// source-side reduction). The modes themselves: ep_cpu_normal.cc, ep_cpu_ll.cc.
#include "epmoe/ep/ep_cpu.h"

#include <algorithm>
#include <cstring>

#include "epmoe/permute/reduce_plan.h"

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
      if (want_hi <= mid)
        hi = mid;
      else if (want_lo >= mid)
        lo = mid;
      else
        return false;
    }
  }
  return true;
}

const char* micro_batch_name(int index) {
  static const char* const kNames[] = {"A", "B", "C", "D"};
  return index >= 0 && index < 4 ? kNames[index] : "?";
}

EpMicroBatchCpu::Record::Record(int64_t h, DType dt, int kp) {
  payload = size_t(h) * dtype_size(dt);
  src_off = (payload + 7) / 8 * 8;
  ids_off = src_off + 4;
  w_off = ids_off + 4 * size_t(kp);
  bytes = (w_off + 4 * size_t(kp) + 7) / 8 * 8;
}

EpMicroBatchCpu::EpMicroBatchCpu(Communicator& comm, const MoeWeights& weights, const EpConfig& ep,
                                 const EpMicroBatchDesc& desc)
    : comm_(comm), weights_(weights), cfg_(weights.config), ep_(ep), desc_(desc) {
  cfg_.validate();
  ep_.validate(cfg_);
  EPMOE_CHECK(comm_.size() == ep_.num_ranks, kInvalidConfig,
              "the communicator has {} ranks, the EP config {}", comm_.size(), ep_.num_ranks);
  EPMOE_CHECK(
      desc_.capacity >= 0 && desc_.capacity <= std::max<int64_t>(ep_.max_tokens_per_rank, 1),
      kInvalidArgument, "micro-batch {} capacity {} outside [0, max_tokens_per_rank = {}]",
      micro_batch_name(desc_.index), desc_.capacity, ep_.max_tokens_per_rank);
  R_ = ep_.num_ranks;
  rank_ = comm_.rank();
  E_ = cfg_.n_routed_experts;
  E_loc_ = E_ / R_;
  Kp_ = cfg_.num_slots();
  H_ = cfg_.hidden;
  if (ep_.mode == EpMode::kLowLatency) ll_create_window();
}

EpMicroBatchCpu::~EpMicroBatchCpu() = default;

const Tensor& EpMicroBatchCpu::recv_x() const {
  return ep_.mode == EpMode::kNormal ? n_.recv_x : ll_.recv_x;
}

void EpMicroBatchCpu::expect_phase(Phase want, const char* op) const {
  static const char* const kAfter[] = {"nothing (a new forward)", "dispatch_send", "dispatch_recv",
                                       "experts", "combine_send"};
  EPMOE_CHECK(phase_ == want, kInvalidArgument,
              "rank {}, micro-batch {}: {} must follow {}, but the last step was {}", rank_,
              micro_batch_name(desc_.index), op, kAfter[int(want)], kAfter[int(phase_)]);
}

void EpMicroBatchCpu::dispatch_send(const TensorView& x, const TensorView& ids,
                                    const TensorView& w) {
  expect_phase(Phase::kIdle, "dispatch_send");
  EPMOE_CHECK(x.shape.rank == 2 && x.shape[1] == H_, kInvalidArgument,
              "rank {}: input must be [T, {}], got {}", rank_, H_, x.shape.str());
  EPMOE_CHECK(x.dtype == DType::kBF16 || x.dtype == DType::kF32, kInvalidArgument,
              "rank {}: input must be bf16 or f32, got {}", rank_, dtype_name(x.dtype));
  const int64_t t = x.shape[0];
  EPMOE_CHECK(t <= desc_.capacity, kInvalidArgument,
              "rank {}, micro-batch {} brings {} tokens, more than its capacity {}", rank_,
              micro_batch_name(desc_.index), t, desc_.capacity);
  ids.expect("topk_ids", DType::kI32, {t, Kp_});
  w.expect("topk_weights", DType::kF32, {t, Kp_});
  x_ = x;
  ids_ = ids;
  w_ = w;
  T_ = t;
  rec_ = Record(H_, x.dtype, Kp_);
  traffic_ = EpTraffic{};
  ++seq_;
  if (ep_.mode == EpMode::kNormal)
    normal_dispatch_send();
  else
    ll_dispatch_send();
  phase_ = Phase::kDispatchSent;
}

void EpMicroBatchCpu::dispatch_recv() {
  expect_phase(Phase::kDispatchSent, "dispatch_recv");
  if (ep_.mode == EpMode::kNormal)
    normal_dispatch_recv();
  else
    ll_dispatch_recv();
  phase_ = Phase::kDispatched;
}

void EpMicroBatchCpu::experts() {
  expect_phase(Phase::kDispatched, "experts");
  if (ep_.mode == EpMode::kNormal)
    normal_experts();
  else
    ll_experts();
  phase_ = Phase::kExpertsDone;
}

void EpMicroBatchCpu::combine_send() {
  expect_phase(Phase::kExpertsDone, "combine_send");
  if (ep_.mode == EpMode::kNormal)
    normal_combine_send();
  else
    ll_combine_send();
  phase_ = Phase::kCombineSent;
}

void EpMicroBatchCpu::combine_recv(const TensorView& routed, std::vector<uint8_t>* has_routed) {
  expect_phase(Phase::kCombineSent, "combine_recv");
  routed.expect("routed output", DType::kF32, {T_, H_});
  has_routed->assign(size_t(T_), 0);
  if (ep_.mode == EpMode::kNormal)
    normal_combine_recv(routed, has_routed);
  else
    ll_combine_recv(routed, has_routed);
  phase_ = Phase::kIdle;
}

void EpMicroBatchCpu::write_record(char* dst, int64_t t, int dest) const {
  std::memcpy(dst, static_cast<const char*>(x_.data) + size_t(t) * rec_.payload, rec_.payload);
  const int32_t src = int32_t(t);
  std::memcpy(dst + rec_.src_off, &src, 4);
  const int32_t* id = ids_.as<int32_t>() + t * Kp_;
  const float* w = w_.as<float>() + t * Kp_;
  int32_t* lid = reinterpret_cast<int32_t*>(dst + rec_.ids_off);
  float* lw = reinterpret_cast<float*>(dst + rec_.w_off);
  for (int k = 0; k < Kp_; ++k) {
    lid[k] = owner(id[k]) == dest ? id[k] - dest * E_loc_ : -1;
    lw[k] = w[k];
  }
}

void reduce_terms_cpu(float* y, int64_t h, int num_routed, const ReduceTerm* terms, int n,
                      std::vector<float>& acc) {
  EPMOE_CHECK(n >= 0 && n <= kMaxSlots, kInternal, "{} terms in one token's sum (at most {})", n,
              kMaxSlots);
  int keys[kMaxSlots];
  for (int i = 0; i < n; ++i) keys[i] = terms[i].key;
  ReducePlan plan;
  plan_reduce(plan, keys, n, num_routed);
  if (plan.root < 0) {
    std::fill(y, y + h, 0.0f);
    return;
  }
  if (acc.size() < size_t(n) * size_t(h)) acc.resize(size_t(n) * size_t(h));
  for (int i = 0; i < n; ++i) {
    if (keys[i] < 0) continue;
    float* a = acc.data() + size_t(i) * size_t(h);
    if (terms[i].is_sum) {
      std::memcpy(a, terms[i].row, size_t(h) * 4);
    } else {
      const float wt = terms[i].weight;
      for (int64_t j = 0; j < h; ++j) a[j] = wt * terms[i].row[j];
    }
  }
  for (int m = 0; m < plan.num_merges; ++m) {
    float* d = acc.data() + size_t(plan.dst[m]) * size_t(h);
    const float* s = acc.data() + size_t(plan.src[m]) * size_t(h);
    for (int64_t j = 0; j < h; ++j) d[j] += s[j];
  }
  std::memcpy(y, acc.data() + size_t(plan.root) * size_t(h), size_t(h) * 4);
}

}  // namespace epmoe
