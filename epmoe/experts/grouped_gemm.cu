// Deterministic grouped GEMM with device-side counts (grouped_gemm.cuh).
//
// One kernel for both layouts: bf16 tensor cores through mma.sync.m16n8k16 (f32 accumulate),
// a 128 x 128 x 64 block tile, a 3-stage cp.async pipeline (16-byte copies that bypass L1),
// XOR-swizzled shared memory read by ldmatrix, and the accumulators stored straight from
// registers. Grid: x = n-tile (fastest, so the blocks of one m-tile run together and share its
// rows in L2), y = m-tile, z = expert (masked only). The counts live on the device, so the grid
// covers the worst case and a block whose tile holds no row returns at once.
#include <cuda_bf16.h>

#include <atomic>
#include <cstdint>

#include "epmoe/cuda/cuda_check.h"
#include "epmoe/cuda/nvtx.h"
#include "epmoe/experts/grouped_gemm.cuh"
#include "epmoe/experts/grouped_gemm_checks.h"

namespace epmoe::cuda {

namespace {

// Block tile kBlockM x kBlockN, kBlockK deep per stage; 8 warps as 2 (M) x 4 (N), each warp
// owning a 64 x 32 sub-tile = kFragsM x kFragsN m16n8 accumulators.
constexpr int kBlockM = 128, kBlockN = 128, kBlockK = 64, kStages = 3;
constexpr int kWarpsM = 2, kWarpsN = 4, kThreads = kWarpsM * kWarpsN * 32;
constexpr int kWarpM = kBlockM / kWarpsM, kWarpN = kBlockN / kWarpsN;  // 64, 32
constexpr int kFragsM = kWarpM / 16, kFragsN = kWarpN / 8;             // 4, 4
constexpr int kChunks = kBlockK / 8;          // 16-byte chunks per tile row (8)
constexpr int kRowStep = kThreads / kChunks;  // tile rows one loader pass covers (32)
constexpr int kLoads = kBlockM / kRowStep;    // loader passes per tile (4)
constexpr int kTileBytesA = kBlockM * kBlockK * 2, kTileBytesB = kBlockN * kBlockK * 2;
constexpr int kStageBytes = kTileBytesA + kTileBytesB;  // 32 KB
constexpr int kSmemBytes = kStages * kStageBytes;       // 96 KB: two blocks per SM
static_assert(kChunks == 8, "swz() assumes 128-byte tile rows");
static_assert(kBlockM == kBlockN, "A and B tiles share the loader's row mapping");
static_assert(kFragsN % 2 == 0, "B fragments are loaded in pairs");

// Everything the kernel reads; one struct for both layouts.
struct Params {
  void* out;                // contiguous [N, Nout]; masked [E_loc, M_max, Nout]
  const __nv_bfloat16* in;  // contiguous [N, K];    masked [E_loc, M_max, K]
  const __nv_bfloat16* w;   // [E_bank, Nout, K]
  const int32_t* counts;    // contiguous: seg_indptr [E_loc+1]; masked: count [E_loc]
  int64_t rows;             // contiguous: N; masked: M_max
  int n_out, k, e_loc, bank_offset;
};

// A block's rows: [row0, row0 + rows) of the flattened in/out rows, all of bank expert
// bank_offset + expert; rows == 0 means the block has nothing to do.
struct Tile {
  int expert;
  int64_t row0;
  int rows;
};

// NOTES: expert e's m-tiles are numbered from base(e) = seg[e] / kBlockM + e. base grows by at
// least 1 per expert and base(e) + ceil(rows_e / kBlockM) <= base(e+1), so N / kBlockM + E_loc
// tiles cover any split of N rows, and a tile finds its expert by binary search over seg.
// Values are clamped to [0, N]: a corrupt seg_indptr can give wrong rows but never an
// out-of-bounds access.
__device__ __forceinline__ Tile contiguous_tile(const Params& p, int t) {
  const int32_t* seg = p.counts;
  auto base = [&](int e) { return int64_t(max(seg[e], 0)) / kBlockM + e; };
  int lo = 0, hi = p.e_loc - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (base(mid) <= t)
      lo = mid;
    else
      hi = mid - 1;
  }
  const int64_t local = t - base(lo);
  const int64_t begin = min(int64_t(max(seg[lo], 0)), p.rows);
  const int64_t end = min(int64_t(max(seg[lo + 1], 0)), p.rows);
  Tile tile{lo, begin + local * kBlockM, 0};
  if (local >= 0 && tile.row0 < end) tile.rows = int(min(int64_t(kBlockM), end - tile.row0));
  return tile;
}

__device__ __forceinline__ Tile masked_tile(const Params& p, int e, int m_tile) {
  const int64_t count = min(int64_t(max(p.counts[e], 0)), p.rows);
  const int64_t left = count - int64_t(m_tile) * kBlockM;
  Tile tile{e, int64_t(e) * p.rows + int64_t(m_tile) * kBlockM, 0};
  if (left > 0) tile.rows = int(min(int64_t(kBlockM), left));
  return tile;
}

// Byte offset of 16-byte chunk `chunk` of tile row `row` (rows of 128 bytes). XOR-ing the chunk
// with row % 8 puts the 8 rows one ldmatrix phase reads in 8 distinct bank groups.
__device__ __forceinline__ uint32_t swz(int row, int chunk) {
  return uint32_t(row * (kChunks * 16) + ((chunk ^ (row & 7)) << 4));
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; src_bytes = 0 reads nothing and writes 16 zero bytes.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                            uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

// d[16x8] += a[16x16] · b[16x8], bf16 inputs, f32 accumulators (in place).
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void store2(float* p, float a, float b) {
  *reinterpret_cast<float2*>(p) = make_float2(a, b);
}
__device__ __forceinline__ void store2(__nv_bfloat16* p, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}

// grid: (ceil(Nout / kBlockN), m-tiles, kMasked ? E_loc : 1); block: kThreads; smem: kSmemBytes.
template <bool kMasked, typename Out>
__global__ void __launch_bounds__(kThreads, 2) grouped_gemm_kernel(const Params p) {
  const Tile tile = kMasked ? masked_tile(p, int(blockIdx.z), int(blockIdx.y))
                            : contiguous_tile(p, int(blockIdx.y));
  if (tile.rows == 0) return;  // block-uniform

  extern __shared__ __align__(128) uint8_t smem[];
  const uint32_t smem0 = smem_addr(smem);
  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  const int n0 = int(blockIdx.x) * kBlockN;
  const int64_t K = p.k;

  // --- loader: this thread copies chunk ld_chunk of tile rows ld_row + i * kRowStep ----------
  // A rows past tile.rows are zero-filled (never read from global: masked rows stay unread);
  // rows past the last 16-row fragment holding a valid row are not even written (no MMA reads
  // them). B rows past Nout and chunks past K are zero-filled, so tails add exact zeros.
  const int ld_row = tid / kChunks, ld_chunk = tid % kChunks;
  const int rows16 = (tile.rows + 15) & ~15;
  const __nv_bfloat16* a_src = p.in + (tile.row0 + ld_row) * K + ld_chunk * 8;
  const __nv_bfloat16* b_src =
      p.w + (int64_t(p.bank_offset + tile.expert) * p.n_out + n0 + ld_row) * K + ld_chunk * 8;
  auto load_stage = [&](int stage, int kt) {
    const uint32_t sa = smem0 + uint32_t(stage * kStageBytes), sb = sa + kTileBytesA;
    const int64_t k = int64_t(kt) * kBlockK;
    const bool k_ok = k + ld_chunk * 8 < K;
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int r = ld_row + i * kRowStep;
      const bool a_ok = k_ok && r < tile.rows;
      const bool b_ok = k_ok && n0 + r < p.n_out;
      if (r < rows16)
        cp_async16(sa + swz(r, ld_chunk), a_ok ? a_src + i * kRowStep * K + k : p.in,
                   a_ok ? 16 : 0);
      cp_async16(sb + swz(r, ld_chunk), b_ok ? b_src + i * kRowStep * K + k : p.w, b_ok ? 16 : 0);
    }
  };

  // --- main loop: fixed K order 0, 64, 128, ... for every row, whatever the count ----------------
  float acc[kFragsM][kFragsN][4] = {};
  const int k_tiles = int((K + kBlockK - 1) / kBlockK);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();  // always commit, so group counting stays uniform
  }
  // Valid rows of this warp's 64-row slice. NOTES: 16-row fragments without a valid row skip
  // their ldmatrix and MMAs (warp-uniform), so a decode tile with a few rows costs weight
  // bandwidth, not tensor-core time. A valid row always gets the full MMA sequence.
  const int warp_rows = tile.rows - wm * kWarpM;
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();  // tile kt has landed (this thread's copies)
    __syncthreads();               // ... everyone's, and stage (kt - 1) % kStages is free
    const int next = kt + kStages - 1;
    if (next < k_tiles) load_stage(next % kStages, next);
    cp_async_commit();

