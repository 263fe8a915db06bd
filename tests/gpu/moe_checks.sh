#!/usr/bin/env bash
# Workload C (issue 21) on one GPU, in stages that each fit one device call; logs and JSON
# rows in $OUT (else bench/results). Not part of CI.
#
#   STAGES="tests sweep" tests/gpu/moe_checks.sh   # MoE GPU tests; per-GEMM tile sweep
#   STAGES=c tests/gpu/moe_checks.sh               # workload C, all 48 layers, dummy weights
#
# tests: tests/gpu/test_moe_gpu.py. sweep: bench/kernel_bench.py --only
# moe_parts,bench_moe (each GEMM's launch variants as CUDA-graph replays, then fused_moe vs
# the torch reference). c: bench/throughput.py --workloads C --load-format dummy
# --step-breakdown (a config.json, no checkpoint; the time by step kind); C_ARGS adds
# arguments, e.g. "--num-prompts 512 --layers 8".
# Each stage runs under `timeout` (STAGE_TIMEOUT seconds; default tests 220, sweep 360,
# c 420), so one that hangs leaves its log and the next stage's time: the first call of
# 2026-12-05 (tests, c and sweep in one command) lost the machine with nothing back.
# "tests sweep" fits one 10-minute call, "c" another.
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
RESULTS=${OUT:-$REPO/bench/results}
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 HPCINFER_GPU_TESTS=1
# shellcheck source=tests/gpu/shim.sh
source "$REPO/tests/gpu/shim.sh"
PY=${PYTHON:-python3}
rc=0
for stage in ${STAGES:-tests sweep}; do
  start=$(date +%s)
  case $stage in tests) limit=220 ;; sweep) limit=360 ;; *) limit=420 ;; esac
  limit=${STAGE_TIMEOUT:-$limit}
  case $stage in
    tests)
      timeout "$limit" "$PY" -m pytest "$REPO/tests/gpu/test_moe_gpu.py" -q -p no:cacheprovider \
        --rootdir "$REPO" -c "$REPO/pyproject.toml" 2>&1 | tee "$RESULTS/gpu-tests-moe.log"
      status=${PIPESTATUS[0]} ;;
    sweep)
      timeout "$limit" "$PY" "$REPO/bench/kernel_bench.py" --quick --only moe_parts,bench_moe \
        --out "$RESULTS/kernels-moe-parts.json" 2>&1 | grep -v "incorrect regex" \
        | tee "$RESULTS/kernels-moe-parts.log"
      status=${PIPESTATUS[0]} ;;
    c)
      read -r -a extra <<< "${C_ARGS:-}"
      timeout "$limit" "$PY" "$REPO/bench/throughput.py" --workloads C --engines hpcinfer \
        --load-format dummy --step-breakdown --out "$RESULTS" "${extra[@]}" 2>&1 \
        | grep -v "incorrect regex" \
        | tee "$RESULTS/throughput-C.log"
      status=${PIPESTATUS[0]} ;;
    *) echo "unknown stage $stage (tests, sweep, c)"; status=2 ;;
  esac
  echo "stage $stage: exit $status in $(( $(date +%s) - start )) s"
  (( status == 0 )) || rc=$status
done
exit "$rc"
