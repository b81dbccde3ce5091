#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cstdio>

#include "epmoe/cuda/cuda_check.h"
#include "epmoe/cuda/flags.cuh"
#include "epmoe/cuda/fp8.cuh"
#include "epmoe/cuda/nvtx.h"
#include "epmoe/cuda/vec8.cuh"
#include "epmoe/ep/ep_kernels.cuh"
#include "epmoe/permute/reduce_plan.h"

namespace epmoe::cuda::ep {

RecordLayout make_record_layout(int64_t hidden, int num_slots, bool fp8) {
  EPMOE_CHECK(hidden % 8 == 0, kUnsupported,
              "expert parallelism on the GPU needs H % 8 == 0, got {}", hidden);
  EPMOE_CHECK(num_slots <= kMaxDeviceSlots, kUnsupported,
              "expert parallelism on the GPU supports up to {} slots per token, got {}",
              kMaxDeviceSlots, num_slots);
  RecordLayout r;
  r.hidden = hidden;
  r.num_slots = num_slots;
  r.fp8 = fp8;
  const int64_t blocks = (hidden + 127) / 128;
  r.payload = fp8 ? size_t(hidden) + size_t(blocks) * 4 : size_t(hidden) * 2;
  r.scales_off = fp8 ? size_t(hidden) : 0;
  r.src_off = (r.payload + 15) / 16 * 16;
  r.ids_off = r.src_off + 4;
  r.w_off = r.ids_off + 4 * size_t(num_slots);
  r.bytes = (r.w_off + 4 * size_t(num_slots) + 15) / 16 * 16;
  return r;
}

LowLatencyLayout make_ll_layout(int num_ranks, int64_t t_max, const RecordLayout& rec) {
  LowLatencyLayout l;
  l.dispatch_flags = 0;
  l.combine_flags = size_t(num_ranks) * 8;
  l.staging = (l.combine_flags + size_t(num_ranks) * 8 + 127) / 128 * 128;
  l.combine = l.staging + size_t(num_ranks) * size_t(t_max) * rec.bytes;
  l.total = l.combine + size_t(t_max) * size_t(rec.num_slots) * size_t(rec.hidden) * 2;
  return l;
}

namespace {

constexpr int kWarps = 8;  // warps per block of the per-token / per-row kernels
constexpr unsigned kFull = 0xffffffffu;

// Records the first failed wait of the launch sequence (device memory, read by the host).
__device__ void report_wait(DeviceWaitError* err, int rank, int peer, uint64_t expected,
                            uint64_t observed, const char* what) {
  if (atomicCAS(&err->failed, 0, kWaitTimedOut) == 0) {
    err->rank = rank;
    err->peer = peer;
    err->expected = expected;
    err->observed = observed;
    int i = 0;
    for (; what[i] && i < int(sizeof(err->what)) - 1; ++i) err->what[i] = what[i];
    err->what[i] = '\0';
    __threadfence();
  }
  printf("epmoe: rank %d timed out waiting for %s from peer %d: expected %#llx, observed %#llx\n",
         rank, what, peer, (unsigned long long)expected, (unsigned long long)observed);
}

// Block-wide exclusive scan of one int per thread (blockDim.x <= 1024). Returns the prefix and
// the block total.
__device__ int block_exclusive_scan(int v, int* total) {
  __shared__ int warp_sum[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(kFull, x, o);
    if (lane >= o) x += y;
  }
  __syncthreads();
  if (lane == 31) warp_sum[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int w = lane < nwarps ? warp_sum[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(kFull, w, o);
      if (lane >= o) w += y;
    }
    warp_sum[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  const int before = warp == 0 ? 0 : warp_sum[warp - 1];
  *total = warp_sum[nwarps - 1];
  return before + x - v;
}

// ---- records ----
// Plain loads: the rows may have been written by peers (no read-only cache path).
__device__ __forceinline__ void load8(float* v, const __nv_bfloat16* p) {
  bf16x8_to_f32(v, *reinterpret_cast<const uint4*>(p));
}
__device__ __forceinline__ void load8(float* v, const float* p) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  const float4 b = *reinterpret_cast<const float4*>(p + 4);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void store8(float* p, const float* v) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  *reinterpret_cast<float4*>(p + 4) = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void store8(__nv_bfloat16* p, const float* v) {
  uint4 raw;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
  *reinterpret_cast<uint4*>(p) = raw;
}

// One warp writes token t's record for destination `dst`.
__device__ void write_record(char* rec_ptr, const RecordLayout& rec, const __nv_bfloat16* xrow,
                             const int32_t* ids, const float* w, int t, int dst, const EpDims& d,
                             int lane) {
  const int64_t H = rec.hidden;
  if (!rec.fp8) {
    const uint4* src = reinterpret_cast<const uint4*>(xrow);
    uint4* out = reinterpret_cast<uint4*>(rec_ptr);
    for (int64_t v = lane; v < H / 8; v += 32) out[v] = src[v];
  } else {
    // 16 lanes per 128-value block, 8 values per lane; two blocks per warp step.
    const int64_t nblocks = (H + 127) / 128;
    const int half = lane >> 4, sub = lane & 15;
    for (int64_t b0 = 0; b0 < nblocks; b0 += 2) {
      const int64_t b = b0 + half;
      const int64_t c = b * 128 + sub * 8;
      float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      const bool live = b < nblocks && c < H;
      if (live) load8(v, xrow + c);
      float scale;
      const uint2 packed = quantize8_fp8_group128(v, &scale);
      if (live) *reinterpret_cast<uint2*>(rec_ptr + c) = packed;
      if (b < nblocks && sub == 0) reinterpret_cast<float*>(rec_ptr + rec.scales_off)[b] = scale;
    }
  }
  if (lane < d.num_slots) {
    const int id = ids[lane];
    const bool mine = id >= 0 && id < d.num_routed && id / d.local_experts == dst;
    reinterpret_cast<int32_t*>(rec_ptr + rec.ids_off)[lane] =
        mine ? id - dst * d.local_experts : -1;
    reinterpret_cast<float*>(rec_ptr + rec.w_off)[lane] = w[lane];
  }
  if (lane == 0) *reinterpret_cast<int32_t*>(rec_ptr + rec.src_off) = t;
}

// One warp: a record's payload → a bf16 row (FP8 dequantised as q · scale).
__device__ void payload_to_row(__nv_bfloat16* row, const char* rec_ptr, const RecordLayout& rec,
                               int lane) {
  const int64_t H = rec.hidden;
  if (!rec.fp8) {
    const uint4* src = reinterpret_cast<const uint4*>(rec_ptr);
    uint4* out = reinterpret_cast<uint4*>(row);
    for (int64_t v = lane; v < H / 8; v += 32) out[v] = src[v];
  } else {
    const float* scales = reinterpret_cast<const float*>(rec_ptr + rec.scales_off);
    for (int64_t c = int64_t(lane) * 8; c < H; c += 256) {
      const uint2 packed = *reinterpret_cast<const uint2*>(rec_ptr + c);
      const unsigned char* q = reinterpret_cast<const unsigned char*>(&packed);
      const float s = scales[c / 128];
      float v[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        __nv_fp8_e4m3 f;
        f.__x = q[i];
        v[i] = float(f) * s;
      }
      store8(row + c, v);
    }
  }
}

// ---- the canonical reduction of one token by one warp ----
struct Item {
  const void* row;  // nullptr = absent
  float weight;
  int is_f32;  // row holds f32 (else bf16)
  int is_sum;  // a finished partial: added as it is
  int key;     // reduce_plan key (expert id, or a rank's first expert)
};

// items/plan in shared memory (per warp); acc: [kMaxDeviceSlots][8][32] floats of this warp.
// Columns [c_begin, c_end) of the token (multiples of 8).
__device__ void reduce_token_warp(float* y, const Item* items, int n, const ReducePlan& plan,
                                  int64_t c_begin, int64_t c_end, float* acc, int lane) {
  auto slot = [&](int k, int i) -> float& { return acc[(k * 8 + i) * 32 + lane]; };
  for (int64_t c = c_begin + int64_t(lane) * 8; c < c_end; c += 256) {
    float res[8];
    if (plan.root < 0) {
#pragma unroll
      for (int i = 0; i < 8; ++i) res[i] = 0.f;
    } else {
      for (int k = 0; k < n; ++k) {
        const Item& it = items[k];
        if (!it.row) continue;
        float v[8];
        if (it.is_f32)
          load8(v, static_cast<const float*>(it.row) + c);
        else
          load8(v, static_cast<const __nv_bfloat16*>(it.row) + c);
#pragma unroll
        for (int i = 0; i < 8; ++i) slot(k, i) = it.is_sum ? v[i] : it.weight * v[i];
      }
      reduce_in_plan_order<8>(plan, slot, res);
    }
    store8(y + c, res);
  }
}

constexpr int kMaxItems = kMaxRanks + kMaxDeviceSlots;
// Columns one warp reduces per token: the token's H is split over gridDim.y blocks, so a small
// decode batch still spreads over the machine.
constexpr int64_t kCombineCols = 1024;

// Lane 0 plans; the whole warp reduces. Items beyond n are ignored.
__device__ void plan_and_reduce(float* y, Item* items, int n, ReducePlan* plan_smem, int E,
                                int64_t c_begin, int64_t c_end, float* acc, int lane) {
  if (lane == 0) {
    int keys[kMaxSlots];
    int m = 0;
    // Compact present items (plan_reduce takes at most kMaxSlots keys).
    for (int k = 0; k < n; ++k)
      if (items[k].row) {
        items[m] = items[k];
        keys[m] = items[k].key;
        ++m;
      }
    ReducePlan p;
    plan_reduce(p, keys, m, E);
    *plan_smem = p;
  }
  __syncwarp();
  int m = 0;
  if (plan_smem->root >= 0) m = plan_smem->num_items;
  reduce_token_warp(y, items, m, *plan_smem, c_begin, c_end, acc, lane);
  __syncwarp();
}

// ---------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(1024)
    route_layout_kernel(int32_t* dest_slot, int32_t* dest_count, int32_t* dest_pairs,
                        const int32_t* ids, const int32_t* num_tokens, EpDims d) {
  __shared__ int carry[kMaxRanks];
  __shared__ int pairs[kMaxRanks];
  const int T = min(int64_t(*num_tokens), d.t_max);
  const int R = d.num_ranks;
  if (threadIdx.x < R) carry[threadIdx.x] = pairs[threadIdx.x] = 0;
  __syncthreads();
  for (int base = 0; base < T; base += blockDim.x) {
    const int t = base + threadIdx.x;
    uint64_t mask = 0;
    if (t < T)
      for (int k = 0; k < d.num_slots; ++k) {
        const int id = ids[int64_t(t) * d.num_slots + k];
        if (id >= 0 && id < d.num_routed) {
          mask |= 1ull << (id / d.local_experts);
          if (dest_pairs) atomicAdd(&pairs[id / d.local_experts], 1);  // a count: order-free
        }
      }
    for (int r = 0; r < R; ++r) {
      const int v = int((mask >> r) & 1);
      int total;
      const int pos = block_exclusive_scan(v, &total);
      if (t < T) dest_slot[int64_t(t) * R + r] = v ? carry[r] + pos : -1;
      __syncthreads();
      if (threadIdx.x == 0) carry[r] += total;
      __syncthreads();
    }
  }
  __syncthreads();
  if (threadIdx.x < R) {
    dest_count[threadIdx.x] = carry[threadIdx.x];
    if (dest_pairs) dest_pairs[threadIdx.x] = pairs[threadIdx.x];
  }
}

// One warp per (token, destination) pair writes the token's record for that destination:
//   peers != nullptr: straight into the destination's window, at
//                     peers[dst] + peer_off + (d.rank * T_max + slot) * rec.bytes;
//   peers == nullptr: into the local send buffer at send + (dest_offset[dst] + slot) * rec.bytes.
__global__ void __launch_bounds__(kWarps * 32)
    pack_records_kernel(void* const* peers, size_t peer_off, char* send, const int32_t* dest_offset,
                        RecordLayout rec, const __nv_bfloat16* x, const int32_t* ids,
                        const float* w, const int32_t* num_tokens, const int32_t* dest_slot,
                        EpDims d) {
  const int lane = threadIdx.x & 31;
  const int64_t T = min(int64_t(*num_tokens), d.t_max);
  const int64_t nw = int64_t(gridDim.x) * kWarps;
  for (int64_t p = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5); p < T * d.num_ranks;
       p += nw) {
    const int64_t t = p / d.num_ranks;
    const int dst = int(p % d.num_ranks);
    const int slot = dest_slot[t * d.num_ranks + dst];
    if (slot < 0) continue;
    char* rp = peers ? static_cast<char*>(peers[dst]) + peer_off +
                           (size_t(d.rank) * size_t(d.t_max) + size_t(slot)) * rec.bytes
                     : send + (size_t(dest_offset[dst]) + size_t(slot)) * rec.bytes;
    write_record(rp, rec, x + t * d.hidden, ids + t * d.num_slots, w + t * d.num_slots, int(t), dst,
                 d, lane);
  }
  if (peers) __threadfence_system();
}

// Thread r: raise rank r's flag for us. seq is this rank's call counter.
// skip_if != nullptr: raise nothing once that error record holds a failure (the rows before the
// flags are incomplete; the peers then time out naming this rank, and this rank reports why).
__global__ void raise_flags_kernel(void* const* peers, size_t flags_off, const int32_t* counts,
                                   uint64_t* seq, int increment, int rank, int R,
                                   const DeviceWaitError* skip_if = nullptr) {
  if (skip_if != nullptr && *reinterpret_cast<volatile const int*>(&skip_if->failed) != 0) return;
  const uint64_t s = *seq + uint64_t(increment);
  __syncthreads();
  if (int(threadIdx.x) < R) {
    uint64_t* f =
        reinterpret_cast<uint64_t*>(static_cast<char*>(peers[threadIdx.x]) + flags_off) + rank;
    st_release_sys(f, counts ? (s << 32) | uint32_t(counts[threadIdx.x]) : s);
  }
  __syncthreads();
  if (threadIdx.x == 0 && increment) *seq = s;
}

// One small block per rank does all the waiting, so a rank that waits holds almost none of the
// GPU: on the loopback transport every rank shares one device, and wide spinning grids would
// starve the peers they wait for. Thread r waits for rank r's flag; dispatch flags carry
// (sequence << 32 | count) and counts[r] receives the count.
__global__ void __launch_bounds__(kMaxRanks)
    wait_flags_kernel(int32_t* counts, const char* window, size_t flags_off, bool with_count,
                      const uint64_t* seq, DeviceWaitError* err, int64_t timeout_ns, int rank,
                      int R) {
  __shared__ int s_fail;
  if (threadIdx.x == 0) s_fail = err->failed;
  __syncthreads();
  if (s_fail || int(threadIdx.x) >= R) return;
  const uint64_t sv = *seq;
  const uint64_t expected = with_count ? sv << 32 : sv;
  const uint64_t mask = with_count ? ~0xffffffffull : ~0ull;
  const uint64_t* f = reinterpret_cast<const uint64_t*>(window + flags_off) + threadIdx.x;
  uint64_t seen;
  if (wait_flag(f, expected, mask, timeout_ns, &seen)) {
    if (counts) counts[threadIdx.x] = int(seen & 0xffffffffu);
  } else {
    report_wait(err, rank, int(threadIdx.x), expected, seen,
                with_count ? "dispatch flag" : "combine flag");
  }
  __threadfence();
}

__global__ void __launch_bounds__(256)
    ll_recv_index_kernel(int32_t* recv_count, int32_t* recv_src, int32_t* recv_record,
                         int32_t* recv_seg, const char* window, LowLatencyLayout ll,
                         RecordLayout rec, const int32_t* src_count, DeviceWaitError* err,
                         EpDims d) {
  __shared__ int s_count[kMaxRanks];
  __shared__ int s_fail, s_running;
  const int R = d.num_ranks;
  const int64_t m_max = int64_t(R) * d.t_max;
  // Blocks stride over the local experts (a bounded grid on the communication stream).
  for (int e = blockIdx.x; e < d.local_experts; e += gridDim.x) {
    __syncthreads();
    if (threadIdx.x == 0) {
      s_fail = err->failed;
      s_running = 0;
    }
    if (int(threadIdx.x) < R) s_count[threadIdx.x] = src_count[threadIdx.x];
    __syncthreads();
    if (s_fail) {
      if (threadIdx.x == 0) recv_count[e] = 0;
      if (int(threadIdx.x) <= R) recv_seg[e * (R + 1) + threadIdx.x] = 0;
      continue;
    }
    // Ordered compaction of the (source, token, slot) triples that hit expert e.
    for (int s = 0; s < R; ++s) {
      const int n = s_count[s];
      if (threadIdx.x == 0) recv_seg[e * (R + 1) + s] = min(s_running, int(m_max));
      for (int base = 0; base < n; base += blockDim.x) {
        const int i = base + threadIdx.x;
        const char* rp =
            window + ll.staging + (size_t(s) * size_t(d.t_max) + size_t(i)) * rec.bytes;
        int c = 0;
        if (i < n) {
          const int32_t* lid = reinterpret_cast<const int32_t*>(rp + rec.ids_off);
          for (int k = 0; k < d.num_slots; ++k) c += lid[k] == e;
        }
        int total;
        const int pos = block_exclusive_scan(c, &total);
        if (c) {
          const int32_t* lid = reinterpret_cast<const int32_t*>(rp + rec.ids_off);
          const int32_t src_token = *reinterpret_cast<const int32_t*>(rp + rec.src_off);
          int row = s_running + pos;
          for (int k = 0; k < d.num_slots; ++k) {
            if (lid[k] != e) continue;
            if (row < m_max) {
              int32_t* o = recv_src + (int64_t(e) * m_max + row) * 3;
              o[0] = s;
              o[1] = src_token;
              o[2] = k;
              recv_record[int64_t(e) * m_max + row] = s * int(d.t_max) + i;
            }
            ++row;
          }
        }
        __syncthreads();
        if (threadIdx.x == 0) s_running += total;
        __syncthreads();
      }
    }
    if (threadIdx.x == 0) {
      recv_count[e] = min(s_running, int(m_max));
      recv_seg[e * (R + 1) + R] = min(s_running, int(m_max));
      if (s_running > m_max && atomicCAS(&err->failed, 0, kOverflowedExpert) == 0) {
        err->rank = d.rank;
        err->peer = e;
        err->expected = uint64_t(m_max);
        err->observed = uint64_t(s_running);
        __threadfence();
      }
    }
  }
}

// recv_q != nullptr (FP8 payloads kept): the row's codes and scales as they came.
__global__ void __launch_bounds__(kWarps * 32)
    ll_expand_kernel(__nv_bfloat16* recv_x, const int32_t* recv_count, const int32_t* recv_record,
                     const char* window, LowLatencyLayout ll, RecordLayout rec, EpDims d,
                     uint8_t* recv_q, float* recv_scale) {
  const int lane = threadIdx.x & 31;
  const int64_t m_max = int64_t(d.num_ranks) * d.t_max;
  const int64_t nsc = d.hidden / 128;
  for (int e = blockIdx.x; e < d.local_experts; e += gridDim.x) {
    const int64_t n = recv_count[e];
    for (int64_t row = int64_t(blockIdx.y) * kWarps + (threadIdx.x >> 5); row < n;
         row += int64_t(gridDim.y) * kWarps) {
      const int32_t r = recv_record[int64_t(e) * m_max + row];
      const char* rp = window + ll.staging + size_t(r) * rec.bytes;
      const int64_t at = int64_t(e) * m_max + row;
      if (recv_q == nullptr) {
        payload_to_row(recv_x + at * d.hidden, rp, rec, lane);
        continue;
      }
      const uint2* q = reinterpret_cast<const uint2*>(rp);
      uint2* out = reinterpret_cast<uint2*>(recv_q + at * d.hidden);
      for (int64_t v = lane; v < d.hidden / 8; v += 32) out[v] = q[v];
      const float* sc = reinterpret_cast<const float*>(rp + rec.scales_off);
      for (int64_t b = lane; b < nsc; b += 32) recv_scale[at * nsc + b] = sc[b];
    }
  }
}

// One warp: row `row` of local expert e's down-GEMM output into the combine area of the window
// of the rank it came from, at (source token, slot) (recv_src).
__device__ __forceinline__ void send_row_back(void* const* peers, const LowLatencyLayout& ll,
                                              const __nv_bfloat16* expert_out,
                                              const int32_t* recv_src, int e, int64_t row,
                                              int64_t m_max, const EpDims& d, int lane) {
  const int32_t* src = recv_src + (int64_t(e) * m_max + row) * 3;
  const int s = src[0], t = src[1], k = src[2];
  uint4* dst = reinterpret_cast<uint4*>(static_cast<char*>(peers[s]) + ll.combine +
                                        (size_t(t) * d.num_slots + size_t(k)) * d.hidden * 2);
  const uint4* in =
      reinterpret_cast<const uint4*>(expert_out + (int64_t(e) * m_max + row) * d.hidden);
  for (int64_t v = lane; v < d.hidden / 8; v += 32) dst[v] = in[v];
}

__global__ void __launch_bounds__(kWarps * 32)
    ll_combine_send_kernel(void* const* peers, LowLatencyLayout ll, const __nv_bfloat16* expert_out,
                           const int32_t* recv_count, const int32_t* recv_src, EpDims d) {
  const int lane = threadIdx.x & 31;
  const int64_t m_max = int64_t(d.num_ranks) * d.t_max;
  for (int e = blockIdx.x; e < d.local_experts; e += gridDim.x) {
    const int64_t n = recv_count[e];
    for (int64_t row = int64_t(blockIdx.y) * kWarps + (threadIdx.x >> 5); row < n;
         row += int64_t(gridDim.y) * kWarps) {
      send_row_back(peers, ll, expert_out, recv_src, e, row, m_max, d, lane);
    }
  }
  __threadfence_system();
}

// The signalled combine-send: work items (local expert e, m-block m, part p) in expert-major
// order, the order the GEMM's persistent scheduler finishes them in; a part is kSignalPartRows
// rows of the m-block, so the few blocks this kernel may use all have work even with few experts
// (a block per m-block left most of them idle at decode). A block takes items with a grid
// stride, thread 0 waits for the item's m-block signal, then the block's warps send its rows.
constexpr int kSignalPartRows = 2 * kWarps;
constexpr int kSignalBlocksDefault = 16;

__global__ void __launch_bounds__(kWarps * 32)
    ll_combine_send_signalled_kernel(void* const* peers, LowLatencyLayout ll,
                                     const __nv_bfloat16* expert_out, const int32_t* recv_count,
                                     const int32_t* recv_src, GemmSignals sig, DeviceWaitError* err,
                                     int64_t timeout_ns, EpDims d) {
  __shared__ int s_go;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t m_max = int64_t(d.num_ranks) * d.t_max;
  const int64_t nb = (m_max + sig.block_m - 1) / sig.block_m;
  const int64_t parts = (sig.block_m + kSignalPartRows - 1) / kSignalPartRows;
  const int64_t items = int64_t(d.local_experts) * nb * parts;
  for (int64_t i = blockIdx.x; i < items; i += gridDim.x) {
    const int64_t mb = i / parts;  // signal entry e·nb + m
    const int e = int(mb / nb);
    const int64_t m = mb % nb, n = recv_count[e];
    const int64_t first = m * sig.block_m + (i % parts) * kSignalPartRows;
    const int64_t last = min(min(n, (m + 1) * sig.block_m), first + kSignalPartRows);
    if (first >= last) continue;  // block-uniform: no rows here, nothing to wait for
    if (threadIdx.x == 0) {
      const uint64_t start = global_ns();
      int go = 1;
      while (true) {
        const int v = ld_acquire_gpu(sig.signal + mb);
        if (v >= sig.threshold) break;
        // Another block timed out already: stop waiting (the host reports the first one).
        if (*reinterpret_cast<volatile const int*>(&err->failed) != 0) {
          go = 0;
          break;
        }
        if (int64_t(global_ns() - start) > timeout_ns) {
          if (atomicCAS(&err->failed, 0, kSignalTimedOut) == 0) {
            err->rank = d.rank;
            err->peer = e;
            err->index = int(m);
            err->expected = unsigned(sig.threshold);
            err->observed = unsigned(v);
            const char what[] = "down-GEMM signal";
            for (int c = 0; c < int(sizeof(what)); ++c) err->what[c] = what[c];
            __threadfence();
          }
          printf(
              "epmoe: rank %d timed out waiting for the down GEMM's signal of local expert %d "
              "m-block %lld: expected %d, observed %d\n",
              d.rank, e, (long long)m, sig.threshold, v);
          go = 0;
          break;
        }
        __nanosleep(64);
      }
      s_go = go;
    }
    // NOTES: the rows are read with plain loads after thread 0's acquire and the CTA barrier
    // (cumulativity makes the GEMM's stores visible to every thread of the block).
    __syncthreads();
    const int go = s_go;
    __syncthreads();  // s_go is rewritten by the next item
    if (!go) return;
    for (int64_t row = first + warp; row < last; row += kWarps) {
      send_row_back(peers, ll, expert_out, recv_src, e, row, m_max, d, lane);
    }
  }
  __threadfence_system();
}

// Host-API path, expert side: every received row goes back to its source as a return record
// (header {source token, slot, 0, 0} i32, then H bf16), packed source-major: the rows for
// source s start at row src_base[s], expert-major within, in the expert's row order.
// recv_seg: [E_loc, R + 1] first row of each source in each expert's rows (ll_recv_index).
__global__ void __launch_bounds__(kWarps * 32)
    ll_return_pack_kernel(char* out, size_t ret_bytes, const int32_t* src_base,
                          const __nv_bfloat16* expert_out, const int32_t* recv_count,
                          const int32_t* recv_src, const int32_t* recv_seg, EpDims d) {
  __shared__ int s_first[kMaxRanks];  // first return row of (source s, expert e)
  const int lane = threadIdx.x & 31, R = d.num_ranks;
  const int64_t m_max = int64_t(R) * d.t_max;
  for (int e = blockIdx.x; e < d.local_experts; e += gridDim.x) {
    __syncthreads();
    if (int(threadIdx.x) < R) {
      const int s = threadIdx.x;
      int before = 0;
      for (int e2 = 0; e2 < e; ++e2)
        before += recv_seg[e2 * (R + 1) + s + 1] - recv_seg[e2 * (R + 1) + s];
      s_first[s] = src_base[s] + before - recv_seg[e * (R + 1) + s];
    }
    __syncthreads();
    const int64_t n = recv_count[e];
    for (int64_t row = int64_t(blockIdx.y) * kWarps + (threadIdx.x >> 5); row < n;
         row += int64_t(gridDim.y) * kWarps) {
      const int32_t* src = recv_src + (int64_t(e) * m_max + row) * 3;
      char* rp = out + size_t(s_first[src[0]] + row) * ret_bytes;
      if (lane < 4)
        reinterpret_cast<int32_t*>(rp)[lane] = lane == 0 ? src[1] : lane == 1 ? src[2] : 0;
      const uint4* in =
          reinterpret_cast<const uint4*>(expert_out + (int64_t(e) * m_max + row) * d.hidden);
      uint4* o = reinterpret_cast<uint4*>(rp + 16);
      for (int64_t v = lane; v < d.hidden / 8; v += 32) o[v] = in[v];
    }
  }
}

// Host-API path, source side: n return records → the window's combine rows [T_max][K'] (the
// place the load/store path writes them).
__global__ void __launch_bounds__(kWarps * 32)
    ll_return_unpack_kernel(char* window, LowLatencyLayout ll, const char* in, size_t ret_bytes,
                            int64_t n, EpDims d) {
  const int lane = threadIdx.x & 31;
  for (int64_t i = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5); i < n;
       i += int64_t(gridDim.x) * kWarps) {
    const char* rp = in + size_t(i) * ret_bytes;
    const int t = reinterpret_cast<const int32_t*>(rp)[0];
    const int k = reinterpret_cast<const int32_t*>(rp)[1];
    if (t < 0 || t >= d.t_max || k < 0 || k >= d.num_slots) continue;  // never out of the window
    uint4* dst = reinterpret_cast<uint4*>(window + ll.combine +
                                          (size_t(t) * d.num_slots + size_t(k)) * d.hidden * 2);
    const uint4* src = reinterpret_cast<const uint4*>(rp + 16);
    for (int64_t v = lane; v < d.hidden / 8; v += 32) dst[v] = src[v];
  }
}

__global__ void __launch_bounds__(kWarps * 32)
    ll_combine_recv_kernel(float* y, const char* window, LowLatencyLayout ll, const int32_t* ids,
                           const float* w, const float* shared_out, const int32_t* num_tokens,
                           const DeviceWaitError* err, EpDims d) {
  extern __shared__ float s_acc[];
  __shared__ Item s_items[kWarps][kMaxDeviceSlots];
  __shared__ alignas(ReducePlan) unsigned char s_plan_raw[kWarps * sizeof(ReducePlan)];
  __shared__ int s_fail;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (threadIdx.x == 0) s_fail = err->failed;
  __syncthreads();
  if (s_fail) return;
  ReducePlan* plan = reinterpret_cast<ReducePlan*>(s_plan_raw) + warp;
  float* acc = s_acc + size_t(warp) * kMaxDeviceSlots * 8 * 32;
  const int64_t T = min(int64_t(*num_tokens), d.t_max);
  Item* items = s_items[warp];
  for (int64_t t = int64_t(blockIdx.x) * kWarps + warp; t < T; t += int64_t(gridDim.x) * kWarps) {
    if (lane < d.num_slots) {
      const int id = ids[t * d.num_slots + lane];
      Item it{nullptr, w[t * d.num_slots + lane], 0, 0, id};
      if (id >= 0 && id < d.num_routed) {
        it.row = window + ll.combine + (size_t(t) * d.num_slots + size_t(lane)) * d.hidden * 2;
      } else if (id >= d.num_routed && id < d.num_routed + d.n_shared_fused && shared_out) {
        it.row = shared_out + (t * d.n_shared_fused + (id - d.num_routed)) * d.hidden;
        it.is_f32 = 1;
      }
      items[lane] = it;
    }
    __syncwarp();
    const int64_t c0 = int64_t(blockIdx.y) * kCombineCols;
    plan_and_reduce(y + t * d.hidden, items, d.num_slots, plan, d.num_routed, c0,
                    min(d.hidden, c0 + kCombineCols), acc, lane);
  }
}

// ---- normal mode ----
__global__ void __launch_bounds__(kWarps * 32)
    normal_unpack_kernel(__nv_bfloat16* recv_x, int32_t* recv_ids, float* recv_w, const char* recv,
                         RecordLayout rec, int64_t n) {
  const int lane = threadIdx.x & 31;
  for (int64_t i = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5); i < n;
       i += int64_t(gridDim.x) * kWarps) {
    const char* rp = recv + size_t(i) * rec.bytes;
    payload_to_row(recv_x + i * rec.hidden, rp, rec, lane);
    if (lane < rec.num_slots) {
      recv_ids[i * rec.num_slots + lane] = reinterpret_cast<const int32_t*>(rp + rec.ids_off)[lane];
      recv_w[i * rec.num_slots + lane] = reinterpret_cast<const float*>(rp + rec.w_off)[lane];
    }
  }
}

__global__ void __launch_bounds__(kWarps * 32)
    normal_combine_kernel(float* y, const float* partials, const int32_t* dest_slot,
                          const int32_t* dest_offset, const int32_t* ids, const float* w,
                          const float* shared_out, const int32_t* num_tokens, EpDims d) {
  extern __shared__ float s_acc[];
  __shared__ Item s_items[kWarps][kMaxItems];
  __shared__ alignas(ReducePlan) unsigned char s_plan_raw[kWarps * sizeof(ReducePlan)];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t T = min(int64_t(*num_tokens), d.t_max);
  Item* items = s_items[warp];
  for (int64_t t = int64_t(blockIdx.x) * kWarps + warp; t < T; t += int64_t(gridDim.x) * kWarps) {
    for (int r = lane; r < d.num_ranks; r += 32) {
      const int slot = dest_slot[t * d.num_ranks + r];
      Item it{nullptr, 1.f, 1, 1, r * d.local_experts};
      if (slot >= 0) it.row = partials + (int64_t(dest_offset[r]) + slot) * d.hidden;
      items[r] = it;
    }
    if (lane < d.num_slots) {
      const int id = ids[t * d.num_slots + lane];
      Item it{nullptr, w[t * d.num_slots + lane], 1, 0, id};
      if (id >= d.num_routed && id < d.num_routed + d.n_shared_fused && shared_out)
        it.row = shared_out + (t * d.n_shared_fused + (id - d.num_routed)) * d.hidden;
      items[d.num_ranks + lane] = it;
    }
    __syncwarp();
    ReducePlan* plan = reinterpret_cast<ReducePlan*>(s_plan_raw) + warp;
    float* acc = s_acc + size_t(warp) * kMaxDeviceSlots * 8 * 32;
    const int64_t c0 = int64_t(blockIdx.y) * kCombineCols;
    plan_and_reduce(y + t * d.hidden, items, d.num_ranks + d.num_slots, plan, d.num_routed, c0,
                    min(d.hidden, c0 + kCombineCols), acc, lane);
  }
}

__global__ void add_rows_kernel(float* y, const float* add, float scale, const int32_t* num_tokens,
                                int64_t t_max, int64_t hidden) {
  const int64_t n = min(int64_t(*num_tokens), t_max) * hidden;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    float v = y[i];
    if (add) v = v + add[i];
    if (scale != 1.f) v = v * scale;
    y[i] = v;
  }
}

