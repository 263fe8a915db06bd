#!/usr/bin/env bash
# Shared-prefix decode attention (cascade; engine/shared_prefix.py, kernels/decode_attention.py)
# on one GPU, sized for one 10-minute device call:
#   1. the GPU tests: the kernel at full size against the reference, and greedy tokens of
#      72 rows behind one 300-token prompt equal to transformers (fp32)     (TEST_TIMEOUT, 150 s)
#   2. bench/kernel_bench.py --only decode_shared: workload P's decode step (1,024 rows,
#      1,024 shared tokens, 8B layer shape), the kernel without and with the shared prefix
#   3. workload P (bench/throughput.py), hpcinfer only, PROCESSES processes with
#      HPCINFER_SHARED_PREFIX_ATTENTION=1 and as many with =0, interleaved (on, off, on, ...);
#      MODES="1" for the "on" processes only; BENCH_ARGS more bench/throughput.py arguments
#      (e.g. --step-breakdown)
# Stage "sweep" (not in the default STAGES): bench/kernel_bench.py --only sweep_decode_shared
# times the shared-prefix kernel's tiles on P's decode step; when the fastest (rel_err < 1e-2)
# beats the first (the default) by 3% or more, the P stage runs with it
# (HPCINFER_SHARED_PREFIX_TILES, kernels/decode_attention.py shared_prefix_config).
# Rows and logs go to RESULTS_DIR. For vLLM beside it in the same machine session, follow with
# the vLLM side of tests/gpu/vllm_side_by_side.sh (WORKLOADS=P), as docs/performance.md says.
#
#   tests/gpu/shared_prefix_checks.sh [RESULTS_DIR]     # default: $OUT if set, else bench/results
#   STAGES=bench,p PROCESSES=3 tests/gpu/shared_prefix_checks.sh
#   STAGES=sweep,p MODES=1 PROCESSES=3 tests/gpu/shared_prefix_checks.sh
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
RESULTS_DIR=${1:-${OUT:-$REPO/bench/results}}
mkdir -p "$RESULTS_DIR"
PY=${PYTHON:-python3}
PROCESSES=${PROCESSES:-2}
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 HPCINFER_GPU_TESTS=1
# shellcheck source=tests/gpu/shim.sh
source "$REPO/tests/gpu/shim.sh"
STAGES=" ${STAGES:-tests bench p} "
STAGES=${STAGES//,/ }
status=0

nvidia-smi --query-gpu=name,memory.total,clocks.sm,power.limit --format=csv
if [[ $STAGES == *" tests "* ]]; then
  timeout "${TEST_TIMEOUT:-150}" "$PY" -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
    -c "$REPO/pyproject.toml" \
    "$REPO/tests/gpu/test_kernels_gpu.py::test_decode_shared_prefix" \
    "$REPO/tests/gpu/test_engine_gpu.py::test_shared_prefix_decode_steps_match_transformers" \
    2>&1 | tee "$RESULTS_DIR/shared-prefix-gpu-tests.log" | tail -15
  rc=${PIPESTATUS[0]}
  echo "shared-prefix GPU tests: exit $rc"
  (( rc == 0 )) || status=1
fi
if [[ $STAGES == *" bench "* ]]; then
  timeout 120 "$PY" "$REPO/bench/kernel_bench.py" --quick --only decode_shared \
    --out "$RESULTS_DIR" 2>&1 | tail -6 || status=1
fi
if [[ $STAGES == *" sweep "* ]]; then
  timeout 240 "$PY" "$REPO/bench/kernel_bench.py" --quick --only sweep_decode_shared \
    --out "$RESULTS_DIR/kernels-shared-sweep.json" 2>&1 | tail -14 || status=1
  best=$("$PY" - "$RESULTS_DIR/kernels-shared-sweep.json" <<'PYEOF'
import json, sys
rows = [r for r in json.load(open(sys.argv[1])) if r.get("ms") and (r.get("rel_err") or 0) < 1e-2]
if rows:
    best = min(rows, key=lambda r: r["ms"])
    if best["ms"] <= 0.97 * rows[0]["ms"]:
        c = best["config"]
        print(f"{c['BLOCK_M']},{c['BLOCK_N']},{c['num_warps']},{c['num_stages']}")
PYEOF
)
  if [[ -n $best ]]; then
    export HPCINFER_SHARED_PREFIX_TILES=$best
    echo "P runs with HPCINFER_SHARED_PREFIX_TILES=$best (the sweep's fastest)"
  else
    echo "P runs with the default tiles (no variant 3% faster)"
  fi
fi
if [[ $STAGES == *" p "* ]]; then
  read -r -a bench_args <<< "${BENCH_ARGS:-}"
  for (( i = 0; i < PROCESSES; i++ )); do
    for on in ${MODES:-1 0}; do
      echo "=== workload P, shared-prefix attention $on, round $(( i + 1 )) of $PROCESSES"
      HPCINFER_SHARED_PREFIX_ATTENTION=$on timeout 200 "$PY" "$REPO/bench/throughput.py" \
        --workloads P --engines hpcinfer --out "$RESULTS_DIR" "${bench_args[@]}" \
        --label "shared-prefix attention $on${HPCINFER_SHARED_PREFIX_TILES:+, tiles $HPCINFER_SHARED_PREFIX_TILES}" 2>&1 \
        | grep -E "^(===|decode steps over|host breakdown|workload P|device|step |mixed|decode_|tail|prefill)" \
        || status=1
    done
  done
fi
exit $status
