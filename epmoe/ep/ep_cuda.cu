#include <algorithm>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "epmoe/core/env.h"
#include "epmoe/cuda/cuda_check.h"
#include "epmoe/cuda/device.h"
#include "epmoe/cuda/nvtx.h"
#include "epmoe/ep/ep_cuda.h"
#include "epmoe/ep/ep_kernels.cuh"

namespace epmoe::cuda {

struct EpMicroBatchCuda::Impl {
  Impl(GpuTransport& tr, const MoeConfig& c, const EpConfig& e, const EpCudaOptions& o,
       std::string n)
      : t(tr), cfg(c), ep(e), opt(o), name(std::move(n)) {
    EPMOE_CHECK(tr.size() == ep.num_ranks, kInvalidConfig,
                "the transport has {} ranks, the EP config {}", tr.size(), ep.num_ranks);
    EPMOE_CHECK(ep.max_tokens_per_rank >= 1, kInvalidConfig,
                "max_tokens_per_rank must be >= 1 on the GPU, got {}", ep.max_tokens_per_rank);
    EPMOE_CHECK(opt.comm_blocks >= 0, kInvalidArgument, "comm_blocks must be >= 0, got {}",
                opt.comm_blocks);
    d.rank = tr.rank();
    d.num_ranks = ep.num_ranks;
    d.num_routed = cfg.n_routed_experts;
    d.local_experts = cfg.n_routed_experts / ep.num_ranks;
    d.num_slots = cfg.num_slots();
    d.n_shared_fused = cfg.fused_shared();
    d.hidden = cfg.hidden;
    d.t_max = ep.max_tokens_per_rank;
    d.max_blocks = opt.comm_blocks;
    rec = ep::make_record_layout(cfg.hidden, d.num_slots, opt.fp8_dispatch);
    timeout_ns = (opt.timeout_ms >= 0 ? opt.timeout_ms : wait_timeout_ms()) * 1000000;
    const int64_t T = d.t_max, H = cfg.hidden, E_loc = d.local_experts, R = d.num_ranks;
    dest_slot = DeviceTensor(DType::kI32, {T, R});
    dest_count = DeviceTensor(DType::kI32, {2 * R});  // [counts | pairs]
    // Uploaded per call: [dest_offset | src_count (host-API path) | src_base (host-API path)].
    host_meta = DeviceTensor(DType::kI32, {3 * R});
    EPMOE_CUDA_CHECK(cudaMallocHost(&pinned_i32, sizeof(int32_t) * 8 * size_t(R)));
    EPMOE_CUDA_CHECK(cudaEventCreateWithFlags(&counts_ready, cudaEventDisableTiming));
    seq = DeviceTensor(DType::kI64, {1});
    seq.fill_bytes(0);
    err = DeviceTensor(DType::kI32, {int64_t(sizeof(DeviceWaitError) / 4 + 1)});
    err.fill_bytes(0);
    if (ep.mode == EpMode::kLowLatency) {
      ll = ep::make_ll_layout(int(R), T, rec);
      EPMOE_CHECK(opt.ll_transfer != LlTransfer::kDevice || t.peers_reachable(), kUnsupported,
                  "rank {}: low-latency transfers by load/store need every peer's memory to be "
                  "reachable (one node over NVLink/PCIe); the {} transport cannot map some "
                  "peers: use --ll-transfer host (or auto) between nodes",
                  d.rank, t.name());
      ll_host = opt.ll_transfer == LlTransfer::kHostApi ||
                (opt.ll_transfer == LlTransfer::kAuto && !t.peers_reachable());
      if (ll_host) {
        // Only this rank writes its window (through the host API): plain device memory.
        ll_local = DeviceTensor(DType::kI32, {int64_t(ll.total / 4 + 1)});
        win_local = ll_local.view().data;
      } else {
        window = t.alloc_symmetric(ll.total);
        win_local = window.local;
      }
      const int64_t m_max = R * T;
      recv_seg = DeviceTensor(DType::kI32, {E_loc, R + 1});
      keep_fp8 = opt.fp8_dispatch && opt.fp8_experts;
      if (keep_fp8) {
        EPMOE_CHECK(H % 128 == 0, kUnsupported,
                    "FP8 experts need H to be a multiple of 128, got {}", H);
        recv_q = DeviceTensor(DType::kF8E4M3, {E_loc, m_max, H});
        recv_s = DeviceTensor(DType::kF32, {E_loc, m_max, H / 128});
      } else {
        recv_x = DeviceTensor(DType::kBF16, {E_loc, m_max, H});
      }
      recv_count = DeviceTensor(DType::kI32, {E_loc});
      recv_count.fill_bytes(0);
      recv_src = DeviceTensor(DType::kI32, {E_loc, m_max, 3});
      recv_record = DeviceTensor(DType::kI32, {E_loc, m_max});
      src_count = DeviceTensor(DType::kI32, {R});
      expert_out = DeviceTensor(DType::kBF16, {E_loc, m_max, H});
    }
  }

