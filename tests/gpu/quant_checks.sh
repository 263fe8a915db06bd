#!/usr/bin/env bash
# Issue 20 on a GPU, in stages that each fit one 10-minute device call (STAGES picks them,
# space- or comma-separated; default "kernels"). Writes logs and JSON to RESULTS_DIR.
#
#   kernels     tests/gpu/test_quant_gpu.py (W4A16 incl. split-K and CUDA graphs, FP8), then
#               bench/kernel_bench.py's quant_gemm rows: 8B and 70B projections at M 1/16/64/256/2048
#               next to the bf16 GEMM, each quantized path timed as the layer calls it
#               (*_linear rows, activation quantization included) and as the GEMM alone
#               (QUANT_MODELS=8B: the 8B shapes only, about half the time)       (~4-6 min)
#   sweep       bench/kernel_bench.py --only w4a16: W4A16 tile x split-K variants at decode M (~5 min)
#   kv          the FP8 KV cache: its GPU tests (e4m3 write vs torch's cast, decode and prefill
#               on e4m3 caches vs the reference), then bench/kernel_bench.py --only decode_mix
#               (workload B's 1000-row decode step on a bf16 and an e4m3 cache)  (~2-3 min)
#   throughput  workload B (Llama-3.1-8B shape, 1000 prompts), hpcinfer only, every variant
#               with load_format=dummy (same weights source, nothing written to disk):
#               VARIANTS (default "bf16 fp8 fp8-kvfp8 awq"; each up to THROUGHPUT_TIMEOUT=140 s;
#               split over two calls if needed: VARIANTS="bf16 fp8", VARIANTS="fp8-kvfp8 awq")
#               fp8 = online FP8 (W8A8), kvfp8 = FP8 KV cache, awq = W4A16 (AWQ group 128)
#   70b         workload L: Llama-3.1-70B shape, W4A16 (awq), 256 prompts, one GPU  (~5-8 min)
#   agreement   bench/real_model_agreement.py --quant --copy-model: the project's copy model
#               (trained on the GPU first, ~1-3 min) greedy on workload A's prompts, bf16 vs
#               online fp8, fp8 + fp8 KV cache, W4A16 (its weights quantized to 4 bits);
#               AGREEMENT_MODEL="--model-dir DIR" for another checkpoint (SmolLM2's 98 MB
#               GGUF does not fit a carry)                                          (~3-5 min)
#
#   STAGES=kernels tests/gpu/quant_checks.sh [RESULTS_DIR]   # default: $OUT, else bench/results
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
RESULTS_DIR=${1:-${OUT:-$REPO/bench/results}}
mkdir -p "$RESULTS_DIR"
PY=${PYTHON:-python3}
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 HPCINFER_GPU_TESTS=1
# shellcheck source=tests/gpu/shim.sh
source "$REPO/tests/gpu/shim.sh"
STAGES=" ${STAGES:-kernels} "
STAGES=${STAGES//,/ }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

if [[ $STAGES == *" kernels "* ]]; then
  parallel=()
  if "$PY" -c 'import xdist' 2>/dev/null; then parallel=(-n 8); fi
  start=$(date +%s)
  timeout "${TEST_TIMEOUT:-240}" "$PY" -m pytest "$REPO/tests/gpu/test_quant_gpu.py" -q \
    -p no:cacheprovider --rootdir "$REPO" -c "$REPO/pyproject.toml" "${parallel[@]}" \
    --durations=5 2>&1 | tee "$RESULTS_DIR/quant-gpu-tests.log" | tail -15
  echo "quant GPU tests: exit ${PIPESTATUS[0]} in $(( $(date +%s) - start )) s"

  start=$(date +%s)
  timeout "${BENCH_TIMEOUT:-240}" "$PY" "$REPO/bench/kernel_bench.py" --only copy,quant_gemm \
    ${QUANT_MODELS:+--quant-models "$QUANT_MODELS"} \
    --out "$RESULTS_DIR" > "$RESULTS_DIR/quant-kernels.log" 2>&1
  echo "bench: exit $? in $(( $(date +%s) - start )) s"
  grep -E "^(kernel|device_copy|bf16_gemm|w4a16|fp8)" "$RESULTS_DIR/quant-kernels.log" | tail -400
fi

if [[ $STAGES == *" kv "* ]]; then
  start=$(date +%s)
  timeout "${TEST_TIMEOUT:-240}" "$PY" -m pytest "$REPO/tests/gpu/test_quant_gpu.py" -q \
    -p no:cacheprovider --rootdir "$REPO" -c "$REPO/pyproject.toml" -k fp8_kv_cache 2>&1 \
    | tee "$RESULTS_DIR/gpu-tests-fp8-kv.log"
  echo "kv tests: exit ${PIPESTATUS[0]} in $(( $(date +%s) - start )) s"
  start=$(date +%s)
  timeout "${BENCH_TIMEOUT:-240}" "$PY" "$REPO/bench/kernel_bench.py" --quick --only decode_mix \
    --out "$RESULTS_DIR/kernels-decode-mix-fp8-kv.json" 2>&1 | grep -v "incorrect regex" \
    | tee "$RESULTS_DIR/kernels-decode-mix-fp8-kv.log"
  echo "kv bench: exit ${PIPESTATUS[0]} in $(( $(date +%s) - start )) s"
fi

if [[ $STAGES == *" sweep "* ]]; then
  start=$(date +%s)
  timeout "${SWEEP_TIMEOUT:-500}" "$PY" "$REPO/bench/kernel_bench.py" --only w4a16 \
    --out "$RESULTS_DIR/quant-w4a16-sweep.json" > "$RESULTS_DIR/quant-w4a16-sweep.log" 2>&1
  echo "w4a16 sweep: exit $? in $(( $(date +%s) - start )) s"
  grep -E "^w4a16_gemm:sweep" "$RESULTS_DIR/quant-w4a16-sweep.log" | tail -400
fi

run_throughput() {   # variant workload timeout [extra args...]
  local variant=$1 workload=$2 limit=$3; shift 3
  local quant=${variant%%-*} kv=auto
  [[ $quant == bf16 ]] && quant=""
  [[ $variant == *kvfp8 ]] && kv=fp8
  local start; start=$(date +%s)
  BENCH_QUANTIZATION=$quant BENCH_KV_CACHE_DTYPE=$kv BENCH_LOAD_FORMAT=dummy \
    timeout "$limit" "$PY" "$REPO/bench/throughput.py" --workloads "$workload" \
    --engines hpcinfer --out "$RESULTS_DIR" --label "issue 20: $variant, load_format dummy" \
    "$@" > "$RESULTS_DIR/quant-throughput-$workload-$variant.log" 2>&1
  echo "throughput $workload $variant: exit $? in $(( $(date +%s) - start )) s"
  grep -E "^===|start-up|KV pool|load_format|Error|error" \
    "$RESULTS_DIR/quant-throughput-$workload-$variant.log" | tail -8
}

if [[ $STAGES == *" throughput "* ]]; then
  for variant in ${VARIANTS:-bf16 fp8 fp8-kvfp8 awq}; do
    run_throughput "$variant" B "${THROUGHPUT_TIMEOUT:-140}"
  done
fi

if [[ $STAGES == *" 70b "* ]]; then
  run_throughput "${W4A16_METHOD:-awq}" L "${L_TIMEOUT:-540}" \
    ${L_PROMPTS:+--num-prompts "$L_PROMPTS"}
fi

if [[ $STAGES == *" agreement "* ]]; then
  start=$(date +%s)
  read -r -a agreement_model <<< "${AGREEMENT_MODEL:---copy-model}"
  timeout "${AGREEMENT_TIMEOUT:-540}" "$PY" "$REPO/bench/real_model_agreement.py" --quant \
    "${agreement_model[@]}" --out "$RESULTS_DIR" 2>&1 | tee "$RESULTS_DIR/quant-agreement.log" | tail -20
  echo "agreement: exit ${PIPESTATUS[0]} in $(( $(date +%s) - start )) s"
fi
