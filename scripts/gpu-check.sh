#!/usr/bin/env bash
# Builds, tests and benchmarks epmoe on a GPU machine in one call (the device tool's `run`).
# Logs and JSON go to $OUT (default ./gpu-out). Golden files: $EPMOE_GOLDEN_DIR (default ./.golden).
# Usage: bash scripts/gpu-check.sh [--stages "tests multi bench sanitizer"] [--no-bench]
#                                   [--no-sanitizer] [--no-kernel-bench] [--only-multi]
#   tests    : GPU tests, CLI runs (single GPU, loopback EP, mpirun -np 1)
#   multi    : (>= 2 GPUs) NCCL EP tests, the same on NCCL's network path, mpirun -np 2
#   bench    : kernel + grouped GEMM benchmarks, dispatch/combine over loopback (and NCCL)
#   sanitizer: compute-sanitizer memcheck and racecheck on the expert-parallel tests
#   overlap  : (not in the default list) `epmoe bench --kernel layer`: none/tbo/sbo, decode and
#              prefill, DeepSeek-V3 and the large-EP slice, with a TBO trace
#   gemm     : (not in the default list) the sm90 grouped GEMM: its tests, memcheck/racecheck on
#              them (quick sizes), `epmoe bench --kernel gemm` and bench/torch_grouped_mm.py
#   fp8      : (not in the default list) FP8 experts and the signalled SBO combine: their GPU
#              tests (and memcheck/racecheck on them), golden files with --weights fp8, and the
#              DeepSeek-V3 layer at 128 (decode) and 4096 (prefill) tokens per rank, bf16 vs fp8
# The sm90 GEMM needs the CUTLASS headers: scripts/fetch-cutlass.sh unpacks the pinned wheel
# carried in .whl/ (no network here) into third_party/ before the build.
# The build directory (build-gpu) is reused, so a second call with other stages rebuilds nothing.
# EPMOE_COMMIT names the commit in the summary where the copy on the GPU machine has no usable git.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
J=$(mktemp -d)   # JSON results, packed into $OUT/results_json.tar at the end (8 files come back)
export EPMOE_GOLDEN_DIR=${EPMOE_GOLDEN_DIR:-$PWD/.golden}
export NCCL_NVLS_ENABLE=0   # never NVLink multicast on these machines
export CUDA_MODULE_LOADING=EAGER
export CUDA_DEVICE_MAX_CONNECTIONS=32
STAGES="tests multi bench sanitizer"; KBENCH=1; ONLY_MULTI=0
while [ $# -gt 0 ]; do
  case "$1" in
    --stages) STAGES="$2"; shift ;;
    --no-bench) STAGES=${STAGES/bench/} ;;
    --no-sanitizer) STAGES=${STAGES/sanitizer/} ;;
    --only-multi) ONLY_MULTI=1; STAGES=${STAGES/tests/}; STAGES=${STAGES/sanitizer/} ;;
    --no-kernel-bench) KBENCH=0 ;;
    *) echo "gpu-check: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
has() { case " $STAGES " in *" $1 "*) return 0 ;; esac; return 1; }
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
elapsed() { echo "$(( $(date +%s) - $1 )) s"; }

export PATH=/usr/local/cuda/bin:$PATH
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
NCCL_PIP=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/nccl
NCCL_ARG=(); [ -d "$NCCL_PIP" ] && NCCL_ARG=(-DEPMOE_NCCL_ROOT="$NCCL_PIP")
GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c GPU)
say "commit: ${EPMOE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}$(git diff --quiet 2>/dev/null || echo ' (+local changes)')"
say "gpus: $NGPU x $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | head -1)"