__global__ void single_segment_kernel(int32_t* seg, const int32_t* num_tokens) {
  seg[0] = 0;
  seg[1] = *num_tokens;
}

__global__ void scatter_shared_kernel(float* out, const float* in, int j, int n,
                                      const int32_t* num_tokens, int64_t t_max, int64_t hidden) {
  const int64_t total = min(int64_t(*num_tokens), t_max) * hidden;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / hidden, c = i % hidden;
    out[(t * n + j) * hidden + c] = in[i];
  }
}

__global__ void dest_offsets_kernel(int32_t* offsets, const int32_t* counts, int R) {
  if (threadIdx.x == 0) {
    int acc = 0;
    for (int r = 0; r < R; ++r) {
      offsets[r] = acc;
      acc += counts[r];
    }
  }
}

unsigned blocks_for(int64_t items, int per_block) {
  const int64_t b = (items + per_block - 1) / per_block;
  return unsigned(b < 1 ? 1 : (b > 65535 ? 65535 : b));
}

// Grid of a communication kernel: enough blocks for the work, at most d.max_blocks in all.
unsigned capped(int64_t blocks, const EpDims& d) {
  const int64_t b = blocks < 1 ? 1 : blocks;
  return unsigned(d.max_blocks > 0 && b > d.max_blocks ? d.max_blocks : b);
}
dim3 capped2(int64_t x, int64_t y, const EpDims& d) {
  if (d.max_blocks <= 0) return dim3(unsigned(x < 1 ? 1 : x), unsigned(y < 1 ? 1 : y));
  const int64_t gx = x < 1 ? 1 : (x > d.max_blocks ? d.max_blocks : x);
  const int64_t gy = std::max<int64_t>(1, std::min<int64_t>(y, d.max_blocks / gx));
  return dim3(unsigned(gx), unsigned(gy));
}

