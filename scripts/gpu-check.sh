#!/usr/bin/env bash
# Builds, tests and benchmarks the CUDA backend on a GPU machine in one call.
# Logs and JSON go to $OUT (default ./gpu-out): build.log, gpu_tests.log/.json, bench.log/.json,
# memcheck.log, summary.txt. Golden files: $EPMOE_GOLDEN_DIR (default ./.golden).
# Usage: bash scripts/gpu-check.sh [--no-bench] [--no-memcheck]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export EPMOE_GOLDEN_DIR=${EPMOE_GOLDEN_DIR:-$PWD/.golden}
BENCH=1; MEMCHECK=1
for a in "$@"; do
  case "$a" in --no-bench) BENCH=0 ;; --no-memcheck) MEMCHECK=0 ;; esac
done
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

NVCC=$(command -v nvcc || true)
[ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc
export PATH=/usr/local/cuda/bin:$PATH
GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)
say "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+local changes)')"
say "gpu: $(nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader 2>&1 | head -1)"
say "nvcc: ${NVCC:-missing} ($("${NVCC:-nvcc}" --version 2>/dev/null | tail -1))"

t0=$(date +%s)
if ! cmake -S . -B build-gpu "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_COMPILER="$NVCC" \
    > "$OUT/build.log" 2>&1 ||
   ! cmake --build build-gpu -j16 --target epmoe_gpu_tests >> "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  say "BUILD FAILED"
  exit 1
fi
# The CLI is built too, but its failure must not hide the kernel results.
cmake --build build-gpu -j16 >> "$OUT/build.log" 2>&1 || say "note: full build (CLI, CPU tests) failed; see build.log"
say "build: ok ($(( $(date +%s) - t0 )) s)"

t0=$(date +%s)
./build-gpu/epmoe_gpu_tests --gtest_output=json:"$OUT/gpu_tests.json" > "$OUT/gpu_tests.log" 2>&1
rc_tests=$?
grep -E "^\[  (FAILED|PASSED|SKIPPED) \]|tests? ran" "$OUT/gpu_tests.log" | tail -20
grep -E "^\[golden\]" "$OUT/gpu_tests.log" | tee -a "$SUMMARY"
grep -B2 -A8 "Failure" "$OUT/gpu_tests.log" | head -60
say "gpu tests: rc=$rc_tests, $(grep -c '^\[       OK \]' "$OUT/gpu_tests.log") passed, $(grep -c '^\[  FAILED  \] [A-Za-z]' "$OUT/gpu_tests.log") failed lines, $(grep -c '^\[  SKIPPED \] [A-Za-z]' "$OUT/gpu_tests.log") skipped ($(( $(date +%s) - t0 )) s)"

if [ "$BENCH" = 1 ]; then
  t0=$(date +%s)
  EPMOE_BENCH_JSON="$OUT/bench.json" timeout 200 ./build-gpu/epmoe_gpu_tests \
    --gtest_also_run_disabled_tests --gtest_filter='GpuBench.DISABLED_KernelBench' \
    > "$OUT/bench.log" 2>&1
  say "bench: rc=$? ($(( $(date +%s) - t0 )) s)"
  sed -n '/^device:/,/^\[/p' "$OUT/bench.log" | grep -v '^\[' | tee -a "$SUMMARY"
fi

if [ "$MEMCHECK" = 1 ]; then
  t0=$(date +%s)
  EPMOE_GPU_TEST_QUICK=1 timeout 150 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 99 \
    ./build-gpu/epmoe_gpu_tests > "$OUT/memcheck.log" 2>&1
  rc_mc=$?
  say "memcheck: rc=$rc_mc ($(( $(date +%s) - t0 )) s): $(grep -E 'ERROR SUMMARY' "$OUT/memcheck.log" | tail -1) $(grep -E '^\[  (PASSED|FAILED)  \]' "$OUT/memcheck.log" | tail -2 | tr '\n' ' ')"
fi
exit $rc_tests
