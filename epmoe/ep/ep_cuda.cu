#include "epmoe/ep/ep_cuda.h"

#include <cstring>
#include <vector>

#include "epmoe/core/env.h"
#include "epmoe/cuda/cuda_check.h"
#include "epmoe/cuda/device.h"
#include "epmoe/ep/ep_kernels.cuh"
#include "epmoe/experts/experts.cuh"
#include "epmoe/experts/experts_cpu.h"
#include "epmoe/experts/grouped_gemm.cuh"
#include "epmoe/permute/permute.cuh"
#include "epmoe/routing/gate.cuh"

namespace epmoe::cuda {

namespace {
// Host bank slice [first, first + n) of a [E_bank, a, b] tensor as its own tensor.
Tensor bank_range(const Tensor& bank, int64_t first, int64_t n) {
  const Shape& s = bank.shape();
  Tensor out(bank.dtype(), {n, s[1], s[2]});
  const size_t per = size_t(s[1] * s[2]) * dtype_size(bank.dtype());
  std::memcpy(out.view().data, static_cast<const char*>(bank.view().data) + per * size_t(first),
              per * size_t(n));
  return out;
}
// NOTES: the GPU computes in bf16; an f32 bank is rounded once here.
Tensor as_bf16(const Tensor& t) { return to_dtype(t, DType::kBF16); }
}  // namespace

struct EpRankCuda::Impl {
  Impl(GpuTransport& tr, const MoeWeights& w, const EpConfig& e, const EpCudaOptions& o)
      : t(tr), cfg(w.config), ep(e), opt(o) {
    cfg.validate();
    ep.validate(cfg);
    EPMOE_CHECK(tr.size() == ep.num_ranks, kInvalidConfig,
                "the transport has {} ranks, the EP config {}", tr.size(), ep.num_ranks);
    EPMOE_CHECK(ep.max_tokens_per_rank >= 1, kInvalidConfig,
                "max_tokens_per_rank must be >= 1 on the GPU, got {}", ep.max_tokens_per_rank);
    EPMOE_CUDA_CHECK(cudaSetDevice(tr.device()));
    stream = tr.stream();
    d.rank = tr.rank();
    d.num_ranks = ep.num_ranks;
    d.num_routed = cfg.n_routed_experts;
    d.local_experts = cfg.n_routed_experts / ep.num_ranks;
    d.num_slots = cfg.num_slots();
    d.n_shared_fused = cfg.fused_shared();
    d.hidden = cfg.hidden;
    d.t_max = ep.max_tokens_per_rank;
    rec = ep::make_record_layout(cfg.hidden, d.num_slots, opt.fp8_dispatch);
    timeout_ns = (opt.timeout_ms >= 0 ? opt.timeout_ms : wait_timeout_ms()) * 1000000;
    const int64_t T = d.t_max, H = cfg.hidden, I = cfg.moe_intermediate, Kp = d.num_slots;
    const int64_t E_loc = d.local_experts, R = d.num_ranks;

    // Weights: this rank's experts, the shared expert(s), the router.
    w13 = DeviceTensor::from_host(as_bf16(bank_range(w.w13, d.rank * E_loc, E_loc)));
    w2 = DeviceTensor::from_host(as_bf16(bank_range(w.w2, d.rank * E_loc, E_loc)));
    if (cfg.fuse_shared) {
      sw13 = DeviceTensor::from_host(as_bf16(bank_range(w.w13, cfg.n_routed_experts, cfg.n_shared_experts)));
      sw2 = DeviceTensor::from_host(as_bf16(bank_range(w.w2, cfg.n_routed_experts, cfg.n_shared_experts)));
    } else if (cfg.n_shared_experts > 0) {
      const int64_t si = int64_t(cfg.n_shared_experts) * I;
      Tensor a = as_bf16(w.shared_w13), b = as_bf16(w.shared_w2);
      sw13 = DeviceTensor(DType::kBF16, {1, 2 * si, H});
      sw13.copy_from_host(TensorView{a.view().data, {1, 2 * si, H}, DType::kBF16, Device::kCpu});
      sw2 = DeviceTensor(DType::kBF16, {1, H, si});
      sw2.copy_from_host(TensorView{b.view().data, {1, H, si}, DType::kBF16, Device::kCpu});
    }
    gate_w = DeviceTensor::from_host(as_bf16(w.gate));
    if (w.has_bias()) gate_bias = DeviceTensor::from_host(to_f32(w.gate_bias));

    // Inputs and outputs.
    x = DeviceTensor(DType::kBF16, {T, H});
    ids = DeviceTensor(DType::kI32, {T, Kp});
    wts = DeviceTensor(DType::kF32, {T, Kp});
    ntok = DeviceTensor(DType::kI32, {1});
    ntok.fill_bytes(0);
    // Pinned staging for upload(): copies from pageable memory go through the driver's own
    // staging and may wait on other work of the device, which a spinning peer never finishes.
    staging_bytes = size_t(T) * size_t(H) * 2 + 2 * size_t(T) * size_t(Kp) * 4 + 64;
    EPMOE_CUDA_CHECK(cudaMallocHost(&staging, staging_bytes));
    y = DeviceTensor(DType::kF32, {T, H});
    dest_slot = DeviceTensor(DType::kI32, {T, R});
    dest_count = DeviceTensor(DType::kI32, {2 * R});  // [counts | pairs]
    // Uploaded per call: [dest_offset | src_count (host-API path) | src_base (host-API path)].
    host_meta = DeviceTensor(DType::kI32, {3 * R});
    EPMOE_CUDA_CHECK(cudaMallocHost(&pinned_i32, sizeof(int32_t) * 8 * size_t(R)));
    seq = DeviceTensor(DType::kI64, {1});
    seq.fill_bytes(0);
    err = DeviceTensor(DType::kI32, {int64_t(sizeof(DeviceWaitError) / 4 + 1)});
    err.fill_bytes(0);
    if (cfg.n_shared_experts > 0) {
      const int64_t si = cfg.fuse_shared ? I : int64_t(cfg.n_shared_experts) * I;
      shared_gu = DeviceTensor(DType::kBF16, {T, 2 * si});
      shared_act = DeviceTensor(DType::kBF16, {T, si});
      shared_tmp = DeviceTensor(DType::kF32, {T, H});
      if (cfg.fuse_shared) shared_out = DeviceTensor(DType::kF32, {T, cfg.n_shared_experts, H});
      seg1 = DeviceTensor(DType::kI32, {2});
    }
    cublas_check(cublasCreate(&cublas));
    cublas_check(cublasSetStream(cublas, stream));
    // A preallocated cuBLAS workspace: no allocation (a device-wide sync) inside the layer.
    cublas_ws = DeviceTensor(DType::kI32, {(32 << 20) / 4});
    cublas_check(cublasSetWorkspace(cublas, cublas_ws.view().data, cublas_ws.nbytes()));
    ep::prepare_kernels();
    logits = DeviceTensor(DType::kF32, {T, cfg.n_routed_experts});

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
      recv_x = DeviceTensor(DType::kBF16, {E_loc, m_max, H});
      recv_count = DeviceTensor(DType::kI32, {E_loc});
      recv_count.fill_bytes(0);
      recv_src = DeviceTensor(DType::kI32, {E_loc, m_max, 3});
      recv_record = DeviceTensor(DType::kI32, {E_loc, m_max});
      src_count = DeviceTensor(DType::kI32, {R});
      gu = DeviceTensor(DType::kBF16, {E_loc, m_max, 2 * I});
      act = DeviceTensor(DType::kBF16, {E_loc, m_max, I});
      out = DeviceTensor(DType::kBF16, {E_loc, m_max, H});
    }
    EPMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
    // Every rank is fully set up before any starts waiting on flags: setup allocates, and an
    // allocation may wait for the device while a peer's kernel spins.
    t.barrier();
  }

