#!/usr/bin/env bash
# Issue 20 on a GPU: the quantized GEMM kernels at full shapes (tests/gpu/test_quant_gpu.py),
# their bench/kernels.py rows next to the bf16 GEMM of the same shape, then (THROUGHPUT=1)
# workload B bf16 vs online FP8 (BENCH_QUANTIZATION=fp8) vs online FP8 with an FP8 KV cache
# (BENCH_KV_CACHE_DTYPE=fp8). Writes logs and JSON to RESULTS_DIR.
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
  for variant in bf16 fp8 fp8-kvfp8; do
    quant=${variant%%-*}; [[ $quant == bf16 ]] && quant=""
    kv=auto; [[ $variant == *kvfp8 ]] && kv=fp8
    start=$(date +%s)
    BENCH_QUANTIZATION=$quant BENCH_KV_CACHE_DTYPE=$kv timeout "${THROUGHPUT_TIMEOUT:-170}" \
      "$PY" "$REPO/bench/throughput.py" --workloads B --engines hpcinfer --out "$RESULTS_DIR" \
      --label "issue 20: $variant" > "$RESULTS_DIR/quant-throughput-$variant.log" 2>&1
    echo "throughput $variant: exit $? in $(( $(date +%s) - start )) s"
    grep -E "^===|start-up|KV pool" "$RESULTS_DIR/quant-throughput-$variant.log"
  done
fi
