#!/usr/bin/env bash
# LoRA launch tuning in one GPU call (issue 23): sweep the shrink/expand launch configs
# (bench/kernel_bench.py --only lora,lora_tiles), then bench/lora.py on workload A with the
# default launches and with the ones the sweep picks (--tiles-from), against the same
# no-LoRA baseline, REPS timed reps each (median). Writes kernels-*.json and lora-*.json
# under RESULTS_DIR (default $OUT, else bench/results).
#
#   bash tests/gpu/lora_tune.sh [RESULTS_DIR]
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
RESULTS_DIR=${1:-${OUT:-$REPO/bench/results}}
PY=${PYTHON:-python3}
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
# shellcheck source=tests/gpu/shim.sh
source "$REPO/tests/gpu/shim.sh"
slug=$("$PY" -c 'import re, torch; print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-"))')
sweep="$RESULTS_DIR/kernels-lora-$slug-$(date -u +%F).json"
start=$(date +%s)
"$PY" "$REPO/bench/kernel_bench.py" --quick --only lora,lora_tiles --out "$sweep" 2>&1 | tail -n 80
sweep_rc=${PIPESTATUS[0]}
echo "sweep: exit $sweep_rc in $(( $(date +%s) - start )) s"
start=$(date +%s)
"$PY" "$REPO/bench/lora.py" --workload A --reps "${REPS:-3}" --tiles-from "$sweep" \
  --out "$RESULTS_DIR" 2>&1 | grep -v "incorrect regex pattern"
bench_rc=${PIPESTATUS[0]}
echo "lora bench: exit $bench_rc in $(( $(date +%s) - start )) s"
exit $(( sweep_rc != 0 || bench_rc != 0 ))
