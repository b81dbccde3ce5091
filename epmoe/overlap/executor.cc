#include "epmoe/overlap/executor.h"

#include "epmoe/core/error.h"

namespace epmoe {

Step Step::layer(LayerOp op) {
  Step s;
  s.kind = Kind::kLayer;
  s.op = op;
  s.name = layer_op_name(op);
  return s;
}

Step Step::user(std::string name, std::function<void(int mb)> fn) {
  Step s;
  s.kind = Kind::kUser;
  s.name = std::move(name);
  s.fn = std::move(fn);
  return s;
}

Step Step::yield() {
  Step s;
  s.kind = Kind::kYield;
  s.name = "Y";
  return s;
}

const char* overlap_name(OverlapKind k) {
  switch (k) {
    case OverlapKind::kNone:
      return "none";
    case OverlapKind::kTbo:
      return "tbo";
    case OverlapKind::kSbo:
      return "sbo";
  }
  return "?";
}

OverlapKind parse_overlap(const std::string& s) {
  for (OverlapKind k : {OverlapKind::kNone, OverlapKind::kTbo, OverlapKind::kSbo})
    if (s == overlap_name(k)) return k;
  EPMOE_FAIL(kInvalidArgument, "unknown overlap strategy '{}' (expected none, tbo, sbo or auto)",
             s);
}

namespace {

// Appends a user step when the user supplied that operation.
void add_user(std::vector<Step>& v, const char* name, const std::function<void(int)>& fn) {
  if (fn) v.push_back(Step::user(name, fn));
}

}  // namespace

Strategy make_strategy(OverlapKind kind, EpMode mode, const UserOps& u) {
  using L = LayerOp;
  Strategy s;
  s.kind = kind;
  std::vector<Step>& v = s.steps;
  auto op = [&](L o) { v.push_back(Step::layer(o)); };
  auto yield = [&] { v.push_back(Step::yield()); };
  switch (kind) {
    case OverlapKind::kNone:
      add_user(v, "attn_prepare", u.attn_prepare);
      add_user(v, "attn_core", u.attn_core);
      add_user(v, "mlp_prepare", u.mlp_prepare);
      // The shared expert before the routed path: fused shared slices are part of the
      // canonical sum combine_recv forms, so every list runs it before combine_recv.
      for (L o : {L::kGate, L::kSelectExperts, L::kSharedExperts, L::kDispatchSend,
                  L::kDispatchRecv, L::kExperts, L::kCombineSend, L::kCombineRecv, L::kOutput})
        op(o);
      add_user(v, "layer_postprocess", u.layer_postprocess);
      s.plan = ForwardPlan{.num_micro_batches = 1, .concurrent = false};
      break;
    case OverlapKind::kSbo:
      // Seed 001, first half: the shared expert fills the dispatch latency, on a lane of its own
      // (measured on 2 x H200: on the compute lane its time lands on the critical path, 0.88x;
      // on its own lane it runs long beside the routed GEMM but finishes before the combine).
      add_user(v, "attn_prepare", u.attn_prepare);
      add_user(v, "attn_core", u.attn_core);
      add_user(v, "mlp_prepare", u.mlp_prepare);
      for (L o : {L::kGate, L::kSelectExperts, L::kDispatchSend, L::kSharedExperts,
                  L::kDispatchRecv, L::kExperts, L::kCombineSend, L::kCombineRecv, L::kOutput})
        op(o);
      add_user(v, "layer_postprocess", u.layer_postprocess);
      // Second half: combine_send overlaps the down GEMM, block by block (signalled_combine).
      s.plan = ForwardPlan{.num_micro_batches = 1,
                           .concurrent = true,
                           .shared_lane = true,
                           .signalled_combine = true};
      break;
    case OverlapKind::kTbo:
      if (mode == EpMode::kLowLatency) {
        // Decode (seed 000): d = 2, combine_recv in a stage of its own.
        add_user(v, "attn_prepare", u.attn_prepare);
        yield();
        add_user(v, "attn_core", u.attn_core);
        add_user(v, "mlp_prepare", u.mlp_prepare);
        op(L::kGate);
        op(L::kSelectExperts);
        yield();
        op(L::kDispatchSend);
        op(L::kSharedExperts);
        yield();
        op(L::kDispatchRecv);
        op(L::kExperts);
        op(L::kCombineSend);
        yield();
        op(L::kCombineRecv);
        yield();
        op(L::kOutput);
        add_user(v, "layer_postprocess", u.layer_postprocess);
        s.delta = 2;
        s.plan =
            ForwardPlan{.num_micro_batches = 2, .split = SplitRule::kHalves, .concurrent = true};
      } else {
        // Prefill: d = 0.
        add_user(v, "attn_prepare", u.attn_prepare);
        add_user(v, "attn_core", u.attn_core);
        add_user(v, "mlp_prepare", u.mlp_prepare);
        op(L::kGate);
        op(L::kSelectExperts);
        op(L::kDispatchSend);
        yield();
        op(L::kDispatchRecv);
        op(L::kExperts);
        op(L::kCombineSend);
        yield();
        op(L::kSharedExperts);
        op(L::kCombineRecv);
        op(L::kOutput);
        add_user(v, "layer_postprocess", u.layer_postprocess);
        s.delta = 0;
        s.plan =
            ForwardPlan{.num_micro_batches = 2, .split = SplitRule::kBalanced, .concurrent = true};
      }
      break;
  }
  return s;
}

OverlapKind choose_overlap(const OverlapConfig& c, EpMode mode, int64_t t) {
  if (mode == EpMode::kNormal)
    return c.prefill_tbo_min_tokens > 0 && t >= c.prefill_tbo_min_tokens ? OverlapKind::kTbo
                                                                         : OverlapKind::kNone;
  if (c.decode_tbo_min_tokens > 0 && t >= c.decode_tbo_min_tokens) return OverlapKind::kTbo;
  if (c.decode_sbo_min_tokens > 0 && t >= c.decode_sbo_min_tokens) return OverlapKind::kSbo;
  return OverlapKind::kNone;
}

std::vector<std::vector<const Step*>> stages_of(const Strategy& s) {
  std::vector<std::vector<const Step*>> out(1);
  for (const Step& st : s.steps) {
    if (st.kind == Step::Kind::kYield)
      out.emplace_back();
    else
      out.back().push_back(&st);
  }
  return out;
}

namespace {

// Calls visit(mb, stage) in the executor's stage order.
template <class Visit>
void for_each_stage(const Strategy& s, size_t num_stages, Visit&& visit) {
  const int nmb = s.plan.num_micro_batches;
  EPMOE_CHECK(nmb == 1 || nmb == 2, kInvalidArgument,
              "a strategy runs one or two micro-batches, not {}", nmb);
  if (nmb == 1) {
    for (size_t i = 0; i < num_stages; ++i) visit(0, i);
    return;
  }
  const size_t d = size_t(s.delta);
  EPMOE_CHECK(s.delta >= 0 && d <= num_stages, kInvalidArgument, "delta {} outside [0, {}] stages",
              s.delta, num_stages);
  size_t a = 0, b = 0;
  for (; a < d; ++a) visit(0, a);
  while (a < num_stages) {
    visit(0, a++);
    visit(1, b++);
  }
  while (b < num_stages) visit(1, b++);
}

}  // namespace

std::vector<std::pair<int, std::string>> issue_order(const Strategy& s) {
  const auto stages = stages_of(s);
  std::vector<std::pair<int, std::string>> out;
  for_each_stage(s, stages.size(), [&](int mb, size_t i) {
    for (const Step* st : stages[i]) out.emplace_back(mb, st->name);
  });
  return out;
}

void execute(MoeLayerRank& layer, const Strategy& s) {
  EPMOE_CHECK(s.plan.num_micro_batches <= layer.max_micro_batches(), kInvalidArgument,
              "strategy {} needs {} micro-batch states, the layer holds {}", overlap_name(s.kind),
              s.plan.num_micro_batches, layer.max_micro_batches());
  const auto stages = stages_of(s);
  layer.begin_forward(s.plan);
  for_each_stage(s, stages.size(), [&](int mb, size_t i) {
    for (const Step* st : stages[i]) {
      if (st->kind == Step::Kind::kLayer)
        layer.run(st->op, mb);
      else
        layer.run_user(st->name, mb, st->fn);
    }
  });
  layer.end_forward();
}

std::string Strategy::describe() const {
  std::string out = overlap_name(kind);
  if (plan.num_micro_batches == 2) out += " (d = " + std::to_string(delta) + ")";
  out += ": [";
  bool first = true;
  for (const Step& st : steps) {
    out += st.kind == Step::Kind::kYield ? " |" : (first ? "" : ", ") + st.name;
    if (st.kind == Step::Kind::kYield)
      first = true;
    else
      first = false;
    if (st.kind == Step::Kind::kYield) out += " ";
  }
  return out + "]";
}

}  // namespace epmoe
