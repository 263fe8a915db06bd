#!/usr/bin/env bash
# Issue 24 on one GPU, sized for one 10-minute device call (about 7-9 minutes on an H200):
#   1. tests/gpu/test_vision_gpu.py: the tiny LLaVA, Qwen2-VL, Qwen2.5-VL and Gemma 3
#      checkpoints, fp32, Triton attention (+ decode CUDA graphs, replayed for all four):
#      greedy tokens equal to transformers on the same GPU; chunked prefill through image
#      spans (Gemma 3's bidirectional spans kept whole by the scheduler) (TEST_TIMEOUT, 150 s)
#   2. bench/vision.py workload V: Qwen2.5-VL-7B shape, bf16, 500 synthetic 448x448 images x
#      128 output tokens; hpcinfer on all 500, then transformers (static generate, batches of
#      HF_BATCH) until HF_BUDGET_S seconds have passed (the row says subset=true and how many
#      images it timed when it stops early); the checkpoint (16.6 GB) is written first, on the
#      GPU                                                             (BENCH_TIMEOUT, 400 s)
# Logs and bench/results-style JSON (vision-<device>-<date>.json) go to RESULTS_DIR.
#
#   tests/gpu/vision_checks.sh [RESULTS_DIR]     # default: $OUT if set, else bench/results
#   STAGES=bench tests/gpu/vision_checks.sh      # one stage: tests | bench | diagnose
#   STAGES=diagnose ...: hpcinfer alone with --sync-debug and a trace of all 500 images, its
#      GPU gaps by size and the host ops in the largest (bench/trace_gaps.py); not by default
#   HF_IMAGES=128 tests/gpu/vision_checks.sh     # transformers on a fixed subset instead
#
# Needs torch, triton, transformers, safetensors and pillow (no torchvision, pydantic or peft:
# both engines use transformers' PIL image processor); hpcinfer need not be pip-installed (the
# shim maps kernels/ to hpcinfer.kernels). Not part of CI.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
RESULTS_DIR=${1:-${OUT:-$REPO/bench/results}}
mkdir -p "$RESULTS_DIR"
PY=${PYTHON:-python3}
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 HPCINFER_GPU_TESTS=1
# shellcheck source=tests/gpu/shim.sh
source "$REPO/tests/gpu/shim.sh"
STAGES=" ${STAGES:-tests bench} "
STAGES=${STAGES//,/ }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton",
triton.__version__, "transformers", transformers.__version__)' || exit 1

tests_rc=0
if [[ $STAGES == *" tests "* ]]; then
  start=$(date +%s)
  timeout "${TEST_TIMEOUT:-150}" "$PY" -m pytest "$REPO/tests/gpu/test_vision_gpu.py" -q \
    -p no:cacheprovider --rootdir "$REPO" -c "$REPO/pyproject.toml" --durations=5 2>&1 \
    | tee "$RESULTS_DIR/vision-gpu-tests.log" | tail -25
  tests_rc=${PIPESTATUS[0]}
  echo "vision GPU tests: exit $tests_rc in $(( $(date +%s) - start )) s"
fi

bench_rc=0
if [[ $STAGES == *" bench "* ]]; then
  start=$(date +%s)
  timeout "${BENCH_TIMEOUT:-400}" "$PY" "$REPO/bench/vision.py" --out "$RESULTS_DIR" \
    --hf-batch-size "${HF_BATCH:-256}" --hf-time-budget-s "${HF_BUDGET_S:-120}" \
    ${HF_IMAGES:+--hf-images "$HF_IMAGES"} \
    > "$RESULTS_DIR/vision-bench.log" 2>&1
  bench_rc=$?
  echo "vision bench: exit $bench_rc in $(( $(date +%s) - start )) s"
  grep -E "^(===|---|workload|hpcinfer (start-up|warm-up)|transformers: |hpcinfer / |rows in)|Error|error" \
    "$RESULTS_DIR/vision-bench.log" | tail -20
fi
diagnose_rc=0
if [[ $STAGES == *" diagnose "* ]]; then
  # where workload V's GPU still waits: hpcinfer alone, then the same generate under torch's
  # sync debug mode (host waits through torch calls) and a trace of all its images read with
  # bench/trace_gaps.py here (the trace itself stays on the machine: tens of MiB)
  start=$(date +%s)
  timeout "${DIAGNOSE_TIMEOUT:-300}" "$PY" "$REPO/bench/vision.py" --engines hpcinfer \
    --out "$RESULTS_DIR" --sync-debug --trace /tmp/vision-trace.json.gz --trace-images 500 \
    --label "diagnose: --sync-debug, trace of all images" \
    > "$RESULTS_DIR/vision-diagnose.log" 2>&1
  diagnose_rc=$?
  grep -E "^(===|sync points|  +[0-9]+x|hpcinfer steps)" "$RESULTS_DIR/vision-diagnose.log"
  "$PY" "$REPO/bench/trace_gaps.py" /tmp/vision-trace.json.gz --top 25 \
    | tee "$RESULTS_DIR/vision-trace-gaps.txt"
  echo "vision diagnose: exit $diagnose_rc in $(( $(date +%s) - start )) s"
fi
exit $(( tests_rc != 0 || bench_rc != 0 || diagnose_rc != 0 ))