  ~Impl() {
    if (pinned_i32) cudaFreeHost(pinned_i32);
    if (counts_ready) cudaEventDestroy(counts_ready);
  }

  GpuTransport& t;
  MoeConfig cfg;
  EpConfig ep;
  EpCudaOptions opt;
  std::string name;
  ep::EpDims d;
  ep::RecordLayout rec;
  ep::LowLatencyLayout ll;
  int64_t timeout_ns = 0;
  SymmetricBuffer window;  // low-latency by load/store
  DeviceTensor ll_local;   // low-latency over the host API: the window, local only
  void* win_local = nullptr;
  bool ll_host = false;
  bool serial_halves = env_int("SERIAL_HALVES", 0) != 0;
  EpTokens in;  // the tokens of the current dispatch
  DeviceTensor dest_slot, dest_count, host_meta, seq, err;
  // low-latency
  DeviceTensor recv_x, recv_count, recv_src, recv_record, recv_seg, src_count, expert_out;
  bool keep_fp8 = false;   // the FP8 payload stays FP8: recv_q, recv_s instead of recv_x
  int signal_block_m = 0;  // of the last signalled combine-send (messages)
  DeviceTensor recv_q, recv_s;
  DeviceTensor ret_out, ret_in;  // host-API path: return records
  // sizes learned on the host (normal mode; low-latency over the host API)
  std::vector<int32_t> send_counts, recv_counts, send_pairs, recv_pairs;
  int64_t n_recv = 0, n_send = 0;
  DeviceTensor send_buf, recv_buf, n_recv_x, n_recv_ids, n_recv_w, partial, back;
  int32_t* pinned_i32 = nullptr;       // [8R]: counts read back [2R], host_meta's upload [3R]
  cudaEvent_t counts_ready = nullptr;  // after dispatch_send's count read-back
  EpCudaTraffic traffic;

  DeviceWaitError* err_ptr() const { return reinterpret_cast<DeviceWaitError*>(err.view().data); }
  int32_t* dest_offset_ptr() const { return host_meta.as<int32_t>(); }
  int32_t* src_count_host_path() const { return host_meta.as<int32_t>() + d.num_ranks; }
  int32_t* src_base_ptr() const { return host_meta.as<int32_t>() + 2 * d.num_ranks; }
  uint64_t* seq_ptr() const { return reinterpret_cast<uint64_t*>(seq.view().data); }

  bool local_halves() const { return ep.mode == EpMode::kNormal || ll_host; }

  void require_comm_stream(cudaStream_t s) const {
    EPMOE_CHECK(s == t.stream(), kInvalidArgument,
                "rank {}, micro-batch {}: communication runs on the transport's stream", d.rank,
                name);
  }

