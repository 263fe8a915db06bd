#!/usr/bin/env bash
# Issue 20 on a GPU: the quantized GEMM kernels at full shapes (tests/gpu/test_quant_gpu.py),
# their bench/kernels.py rows next to the bf16 GEMM of the same shape, then (THROUGHPUT=1)
# workload B bf16 vs online FP8 (BENCH_QUANTIZATION=fp8). Writes logs and JSON to RESULTS_DIR.
#
#   tests/gpu/quant_checks.sh [RESULTS_DIR]     # default: $OUT if set, else bench/results
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
RESULTS_DIR=${1:-${OUT:-$REPO/bench/results}}
PY=${PYTHON:-python3}
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 HPCINFER_GPU_TESTS=1
# shellcheck source=tests/gpu/shim.sh
source "$REPO/tests/gpu/shim.sh"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
parallel=()
if "$PY" -c 'import xdist' 2>/dev/null; then parallel=(-n 8); fi
start=$(date +%s)
timeout "${TEST_TIMEOUT:-150}" "$PY" -m pytest "$REPO/tests/gpu/test_quant_gpu.py" -q \
  -p no:cacheprovider --rootdir "$REPO" -c "$REPO/pyproject.toml" "${parallel[@]}" \
  --durations=5 2>&1 | tee "$RESULTS_DIR/quant-gpu-tests.log" | tail -15
echo "quant GPU tests: exit ${PIPESTATUS[0]} in $(( $(date +%s) - start )) s"

start=$(date +%s)
timeout "${BENCH_TIMEOUT:-120}" "$PY" "$REPO/bench/kernels.py" --only copy,quant_gemm \
  --out "$RESULTS_DIR" > "$RESULTS_DIR/quant-kernels.log" 2>&1
echo "bench: exit $? in $(( $(date +%s) - start )) s"
grep -E "^(kernel|device_copy|bf16_gemm|w4a16|fp8)" "$RESULTS_DIR/quant-kernels.log" | tail -40

if [[ ${THROUGHPUT:-0} == 1 ]]; then
  for quant in "" fp8; do
    start=$(date +%s)
    BENCH_QUANTIZATION=$quant timeout "${THROUGHPUT_TIMEOUT:-170}" "$PY" \
      "$REPO/bench/throughput.py" --workloads B --engines hpcinfer --out "$RESULTS_DIR" \
      --label "issue 20: ${quant:-bf16}" > "$RESULTS_DIR/quant-throughput-${quant:-bf16}.log" 2>&1
    echo "throughput ${quant:-bf16}: exit $? in $(( $(date +%s) - start )) s"
    grep -E "^===|start-up|KV pool" "$RESULTS_DIR/quant-throughput-${quant:-bf16}.log"
  done
fi