  ~Impl() {
    if (cublas) cublasDestroy(cublas);
    if (staging) cudaFreeHost(staging);
    if (pinned_i32) cudaFreeHost(pinned_i32);
  }
  static void cublas_check(cublasStatus_t s) { EPMOE_CUBLAS_CHECK(s); }

  GpuTransport& t;
  MoeConfig cfg;
  EpConfig ep;
  EpCudaOptions opt;
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  ep::EpDims d;
  ep::RecordLayout rec;
  ep::LowLatencyLayout ll;
  int64_t timeout_ns = 0;
  SymmetricBuffer window;  // low-latency by load/store
  DeviceTensor ll_local;   // low-latency over the host API: the window, local only
  void* win_local = nullptr;
  bool ll_host = false;
  bool serial_halves = env_int("SERIAL_HALVES", 0) != 0;
  DeviceTensor w13, w2, sw13, sw2, gate_w, gate_bias;
  DeviceTensor x, ids, wts, ntok, y, logits, cublas_ws;
  DeviceTensor dest_slot, dest_count, host_meta, seq, err;
  DeviceTensor shared_gu, shared_act, shared_tmp, shared_out, seg1;
  // low-latency
  DeviceTensor recv_x, recv_count, recv_src, recv_record, recv_seg, src_count, gu, act, out;
  DeviceTensor ret_out, ret_in;  // host-API path: return records
  // sizes learned on the host (normal mode; low-latency over the host API)
  std::vector<int32_t> send_counts, recv_counts, send_pairs, recv_pairs;
  int64_t n_recv = 0, n_send = 0;
  DeviceTensor send_buf, recv_buf, n_recv_x, n_recv_ids, n_recv_w, n_seg, n_s2d, n_sorted, n_gu,
      n_act, n_down, partial, back, workspace;
  char* staging = nullptr;  // pinned: [x | ids | weights | num_tokens]
  size_t staging_bytes = 0;
  int32_t* pinned_i32 = nullptr;  // [8R]: counts read back [2R], host_meta's upload [3R]
  EpCudaTraffic traffic;