    if (warp_rows <= 0) continue;
    const uint32_t sa = smem0 + uint32_t((kt % kStages) * kStageBytes), sb = sa + kTileBytesA;
#pragma unroll
    for (int kk = 0; kk < kBlockK / 16; ++kk) {
      // B: one ldmatrix.x4 = two n8 fragments x k16 (matrices: n0-7/k0-7, n0-7/k8-15,
      // n8-15/k0-7, n8-15/k8-15); the tile is stored [n][k], i.e. the "col" operand.
      uint32_t b[kFragsN][2];
#pragma unroll
      for (int np = 0; np < kFragsN / 2; ++np) {
        const int row = wn * kWarpN + np * 16 + (lane & 7) + ((lane >> 4) << 3);
        const int chunk = kk * 2 + ((lane >> 3) & 1);
        ldmatrix_x4(sb + swz(row, chunk), b[2 * np][0], b[2 * np][1], b[2 * np + 1][0],
                    b[2 * np + 1][1]);
      }
#pragma unroll
      for (int mi = 0; mi < kFragsM; ++mi) {
        if (mi * 16 >= warp_rows) continue;  // warp-uniform
        // A: matrices rows0-7/k0-7, rows8-15/k0-7, rows0-7/k8-15, rows8-15/k8-15 = a0..a3.
        uint32_t a[4];
        const int row = wm * kWarpM + mi * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
        const int chunk = kk * 2 + (lane >> 4);
        ldmatrix_x4(sa + swz(row, chunk), a[0], a[1], a[2], a[3]);
#pragma unroll
        for (int ni = 0; ni < kFragsN; ++ni) mma_bf16(acc[mi][ni], a, b[ni]);
      }
    }
  }
  cp_async_wait<0>();  // only empty groups remain; leave nothing in flight

  // --- epilogue: accumulator (mi, ni) holds rows g, g + 8 and columns c, c + 1 of its 16 x 8 -----
  Out* out = static_cast<Out*>(p.out);
  const int g = lane >> 2, c = (lane & 3) * 2;
