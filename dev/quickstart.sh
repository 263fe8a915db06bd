#!/usr/bin/env bash
# README quickstart: install hpcinfer into .venv (unless dev/setup.sh made it already), build
# a tiny random checkpoint locally (no hub access needed: this machine and compute nodes may
# have none), render configs/examples/quickstart.yaml with it, submit it when sbatch is on
# PATH or else run the same rendered job with the local backend (and say so), then collect
# the outputs and print the generated text. It never starts daemons.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HPCINFER_VENV:-.venv}
JOB=configs/examples/quickstart.yaml
JOB_DIR=results/quickstart
MODEL_DIR=$PWD/results/quickstart-model/tiny-llama

if [ ! -x "$VENV/bin/hpcinfer" ]; then
  echo "quickstart: installing hpcinfer into $VENV (pip install -e .[compute], CPU torch)"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  "$VENV/bin/python" -m pip install -q -e ".[compute]"
fi
HPCINFER="$VENV/bin/hpcinfer"

if [ ! -f "$MODEL_DIR/model.safetensors.index.json" ]; then
  echo "quickstart: no hub access assumed: building a tiny random llama checkpoint locally in"
  echo "            $MODEL_DIR (its text is gibberish; see the README for a real model)"
  "$VENV/bin/python" -c 'import sys; from hpcinfer.testing.tiny import build_tiny_checkpoint
build_tiny_checkpoint("llama", sys.argv[1])' "$MODEL_DIR" 2>/dev/null
fi
SET=(--set "model.id=$MODEL_DIR")

echo "quickstart: hpcinfer validate $JOB ${SET[*]}"
"$HPCINFER" validate "$JOB" "${SET[@]}"
if command -v sbatch >/dev/null 2>&1; then
  echo "quickstart: sbatch found: submitting to Slurm"
  "$HPCINFER" submit "$JOB" "${SET[@]}"
  "$VENV/bin/python" - "$JOB_DIR" <<'PY'
import sys
from hpcinfer.slurm.api import Job
job = Job(sys.argv[1])
print(f"quickstart: waiting for job {job.job_id} ...", flush=True)
print(f"quickstart: job {job.job_id} finished: {job.wait(timeout_s=900)}")
PY
else
  echo "quickstart: no Slurm here (sbatch not on PATH): running the same job with the local backend (hpcinfer run --local)"
  "$HPCINFER" run "$JOB" --local "${SET[@]}"
fi

echo
echo "quickstart: what the job wrote in $JOB_DIR:"
ls -l "$JOB_DIR" "$JOB_DIR/logs" "$JOB_DIR/metrics"
echo
"$HPCINFER" status "$JOB_DIR"
echo
job_id=$("$VENV/bin/python" -c 'import sys; from hpcinfer.slurm.records import last_submission; print(last_submission(sys.argv[1])["job_id"])' "$JOB_DIR")
for log in "$JOB_DIR"/logs/slurm-"$job_id"*.out; do
  echo "==> $log <=="
  tail -n 4 "$log"
done
echo
"$HPCINFER" collect "$JOB_DIR"
echo "quickstart: generated text (from $JOB_DIR/outputs/):"
"$VENV/bin/python" - "$JOB_DIR/outputs" <<'PY'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("[0-9]*.jsonl")):
    for line in path.read_text().splitlines():
        r = json.loads(line)
        print(f"  {r['id']}: {r['text']!r}  ({r['num_output_tokens']} tokens, {r['finish_reason']})")
PY