constexpr size_t kCombineSmem = size_t(kWarps) * kMaxDeviceSlots * 8 * 32 * sizeof(float);

template <typename K>
void allow_big_smem(K kernel, size_t bytes) {
  EPMOE_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

}  // namespace

void prepare_kernels() {
  const NvtxRange nvtx("ep.prepare_kernels");
  // NOTES: loads every kernel of this file now (and sets the shared-memory opt-ins): with lazy
  // module loading, a kernel's first launch can wait for the device while another rank of the
  // same process spins on a flag, which would deadlock the loopback transport.
  cudaFuncAttributes a;
  EPMOE_CUDA_CHECK(cudaFuncGetAttributes(&a, route_layout_kernel));
  EPMOE_CUDA_CHECK(cudaFuncGetAttributes(&a, pack_records_kernel));
  EPMOE_CUDA_CHECK(cudaFuncGetAttributes(&a, raise_flags_kernel));
  EPMOE_CUDA_CHECK(cudaFuncGetAttributes(&a, ll_recv_index_kernel));
  EPMOE_CUDA_CHECK(cudaFuncGetAttributes(&a, wait_flags_kernel));
  EPMOE_CUDA_CHECK(cudaFuncGetAttributes(&a, ll_expand_kernel));
  EPMOE_CUDA_CHECK(cudaFuncGetAttributes(&a, ll_combine_send_kernel));
  EPMOE_CUDA_CHECK(cudaFuncGetAttributes(&a, ll_combine_send_signalled_kernel));
  EPMOE_CUDA_CHECK(cudaFuncGetAttributes(&a, ll_return_pack_kernel));
  EPMOE_CUDA_CHECK(cudaFuncGetAttributes(&a, ll_return_unpack_kernel));
  EPMOE_CUDA_CHECK(cudaFuncGetAttributes(&a, normal_unpack_kernel));
  EPMOE_CUDA_CHECK(cudaFuncGetAttributes(&a, add_rows_kernel));
  EPMOE_CUDA_CHECK(cudaFuncGetAttributes(&a, single_segment_kernel));
  EPMOE_CUDA_CHECK(cudaFuncGetAttributes(&a, scatter_shared_kernel));
  EPMOE_CUDA_CHECK(cudaFuncGetAttributes(&a, dest_offsets_kernel));
  allow_big_smem(ll_combine_recv_kernel, kCombineSmem);
  allow_big_smem(normal_combine_kernel, kCombineSmem);
}