t0=$(date +%s)
bash scripts/fetch-cutlass.sh > "$OUT/cutlass.log" 2>&1 || say "CUTLASS headers missing (carry .whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl): no sm90 GEMM"
# EPMOE_SM90_TUNING=ON (default here, OFF in CI): the FP8 tile candidates of the gemm bench.
if ! cmake -S . -B build-gpu "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_COMPILER="$NVCC" \
      -DEPMOE_SM90_TUNING="${EPMOE_SM90_TUNING:-ON}" \
      "${NCCL_ARG[@]}" > "$OUT/build.log" 2>&1 ||
   ! cmake --build build-gpu -j"$(nproc)" >> "$OUT/build.log" 2>&1; then
  grep -E "error|Error" "$OUT/build.log" | head -30
  say "BUILD FAILED"
  exit 1
fi
say "build: ok ($(elapsed $t0)); $(grep -m1 'NCCL' "$OUT/build.log")"
B=./build-gpu
GT=$B/epmoe_gpu_tests

if has tests; then
  t0=$(date +%s)
  timeout 300 $GT --gtest_output=json:"$J/gpu_tests.json" > "$OUT/gpu_tests.log" 2>&1
  rc=$?
  grep -B3 -A12 "Failure" "$OUT/gpu_tests.log" | head -80
  say "gpu tests: rc=$rc, $(grep -c '^\[       OK \]' "$OUT/gpu_tests.log") passed, $(grep -c '^\[  FAILED  \] [A-Za-z]' "$OUT/gpu_tests.log") failed, $(grep -c '^\[  SKIPPED \] [A-Za-z]' "$OUT/gpu_tests.log") skipped ($(elapsed $t0))"
  grep -E '^\[  (FAILED|SKIPPED) \] [A-Za-z]' "$OUT/gpu_tests.log" | sort -u | head -20 | tee -a "$SUMMARY"
  # CPU suite too (the CLI tests exercise --backend cuda on this machine).
  timeout 120 ctest --test-dir $B -E 'Gpu' -j8 >> "$OUT/gpu_tests.log" 2>&1
  say "cpu tests: rc=$? $(grep -E 'tests passed|tests failed' "$OUT/gpu_tests.log")"
  {
    echo "== single GPU layer, golden"; for g in "$EPMOE_GOLDEN_DIR"/*.safetensors; do timeout 60 $B/epmoe run --backend cuda --ranks 1 --golden "$g" --fuse-shared | tail -2; done
    echo "== loopback EP, golden split"; timeout 60 $B/epmoe run --backend cuda --ranks 8 --transport loopback --golden "$EPMOE_GOLDEN_DIR/dsv3_routing_256e.safetensors" --tokens 40,0,0,33,1,0,54,0 --mode low-latency | tail -3
    echo "== loopback EP, tiny preset, normal"; timeout 60 $B/epmoe run --backend cuda --ranks 4 --transport loopback --preset deepseek-v3-tiny --tokens 64,0,17,128 | tail -12
    echo "== loopback EP, deepseek-v3, low-latency fp8"; timeout 120 $B/epmoe run --backend cuda --ranks 8 --transport loopback --preset deepseek-v3 --tokens 128 --mode low-latency --fp8-dispatch --no-check --iters 5 | tail -12
    echo "== loopback EP, low-latency over the host API"; timeout 60 $B/epmoe run --backend cuda --ranks 4 --transport loopback --preset deepseek-v3-tiny --tokens 64,0,17,128 --mode low-latency --ll-transfer host | grep -E "transport|PASS|FAIL|error"
    echo "== mpirun -np 1 (nccl transport)"; timeout 60 mpirun --allow-run-as-root -np 1 -x NCCL_NVLS_ENABLE=0 $B/epmoe run --backend cuda --ranks 1 --preset deepseek-v3-tiny --tokens 40 --mode low-latency | tail -3
    echo "== no GPU message"; CUDA_VISIBLE_DEVICES= $B/epmoe run --backend cuda --ranks 1 --tokens 4; echo "exit $?"
  } > "$OUT/cli.log" 2>&1
  grep -E "^==|PASS|FAIL|error|check vs" "$OUT/cli.log" | tee -a "$SUMMARY"
fi

if has multi && [ "$NGPU" -ge 2 ]; then
  t0=$(date +%s)
  {
    echo "== NCCL EP + transport tests (2 GPUs)"; timeout 200 $GT --gtest_filter='*Nccl*:*nccl*' 2>&1 | grep -E "^\[  (FAILED|PASSED|SKIPPED|  OK)|Failure|tests? ran|low-latency runs" | head -30
    echo "== network path (NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1)"; NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 timeout 150 $GT --gtest_filter='*Nccl*:*nccl*' 2>&1 | grep -E "^\[  (FAILED|PASSED|SKIPPED|  OK)|Failure|low-latency runs" | head -30
    echo "== network path, epmoe run low-latency (auto transfers)"; NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 timeout 60 $B/epmoe run --backend cuda --ranks 2 --transport nccl --preset deepseek-v3-tiny --tokens 96,5 --mode low-latency | grep -E "transport|PASS|FAIL|error"
    echo "== thread per GPU, golden split"; timeout 60 $B/epmoe run --backend cuda --ranks 2 --transport nccl --golden "$EPMOE_GOLDEN_DIR/dsv3_small_grouped.safetensors" --tokens 30,7 | tail -3
    echo "== mpirun -np 2, both modes"; for m in normal low-latency; do timeout 90 mpirun --allow-run-as-root -np 2 -x NCCL_NVLS_ENABLE=0 $B/epmoe run --backend cuda --ranks 2 --preset deepseek-v3-tiny --tokens 96,5 --mode $m | grep -E "PASS|FAIL|error"; done
    echo "== mpirun -np 2, low-latency over the host API"; timeout 90 mpirun --allow-run-as-root -np 2 -x NCCL_NVLS_ENABLE=0 $B/epmoe run --backend cuda --ranks 2 --preset deepseek-v3-tiny --tokens 96,5 --mode low-latency --ll-transfer host | grep -E "transport|PASS|FAIL|error"
    echo "== mpirun -np 2 smoke"; [ -x $B/epmoe_mpi_smoke ] && timeout 60 mpirun --allow-run-as-root -np 2 -x NCCL_NVLS_ENABLE=0 $B/epmoe_mpi_smoke
  } > "$OUT/multi.log" 2>&1
  grep -E "^==|PASS|FAIL|Failure|PASSED|error|ok$" "$OUT/multi.log" | tee -a "$SUMMARY"
  say "multi-GPU: ($(elapsed $t0))"
fi

if has bench; then
  t0=$(date +%s)
  {
    if [ "$ONLY_MULTI" = 0 ]; then
      if [ "$KBENCH" = 1 ]; then
        timeout 120 $B/epmoe bench --kernel all --json "$J/bench_kernels.json"
        timeout 120 $B/epmoe bench --kernel gemm --json "$J/bench_gemm.json"
      fi
      for R in 2 8; do
        timeout 60 $B/epmoe bench --kernel dispatch --ranks $R --transport loopback --mode low-latency --tokens 128 --json "$J/bench_ll_bf16_r$R.json"
        timeout 60 $B/epmoe bench --kernel dispatch --ranks $R --transport loopback --mode low-latency --tokens 128 --fp8 --json "$J/bench_ll_fp8_r$R.json"
        timeout 60 $B/epmoe bench --kernel dispatch --ranks $R --transport loopback --mode low-latency --tokens 128 --ll-transfer host --json "$J/bench_ll_host_r$R.json"
        NT=4096; [ "$R" = 8 ] && [ "$NGPU" -lt 2 ] && NT=2048   # 8 x 4096 does not fit in 80 GB
        timeout 90 $B/epmoe bench --kernel dispatch --ranks $R --transport loopback --mode normal --tokens $NT --json "$J/bench_normal_r$R.json"
      done
    fi
    if [ "$NGPU" -ge 2 ]; then
      timeout 120 $B/epmoe bench --kernel dispatch --ranks 8 --transport loopback --mode normal --tokens 4096 --json "$J/bench_normal_r8_4096.json"
      timeout 60 $B/epmoe bench --kernel dispatch --ranks 2 --transport nccl --mode low-latency --tokens 128 --json "$J/bench_nccl_ll_bf16.json"
      timeout 60 $B/epmoe bench --kernel dispatch --ranks 2 --transport nccl --mode low-latency --tokens 128 --fp8 --json "$J/bench_nccl_ll_fp8.json"
      timeout 90 $B/epmoe bench --kernel dispatch --ranks 2 --transport nccl --mode normal --tokens 4096 --json "$J/bench_nccl_normal.json"
      timeout 60 $B/epmoe bench --kernel dispatch --ranks 2 --transport nccl --mode low-latency --tokens 128 --ll-transfer host --json "$J/bench_nccl_ll_host.json"
      NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 timeout 60 $B/epmoe bench --kernel dispatch --ranks 2 --transport nccl --mode low-latency --tokens 128 --json "$J/bench_net_ll.json"
      NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 timeout 90 $B/epmoe bench --kernel dispatch --ranks 2 --transport nccl --mode normal --tokens 4096 --json "$J/bench_net_normal.json"
    fi
  } > "$OUT/bench.log" 2>&1
  say "bench: ($(elapsed $t0))"
  grep -vE "^\s*$" "$OUT/bench.log" | tail -60 | tee -a "$SUMMARY" >/dev/null
fi

if has gemm && [ "${GEMM_TESTS:-1}" = 1 ]; then
  t0=$(date +%s)
  timeout 600 $GT --gtest_filter='Sm90*' --gtest_output=json:"$J/sm90_tests.json" > "$OUT/gemm.log" 2>&1
  rc=$?
  grep -B3 -A12 "Failure" "$OUT/gemm.log" | head -60
  say "sm90 gemm tests: rc=$rc, $(grep -c '^\[       OK \]' "$OUT/gemm.log") passed, $(grep -c '^\[  FAILED  \] [A-Za-z]' "$OUT/gemm.log") failed, $(grep -c '^\[  SKIPPED \] [A-Za-z]' "$OUT/gemm.log") skipped ($(elapsed $t0))"
  grep -E '^\[  (FAILED|SKIPPED) \] [A-Za-z]' "$OUT/gemm.log" | sort -u | head -20 | tee -a "$SUMMARY"
  for tool in memcheck racecheck; do
    EPMOE_GPU_TEST_QUICK=1 timeout 300 compute-sanitizer --tool $tool --error-exitcode 99 \
      $GT --gtest_filter='Sm90*:-*RowsAreIndependent*:*SignalledRowsAreFinal*' > "$J/sm90_$tool.log" 2>&1
    say "sm90 $tool: rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$J/sm90_$tool.log" | tail -1) $(grep -E '^\[  (PASSED|FAILED)  \]' "$J/sm90_$tool.log" | tail -2 | tr '\n' ' ')"
  done
fi
if has gemm; then
  t0=$(date +%s)
  timeout 400 $B/epmoe bench --kernel gemm --iters ${GEMM_ITERS:-10} --warmup 3 --json "$J/bench_sm90_gemm.json" > "$OUT/bench_gemm.log" 2>&1
  say "gemm bench: rc=$?"; grep -vE "^\s*$" "$OUT/bench_gemm.log" | tail -70 | tee -a "$SUMMARY" > /dev/null
  PY=/opt/torch/.venv/bin/python; [ -x "$PY" ] || PY=python3
  timeout 300 "$PY" bench/torch_grouped_mm.py --iters ${GEMM_ITERS:-10} --warmup 3 --json "$J/bench_torch_grouped_mm.json" > "$OUT/bench_torch.log" 2>&1
  say "torch grouped_mm bench: rc=$?"; tail -40 "$OUT/bench_torch.log" | tee -a "$SUMMARY" > /dev/null
fi

if has overlap; then
  # The layer under none / tbo / sbo (issue 11): decode (low-latency, CUDA graphs) at 32-256
  # tokens per rank and prefill (normal) at 4096, DeepSeek-V3 as it is and the large-EP slice
  # (8 local experts per rank), the attention stand-in as long as the sequential MoE layer.
  t0=$(date +%s)
  R=2; TR=nccl; [ "$NGPU" -lt 2 ] && TR=loopback
  OV_TOKENS=${OV_TOKENS:-32,64,128,256}
  {
    for tag in ${OV_SHAPES:-slice dsv3}; do
      shape=$([ "$tag" = slice ] && echo "--experts-per-rank 8")
      wl=${OV_WEIGHTS:-bf16}; [ "$tag" = dsv3 ] && wl=${OV_DSV3_WEIGHTS:-$wl}
      for w in $wl; do
        echo "== decode $tag $w"; timeout 150 $B/epmoe bench --kernel layer --preset deepseek-v3 $shape --ranks $R --transport $TR --mode low-latency --weights $w --tokens $OV_TOKENS --overlap ${OV_OVERLAP:-all} --attn-us -1 --graph --iters ${OV_ITERS:-20} --trace "$J/trace_decode_${tag}_$w.json" --json "$J/layer_decode_${tag}_$w.json"
      done
      [ -n "${OV_NO_PREFILL:-}" ] && continue
      echo "== prefill $tag"; timeout 150 $B/epmoe bench --kernel layer --preset deepseek-v3 $shape --ranks $R --transport $TR --mode normal --tokens 4096 --overlap all --attn-us -1 --iters ${OV_ITERS:-10} --json "$J/layer_prefill_$tag.json"
    done
  } > "$OUT/overlap.log" 2>&1
  say "overlap bench: ($(elapsed $t0))"
  grep -E "^==|tokens/rank|^none|^tbo|^sbo|error" "$OUT/overlap.log" | cut -c1-60 | tee -a "$SUMMARY"
fi

if has fp8; then
  t0=$(date +%s)
  R=2; TR=nccl; [ "$NGPU" -lt 2 ] && TR=loopback
  F8_TESTS='GpuOverlap.Sbo*:GpuOverlap.Signalled*:GpuOverlap.Fp8*:GpuLayer.GoldenFilesWithFp8Weights:GpuOverlap.Strategies*'
  {
    echo "== FP8 / signalled-combine tests"; timeout 200 $GT --gtest_filter="$F8_TESTS:GpuExpertParallelNccl.TwoGpus*" 2>&1 | grep -E "^\[  (FAILED|PASSED|SKIPPED|  OK)|Failure|Expected|Which is|golden fp8|seed|trial" | head -60
    echo "== golden, --weights fp8"; for g in dsv3_fp8_block128 dsv3_small_grouped dsv3_routing_256e; do timeout 60 $B/epmoe run --backend cuda --ranks 1 --golden "$EPMOE_GOLDEN_DIR/$g.safetensors" --weights fp8 --mode low-latency --overlap sbo | grep -E "golden|PASS|FAIL|error"; done
    echo "== golden split over $TR, --weights fp8, sbo"; timeout 60 $B/epmoe run --backend cuda --ranks $R --transport $TR --golden "$EPMOE_GOLDEN_DIR/dsv3_fp8_block128.safetensors" --tokens 30,18 --weights fp8 --mode low-latency --overlap sbo | grep -E "golden|reference|vs none|PASS|FAIL|error"
    echo "== refused: H = 192 with --weights fp8"; timeout 60 $B/epmoe run --backend cuda --ranks 1 --golden "$EPMOE_GOLDEN_DIR/ungrouped_2shared_noscale.safetensors" --weights fp8; echo "exit $?"
    echo "== deepseek-v3 checked, fp8 (16 tokens/rank)"; timeout 120 $B/epmoe run --backend cuda --ranks $R --transport $TR --preset deepseek-v3 --tokens 16 --mode low-latency --weights fp8 --overlap sbo --iters 2 | grep -E "reference|vs none|PASS|FAIL|error"
    for w in ${F8_LAYER_WEIGHTS-bf16 fp8}; do
      echo "== deepseek-v3 decode 128 tokens/rank, $w"; timeout 150 $B/epmoe run --backend cuda --ranks $R --transport $TR --preset deepseek-v3 --tokens 128 --mode low-latency --weights $w --no-check --iters 10 --json "$J/run_decode_$w.json" | tail -16
      echo "== deepseek-v3 prefill 4096 tokens/rank, $w"; timeout 150 $B/epmoe run --backend cuda --ranks $R --transport $TR --preset deepseek-v3 --tokens 4096 --mode normal --weights $w --no-check --iters 5 --json "$J/run_prefill_$w.json" | tail -16
    done
  } > "$OUT/fp8.log" 2>&1
  say "fp8 stage: ($(elapsed $t0))"
  grep -E "^==|PASS|FAIL|Failure|PASSED|error|golden fp8|exit|experts " "$OUT/fp8.log" | cut -c1-150 | tee -a "$SUMMARY"
  if [ -n "${F8_SANITIZE:-}" ]; then
    for tool in memcheck racecheck; do
      t0=$(date +%s)
      EPMOE_GPU_TEST_QUICK=1 EPMOE_TIMEOUT_MS=60000 EPMOE_SERIAL_HALVES=1 timeout ${F8_SANITIZE_S:-200} compute-sanitizer --tool $tool --error-exitcode 99 \
        $GT --gtest_filter="${F8_SANITIZE_FILTER:-GpuOverlap.Sbo*:GpuOverlap.Signalled*:GpuOverlap.Fp8*}" > "$J/fp8_$tool.log" 2>&1
      say "fp8/sbo $tool: rc=$? ($(elapsed $t0)) $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$J/fp8_$tool.log" | tail -1) $(grep -E '^\[  (PASSED|FAILED)  \]' "$J/fp8_$tool.log" | tail -2 | tr '\n' ' ')"
    done
  fi
fi

if has sanitizer; then
  t0=$(date +%s)
  # Sanitized kernels run many times slower: give the flag waits a longer budget. The sanitizers
  # run kernels one at a time: every send half finishes before any rank waits (see ep_cuda.cu).
  export EPMOE_TIMEOUT_MS=60000 EPMOE_SERIAL_HALVES=1
  EPMOE_GPU_TEST_QUICK=1 timeout 240 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 99 \
    $GT --gtest_filter='GpuExpertParallel.*' > "$J/memcheck.log" 2>&1
  say "memcheck (EP tests): rc=$? ($(elapsed $t0)): $(grep -E 'ERROR SUMMARY' "$J/memcheck.log" | tail -1) $(grep -E '^\[  (PASSED|FAILED)  \]' "$J/memcheck.log" | tail -2 | tr '\n' ' ')"
  tail -40 "$J/memcheck.log" > "$OUT/sanitizer.log"
  t0=$(date +%s)
  EPMOE_GPU_TEST_QUICK=1 timeout 200 compute-sanitizer --tool racecheck --error-exitcode 99 \
    $GT --gtest_filter='GpuExpertParallel.*:-*Golden*' > "$J/racecheck.log" 2>&1
  say "racecheck (EP tests): rc=$? ($(elapsed $t0)): $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$J/racecheck.log" | tail -1) $(grep -E '^\[  (PASSED|FAILED)  \]' "$J/racecheck.log" | tail -2 | tr '\n' ' ')"
  tail -40 "$J/racecheck.log" >> "$OUT/sanitizer.log"
fi
tar -C "$J" -cf "$OUT/results_json.tar" . 2>/dev/null
cat "$SUMMARY" > /dev/null
