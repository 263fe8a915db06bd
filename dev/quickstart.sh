#!/usr/bin/env bash
# README quickstart: install hpcinfer into .venv (login-side dependencies only, unless
# dev/setup.sh made it already), render configs/examples/quickstart.yaml, submit it when
# sbatch is on PATH or else run the same rendered job with the local backend (and say so),
# then show what the job wrote. It never starts daemons: no Slurm here means the local backend.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HPCINFER_VENV:-.venv}
JOB=configs/examples/quickstart.yaml
JOB_DIR=results/quickstart

if [ ! -x "$VENV/bin/hpcinfer" ]; then
  echo "quickstart: installing hpcinfer into $VENV (pip install -e .)"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e .
fi
HPCINFER="$VENV/bin/hpcinfer"

echo "quickstart: hpcinfer validate $JOB"
"$HPCINFER" validate "$JOB"
if command -v sbatch >/dev/null 2>&1; then
  echo "quickstart: sbatch found: submitting to Slurm"
  "$HPCINFER" submit "$JOB"
  "$VENV/bin/python" - "$JOB_DIR" <<'PY'
import sys
from hpcinfer.slurm.api import Job
job = Job(sys.argv[1])
print(f"quickstart: waiting for job {job.job_id} ...", flush=True)
print(f"quickstart: job {job.job_id} finished: {job.wait(timeout_s=900)}")
PY
else
  echo "quickstart: no Slurm here (sbatch not on PATH): running the same job with the local backend (hpcinfer run --local)"
  "$HPCINFER" run "$JOB" --local
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