void route_layout(int32_t* dest_slot, int32_t* dest_count, int32_t* dest_pairs,
                  const int32_t* topk_ids, const int32_t* num_tokens, const EpDims& d,
                  cudaStream_t stream) {
  const NvtxRange nvtx("ep.route_layout");
  EPMOE_CHECK(d.num_ranks <= kMaxRanks, kUnsupported, "at most {} ranks, got {}", kMaxRanks,
              d.num_ranks);
  route_layout_kernel<<<1, 1024, 0, stream>>>(dest_slot, dest_count, dest_pairs, topk_ids,
                                              num_tokens, d);
  EPMOE_CUDA_CHECK_LAUNCH("route_layout_kernel");
}

namespace {
void launch_pack(void* const* peers, size_t peer_off, void* send, const int32_t* dest_offset,
                 const RecordLayout& rec, const void* x, const int32_t* topk_ids,
                 const float* topk_weights, const int32_t* num_tokens, const int32_t* dest_slot,
                 const EpDims& d, cudaStream_t stream) {
  const NvtxRange nvtx("ep.launch_pack");
  pack_records_kernel<<<capped(blocks_for(d.t_max * d.num_ranks, kWarps), d), kWarps * 32, 0,
                        stream>>>(peers, peer_off, static_cast<char*>(send), dest_offset, rec,
                                  static_cast<const __nv_bfloat16*>(x), topk_ids, topk_weights,
                                  num_tokens, dest_slot, d);
  EPMOE_CUDA_CHECK_LAUNCH("pack_records_kernel");
}
}  // namespace