#pragma unroll
  for (int mi = 0; mi < kFragsM; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = wm * kWarpM + mi * 16 + half * 8 + g;
      if (r >= tile.rows) continue;
      Out* row = out + (tile.row0 + r) * int64_t(p.n_out);
#pragma unroll
      for (int ni = 0; ni < kFragsN; ++ni) {
        const int col = n0 + wn * kWarpN + ni * 8 + c;
        if (col < p.n_out)  // Nout % 8 == 0: a fragment is all in or all out
          store2(row + col, acc[mi][ni][2 * half], acc[mi][ni][2 * half + 1]);
      }
    }
  }
}

template <bool kMasked, typename Out>
void launch_typed(const Params& p, dim3 grid, cudaStream_t stream) {
  const NvtxRange nvtx("gemm.launch_typed");
  auto* kernel = grouped_gemm_kernel<kMasked, Out>;
  // NOTES: the 96 KB opt-in is per device; set once per device (a plain host call, legal while
  // a stream is being captured).
  static std::atomic<uint64_t> configured{0};
  int dev = 0;
  EPMOE_CUDA_CHECK(cudaGetDevice(&dev));
  const uint64_t bit = dev < 64 ? uint64_t(1) << dev : 0;
  if (bit == 0 || (configured.load() & bit) == 0) {
    EPMOE_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
    configured.fetch_or(bit);
  }
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(p);
  EPMOE_CUDA_CHECK_LAUNCH("grouped_gemm_kernel");
}

// The one runtime -> template switch: layout x output dtype.
void launch(bool masked, DType out_dtype, const Params& p, dim3 grid, cudaStream_t stream) {
  const NvtxRange nvtx("gemm.launch");
  if (masked) {
    if (out_dtype == DType::kBF16)
      launch_typed<true, __nv_bfloat16>(p, grid, stream);
    else
      launch_typed<true, float>(p, grid, stream);
  } else {
    if (out_dtype == DType::kBF16)
      launch_typed<false, __nv_bfloat16>(p, grid, stream);
    else
      launch_typed<false, float>(p, grid, stream);
  }
}

