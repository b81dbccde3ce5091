// The canonical order in which a token's expert outputs are added (host and device share it).
//
// DESIGN §5 asks that a token's result not depend on the number of ranks. Rank r holds the
// experts [r·E_loc, (r+1)·E_loc) and, in normal mode, returns one partial sum for them, so the
// sum over a token's slots must be grouped the same way at every R. The order used everywhere:
// a binary tree over the routed expert ids [0, E), each range split at its midpoint; a range's
// value is left + right (a side without contributions is skipped); a leaf adds its slots in slot
// order; fused shared experts (ids >= E) are added after the routed tree, in id then slot order.
// When E/R ranges are nodes of that tree (every power-of-two R dividing E), a rank's partial is
// exactly one node, so EP and single-rank results agree bit for bit.
#pragma once

#include <cstdint>

#include "epmoe/core/config.h"
#include "epmoe/core/hd.h"

namespace epmoe {

// Depth of the lowest common ancestor of ids a <= b in the midpoint tree over [0, num_routed):
// 0 at the root; 127 for equal ids (same leaf: slot order); -1 when b is a shared id (>= E).
EPMOE_HD int reduce_lca_depth(int a, int b, int num_routed) {
  if (a == b) return 127;
  if (b >= num_routed) return -1;
  int lo = 0, hi = num_routed, depth = 0;
  while (true) {
    const int mid = lo + (hi - lo) / 2;
    if (b < mid)
      hi = mid;
    else if (a >= mid)
      lo = mid;
    else
      return depth;
    ++depth;
  }
}

// acc[dst[i]] += acc[src[i]] for i in [0, num_merges) leaves the token's sum in acc[root].
struct ReducePlan {
  int num_items = 0;  // contributions (valid slots)
  int root = -1;      // slot holding the result; -1 when there is nothing to add
  int num_merges = 0;
  int8_t dst[kMaxSlots];
  int8_t src[kMaxSlots];
};

// ids: [n] keys of the n slots (expert ids; -1 = no contribution), n <= kMaxSlots.
EPMOE_HD void plan_reduce(ReducePlan& plan, const int* ids, int n, int num_routed) {
  int8_t order[kMaxSlots];
  int m = 0;
  for (int k = 0; k < n; ++k) {
    if (ids[k] < 0) continue;
    int j = m++;  // stable insertion by id
    while (j > 0 && ids[order[j - 1]] > ids[k]) {
      order[j] = order[j - 1];
      --j;
    }
    order[j] = int8_t(k);
  }
  plan.num_items = m;
  plan.num_merges = 0;
  plan.root = m > 0 ? order[0] : -1;
  // depth[i]: boundary between alive items i and i+1 (deeper binds first, leftmost on ties).
  int depth[kMaxSlots];
  for (int i = 0; i + 1 < m; ++i)
    depth[i] = reduce_lca_depth(ids[order[i]], ids[order[i + 1]], num_routed);
  int alive = m;
  while (alive > 1) {
    int best = 0;
    for (int i = 1; i + 1 < alive; ++i)
      if (depth[i] > depth[best]) best = i;
    plan.dst[plan.num_merges] = order[best];
    plan.src[plan.num_merges] = order[best + 1];
    ++plan.num_merges;
    // order[best] absorbs order[best+1]; the merged item keeps the right boundary of best+1.
    for (int i = best + 1; i + 1 < alive; ++i) order[i] = order[i + 1];
    for (int i = best; i + 2 < alive; ++i) depth[i] = depth[i + 1];
    --alive;
  }
}

// The canonical sum of one token, VEC columns at a time, once each item's term sits in
// slot(k, i) (item k, column i): adds the terms pairwise in the plan's order and writes the
// root's sum to res. Every reduction of a token's expert outputs goes through here (the GPU
// post_reorder and combine kernels; the CPU reference walks the same plan row by row).
template <int VEC, class Slot>
EPMOE_HD void reduce_in_plan_order(const ReducePlan& plan, Slot&& slot, float* res) {
  // VEC is a compile-time constant: the column loops unroll without a pragma.
  for (int m = 0; m < plan.num_merges; ++m) {
    const int d = plan.dst[m], s = plan.src[m];
    for (int i = 0; i < VEC; ++i) slot(d, i) = slot(d, i) + slot(s, i);
  }
  for (int i = 0; i < VEC; ++i) res[i] = slot(plan.root, i);
}

}  // namespace epmoe