void ll_dispatch_send(void* const* peers, const LowLatencyLayout& ll, const RecordLayout& rec,
                      const void* x, const int32_t* topk_ids, const float* topk_weights,
                      const int32_t* num_tokens, const int32_t* dest_slot,
                      const int32_t* dest_count, uint64_t* seq, const EpDims& d,
                      cudaStream_t stream) {
  const NvtxRange nvtx("ep.ll_dispatch_send");
  launch_pack(peers, ll.staging, nullptr, nullptr, rec, x, topk_ids, topk_weights, num_tokens,
              dest_slot, d, stream);
  raise_flags_kernel<<<1, kMaxRanks, 0, stream>>>(peers, ll.dispatch_flags, dest_count, seq, 1,
                                                  d.rank, d.num_ranks);
  EPMOE_CUDA_CHECK_LAUNCH("raise_flags_kernel");
}

void ll_wait_dispatch(int32_t* src_count, const void* local_window, const LowLatencyLayout& ll,
                      const uint64_t* seq, DeviceWaitError* err, int64_t timeout_ns,
                      const EpDims& d, cudaStream_t stream) {
  const NvtxRange nvtx("ep.ll_wait_dispatch");
  wait_flags_kernel<<<1, kMaxRanks, 0, stream>>>(src_count, static_cast<const char*>(local_window),
                                                 ll.dispatch_flags, true, seq, err, timeout_ns,
                                                 d.rank, d.num_ranks);
  EPMOE_CUDA_CHECK_LAUNCH("wait_flags_kernel");
}