  // ---- dispatch ----
  void dispatch_send(const EpTokens& tokens, cudaStream_t s) {
    NvtxRange r("ep.dispatch_send");
    if (!local_halves()) require_comm_stream(s);
    in = tokens;
    const int R = d.num_ranks;
    if (ep.mode == EpMode::kLowLatency && !ll_host) {
      ep::route_layout(dest_slot.as<int32_t>(), dest_count.as<int32_t>(), nullptr, in.topk_ids,
                       in.num_tokens, d, s);
      ep::ll_dispatch_send(window.peers, ll, rec, in.x, in.topk_ids, in.topk_weights, in.num_tokens,
                           dest_slot.as<int32_t>(), dest_count.as<int32_t>(), seq_ptr(), d, s);
      serial_point("dispatch send half");
      return;
    }
    // Normal mode and the host-API path: per-destination counts (and pairs) on the device, then
    // the records packed destination-major. The packing offsets are this rank's own prefix sums,
    // so nothing here waits for a peer; the sizes are exchanged in dispatch_recv.
    if (ll_host) refuse_capture("low-latency dispatch (send half)", s);
    ep::route_layout(dest_slot.as<int32_t>(), dest_count.as<int32_t>(),
                     dest_count.as<int32_t>() + R, in.topk_ids, in.num_tokens, d, s);
    ep::dest_offsets(dest_offset_ptr(), dest_count.as<int32_t>(), R, s);
    // At most T_max records to each destination: a fixed-size send buffer.
    ensure_rows(send_buf, DType::kI32,
                {std::max<int64_t>(1, d.t_max * R * int64_t(rec.bytes) / 4)});
    ep::normal_pack(send_buf.view().data, rec, in.x, in.topk_ids, in.topk_weights, in.num_tokens,
                    dest_slot.as<int32_t>(), dest_offset_ptr(), d, s);
    EPMOE_CUDA_CHECK(cudaMemcpyAsync(pinned_i32, dest_count.view().data, 8 * size_t(R),
                                     cudaMemcpyDeviceToHost, s));
    EPMOE_CUDA_CHECK(cudaEventRecord(counts_ready, s));
    // The transfers (dispatch_recv, on the transport's stream) read the packed records.
    EPMOE_CUDA_CHECK(cudaStreamWaitEvent(t.stream(), counts_ready, 0));
  }

  void dispatch_recv(cudaStream_t s) {
    NvtxRange r("ep.dispatch_recv");
    require_comm_stream(s);
    if (ep.mode == EpMode::kLowLatency) {
      const int32_t* counts = src_count.as<int32_t>();
      if (ll_host) {
        refuse_capture("low-latency dispatch (receive half)", s);
        exchange_counts("low-latency dispatch (receive half)");
        Sizes sz = sizes(send_counts, recv_counts, rec.bytes);
        // Into the window's staging area, source p at record p * T_max: where the load/store
        // path puts it, so the expansion below is the same kernels.
        for (int p = 0; p < d.num_ranks; ++p)
          sz.ro[size_t(p)] = size_t(p) * size_t(d.t_max) * rec.bytes;
        t.all_to_all_v(send_buf.view().data, sz.sb.data(), sz.so.data(),
                       static_cast<char*>(win_local) + ll.staging, sz.rb.data(), sz.ro.data());
        count_dispatch(sz);
        counts = src_count_host_path();
      } else {
        ep::ll_wait_dispatch(src_count.as<int32_t>(), win_local, ll, seq_ptr(), err_ptr(),
                             timeout_ns, d, s);
      }
      ep::ll_expand_received(recv_x.view().data, recv_count.as<int32_t>(), recv_src.as<int32_t>(),
                             recv_record.as<int32_t>(), recv_seg.as<int32_t>(), counts, win_local,
                             ll, rec, err_ptr(), d, s, keep_fp8 ? recv_q.view().data : nullptr,
                             keep_fp8 ? recv_s.as<float>() : nullptr);
      return;
    }
    exchange_counts("normal dispatch (receive half)");
    const int64_t Kp = d.num_slots, H = d.hidden;
    ensure_rows(recv_buf, DType::kI32, {std::max<int64_t>(1, n_recv * int64_t(rec.bytes) / 4)});
    const Sizes sz = sizes(send_counts, recv_counts, rec.bytes);
    t.all_to_all_v(send_buf.view().data, sz.sb.data(), sz.so.data(), recv_buf.view().data,
                   sz.rb.data(), sz.ro.data());
    count_dispatch(sz);
    ensure_rows(n_recv_x, DType::kBF16, {std::max<int64_t>(1, n_recv), H});
    ensure_rows(n_recv_ids, DType::kI32, {std::max<int64_t>(1, n_recv), Kp});
    ensure_rows(n_recv_w, DType::kF32, {std::max<int64_t>(1, n_recv), Kp});
    ensure_rows(partial, DType::kF32, {std::max<int64_t>(1, n_recv), H});
    ep::normal_unpack(n_recv_x.view().data, n_recv_ids.as<int32_t>(), n_recv_w.as<float>(),
                      recv_buf.view().data, rec, n_recv, d, s);
  }

