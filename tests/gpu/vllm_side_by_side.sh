#!/usr/bin/env bash
# Issue 22 item 1: hpcinfer and vLLM 0.25.0 side by side on one GPU machine, in two device calls
# (../shared/recipes/vllm-peer.md: each command carries at most 64 MiB, so vLLM's packed site
# directory travels in two pieces, one per call; the machine stays warm ~30 s after a call, so
# send call 2 right after call 1 returns). Run on an H200 on 2026-12-04 (docs/performance.md):
# call 1 took 363 s (A, B, P x 3 processes, the 8B checkpoint written in 21 s); call 2 ran out
# of its 570 s during P (vLLM's first process per model shape spends ~50 s in torch.compile, and
# every vLLM process ~20 s importing), so a third call on the warm machine finished it:
#   run(command="WORKLOADS=P PROCESSES=2 BUDGET_S=240 bash tests/gpu/vllm_side_by_side.sh vllm")
#
#   tests/gpu/vllm_side_by_side.sh hpcinfer [RESULTS_DIR]  # call 1: stash part-aa, hpcinfer side
#   tests/gpu/vllm_side_by_side.sh vllm [RESULTS_DIR]      # call 2: unpack aa+ab, vLLM side
#
# Before the calls (on the login machine, once): the pieces in .vsite/ (ignored via
# .git/info/exclude): bash ../shared/recipes/vllm-peer.sh .vsite
# The device calls (`run` tool, kind nvidia-h200), each under 10 minutes:
#   call 1: run(command="bash tests/gpu/vllm_side_by_side.sh hpcinfer",
#               carry=[".vsite/site.tar.xz.part-aa"], timeout_s=600)
#   call 2: run(command="bash tests/gpu/vllm_side_by_side.sh vllm",
#               carry=[".vsite/site.tar.xz.part-ab"], timeout_s=600)
# Rows go to RESULTS_DIR ($OUT on the device machine, default bench/results), one per engine,
# workload and process (bench/throughput.py --processes); the log is RESULTS_DIR/<side>.log.
# Both calls write the checkpoints to the same /tmp/hpcinfer-bench (seeded: identical if the
# machine was released in between and call 2 has to rewrite them) and use the same prompt ids.
# Call 1 leaves hpcinfer's first tokens in /tmp/hpcinfer-bench/first-tokens-*.json; call 2
# prints vLLM's first-token agreement with them (lost if the machine was released in between).
# Environment: WORKLOADS (default A,B,P), PROCESSES (3), BUDGET_S (570: workloads that would
# start with less than 60 s left are skipped, and a workload is cut off at the budget: rows
# of finished processes are already written), ENGINES_EXTRA (e.g. ",transformers" on call 1),
# REPS (1: timed reps per process, the row keeps each one's rate, the step loop's CPU
# placement per rep, and reports the median rep).
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SIDE=${1:?"usage: $0 hpcinfer|vllm [RESULTS_DIR]"}
RESULTS_DIR=${2:-${OUT:-$REPO/bench/results}}
WORKLOADS=${WORKLOADS:-A,B,P}
PROCESSES=${PROCESSES:-3}
BUDGET_S=${BUDGET_S:-570}
REPS=${REPS:-1}
PY=${PYTHON:-python3}
PARTS=/tmp/parts
SITE=/tmp/site
export PYTHONUNBUFFERED=1
start=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - start) )); }
mkdir -p "$RESULTS_DIR"
exec > >(tee -a "$RESULTS_DIR/$SIDE.log") 2>&1
# hpcinfer need not be pip-installed: shim.sh links the package and kernels/ into one tree,
# puts it first on PYTHONPATH and cds there.
# shellcheck source=tests/gpu/shim.sh
source "$REPO/tests/gpu/shim.sh"

case $SIDE in
  hpcinfer)
    mkdir -p "$PARTS"
    if [[ -f "$REPO/.vsite/site.tar.xz.part-aa" ]]; then
      cp "$REPO/.vsite/site.tar.xz.part-aa" "$PARTS/" && echo "stashed part-aa in $PARTS"
    else
      echo "no .vsite/site.tar.xz.part-aa carried: call 2 will not find vLLM's first piece"
    fi
    ENGINES="hpcinfer${ENGINES_EXTRA:-}"
    ;;
  vllm)
    if [[ ! -d "$SITE/vllm" ]]; then
      if [[ ! -f "$PARTS/site.tar.xz.part-aa" || ! -f "$REPO/.vsite/site.tar.xz.part-ab" ]]; then
        echo "vLLM site missing: needs $PARTS/site.tar.xz.part-aa (call 1 on this warm machine)"
        echo "and .vsite/site.tar.xz.part-ab carried by this call; see the header"
        exit 2
      fi
      t0=$(date +%s)
      cat "$PARTS/site.tar.xz.part-aa" "$REPO/.vsite/site.tar.xz.part-ab" | tar -xJf - -C /tmp \
        || { echo "unpacking vLLM's site failed"; exit 2; }
      echo "unpacked vLLM's site to $SITE in $(( $(date +%s) - t0 )) s"
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    export VLLM_USE_FLASHINFER_SAMPLER=0   # flashinfer is not shipped (vllm-peer.md)
    ENGINES="vllm"
    ;;
  *) echo "usage: $0 hpcinfer|vllm [RESULTS_DIR]"; exit 2 ;;
esac

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,power.limit --format=csv
"$PY" -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
status=0
IFS=, read -ra wls <<< "$WORKLOADS"
for wl in "${wls[@]}"; do
  if (( $(left) < 60 )); then echo "skipped $SIDE on $wl: $(left) s left"; status=3; continue; fi
  echo "=== $SIDE on workload $wl, $PROCESSES processes ($(left) s left)"
  timeout "$(( $(left) - 5 ))" "$PY" "$REPO/bench/throughput.py" --workloads "$wl" \
    --engines "$ENGINES" --processes "$PROCESSES" --reps "$REPS" --out "$RESULTS_DIR" \
    --label "issue 22 side by side: $SIDE" || { echo "$SIDE on $wl: exit $?"; status=1; }
done
echo "done in $(( $(date +%s) - start )) s"
exit $status