  DeviceWaitError* err_ptr() const { return reinterpret_cast<DeviceWaitError*>(err.view().data); }
  int32_t* dest_offset_ptr() const { return host_meta.as<int32_t>(); }
  int32_t* src_count_host_path() const { return host_meta.as<int32_t>() + d.num_ranks; }
  int32_t* src_base_ptr() const { return host_meta.as<int32_t>() + 2 * d.num_ranks; }
  uint64_t* seq_ptr() const { return reinterpret_cast<uint64_t*>(seq.view().data); }
  const int32_t* ntok_ptr() const { return ntok.as<int32_t>(); }

  // Grow-only buffers of normal mode: the leading dimension (rows) varies per call; consumers get
  // the exact row counts separately, so a larger buffer serves a smaller call without cudaMalloc.
  void ensure(DeviceTensor& t_, DType dt, const Shape& s) {
    bool fits = t_.view().data && t_.dtype() == dt && t_.shape().rank == s.rank &&
                t_.shape()[0] >= s[0];
    for (int i = 1; fits && i < s.rank; ++i) fits = t_.shape()[i] == s[i];
    if (fits) return;
    Shape grown = s;
    grown.dims[0] = s[0] + s[0] / 4;
    t_ = DeviceTensor(dt, grown);
  }

  // One MLP (bank expert `e` of w13b/w2b) on the live rows of x, f32 out [T_max, H].
  void mlp_rows(DeviceTensor& out_f32, const DeviceTensor& w13b, const DeviceTensor& w2b, int e) {
    const int64_t T = d.t_max;
    grouped_gemm_contiguous(shared_gu.view(), x.view(), w13b.view(),
                            TensorView{seg1.view().data, {2}, DType::kI32, Device::kCuda}, e,
                            stream);
    silu_and_mul(shared_act.view(), shared_gu.view(), seg1.as<int32_t>() + 1, stream);
    grouped_gemm_contiguous(TensorView{out_f32.view().data, {T, d.hidden}, DType::kF32, Device::kCuda},
                            shared_act.view(), w2b.view(),
                            TensorView{seg1.view().data, {2}, DType::kI32, Device::kCuda}, e,
                            stream);
  }

  void shared_experts() {
    if (cfg.n_shared_experts == 0) return;
    ep::make_single_segment(seg1.as<int32_t>(), ntok_ptr(), stream);
    if (cfg.fuse_shared) {
      for (int j = 0; j < cfg.n_shared_experts; ++j) {
        mlp_rows(shared_tmp, sw13, sw2, j);
        ep::scatter_shared(shared_out.as<float>(), shared_tmp.as<float>(), j,
                           cfg.n_shared_experts, ntok_ptr(), d.t_max, d.hidden, stream);
      }
    } else {
      mlp_rows(shared_tmp, sw13, sw2, 0);
    }
  }

  const float* fused_shared_ptr() const {
    return cfg.fuse_shared ? shared_out.as<float>() : nullptr;
  }

  void finish_output() {
    const bool unfused = cfg.n_shared_experts > 0 && !cfg.fuse_shared;
    const float scale = cfg.fuse_shared && cfg.scale_on_output ? cfg.routed_scaling_factor : 1.f;
    if (unfused || scale != 1.f)
      ep::add_rows(y.as<float>(), unfused ? shared_tmp.as<float>() : nullptr, scale, ntok_ptr(),
                   d.t_max, d.hidden, stream);
  }