  // ---- combine ----
  bool can_signal() const { return ep.mode == EpMode::kLowLatency && !ll_host; }

  void combine_send(cudaStream_t s, const CombineSignals* signals) {
    NvtxRange r("ep.combine_send");
    if (ep.mode != EpMode::kNormal) require_comm_stream(s);
    require_dispatched("combine (send half)");
    EPMOE_CHECK(signals == nullptr || can_signal(), kInvalidArgument,
                "rank {}, micro-batch {}: a signalled combine-send needs low-latency mode by "
                "load/store",
                d.rank, name);
    if (signals != nullptr) {
      signal_block_m = signals->block_m;
      ep::ll_combine_send_signalled(
          window.peers, ll, expert_out.view().data, recv_count.as<int32_t>(),
          recv_src.as<int32_t>(),
          ep::GemmSignals{signals->signal, signals->block_m, signals->threshold}, seq_ptr(),
          err_ptr(), timeout_ns, d, s);
      // Under EPMOE_SERIAL_HALVES the GEMM it waits on was launched first, so a checking tool
      // that runs kernels one at a time in launch order finishes the GEMM before this kernel.
      serial_point("combine send half (signalled)");
      return;
    }
    if (ep.mode == EpMode::kLowLatency && !ll_host) {
      ep::ll_combine_send(window.peers, ll, expert_out.view().data, recv_count.as<int32_t>(),
                          recv_src.as<int32_t>(), seq_ptr(), d, s);
      serial_point("combine send half");
      return;
    }
    if (ep.mode == EpMode::kLowLatency) {
      refuse_capture("low-latency combine (send half)", s);
      const size_t rb = ep::return_record_bytes(d.hidden);
      Sizes sz = sizes(recv_pairs, send_pairs, rb);
      const int64_t n_out = int64_t(sz.total_send / rb), n_in = int64_t(sz.total_recv / rb);
      ensure_rows(ret_out, DType::kI32, {std::max<int64_t>(1, n_out * int64_t(rb) / 4)});
      ensure_rows(ret_in, DType::kI32, {std::max<int64_t>(1, n_in * int64_t(rb) / 4)});
      ep::ll_return_pack(ret_out.view().data, src_base_ptr(), expert_out.view().data,
                         recv_count.as<int32_t>(), recv_src.as<int32_t>(), recv_seg.as<int32_t>(),
                         d, s);
      t.all_to_all_v(ret_out.view().data, sz.sb.data(), sz.so.data(), ret_in.view().data,
                     sz.rb.data(), sz.ro.data());
      count_combine(sz);
      return;
    }
    // Normal mode: nothing to issue here. The partial sums travel in combine_transfer, at the
    // start of the receive half, so that under two-batch overlap the other micro-batch's
    // dispatch is not queued behind this one's combine on the communicator.
  }

