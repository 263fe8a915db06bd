#!/usr/bin/env bash
# One device call for issue 8's workload-B follow-up: B with the per-step-kind breakdown at
# several max_num_seqs / max_num_batched_tokens settings (same prompts, same machine), and
# the bf16 agreement tests (free-running, teacher-forced, larger LM-head std). Everything is
# written under RESULTS_DIR ($OUT on the device machine). Variants run in priority order and
# are skipped once less than ~90 s of BUDGET_S (default 570) is left.
#
#   tests/gpu/b_levers.sh [RESULTS_DIR]
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
RESULTS_DIR=${1:-${OUT:-$REPO/bench/results}}
BUDGET_S=${BUDGET_S:-570}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
start=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - start) )); }

bench_b() {   # label, extra args
  local label=$1; shift
  if (( $(left) < 90 )); then echo "skipped B $label: $(left) s left"; return; fi
  echo "=== B $label ($(left) s left)"
  timeout "$(( $(left) - 5 ))" "$PY" "$REPO/bench/throughput.py" --workloads B \
    --engines hpcinfer --out "$RESULTS_DIR" --step-breakdown --label "levers: $label" "$@"
}

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,power.limit --format=csv
bench_b "seqs 512, tokens 8192 (default)"
bench_b "seqs 1024, tokens 8192" --max-num-seqs 1024
if (( $(left) > 150 )); then
  echo "=== agreement tests ($(left) s left)"
  HPCINFER_GPU_RESULTS=$RESULTS_DIR GPU_TESTS="tests/gpu/test_engine_gpu.py::test_bf16_agreement_teacher_forced_and_free tests/gpu/test_engine_gpu.py::test_bf16_real_shape_agrees_with_torch_ref" \
    SKIP_KERNEL_BENCH=1 PYTEST_ADDOPTS="-s" timeout "$(( $(left) - 100 ))" \
    "$REPO/tests/gpu/run_gpu_checks.sh" "$RESULTS_DIR"
fi
bench_b "seqs 768, tokens 8192" --max-num-seqs 768
bench_b "seqs 512, tokens 16384" --max-num-batched-tokens 16384
bench_b "seqs 1024, tokens 16384" --max-num-seqs 1024 --max-num-batched-tokens 16384
echo "done in $(( $(date +%s) - start )) s"