  // ---- low latency ----
  void ll_dispatch_send() {
    EPMOE_CHECK(ep.mode == EpMode::kLowLatency, kInvalidArgument,
                "rank {}: low-latency call on a normal-mode rank", d.rank);
    if (ll_host) return ll_host_dispatch_send();
    ep::route_layout(dest_slot.as<int32_t>(), dest_count.as<int32_t>(), nullptr,
                     ids.as<int32_t>(), ntok_ptr(), d, stream);
    ep::ll_dispatch_send(window.peers, ll, rec, x.view().data, ids.as<int32_t>(),
                         wts.as<float>(), ntok_ptr(), dest_slot.as<int32_t>(),
                         dest_count.as<int32_t>(), seq_ptr(), d, stream);
    serial_point("dispatch send half");
  }
  void ll_dispatch_recv() {
    EPMOE_CHECK(ep.mode == EpMode::kLowLatency, kInvalidArgument,
                "rank {}: low-latency call on a normal-mode rank", d.rank);
    const int32_t* counts = src_count.as<int32_t>();
    if (ll_host) {
      refuse_capture("low-latency dispatch (receive half)");
      counts = src_count_host_path();
    } else {
      ep::ll_wait_dispatch(src_count.as<int32_t>(), win_local, ll, seq_ptr(), err_ptr(),
                           timeout_ns, d, stream);
    }
    ep::ll_expand_received(recv_x.view().data, recv_count.as<int32_t>(), recv_src.as<int32_t>(),
                           recv_record.as<int32_t>(), recv_seg.as<int32_t>(), counts, win_local,
                           ll, rec, err_ptr(), d, stream);
  }
  void ll_experts() {
    grouped_gemm_masked(gu.view(), recv_x.view(), w13.view(), recv_count.view(), 0, stream);
    silu_and_mul_masked(act.view(), gu.view(), recv_count.view(), stream);
    grouped_gemm_masked(out.view(), act.view(), w2.view(), recv_count.view(), 0, stream);
  }
  void ll_combine_send() {
    if (ll_host) return ll_host_combine_send();
    ep::ll_combine_send(window.peers, ll, out.view().data, recv_count.as<int32_t>(),
                        recv_src.as<int32_t>(), seq_ptr(), d, stream);
    serial_point("combine send half");
  }

  // EPMOE_SERIAL_HALVES=1 (checking tools only): after a send half, wait for it and for every
  // rank's, so no receive kernel is enqueued before all sends finished. compute-sanitizer runs
  // kernels one at a time, and a waiting kernel would otherwise hold the device while the peer
  // it waits for is queued behind it. Skipped while a CUDA graph is being captured.
  void serial_point(const char* what) {
    if (!serial_halves) return;
    cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
    EPMOE_CUDA_CHECK(cudaStreamIsCapturing(stream, &st));
    if (st != cudaStreamCaptureStatusNone) return;
    t.synchronize(what);
    t.barrier();
  }
  void ll_combine_recv() {
    if (ll_host) {
      refuse_capture("low-latency combine (receive half)");
      require_dispatched("combine (receive half)");
      int64_t n = 0;
      for (int p = 0; p < d.num_ranks; ++p) n += send_pairs[size_t(p)];
      ep::ll_return_unpack(win_local, ll, ret_in.view().data, n, d, stream);
    } else {
      ep::ll_wait_combine(win_local, ll, seq_ptr(), err_ptr(), timeout_ns, d, stream);
    }
    ep::ll_combine_reduce(y.as<float>(), win_local, ll, ids.as<int32_t>(), wts.as<float>(),
                          fused_shared_ptr(), ntok_ptr(), err_ptr(), d, stream);
  }

  // ---- low latency over the host API ----
  void refuse_capture(const char* what) const {
    cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
    EPMOE_CUDA_CHECK(cudaStreamIsCapturing(stream, &st));
    EPMOE_CHECK(st == cudaStreamCaptureStatusNone, kUnsupported,
                "rank {}: {} runs over the host API here (peers not load/store reachable, or "
                "--ll-transfer host): it learns transfer sizes on the host and cannot be "
                "captured in a CUDA graph",
                d.rank, what);
  }

  void require_dispatched(const char* what) const {
    EPMOE_CHECK(send_pairs.size() == size_t(d.num_ranks), kInvalidArgument,
                "rank {}: low-latency {} before any dispatch", d.rank, what);
  }