  // Normal mode: partial sums go back the way the tokens came, recv_counts[p] rows to p.
  void combine_transfer(cudaStream_t s) {
    NvtxRange r("ep.combine_transfer");
    require_comm_stream(s);
    require_dispatched("combine (transfer)");
    EPMOE_CHECK(ep.mode == EpMode::kNormal, kInvalidArgument,
                "rank {}, micro-batch {}: combine_transfer is normal mode's", d.rank, name);
    ensure_rows(back, DType::kF32, {std::max<int64_t>(1, n_send), d.hidden});
    const Sizes sz = sizes(recv_counts, send_counts, size_t(d.hidden) * 4);
    t.all_to_all_v(partial.view().data, sz.sb.data(), sz.so.data(), back.view().data, sz.rb.data(),
                   sz.ro.data());
    count_combine(sz);
  }

  void combine_recv(float* y, const float* fused_shared, cudaStream_t s) {
    NvtxRange r("ep.combine_recv");
    if (!local_halves()) require_comm_stream(s);
    require_dispatched("combine (receive half)");
    if (ep.mode == EpMode::kNormal) {
      ep::normal_combine(y, back.as<float>(), dest_slot.as<int32_t>(), dest_offset_ptr(),
                         in.topk_ids, in.topk_weights, fused_shared, in.num_tokens, d, s);
      return;
    }
    if (ll_host) {
      refuse_capture("low-latency combine (receive half)", s);
      int64_t n = 0;
      for (int p = 0; p < d.num_ranks; ++p) n += send_pairs[size_t(p)];
      ep::ll_return_unpack(win_local, ll, ret_in.view().data, n, d, s);
    } else {
      ep::ll_wait_combine(win_local, ll, seq_ptr(), err_ptr(), timeout_ns, d, s);
    }
    ep::ll_combine_reduce(y, win_local, ll, in.topk_ids, in.topk_weights, fused_shared,
                          in.num_tokens, err_ptr(), d, s);
  }

  // EPMOE_SERIAL_HALVES=1 (checking tools only): after a send half, wait for it and for every
  // rank's, so no receive kernel is enqueued before all sends finished. compute-sanitizer runs
  // kernels one at a time, and a waiting kernel would otherwise hold the device while the peer
  // it waits for is queued behind it. Skipped while a CUDA graph is being captured.
  void serial_point(const char* what) {
    if (!serial_halves) return;
    cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
    EPMOE_CUDA_CHECK(cudaStreamIsCapturing(t.stream(), &st));
    if (st != cudaStreamCaptureStatusNone) return;
    t.synchronize(what);
    t.barrier();
  }

  void refuse_capture(const char* what, cudaStream_t s) const {
    cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
    EPMOE_CUDA_CHECK(cudaStreamIsCapturing(s, &st));
    EPMOE_CHECK(st == cudaStreamCaptureStatusNone, kUnsupported,
                "rank {}, micro-batch {}: {} learns transfer sizes on the host (normal mode, or "
                "low-latency over the host API when peers are not load/store reachable or "
                "--ll-transfer host): it cannot be captured in a CUDA graph",
                d.rank, name, what);
  }

  void require_dispatched(const char* what) const {
    EPMOE_CHECK(in.num_tokens != nullptr, kInvalidArgument,
                "rank {}, micro-batch {}: {} before any dispatch", d.rank, name, what);
    EPMOE_CHECK(
        (ep.mode == EpMode::kLowLatency && !ll_host) || send_pairs.size() == size_t(d.num_ranks),
        kInvalidArgument, "rank {}, micro-batch {}: {} before dispatch_recv", d.rank, name, what);
  }