// Checks shared by both layouts (in's rank is checked by the caller); fills p.n_out and p.k.
void check_operands(const char* fn, const TensorView& out, const TensorView& in,
                    const TensorView& w, const TensorView& counts, const char* counts_name,
                    int64_t e_loc, int bank_offset, Params* p) {
  const NvtxRange nvtx("gemm.check_operands");
  const GemmOperandDims dims = check_grouped_gemm_operands(fn, DType::kBF16, 8, out, in, w, counts,
                                                           counts_name, e_loc, bank_offset);
  const int64_t K = dims.k, n_out = dims.n_out;
  p->out = out.data;
  p->in = static_cast<const __nv_bfloat16*>(in.data);
  p->w = static_cast<const __nv_bfloat16*>(w.data);
  p->counts = static_cast<const int32_t*>(counts.data);
  p->n_out = int(n_out);
  p->k = int(K);
  p->e_loc = int(e_loc);
  p->bank_offset = bank_offset;
}

unsigned n_tiles(int n_out) { return unsigned((n_out + kBlockN - 1) / kBlockN); }

}  // namespace

void grouped_gemm_contiguous(const TensorView& out, const TensorView& in, const TensorView& w,
                             const TensorView& seg_indptr, int bank_offset, cudaStream_t stream) {
  const NvtxRange nvtx("gemm.grouped_gemm_contiguous");
  const char* fn = "grouped_gemm_contiguous";
  EPMOE_CHECK(in.shape.rank == 2, kInvalidArgument, "{}: in must be [N, K], got {}", fn,
              in.shape.str());
  EPMOE_CHECK(
      seg_indptr.shape.rank == 1 && seg_indptr.shape[0] >= 1 && seg_indptr.dtype == DType::kI32,
      kInvalidArgument, "{}: seg_indptr must be [E_loc+1] i32, got {} {}", fn,
      seg_indptr.shape.str(), dtype_name(seg_indptr.dtype));
  const int64_t N = in.shape[0], e_loc = seg_indptr.shape[0] - 1;
  Params p{};
  check_operands(fn, out, in, w, seg_indptr, "seg_indptr", e_loc, bank_offset, &p);
  p.rows = N;
  if (N == 0 || e_loc == 0) return;
  const int64_t m_tiles = N / kBlockM + e_loc;  // see contiguous_tile
  EPMOE_CHECK(m_tiles <= 65535, kUnsupported,
              "{}: N = {} rows over E_loc = {} experts need {} m-tiles, above the grid's 65535", fn,
              N, e_loc, m_tiles);
  launch(false, out.dtype, p, dim3(n_tiles(p.n_out), unsigned(m_tiles), 1), stream);
}

void grouped_gemm_masked(const TensorView& out, const TensorView& in, const TensorView& w,
                         const TensorView& count, int bank_offset, cudaStream_t stream) {
  const NvtxRange nvtx("gemm.grouped_gemm_masked");
  const char* fn = "grouped_gemm_masked";
  EPMOE_CHECK(in.shape.rank == 3, kInvalidArgument, "{}: in must be [E_loc, M_max, K], got {}", fn,
              in.shape.str());
  const int64_t e_loc = in.shape[0], m_max = in.shape[1];
  EPMOE_CHECK(count.shape == Shape({e_loc}) && count.dtype == DType::kI32, kInvalidArgument,
              "{}: count must be [{}] i32, got {} {}", fn, e_loc, count.shape.str(),
              dtype_name(count.dtype));
  Params p{};
  check_operands(fn, out, in, w, count, "count", e_loc, bank_offset, &p);
  p.rows = m_max;
  if (e_loc == 0 || m_max == 0) return;
  const int64_t m_tiles = (m_max + kBlockM - 1) / kBlockM;
  EPMOE_CHECK(m_tiles <= 65535 && e_loc <= 65535, kUnsupported,
              "{}: M_max = {} ({} m-tiles) or E_loc = {} exceeds the grid's 65535", fn, m_max,
              m_tiles, e_loc);
  launch(true, out.dtype, p, dim3(n_tiles(p.n_out), unsigned(m_tiles), unsigned(e_loc)), stream);
}

}  // namespace epmoe::cuda