  void ll_host_dispatch_send() {
    refuse_capture("low-latency dispatch (send half)");
    const int R = d.num_ranks;
    ep::route_layout(dest_slot.as<int32_t>(), dest_count.as<int32_t>(),
                     dest_count.as<int32_t>() + R, ids.as<int32_t>(), ntok_ptr(), d, stream);
    exchange_counts();
    ensure(send_buf, DType::kI32, {std::max<int64_t>(1, n_send * int64_t(rec.bytes) / 4)});
    ep::normal_pack(send_buf.view().data, rec, x.view().data, ids.as<int32_t>(), wts.as<float>(),
                    ntok_ptr(), dest_slot.as<int32_t>(), dest_offset_ptr(), d, stream);
    // Into the window's staging area, source s at record s * T_max: where the load/store path
    // puts it, so the receive half is the same kernels.
    Sizes sz = sizes(send_counts, recv_counts, rec.bytes);
    for (int s = 0; s < R; ++s) sz.ro[size_t(s)] = size_t(s) * size_t(d.t_max) * rec.bytes;
    t.all_to_all_v(send_buf.view().data, sz.sb.data(), sz.so.data(),
                   static_cast<char*>(win_local) + ll.staging, sz.rb.data(), sz.ro.data());
    count_dispatch(sz);
  }