  // ---- sizes learned on the host ----
  struct Sizes {
    std::vector<size_t> sb, so, rb, ro;  // per peer: send bytes/offset, receive bytes/offset
    size_t total_send = 0, total_recv = 0;
  };
  // Packed back to back in rank order: send[p] items to p, recv[p] items from p.
  Sizes sizes(const std::vector<int32_t>& send, const std::vector<int32_t>& recv,
              size_t item_bytes) const {
    const size_t R = size_t(d.num_ranks);
    Sizes z{std::vector<size_t>(R), std::vector<size_t>(R), std::vector<size_t>(R),
            std::vector<size_t>(R)};
    for (size_t p = 0; p < R; ++p) {
      z.sb[p] = size_t(send[p]) * item_bytes;
      z.so[p] = z.total_send;
      z.total_send += z.sb[p];
      z.rb[p] = size_t(recv[p]) * item_bytes;
      z.ro[p] = z.total_recv;
      z.total_recv += z.rb[p];
    }
    return z;
  }
  void count_dispatch(const Sizes& sz) {
    traffic = EpCudaTraffic{};
    for (int p = 0; p < d.num_ranks; ++p)
      if (p != d.rank) {
        traffic.dispatch_tokens += send_counts[size_t(p)];
        traffic.dispatch_bytes += int64_t(sz.sb[size_t(p)]);
      }
  }
  void count_combine(const Sizes& sz) {
    traffic.combine_bytes = 0;
    for (int p = 0; p < d.num_ranks; ++p)
      if (p != d.rank) traffic.combine_bytes += int64_t(sz.sb[size_t(p)]);
  }

  // After dispatch_send queued the read-back of this rank's per-destination token (and pair)
  // counts: waits for it (bounded), gathers everyone's, and uploads host_meta's src_count (tokens
  // from each source) and src_base (first return row of each source). One host synchronisation.
  void exchange_counts(const char* what) {
    const int R = d.num_ranks;
    EPMOE_CHECK(in.num_tokens != nullptr, kInvalidArgument,
                "rank {}, micro-batch {}: {} before dispatch_send", d.rank, name, what);
    wait_counts();
    const int32_t* mine = pinned_i32;  // [2R]
    std::vector<int64_t> m64(mine, mine + 2 * R), all(size_t(R) * 2 * size_t(R));
    t.all_gather_host(m64.data(), all.data(), 2 * R);
    send_counts.assign(mine, mine + R);
    send_pairs.assign(mine + R, mine + 2 * R);
    recv_counts.assign(size_t(R), 0);
    recv_pairs.assign(size_t(R), 0);
    for (int s = 0; s < R; ++s) {
      recv_counts[size_t(s)] = int32_t(all[size_t(s) * 2 * R + d.rank]);
      recv_pairs[size_t(s)] = int32_t(all[size_t(s) * 2 * R + R + d.rank]);
    }
    int32_t* meta = pinned_i32 + 2 * R;  // [R..3R) of host_meta: src_count, src_base
    n_send = n_recv = 0;
    int64_t ret = 0;
    for (int p = 0; p < R; ++p) {
      n_send += send_counts[size_t(p)];
      n_recv += recv_counts[size_t(p)];
      meta[p] = recv_counts[size_t(p)];
      meta[R + p] = int32_t(ret);
      ret += recv_pairs[size_t(p)];
    }
    EPMOE_CUDA_CHECK(cudaMemcpyAsync(host_meta.as<int32_t>() + R, meta, 8 * size_t(R),
                                     cudaMemcpyHostToDevice, t.stream()));
  }