void ll_expand_received(void* recv_x, int32_t* recv_count, int32_t* recv_src, int32_t* recv_record,
                        int32_t* recv_seg, const int32_t* src_count, const void* local_window,
                        const LowLatencyLayout& ll, const RecordLayout& rec, DeviceWaitError* err,
                        const EpDims& d, cudaStream_t stream, void* recv_q, float* recv_scale) {
  const NvtxRange nvtx("ep.ll_expand_received");
  EPMOE_CHECK(recv_q == nullptr || (rec.fp8 && d.hidden % 128 == 0), kInvalidArgument,
              "ll_expand_received: FP8 codes can be kept only from FP8 payloads with H % 128 == 0 "
              "(H = {})",
              d.hidden);
  const char* win = static_cast<const char*>(local_window);
  ll_recv_index_kernel<<<capped(d.local_experts, d), 256, 0, stream>>>(
      recv_count, recv_src, recv_record, recv_seg, win, ll, rec, src_count, err, d);
  EPMOE_CUDA_CHECK_LAUNCH("ll_recv_index_kernel");
  const int64_t m_max = int64_t(d.num_ranks) * d.t_max;
  ll_expand_kernel<<<capped2(d.local_experts, blocks_for(m_max, kWarps), d), kWarps * 32, 0,
                     stream>>>(static_cast<__nv_bfloat16*>(recv_x), recv_count, recv_record, win,
                               ll, rec, d, static_cast<uint8_t*>(recv_q), recv_scale);
  EPMOE_CUDA_CHECK_LAUNCH("ll_expand_kernel");
}

