// Kernels of expert parallelism on the GPU (DESIGN §5), shared by both transports: they reach
// other ranks only through device tables of peer pointers. Host launchers; the rank-level
// orchestration is ep_cuda.h.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "epmoe/comm/gpu_transport.h"

namespace epmoe::cuda::ep {

// Device code handles up to this many slots per token (K + fused shared).
constexpr int kMaxDeviceSlots = 16;
constexpr int kMaxRanks = 64;

// One token as it crosses the wire: payload | src token i32 | K' local ids i32 | K' weights f32.
// Payload: H bf16, or (FP8) H e4m3 bytes then ceil(H/128) f32 scales.
struct RecordLayout {
  int64_t hidden = 0;
  int num_slots = 0;
  bool fp8 = false;
  size_t payload = 0, scales_off = 0, src_off = 0, ids_off = 0, w_off = 0, bytes = 0;
};
RecordLayout make_record_layout(int64_t hidden, int num_slots, bool fp8);

// Offsets inside each rank's low-latency symmetric buffer.
struct LowLatencyLayout {
  size_t dispatch_flags = 0;  // [R] u64: (sequence << 32) | tokens sent by that source
  size_t combine_flags = 0;   // [R] u64: sequence
  size_t staging = 0;         // [R sources][T_max] records
  size_t combine = 0;         // [T_max][K'] rows of H bf16
  size_t total = 0;
};
LowLatencyLayout make_ll_layout(int num_ranks, int64_t t_max, const RecordLayout& rec);

// DeviceWaitError::failed values: 1 = a wait ran out of time; kOverflowedExpert = a local expert
// got more rows than the masked receive buffer holds (peer = the expert, expected = R·T_max,
// observed = rows).
constexpr int kWaitTimedOut = 1;
constexpr int kOverflowedExpert = 2;
// A signalled combine-send waited too long for the down GEMM's signal of one block of rows
// (peer = the local expert, index = the m-block, expected = the threshold, observed = the value).
constexpr int kSignalTimedOut = 3;

// What the kernels need to know about the rank and the problem.
struct EpDims {
  int rank = 0, num_ranks = 1;
  int num_routed = 0, local_experts = 0, num_slots = 0;
  int n_shared_fused = 0;
  int64_t hidden = 0, t_max = 0;
  // Most blocks one communication kernel launches (0 = no bound): the rest of the GPU stays
  // free for the other micro-batch's GEMMs. The kernels stride over their work.
  int max_blocks = 0;
};

// Loads this module's kernels and sets their shared-memory limits; call once per device before
// any rank of the process starts waiting on flags (EpRankCuda's constructor does).
void prepare_kernels();

// Per token: which ranks it visits (deduplicated) and its slot in each destination, in token
// order; per destination: how many tokens go there, and (dest_pairs, optional) how many
// (token, slot) pairs it owns. One block, no host synchronisation.
// dest_slot: [T_max, R] i32 (-1 = not visited); dest_count, dest_pairs: [R] i32;
// topk_ids: [T_max, K'] i32; num_tokens: device i32 (T <= T_max).
void route_layout(int32_t* dest_slot, int32_t* dest_count, int32_t* dest_pairs,
                  const int32_t* topk_ids, const int32_t* num_tokens, const EpDims& d,
                  cudaStream_t stream);

// dest_offset[r] = sum of dest_count[0..r): the first packed record of each destination.
// dest_offset, dest_count: [R] i32 device.
void dest_offsets(int32_t* dest_offset, const int32_t* dest_count, int num_ranks,
                  cudaStream_t stream);

// ---- low-latency ----
// Writes each token once into every destination's staging area; then raises the flags.
// seq: device u64 of this rank, incremented here (the call's sequence number).
void ll_dispatch_send(void* const* peers, const LowLatencyLayout& ll, const RecordLayout& rec,
                      const void* x, const int32_t* topk_ids, const float* topk_weights,
                      const int32_t* num_tokens, const int32_t* dest_slot,
                      const int32_t* dest_count, uint64_t* seq, const EpDims& d,
                      cudaStream_t stream);

// Waits (bounded) for every source's dispatch flag; src_count: [R] i32 gets the number of
// tokens each source sent.
void ll_wait_dispatch(int32_t* src_count, const void* local_window, const LowLatencyLayout& ll,
                      const uint64_t* seq, DeviceWaitError* err, int64_t timeout_ns,
                      const EpDims& d, cudaStream_t stream);

// Expands the tokens staged in the window (src_count[s] records from source s) into the masked
// layout in (source rank, token, slot) order. recv_x: [E_loc, M_max, H] bf16 (FP8 payloads
// dequantised); recv_count: [E_loc] i32; recv_src: [E_loc, M_max, 3] i32 (source rank, source
// token, slot); recv_record: [E_loc, M_max] i32 (staging record of the row); recv_seg:
// [E_loc, R + 1] i32, the first row of each source in each expert's rows. M_max = R·T_max.
// FP8 payloads with recv_q != nullptr: the codes and scales are kept as they came, recv_q
// [E_loc, M_max, H] e4m3 and recv_scale [E_loc, M_max, H/128] f32 (H % 128 == 0), and recv_x is
// not written (the FP8 expert GEMMs read them directly).
void ll_expand_received(void* recv_x, int32_t* recv_count, int32_t* recv_src, int32_t* recv_record,
                        int32_t* recv_seg, const int32_t* src_count, const void* local_window,
                        const LowLatencyLayout& ll, const RecordLayout& rec, DeviceWaitError* err,
                        const EpDims& d, cudaStream_t stream, void* recv_q = nullptr,
                        float* recv_scale = nullptr);

// Sends each expert row back into its source's window, then raises the combine flags.
// expert_out: [E_loc, M_max, H] bf16.
void ll_combine_send(void* const* peers, const LowLatencyLayout& ll, const void* expert_out,
                     const int32_t* recv_count, const int32_t* recv_src, const uint64_t* seq,
                     const EpDims& d, cudaStream_t stream);

// Per-tile completion signals of the down GEMM (sm90_grouped_gemm.cuh): entry e·nb + m covers
// rows [m·block_m, (m+1)·block_m) of local expert e (nb = ceil(M_max / block_m)) and reaches
// `threshold` once they are stored.
struct GemmSignals {
  const int32_t* signal = nullptr;
  int block_m = 0, threshold = 0;
};

// Single-batch overlap (seed 001, second half): ll_combine_send started together with the down
// GEMM. Each block of rows of each expert with rows is sent as soon as its signal reaches the
// threshold (acquire load, bounded wait: a timeout is recorded as kSignalTimedOut naming the
// expert and m-block, and the remaining waits stop); then the combine flags as ll_combine_send.
// Run it on its own stream with at most d.max_blocks blocks (16 when 0) beside the GEMM, whose
// persistent kernel must leave it SMs (Sm90GemmWorkspace::set_max_sms). A failure already in
// `err` (an earlier wait of this micro-batch) stops the sends and leaves the flags down, so peers
// never read partial rows; they time out naming this rank.
void ll_combine_send_signalled(void* const* peers, const LowLatencyLayout& ll,
                               const void* expert_out, const int32_t* recv_count,
                               const int32_t* recv_src, const GemmSignals& signals,
                               const uint64_t* seq, DeviceWaitError* err, int64_t timeout_ns,
                               const EpDims& d, cudaStream_t stream);

// Waits (bounded) for every rank's combine flag.
void ll_wait_combine(const void* local_window, const LowLatencyLayout& ll, const uint64_t* seq,
                     DeviceWaitError* err, int64_t timeout_ns, const EpDims& d,
                     cudaStream_t stream);

// Forms y[t] in the canonical order (reduce_plan.h): routed rows from the window's combine
// area, fused shared rows from shared_out.
// y: [T_max, H] f32 (rows < T); shared_out: [T_max, n_shared_fused, H] f32 or nullptr.
void ll_combine_reduce(float* y, const void* local_window, const LowLatencyLayout& ll,
                       const int32_t* topk_ids, const float* topk_weights, const float* shared_out,
                       const int32_t* num_tokens, const DeviceWaitError* err, const EpDims& d,
                       cudaStream_t stream);

// ---- low-latency over the host API (peers not load/store reachable) ----
// The dispatch records travel with the transport's all_to_all_v into the window's staging area
// (the layout ll_dispatch_send produces), so ll_expand_received and ll_combine_reduce serve both
// paths. The way back uses return records: {source token, slot, 0, 0} i32 then H bf16.
size_t return_record_bytes(int64_t hidden);
// Expert side: all received rows as return records, source-major from row src_base[s] ([R] i32,
// device), expert-major within each source.
void ll_return_pack(void* out, const int32_t* src_base, const void* expert_out,
                    const int32_t* recv_count, const int32_t* recv_src, const int32_t* recv_seg,
                    const EpDims& d, cudaStream_t stream);
// Source side: n return records → the window's combine rows.
void ll_return_unpack(void* local_window, const LowLatencyLayout& ll, const void* in, int64_t n,
                      const EpDims& d, cudaStream_t stream);

// ---- normal ----
// Packs records for every (token, destination) pair: destination-major, token order.
// send: [Σ dest_count, rec.bytes]; dest_offset: [R] i32 device, first record of destination d.
void normal_pack(void* send, const RecordLayout& rec, const void* x, const int32_t* topk_ids,
                 const float* topk_weights, const int32_t* num_tokens, const int32_t* dest_slot,
                 const int32_t* dest_offset, const EpDims& d, cudaStream_t stream);
// Received records → recv_x [N, H] bf16, recv_ids [N, K'] i32 (local ids), recv_w [N, K'] f32.
void normal_unpack(void* recv_x, int32_t* recv_ids, float* recv_w, const void* recv,
                   const RecordLayout& rec, int64_t n, const EpDims& d, cudaStream_t stream);
// Source side: y[t] from the partial sums returned by each visited rank, in the canonical order.
// partials: [Σ dest_count, H] f32 in destination-major token order; shared_out as above.
void normal_combine(float* y, const float* partials, const int32_t* dest_slot,
                    const int32_t* dest_offset, const int32_t* topk_ids, const float* topk_weights,
                    const float* shared_out, const int32_t* num_tokens, const EpDims& d,
                    cudaStream_t stream);

// y[t] += add[t] (rows < T), then y *= scale when scale != 1. y, add: [T_max, H] f32.
void add_rows(float* y, const float* add, float scale, const int32_t* num_tokens, int64_t t_max,
              int64_t hidden, cudaStream_t stream);
// seg = {0, *num_tokens}: a one-expert segment for the shared MLP.
void make_single_segment(int32_t* seg, const int32_t* num_tokens, cudaStream_t stream);
// out [T_max, n, H] f32 slice j  <- in [T_max, H] f32 (rows < T).
void scatter_shared(float* out, const float* in, int j, int n, const int32_t* num_tokens,
                    int64_t t_max, int64_t hidden, cudaStream_t stream);

}  // namespace epmoe::cuda::ep
