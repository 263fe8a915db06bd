#!/usr/bin/env bash
# One device call for issue 8's bf16 agreement: tests/gpu/agreement_probe.py (Triton vs
# torch_ref vs an fp32 truth, free-running and teacher-forced, P@V with P in bf16 vs fp32),
# then decode/prefill kernel timings with P in bf16 (default) and fp32 (tf32x3), twice each,
# then the decode/prefill GPU kernel tests with P in fp32. Results under RESULTS_DIR ($OUT
# on the device machine); each stage is skipped once less than its time is left of BUDGET_S.
#
#   tests/gpu/agreement_probe.sh [RESULTS_DIR]
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
RESULTS_DIR=${1:-${OUT:-$REPO/bench/results}}
BUDGET_S=${BUDGET_S:-400}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
start=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - start) )); }
# shellcheck source=tests/gpu/shim.sh
source "$REPO/tests/gpu/shim.sh"

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
echo "=== probe ($(left) s left)"
timeout "$(( $(left) - 150 ))" "$PY" "$REPO/tests/gpu/agreement_probe.py" "$RESULTS_DIR" \
  2>&1 | tee "$RESULTS_DIR/probe.log"
echo "probe: exit ${PIPESTATUS[0]} at $(( $(date +%s) - start )) s"

for round in 1 2; do
  for pv in default fp32; do
    if (( $(left) < 90 )); then echo "skipped bench $pv $round: $(left) s left"; continue; fi
    unset HPCINFER_PV_FP32
    [[ $pv == fp32 ]] && export HPCINFER_PV_FP32=decode,prefill
    echo "=== bench P $pv round $round ($(left) s left)"
    # Full names: "decode" would also match sweep_decode (run 1 timed the sweeps too).
    timeout 60 "$PY" "$REPO/bench/kernel_bench.py" --quick \
      --only bench_decode,bench_decode_mix,bench_prefill \
      --out "$RESULTS_DIR/kernels-pv-$pv-$round.json" 2>&1 | tee -a "$RESULTS_DIR/bench-pv.log"
  done
done

if (( $(left) > 25 )); then
  echo "=== kernel tests, P fp32 ($(left) s left)"
  HPCINFER_PV_FP32=decode,prefill timeout "$(( $(left) - 5 ))" "$PY" -m pytest \
    "$REPO/tests/gpu/test_kernels_gpu.py" -q -p no:cacheprovider --rootdir "$REPO" \
    -c "$REPO/pyproject.toml" -n 8 -k "decode or prefill or triton_backend" 2>&1 \
    | tee "$RESULTS_DIR/kernel-tests-pv-fp32.log"
fi
echo "done in $(( $(date +%s) - start )) s"
