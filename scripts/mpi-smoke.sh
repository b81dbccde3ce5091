#!/usr/bin/env bash
# NCCL transport checks on a GPU machine, in one call: builds against the pip NCCL, then runs
#   1. the thread-per-GPU suite (NcclTransport.*),
#   2. the same with NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 (host API over NCCL's network path),
#   3. the same with NCCL_WIN_ENABLE=0 (NCCL declines windows: peers unreachable, a2a still works),
#   4. mpirun -np 1 and -np <GPUs, at most 2> (+ the P2P/SHM-disabled variant),
#   5. the barrier-timeout test (EPMOE_TIMEOUT_MS=3000).
# Logs go to $OUT (default ./gpu-out): nccl_*.log, nccl_summary.txt.
# Usage: bash scripts/mpi-smoke.sh [--no-build]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
SUMMARY="$OUT/nccl_summary.txt"
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}   # NVLink multicast stays off on these machines
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
PIP_NCCL=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/nccl
if [ -z "${EPMOE_NCCL_ROOT:-}" ] && [ -f "$PIP_NCCL/include/nccl.h" ]; then EPMOE_NCCL_ROOT=$PIP_NCCL; fi
BUILD=${BUILD:-build-gpu}
export PATH=/usr/local/cuda/bin:$PATH
GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)

if [ "${1:-}" != "--no-build" ]; then
  t0=$(date +%s)
  if ! cmake -S . -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
        -DEPMOE_NCCL_ROOT="${EPMOE_NCCL_ROOT:-}" > "$OUT/nccl_build.log" 2>&1 ||
     ! cmake --build "$BUILD" -j16 --target epmoe_gpu_tests epmoe_mpi_smoke >> "$OUT/nccl_build.log" 2>&1; then
    tail -40 "$OUT/nccl_build.log"
    say "BUILD FAILED"
    exit 1
  fi
  say "build: ok ($(( $(date +%s) - t0 )) s)"
fi
grep -E "^-- (NCCL|MPI)" "$OUT/nccl_build.log" | tee -a "$SUMMARY"
say "loader: $(ldd "$BUILD/epmoe_gpu_tests" | grep -i nccl)"
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
say "gpus: $GPUS"

fails=0
run() {  # run NAME TIMEOUT_S CMD...: logs to $OUT/nccl_NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$OUT/nccl_$name.log" 2>&1
  local rc=$?
  [ $rc -ne 0 ] && [ $rc -ne 77 ] && fails=$((fails + 1))
  say "$name: rc=$rc ($(( $(date +%s) - t0 )) s)"
  grep -E "^\[nccl\]|mpi smoke:|^\[  (FAILED|SKIPPED|PASSED) |Failure|rank .* (FAILED|failed)" \
    "$OUT/nccl_$name.log" | head -30 | sed 's/^/    /' | tee -a "$SUMMARY"
}

T="$BUILD/epmoe_gpu_tests"
run threads 240 "$T" --gtest_filter='NcclTransport.*'
run threads_net 240 env NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 "$T" --gtest_filter='NcclTransport.*'
run threads_nowin 240 env NCCL_WIN_ENABLE=0 "$T" --gtest_filter='NcclTransport.*'

MPIRUN=(mpirun --allow-run-as-root --oversubscribe -x NCCL_NVLS_ENABLE -x NCCL_DEBUG)
NP=$(( GPUS < 2 ? GPUS : 2 )); [ "$NP" -lt 1 ] && NP=1
run mpi_np1 180 "${MPIRUN[@]}" -np 1 "$BUILD/epmoe_mpi_smoke"
run mpi_np$NP 180 "${MPIRUN[@]}" -np "$NP" "$BUILD/epmoe_mpi_smoke"
run mpi_np${NP}_net 180 env NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 \
  "${MPIRUN[@]}" -x NCCL_P2P_DISABLE -x NCCL_SHM_DISABLE -np "$NP" "$BUILD/epmoe_mpi_smoke"
run timeout_test 120 env EPMOE_TIMEOUT_MS=3000 "$T" --gtest_also_run_disabled_tests \
  --gtest_filter='NcclTransport.DISABLED_BarrierTimeoutNamesMissingRank'

say "nccl checks: $fails failed run(s)"
[ "$fails" -eq 0 ]
