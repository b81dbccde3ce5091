#!/usr/bin/env bash
# The test suite (the README's test line and .ci/run call this after setup.sh and build.sh):
#   1. tests  the normal build's ctest suite (GPU tests skip without a GPU)
#   2. asan   the CPU suite again, CPU-only build (-DEPMOE_CUDA=OFF) under ASan + UBSan
#   3. tsan   the expert-parallel, overlap and communicator tests under ThreadSanitizer (CPU-only)
#   4. fuzz   the safetensors reader + layer loader under libFuzzer (clang, ASan + UBSan) for
#             EPMOE_FUZZ_SECONDS (default 90) from the seed corpus in tests/fuzz/corpus
#   5. format every C++/CUDA file of the repository as .clang-format says (clang-format --dry-run)
# Each stage prints one summary line; any test failure or sanitizer report fails the run.
# --stages "tests asan tsan fuzz" picks a subset. Sanitizer reports go to files (log_path), so
# reports of child processes (the CLI the tests spawn) are counted too.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
stages="tests asan tsan fuzz format"
if [ "${1:-}" = "--stages" ]; then stages="$2"; fi
jobs=$(nproc)
logs=$root/build-logs
rm -rf "$logs"
mkdir -p "$logs"
summary=()
fail=0

stage_start() { echo "=== $1: $2"; t0=$SECONDS; }
stage_end() {  # stage_end NAME OK(0|1) TEXT
  local line
  line="$1: $3 ($((SECONDS - t0)) s)"
  summary+=("$line")
  echo "$line"
  if [ "$2" -ne 0 ]; then fail=1; echo "$1: FAILED (logs in $logs)"; fi
}
# Sanitizer reports: files the runtimes wrote under $1 (log_path, prefix.PID) plus reports that
# reached a log anyway ($2...: UBSan next to ASan prints to stderr, which ctest captures).
count_reports() {
  local dir=$1 files logged
  shift
  files=$(find "$dir" -type f -size +0 2>/dev/null | wc -l)
  logged=$(cat "$@" 2>/dev/null | grep -cE 'runtime error:|ERROR: (Address|Leak)Sanitizer|WARNING: ThreadSanitizer|SUMMARY: (Address|Undefined|Thread|Leak)' || true)
  echo $((files + logged))
}
# "N tests" from a ctest log.
ctest_count() { grep -Eo 'tests passed, [0-9]+ tests failed out of [0-9]+' "$1" | grep -Eo '[0-9]+$' || echo 0; }

# Sanitizer builds: -O1 -g1 (line tables for the reports, a third of -O2 -g's build time).
configure_cpu() {  # configure_cpu DIR FLAGS
  cmake -S . -B "$1" -DEPMOE_CUDA=OFF -DCMAKE_BUILD_TYPE=None \
    "-DCMAKE_CXX_FLAGS=$2 -O1 -g1 -fno-omit-frame-pointer" >"$logs/$(basename "$1").configure.log" 2>&1
}

golden_dir=${EPMOE_GOLDEN_DIR:-$root/../shared/golden}
export EPMOE_GOLDEN_DIR=$golden_dir

if [[ " $stages " == *" format "* ]]; then
  stage_start format "clang-format --dry-run --Werror on the repository's C++/CUDA files"
  ok=0
  cf=$(command -v clang-format || command -v clang-format-14 || true)
  if [ -z "$cf" ]; then
    ok=1
    echo "clang-format not found (scripts/setup.sh installs it)" >"$logs/format.log"
  else
    git ls-files '*.cc' '*.h' '*.cu' '*.cuh' | xargs "$cf" --dry-run --Werror >"$logs/format.log" 2>&1 || ok=1
  fi
  [ "$ok" -ne 0 ] && head -20 "$logs/format.log"
  stage_end format $ok "$(git ls-files '*.cc' '*.h' '*.cu' '*.cuh' | wc -l) files, $(grep -c 'error:' "$logs/format.log" || true) lines to reformat"
fi

if [[ " $stages " == *" tests "* ]]; then
  stage_start tests "ctest --test-dir build"
  ok=0
  ctest --test-dir build --output-on-failure -j"$jobs" >"$logs/tests.log" 2>&1 || ok=1
  tail -n 3 "$logs/tests.log"
  [ "$ok" -ne 0 ] && grep -E "Failed|\*\*\*" "$logs/tests.log" | head -20
  stage_end tests $ok "$(ctest_count "$logs/tests.log") tests, $(grep -Eo '[0-9]+% tests passed, [0-9]+ tests failed' "$logs/tests.log" || echo 'no result')"
fi