  void ll_host_combine_send() {
    refuse_capture("low-latency combine (send half)");
    require_dispatched("combine (send half)");
    const size_t rb = ep::return_record_bytes(d.hidden);
    Sizes sz = sizes(recv_pairs, send_pairs, rb);
    const int64_t n_out = int64_t(sz.total_send / rb), n_in = int64_t(sz.total_recv / rb);
    ensure(ret_out, DType::kI32, {std::max<int64_t>(1, n_out * int64_t(rb) / 4)});
    ensure(ret_in, DType::kI32, {std::max<int64_t>(1, n_in * int64_t(rb) / 4)});
    ep::ll_return_pack(ret_out.view().data, src_base_ptr(), out.view().data,
                       recv_count.as<int32_t>(), recv_src.as<int32_t>(), recv_seg.as<int32_t>(),
                       d, stream);
    t.all_to_all_v(ret_out.view().data, sz.sb.data(), sz.so.data(), ret_in.view().data,
                   sz.rb.data(), sz.ro.data());
    traffic.combine_bytes = 0;
    for (int p = 0; p < d.num_ranks; ++p)
      if (p != d.rank) traffic.combine_bytes += int64_t(sz.sb[size_t(p)]);
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

  // After route_layout: reads this rank's per-destination token (and pair) counts, gathers
  // everyone's, and uploads host_meta: dest_offset (packed send order), src_count (tokens from
  // each source) and src_base (first return row of each source). One host synchronisation.
  void exchange_counts() {
    const int R = d.num_ranks;
    int32_t* mine = pinned_i32;  // [2R]
    EPMOE_CUDA_CHECK(cudaMemcpyAsync(mine, dest_count.view().data, 8 * size_t(R),
                                     cudaMemcpyDeviceToHost, stream));
    // Bounded: the stream may still hold the previous call's transfers.
    t.synchronize("reading this rank's dispatch counts");
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
    int32_t* meta = pinned_i32 + 2 * R;  // [3R]
    n_send = n_recv = 0;
    int64_t ret = 0;
    for (int p = 0; p < R; ++p) {
      meta[p] = int32_t(n_send);
      n_send += send_counts[size_t(p)];
      n_recv += recv_counts[size_t(p)];
      meta[R + p] = recv_counts[size_t(p)];
      meta[2 * R + p] = int32_t(ret);
      ret += recv_pairs[size_t(p)];
    }
    EPMOE_CUDA_CHECK(cudaMemcpyAsync(host_meta.view().data, meta, 12 * size_t(R),
                                     cudaMemcpyHostToDevice, stream));
  }

  // ---- normal ----
  void normal_dispatch() {
    EPMOE_CHECK(ep.mode == EpMode::kNormal, kInvalidArgument,
                "rank {}: normal-mode call on a low-latency rank", d.rank);
    ep::route_layout(dest_slot.as<int32_t>(), dest_count.as<int32_t>(),
                     dest_count.as<int32_t>() + d.num_ranks, ids.as<int32_t>(), ntok_ptr(), d,
                     stream);
    exchange_counts();
    const int64_t Kp = d.num_slots, H = d.hidden;
    ensure(send_buf, DType::kI32, {std::max<int64_t>(1, n_send * int64_t(rec.bytes) / 4)});
    ensure(recv_buf, DType::kI32, {std::max<int64_t>(1, n_recv * int64_t(rec.bytes) / 4)});
    ep::normal_pack(send_buf.view().data, rec, x.view().data, ids.as<int32_t>(), wts.as<float>(),
                    ntok_ptr(), dest_slot.as<int32_t>(), dest_offset_ptr(), d, stream);
    const Sizes sz = sizes(send_counts, recv_counts, rec.bytes);
    t.all_to_all_v(send_buf.view().data, sz.sb.data(), sz.so.data(), recv_buf.view().data,
                   sz.rb.data(), sz.ro.data());
    count_dispatch(sz);
    ensure(n_recv_x, DType::kBF16, {std::max<int64_t>(1, n_recv), H});
    ensure(n_recv_ids, DType::kI32, {std::max<int64_t>(1, n_recv), Kp});
    ensure(n_recv_w, DType::kF32, {std::max<int64_t>(1, n_recv), Kp});
    ep::normal_unpack(n_recv_x.view().data, n_recv_ids.as<int32_t>(), n_recv_w.as<float>(),
                      recv_buf.view().data, rec, n_recv, stream);
  }

  void normal_experts() {
    const int64_t H = d.hidden, I = cfg.moe_intermediate, Kp = d.num_slots;
    const int64_t n = n_recv, rows = std::max<int64_t>(1, n * Kp);
    const int E_loc = d.local_experts;
    if (!n_seg.view().data) n_seg = DeviceTensor(DType::kI32, {E_loc + 1});
    ensure(n_s2d, DType::kI32, {std::max<int64_t>(1, n), Kp});
    ensure(n_sorted, DType::kBF16, {rows, H});
    ensure(n_gu, DType::kBF16, {rows, 2 * I});
    ensure(n_act, DType::kBF16, {rows, I});
    ensure(n_down, DType::kBF16, {rows, H});
    ensure(partial, DType::kF32, {std::max<int64_t>(1, n), H});
    const size_t ws = preprocess_workspace_bytes(n * Kp, E_loc);
    ensure(workspace, DType::kI32, {int64_t(ws / 4 + 1)});
    TensorView ids_v{n_recv_ids.view().data, {n, Kp}, DType::kI32, Device::kCuda};
    TensorView w_v{n_recv_w.view().data, {n, Kp}, DType::kF32, Device::kCuda};
    TensorView s2d_v{n_s2d.view().data, {n, Kp}, DType::kI32, Device::kCuda};
    TensorView x_v{n_recv_x.view().data, {n, H}, DType::kBF16, Device::kCuda};
    preprocess(n_seg.view(), s2d_v, ids_v, 0, E_loc, workspace.view().data, stream);
    if (n > 0) pre_reorder(n_sorted.view(), x_v, s2d_v, stream);
    grouped_gemm_contiguous(n_gu.view(), n_sorted.view(), w13.view(), n_seg.view(), 0, stream);
    silu_and_mul(n_act.view(), n_gu.view(), n_seg.as<int32_t>() + E_loc, stream);
    grouped_gemm_contiguous(n_down.view(), n_act.view(), w2.view(), n_seg.view(), 0, stream);
    if (n > 0)
      post_reorder(TensorView{partial.view().data, {n, H}, DType::kF32, Device::kCuda},
                   n_down.view(), s2d_v, ids_v, w_v, d.num_routed, d.rank * E_loc, stream);
  }

  void normal_combine() {
    const int64_t H = d.hidden;
    ensure(back, DType::kF32, {std::max<int64_t>(1, n_send), H});
    // Partial sums go back the way the tokens came: recv_counts[p] rows to p.
    const Sizes sz = sizes(recv_counts, send_counts, size_t(H) * 4);
    t.all_to_all_v(partial.view().data, sz.sb.data(), sz.so.data(), back.view().data,
                   sz.rb.data(), sz.ro.data());
    traffic.combine_bytes = 0;
    for (int p = 0; p < d.num_ranks; ++p)
      if (p != d.rank) traffic.combine_bytes += int64_t(sz.sb[size_t(p)]);
    ep::normal_combine(y.as<float>(), back.as<float>(), dest_slot.as<int32_t>(),
                       dest_offset_ptr(), ids.as<int32_t>(), wts.as<float>(),
                       fused_shared_ptr(), ntok_ptr(), d, stream);
  }

  void check() {
    t.synchronize("the expert-parallel layer's stream");
    DeviceWaitError e{};
    EPMOE_CUDA_CHECK(cudaMemcpy(&e, err.view().data, sizeof(e), cudaMemcpyDeviceToHost));
    if (e.failed == ep::kOverflowedExpert) {
      err.fill_bytes(0);
      EPMOE_FAIL(kInvalidArgument,
                 "rank {}: local expert {} received {} rows, more than the {} (R x T_max) the "
                 "low-latency receive buffer holds: some token names that expert twice",
                 e.rank, e.peer, e.observed, e.expected);
    }
    if (e.failed) {
      err.fill_bytes(0);
      EPMOE_FAIL(kTimeout,
                 "rank {} ({} transport) timed out on the device waiting for the {} of peer {}: "
                 "expected {:#x}, observed {:#x}",
                 e.rank, t.name(), e.what, e.peer, e.expected, e.observed);
    }
  }
};

EpRankCuda::EpRankCuda(GpuTransport& transport, const MoeWeights& weights, const EpConfig& ep,
                       const EpCudaOptions& options)
    : t_(transport), impl_(std::make_unique<Impl>(transport, weights, ep, options)) {}
EpRankCuda::~EpRankCuda() = default;

TensorView EpRankCuda::x() const { return impl_->x.view(); }
TensorView EpRankCuda::topk_ids() const { return impl_->ids.view(); }
TensorView EpRankCuda::topk_weights() const { return impl_->wts.view(); }
int32_t* EpRankCuda::num_tokens() const { return impl_->ntok.as<int32_t>(); }
TensorView EpRankCuda::y() const { return impl_->y.view(); }
const EpConfig& EpRankCuda::ep() const { return impl_->ep; }

TensorView EpRankCuda::recv_x() const {
  if (impl_->ep.mode == EpMode::kLowLatency) return impl_->recv_x.view();
  return TensorView{impl_->n_recv_x.view().data, {impl_->n_recv, impl_->d.hidden}, DType::kBF16,
                    Device::kCuda};
}
TensorView EpRankCuda::recv_count() const { return impl_->recv_count.view(); }
TensorView EpRankCuda::recv_src() const { return impl_->recv_src.view(); }

void EpRankCuda::upload(const TensorView& xh, const TensorView& idh, const TensorView& wh) {
  Impl& m = *impl_;
  EPMOE_CHECK(xh.shape.rank == 2 && xh.shape[1] == m.d.hidden && xh.dtype == DType::kBF16,
              kInvalidArgument, "rank {}: tokens must be [T, {}] bf16, got {} {}", m.d.rank,
              m.d.hidden, xh.shape.str(), dtype_name(xh.dtype));
  const int64_t T = xh.shape[0];
  EPMOE_CHECK(T <= m.d.t_max, kInvalidArgument,
              "rank {} brings {} tokens, more than max_tokens_per_rank = {}", m.d.rank, T,
              m.d.t_max);
  char* st = m.staging;
  const size_t xb = xh.nbytes(), ib = size_t(T) * size_t(m.d.num_slots) * 4;
  if (T) {
    std::memcpy(st, xh.data, xb);
    EPMOE_CUDA_CHECK(cudaMemcpyAsync(m.x.view().data, st, xb, cudaMemcpyHostToDevice, m.stream));
  }
  if (idh.data) {
    idh.expect("topk_ids", DType::kI32, {T, m.d.num_slots});
    wh.expect("topk_weights", DType::kF32, {T, m.d.num_slots});
    const int32_t* id = idh.as<int32_t>();
    const int max_id = m.cfg.num_expert_ids(), Kp = m.d.num_slots;
    for (int64_t i = 0; i < T * Kp; ++i) {
      EPMOE_CHECK(id[i] >= -1 && id[i] < max_id, kInvalidArgument,
                  "rank {}: topk_ids[{}, {}] = {} is outside [-1, {})", m.d.rank, i / Kp, i % Kp,
                  id[i], max_id);
      // Low-latency receive buffers hold each token at most once per expert.
      for (int64_t j = i - i % Kp; m.ep.mode == EpMode::kLowLatency && id[i] >= 0 && j < i; ++j)
        EPMOE_CHECK(id[j] != id[i], kInvalidArgument,
                    "rank {}: token {} names expert {} twice (slots {} and {})", m.d.rank, i / Kp,
                    id[i], j % Kp, i % Kp);
    }
    if (T) {
      std::memcpy(st + xb, idh.data, ib);
      std::memcpy(st + xb + ib, wh.data, ib);
      EPMOE_CUDA_CHECK(cudaMemcpyAsync(m.ids.view().data, st + xb, ib, cudaMemcpyHostToDevice, m.stream));
      EPMOE_CUDA_CHECK(cudaMemcpyAsync(m.wts.view().data, st + xb + ib, ib, cudaMemcpyHostToDevice, m.stream));
    }
  }
  int32_t* tn = reinterpret_cast<int32_t*>(st + m.staging_bytes - 16);
  *tn = int32_t(T);
  EPMOE_CUDA_CHECK(cudaMemcpyAsync(m.ntok.view().data, tn, 4, cudaMemcpyHostToDevice, m.stream));
  m.t.synchronize("upload of the tokens");
}

void EpRankCuda::route() {
  Impl& m = *impl_;
  // The gate runs on all T_max rows (fixed shape); rows >= num_tokens are never dispatched.
  gate_gemm(m.logits.view(), m.x.view(), m.gate_w.view(), m.cublas, m.stream);
  select_experts(m.ids.view(), m.wts.view(), m.logits.view(),
                 m.gate_bias.view().data ? m.gate_bias.view() : TensorView{}, m.cfg, m.stream);
}

void EpRankCuda::ll_dispatch_send() { impl_->ll_dispatch_send(); }
void EpRankCuda::ll_dispatch_recv() { impl_->ll_dispatch_recv(); }
void EpRankCuda::ll_experts() { impl_->ll_experts(); }
void EpRankCuda::ll_combine_send() { impl_->ll_combine_send(); }
void EpRankCuda::ll_combine_recv() { impl_->ll_combine_recv(); }
void EpRankCuda::normal_dispatch() { impl_->normal_dispatch(); }
void EpRankCuda::normal_experts() { impl_->normal_experts(); }
void EpRankCuda::normal_combine() { impl_->normal_combine(); }
void EpRankCuda::shared_experts() { impl_->shared_experts(); }

void EpRankCuda::forward_routed() {
  Impl& m = *impl_;
  if (m.ep.mode == EpMode::kLowLatency) {
    m.ll_dispatch_send();
    m.shared_experts();
    m.ll_dispatch_recv();
    m.ll_experts();
    m.ll_combine_send();
    m.ll_combine_recv();
  } else {
    m.normal_dispatch();
    m.shared_experts();
    m.normal_experts();
    m.normal_combine();
  }
  m.finish_output();
}

void EpRankCuda::finish_layer() { impl_->finish_output(); }
bool EpRankCuda::ll_over_host_api() const { return impl_->ll_host; }

const char* ll_transfer_name(LlTransfer t) {
  switch (t) {
    case LlTransfer::kAuto: return "auto";
    case LlTransfer::kDevice: return "device";
    case LlTransfer::kHostApi: return "host";
  }
  return "?";
}

LlTransfer parse_ll_transfer(const std::string& s) {
  for (LlTransfer t : {LlTransfer::kAuto, LlTransfer::kDevice, LlTransfer::kHostApi})
    if (s == ll_transfer_name(t)) return t;
  EPMOE_FAIL(kInvalidArgument, "unknown low-latency transfer '{}' (expected auto, device or host)",
             s);
}
void EpRankCuda::check() { impl_->check(); }

EpCudaTraffic EpRankCuda::last_traffic() {
  Impl& m = *impl_;
  m.check();
  if (m.ep.mode == EpMode::kNormal || m.ll_host) return m.traffic;
  EpCudaTraffic tr;
  const int R = m.d.num_ranks;
  // Load/store path: the kernels' counts say what they stored into other ranks' windows.
  std::vector<int32_t> counts(static_cast<size_t>(R));
  EPMOE_CUDA_CHECK(cudaMemcpy(counts.data(), m.dest_count.view().data, 4 * size_t(R), cudaMemcpyDeviceToHost));
  for (int p = 0; p < R; ++p)
    if (p != m.d.rank) {
      tr.dispatch_tokens += counts[size_t(p)];
      tr.dispatch_bytes += int64_t(counts[size_t(p)]) * int64_t(m.rec.bytes);
    }
  const int64_t E_loc = m.d.local_experts, m_max = int64_t(R) * m.d.t_max;
  std::vector<int32_t> cnt(static_cast<size_t>(E_loc));
  EPMOE_CUDA_CHECK(cudaMemcpy(cnt.data(), m.recv_count.view().data, 4 * size_t(E_loc), cudaMemcpyDeviceToHost));
  Tensor src = m.recv_src.to_host();
  for (int64_t e = 0; e < E_loc; ++e)
    for (int64_t r = 0; r < cnt[size_t(e)]; ++r)
      if (src.as<int32_t>()[(e * m_max + r) * 3] != m.d.rank) tr.combine_bytes += m.d.hidden * 2;
  return tr;
}

}  // namespace epmoe::cuda