void ll_combine_send(void* const* peers, const LowLatencyLayout& ll, const void* expert_out,
                     const int32_t* recv_count, const int32_t* recv_src, const uint64_t* seq,
                     const EpDims& d, cudaStream_t stream) {
  const NvtxRange nvtx("ep.ll_combine_send");
  const int64_t m_max = int64_t(d.num_ranks) * d.t_max;
  ll_combine_send_kernel<<<capped2(d.local_experts, blocks_for(m_max, kWarps), d), kWarps * 32, 0,
                           stream>>>(peers, ll, static_cast<const __nv_bfloat16*>(expert_out),
                                     recv_count, recv_src, d);
  EPMOE_CUDA_CHECK_LAUNCH("ll_combine_send_kernel");
  raise_flags_kernel<<<1, kMaxRanks, 0, stream>>>(
      peers, ll.combine_flags, nullptr, const_cast<uint64_t*>(seq), 0, d.rank, d.num_ranks);
  EPMOE_CUDA_CHECK_LAUNCH("raise_flags_kernel");
}

void ll_combine_send_signalled(void* const* peers, const LowLatencyLayout& ll,
                               const void* expert_out, const int32_t* recv_count,
                               const int32_t* recv_src, const GemmSignals& signals,
                               const uint64_t* seq, DeviceWaitError* err, int64_t timeout_ns,
                               const EpDims& d, cudaStream_t stream) {
  const NvtxRange nvtx("ep.ll_combine_send_signalled");
  EPMOE_CHECK(signals.signal != nullptr && signals.block_m > 0 && signals.threshold > 0,
              kInvalidArgument, "ll_combine_send_signalled: no signals (block_m {}, threshold {})",
              signals.block_m, signals.threshold);
  const int64_t m_max = int64_t(d.num_ranks) * d.t_max;
  const int64_t items =
      int64_t(d.local_experts) * ((m_max + signals.block_m - 1) / signals.block_m);
  // Never an unbounded grid: waiting blocks that filled the GPU before the GEMM started would
  // leave it no SM (the layer passes its budget; a caller without one gets kSignalBlocksDefault).
  EpDims bounded = d;
  if (bounded.max_blocks <= 0) bounded.max_blocks = kSignalBlocksDefault;
  ll_combine_send_signalled_kernel<<<capped(items, bounded), kWarps * 32, 0, stream>>>(
      peers, ll, static_cast<const __nv_bfloat16*>(expert_out), recv_count, recv_src, signals, err,
      timeout_ns, d);
  EPMOE_CUDA_CHECK_LAUNCH("ll_combine_send_signalled_kernel");
  raise_flags_kernel<<<1, kMaxRanks, 0, stream>>>(
      peers, ll.combine_flags, nullptr, const_cast<uint64_t*>(seq), 0, d.rank, d.num_ranks, err);
  EPMOE_CUDA_CHECK_LAUNCH("raise_flags_kernel");
}

void ll_wait_combine(const void* local_window, const LowLatencyLayout& ll, const uint64_t* seq,
                     DeviceWaitError* err, int64_t timeout_ns, const EpDims& d,
                     cudaStream_t stream) {
  const NvtxRange nvtx("ep.ll_wait_combine");
  wait_flags_kernel<<<1, kMaxRanks, 0, stream>>>(nullptr, static_cast<const char*>(local_window),
                                                 ll.combine_flags, false, seq, err, timeout_ns,
                                                 d.rank, d.num_ranks);
  EPMOE_CUDA_CHECK_LAUNCH("wait_flags_kernel");
}