if [[ " $stages " == *" asan "* ]]; then
  stage_start asan "CPU suite under AddressSanitizer + UndefinedBehaviorSanitizer (build-asan)"
  ok=0
  rep=$logs/asan-reports
  mkdir -p "$rep"
  configure_cpu build-asan "-fsanitize=address,undefined -fno-sanitize-recover=all" &&
    cmake --build build-asan -j"$jobs" --target epmoe_tests epmoe_cli >"$logs/asan.build.log" 2>&1 || {
    ok=1
    tail -n 30 "$logs/asan.build.log"
  }
  if [ "$ok" -eq 0 ]; then
    ASAN_OPTIONS="log_path=$rep/asan:halt_on_error=1:detect_leaks=1:abort_on_error=0" \
      UBSAN_OPTIONS="log_path=$rep/ubsan:halt_on_error=1:print_stacktrace=1" \
      ctest --test-dir build-asan --output-on-failure -j"$jobs" >"$logs/asan.log" 2>&1 || ok=1
    tail -n 3 "$logs/asan.log"
  fi
  n=$(count_reports "$rep" "$logs/asan.log")
  [ "$n" -ne 0 ] && { ok=1; head -n 40 "$rep"/* 2>/dev/null; grep -m5 -A8 'runtime error:\|Sanitizer' "$logs/asan.log"; }
  stage_end asan $ok "$(ctest_count "$logs/asan.log") tests, $n reports"
fi

if [[ " $stages " == *" tsan "* ]]; then
  stage_start tsan "expert-parallel and communicator tests under ThreadSanitizer (build-tsan)"
  ok=0
  rep=$logs/tsan-reports
  mkdir -p "$rep"
  filter='ExpertParallel.*:Overlap.*:HostileComm.*'
  configure_cpu build-tsan "-fsanitize=thread" &&
    cmake --build build-tsan -j"$jobs" --target epmoe_tests >"$logs/tsan.build.log" 2>&1 || {
    ok=1
    tail -n 30 "$logs/tsan.build.log"
  }
  if [ "$ok" -eq 0 ]; then
    # One CPU thread per rank: libgomp is not instrumented, so OpenMP regions would be noise.
    EPMOE_CPU_THREADS=1 TSAN_OPTIONS="log_path=$rep/tsan:halt_on_error=1:second_deadlock_stack=1" \
      build-tsan/epmoe_tests --gtest_filter="$filter" >"$logs/tsan.log" 2>&1 || ok=1
    tail -n 3 "$logs/tsan.log"
  fi
  n=$(count_reports "$rep" "$logs/tsan.log")
  [ "$n" -ne 0 ] && { ok=1; head -n 60 "$rep"/* 2>/dev/null; grep -m5 -A8 'Sanitizer' "$logs/tsan.log"; }
  count=$(grep -Eo '^\[==========\] [0-9]+ tests' "$logs/tsan.log" | grep -Eo '[0-9]+' || echo 0)
  stage_end tsan $ok "$count tests, $n reports"
fi

if [[ " $stages " == *" fuzz "* ]]; then
  secs=${EPMOE_FUZZ_SECONDS:-90}
  stage_start fuzz "safetensors reader + layer loader under libFuzzer for $secs s (build-fuzz)"
  ok=0
  cxx=$(command -v clang++-14 || command -v clang++ || true)
  if [ -z "$cxx" ]; then
    ok=1
    echo "fuzz: clang++ not found (scripts/setup.sh installs clang-14)"
  else
    cc=${cxx/clang++/clang}
    CC=$cc CXX=$cxx cmake -S . -B build-fuzz -DEPMOE_CUDA=OFF -DEPMOE_BUILD_TESTS=OFF \
      -DEPMOE_FUZZ=ON -DEPMOE_WERROR=OFF -DCMAKE_BUILD_TYPE=None \
      "-DCMAKE_CXX_FLAGS=-O1 -g1 -fsanitize=address,undefined -fno-sanitize-recover=all -fsanitize=fuzzer-no-link" \
      >"$logs/fuzz.configure.log" 2>&1 &&
      cmake --build build-fuzz -j"$jobs" --target fuzz_safetensors >"$logs/fuzz.build.log" 2>&1 || {
      ok=1
      tail -n 30 "$logs/fuzz.configure.log" "$logs/fuzz.build.log"
    }
  fi
  execs=0 corpus=0
  if [ "$ok" -eq 0 ]; then
    # New inputs go to a scratch corpus; the committed seeds stay as they are.
    work=build-fuzz/corpus
    rm -rf "$work" build-fuzz/artifacts
    mkdir -p "$work" build-fuzz/artifacts
    seeds=tests/fuzz/corpus/safetensors
    (cd build-fuzz && ASAN_OPTIONS=detect_leaks=1 ./fuzz_safetensors -max_total_time="$secs" \
      -timeout=10 -rss_limit_mb=2048 -max_len=8192 -print_final_stats=1 \
      -artifact_prefix=artifacts/ corpus "$root/$seeds") >"$logs/fuzz.log" 2>&1 || ok=1
    execs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$logs/fuzz.log" | grep -Eo '[0-9]+$' || echo 0)
    corpus=$(($(find "$work" -type f | wc -l) + $(find "$seeds" -type f | wc -l)))
    [ "$ok" -ne 0 ] && grep -E "ERROR|==[0-9]+==|runtime error|Test unit written" "$logs/fuzz.log" | head -20
  fi
  crashes=$(find build-fuzz/artifacts -type f 2>/dev/null | wc -l)
  stage_end fuzz $ok "$execs executions in $secs s, corpus $corpus files ($(find tests/fuzz/corpus/safetensors -type f | wc -l) seeds), $crashes crashes"
fi

echo "=== summary"
printf '%s\n' "${summary[@]}"
exit $fail