  // Bounded host wait for this micro-batch's count read-back only (not the whole stream: the
  // other micro-batch's work may be queued behind it).
  void wait_counts() {
    const auto deadline = std::chrono::steady_clock::now() +
                          std::chrono::nanoseconds(std::max<int64_t>(timeout_ns, 1000000));
    while (true) {
      const cudaError_t q = cudaEventQuery(counts_ready);
      if (q == cudaSuccess) return;
      if (q != cudaErrorNotReady) EPMOE_CUDA_CHECK(q);
      EPMOE_CHECK(std::chrono::steady_clock::now() < deadline, kTimeout,
                  "rank {}, micro-batch {}: this rank's dispatch counts were not ready within "
                  "{} ms (its layout kernel never ran)",
                  d.rank, name, timeout_ns / 1000000);
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }

  void check(cudaStream_t s) {
    require_comm_stream(s);
    t.synchronize(fmt::format("micro-batch {}'s communication stream", name).c_str());
    DeviceWaitError e{};
    EPMOE_CUDA_CHECK(cudaMemcpy(&e, err.view().data, sizeof(e), cudaMemcpyDeviceToHost));
    if (e.failed == ep::kSignalTimedOut) {
      err.fill_bytes(0);
      EPMOE_FAIL(
          kTimeout,
          "rank {}, micro-batch {}: the combine-send timed out waiting for the down GEMM's "
          "signal of local expert {}, m-block {} (its rows from {}): expected {}, observed {}",
          e.rank, name, e.peer, e.index, int64_t(e.index) * signal_block_m, e.expected, e.observed);
    }
    if (e.failed == ep::kOverflowedExpert) {
      err.fill_bytes(0);
      EPMOE_FAIL(kInvalidArgument,
                 "rank {}, micro-batch {}: local expert {} received {} rows, more than the {} "
                 "(R x T_max) the low-latency receive buffer holds: some token names that expert "
                 "twice",
                 e.rank, name, e.peer, e.observed, e.expected);
    }
    if (e.failed) {
      err.fill_bytes(0);
      EPMOE_FAIL(kTimeout,
                 "rank {}, micro-batch {} ({} transport) timed out on the device waiting for the "
                 "{} of peer {}: expected {:#x}, observed {:#x}",
                 e.rank, name, t.name(), e.what, e.peer, e.expected, e.observed);
    }
  }

  EpCudaTraffic last_traffic(cudaStream_t s) {
    check(s);
    if (ep.mode == EpMode::kNormal || ll_host) return traffic;
    EpCudaTraffic tr;
    const int R = d.num_ranks;
    // Load/store path: the kernels' counts say what they stored into other ranks' windows.
    std::vector<int32_t> counts(static_cast<size_t>(R));
    EPMOE_CUDA_CHECK(
        cudaMemcpy(counts.data(), dest_count.view().data, 4 * size_t(R), cudaMemcpyDeviceToHost));
    for (int p = 0; p < R; ++p)
      if (p != d.rank) {
        tr.dispatch_tokens += counts[size_t(p)];
        tr.dispatch_bytes += int64_t(counts[size_t(p)]) * int64_t(rec.bytes);
      }
    const int64_t E_loc = d.local_experts, m_max = int64_t(R) * d.t_max;
    std::vector<int32_t> cnt(static_cast<size_t>(E_loc));
    EPMOE_CUDA_CHECK(
        cudaMemcpy(cnt.data(), recv_count.view().data, 4 * size_t(E_loc), cudaMemcpyDeviceToHost));
    Tensor src = recv_src.to_host();
    for (int64_t e = 0; e < E_loc; ++e)
      for (int64_t r = 0; r < cnt[size_t(e)]; ++r)
        if (src.as<int32_t>()[(e * m_max + r) * 3] != d.rank) tr.combine_bytes += d.hidden * 2;
    return tr;
  }
};

EpMicroBatchCuda::EpMicroBatchCuda(GpuTransport& transport, const MoeConfig& cfg,
                                   const EpConfig& ep, const EpCudaOptions& options,
                                   std::string name)
    : impl_(std::make_unique<Impl>(transport, cfg, ep, options, std::move(name))) {}
EpMicroBatchCuda::~EpMicroBatchCuda() = default;

const std::string& EpMicroBatchCuda::name() const { return impl_->name; }
bool EpMicroBatchCuda::ll_over_host_api() const { return impl_->ll_host; }
bool EpMicroBatchCuda::dispatch_send_is_local() const { return impl_->local_halves(); }
void EpMicroBatchCuda::set_comm_blocks(int blocks) {
  EPMOE_CHECK(blocks >= 0, kInvalidArgument, "comm_blocks must be >= 0, got {}", blocks);
  impl_->d.max_blocks = blocks;
}
bool EpMicroBatchCuda::combine_recv_is_local() const { return impl_->local_halves(); }
void EpMicroBatchCuda::dispatch_send(const EpTokens& in, cudaStream_t s) {
  impl_->dispatch_send(in, s);
}
void EpMicroBatchCuda::dispatch_recv(cudaStream_t s) { impl_->dispatch_recv(s); }
void EpMicroBatchCuda::combine_send(cudaStream_t s, const CombineSignals* signals) {
  impl_->combine_send(s, signals);
}
bool EpMicroBatchCuda::can_signal_combine() const { return impl_->can_signal(); }
bool EpMicroBatchCuda::combine_transfers_in_recv() const {
  return impl_->ep.mode == EpMode::kNormal;
}
void EpMicroBatchCuda::combine_transfer(cudaStream_t s) { impl_->combine_transfer(s); }
void EpMicroBatchCuda::combine_recv(float* y, const float* fused_shared, cudaStream_t s) {
  impl_->combine_recv(y, fused_shared, s);
}
TensorView EpMicroBatchCuda::recv_x() const { return impl_->recv_x.view(); }
TensorView EpMicroBatchCuda::recv_x_fp8() const { return impl_->recv_q.view(); }
TensorView EpMicroBatchCuda::recv_x_scale() const { return impl_->recv_s.view(); }
TensorView EpMicroBatchCuda::recv_count() const { return impl_->recv_count.view(); }
TensorView EpMicroBatchCuda::recv_src() const { return impl_->recv_src.view(); }
TensorView EpMicroBatchCuda::ll_expert_out() const { return impl_->expert_out.view(); }
int64_t EpMicroBatchCuda::normal_num_recv() const { return impl_->n_recv; }
TensorView EpMicroBatchCuda::normal_recv_x() const {
  return TensorView{
      impl_->n_recv_x.view().data, {impl_->n_recv, impl_->d.hidden}, DType::kBF16, Device::kCuda};
}
TensorView EpMicroBatchCuda::normal_recv_ids() const {
  return TensorView{impl_->n_recv_ids.view().data,
                    {impl_->n_recv, impl_->d.num_slots},
                    DType::kI32,
                    Device::kCuda};
}
TensorView EpMicroBatchCuda::normal_recv_weights() const {
  return TensorView{
      impl_->n_recv_w.view().data, {impl_->n_recv, impl_->d.num_slots}, DType::kF32, Device::kCuda};
}
TensorView EpMicroBatchCuda::normal_partials() {
  return TensorView{
      impl_->partial.view().data, {impl_->n_recv, impl_->d.hidden}, DType::kF32, Device::kCuda};
}
void EpMicroBatchCuda::check(cudaStream_t s) { impl_->check(s); }
EpCudaTraffic EpMicroBatchCuda::last_traffic(cudaStream_t s) { return impl_->last_traffic(s); }

const char* ll_transfer_name(LlTransfer t) {
  switch (t) {
    case LlTransfer::kAuto:
      return "auto";
    case LlTransfer::kDevice:
      return "device";
    case LlTransfer::kHostApi:
      return "host";
  }
  return "?";
}

LlTransfer parse_ll_transfer(const std::string& s) {
  for (LlTransfer t : {LlTransfer::kAuto, LlTransfer::kDevice, LlTransfer::kHostApi})
    if (s == ll_transfer_name(t)) return t;
  EPMOE_FAIL(kInvalidArgument, "unknown low-latency transfer '{}' (expected auto, device or host)",
             s);
}

}  // namespace epmoe::cuda