void ll_combine_reduce(float* y, const void* local_window, const LowLatencyLayout& ll,
                       const int32_t* topk_ids, const float* topk_weights, const float* shared_out,
                       const int32_t* num_tokens, const DeviceWaitError* err, const EpDims& d,
                       cudaStream_t stream) {
  const NvtxRange nvtx("ep.ll_combine_reduce");
  const int64_t col_blocks = (d.hidden + kCombineCols - 1) / kCombineCols;
  const dim3 grid(
      capped(blocks_for(d.t_max, kWarps),
             EpDims{.max_blocks =
                        d.max_blocks > 0 ? std::max<int>(1, d.max_blocks / int(col_blocks)) : 0}),
      unsigned(col_blocks));
  ll_combine_recv_kernel<<<grid, kWarps * 32, kCombineSmem, stream>>>(
      y, static_cast<const char*>(local_window), ll, topk_ids, topk_weights, shared_out, num_tokens,
      err, d);
  EPMOE_CUDA_CHECK_LAUNCH("ll_combine_recv_kernel");
}

size_t return_record_bytes(int64_t hidden) { return 16 + size_t(hidden) * 2; }

void ll_return_pack(void* out, const int32_t* src_base, const void* expert_out,
                    const int32_t* recv_count, const int32_t* recv_src, const int32_t* recv_seg,
                    const EpDims& d, cudaStream_t stream) {
  const NvtxRange nvtx("ep.ll_return_pack");
  const int64_t m_max = int64_t(d.num_ranks) * d.t_max;
  ll_return_pack_kernel<<<capped2(d.local_experts, blocks_for(m_max, kWarps), d), kWarps * 32, 0,
                          stream>>>(static_cast<char*>(out), return_record_bytes(d.hidden),
                                    src_base, static_cast<const __nv_bfloat16*>(expert_out),
                                    recv_count, recv_src, recv_seg, d);
  EPMOE_CUDA_CHECK_LAUNCH("ll_return_pack_kernel");
}

void ll_return_unpack(void* local_window, const LowLatencyLayout& ll, const void* in, int64_t n,
                      const EpDims& d, cudaStream_t stream) {
  const NvtxRange nvtx("ep.ll_return_unpack");
  if (n == 0) return;
  ll_return_unpack_kernel<<<capped((n + kWarps - 1) / kWarps, d), kWarps * 32, 0, stream>>>(
      static_cast<char*>(local_window), ll, static_cast<const char*>(in),
      return_record_bytes(d.hidden), n, d);
  EPMOE_CUDA_CHECK_LAUNCH("ll_return_unpack_kernel");
}

void normal_pack(void* send, const RecordLayout& rec, const void* x, const int32_t* topk_ids,
                 const float* topk_weights, const int32_t* num_tokens, const int32_t* dest_slot,
                 const int32_t* dest_offset, const EpDims& d, cudaStream_t stream) {
  const NvtxRange nvtx("ep.normal_pack");
  launch_pack(nullptr, 0, send, dest_offset, rec, x, topk_ids, topk_weights, num_tokens, dest_slot,
              d, stream);
}

void normal_unpack(void* recv_x, int32_t* recv_ids, float* recv_w, const void* recv,
                   const RecordLayout& rec, int64_t n, const EpDims& d, cudaStream_t stream) {
  const NvtxRange nvtx("ep.normal_unpack");
  if (n == 0) return;
  normal_unpack_kernel<<<capped((n + kWarps - 1) / kWarps, d), kWarps * 32, 0, stream>>>(
      static_cast<__nv_bfloat16*>(recv_x), recv_ids, recv_w, static_cast<const char*>(recv), rec,
      n);
  EPMOE_CUDA_CHECK_LAUNCH("normal_unpack_kernel");
}

void normal_combine(float* y, const float* partials, const int32_t* dest_slot,
                    const int32_t* dest_offset, const int32_t* topk_ids, const float* topk_weights,
                    const float* shared_out, const int32_t* num_tokens, const EpDims& d,
                    cudaStream_t stream) {
  const NvtxRange nvtx("ep.normal_combine");
  EPMOE_CHECK(d.num_ranks + d.num_slots <= kMaxItems && d.num_ranks <= 32, kUnsupported,
              "normal-mode combine supports up to 32 ranks, got {}", d.num_ranks);
  const int64_t col_blocks = (d.hidden + kCombineCols - 1) / kCombineCols;
  const dim3 grid(
      capped(blocks_for(d.t_max, kWarps),
             EpDims{.max_blocks =
                        d.max_blocks > 0 ? std::max<int>(1, d.max_blocks / int(col_blocks)) : 0}),
      unsigned(col_blocks));
  normal_combine_kernel<<<grid, kWarps * 32, kCombineSmem, stream>>>(
      y, partials, dest_slot, dest_offset, topk_ids, topk_weights, shared_out, num_tokens, d);
  EPMOE_CUDA_CHECK_LAUNCH("normal_combine_kernel");
}

void add_rows(float* y, const float* add, float scale, const int32_t* num_tokens, int64_t t_max,
              int64_t hidden, cudaStream_t stream) {
  const NvtxRange nvtx("ep.add_rows");
  add_rows_kernel<<<blocks_for(t_max * hidden, 256 * 8), 256, 0, stream>>>(
      y, add, scale, num_tokens, t_max, hidden);
  EPMOE_CUDA_CHECK_LAUNCH("add_rows_kernel");
}

void dest_offsets(int32_t* dest_offset, const int32_t* dest_count, int num_ranks,
                  cudaStream_t stream) {
  const NvtxRange nvtx("ep.dest_offsets");
  dest_offsets_kernel<<<1, 32, 0, stream>>>(dest_offset, dest_count, num_ranks);
  EPMOE_CUDA_CHECK_LAUNCH("dest_offsets_kernel");
}

void make_single_segment(int32_t* seg, const int32_t* num_tokens, cudaStream_t stream) {
  const NvtxRange nvtx("ep.make_single_segment");
  single_segment_kernel<<<1, 1, 0, stream>>>(seg, num_tokens);
  EPMOE_CUDA_CHECK_LAUNCH("single_segment_kernel");
}

void scatter_shared(float* out, const float* in, int j, int n, const int32_t* num_tokens,
                    int64_t t_max, int64_t hidden, cudaStream_t stream) {
  const NvtxRange nvtx("ep.scatter_shared");
  scatter_shared_kernel<<<blocks_for(t_max * hidden, 256 * 8), 256, 0, stream>>>(
      out, in, j, n, num_tokens, t_max, hidden);
  EPMOE_CUDA_CHECK_LAUNCH("scatter_shared_kernel");
}

}  // namespace epmoe::cuda::ep
