#!/usr/bin/env bash
# Multi-GPU checks for issue 11, on one host with >= 2 GPUs (nvidia-h200-x2). Not part of CI.
#
#   tests/gpu/multi_gpu_checks.sh [OUT_DIR]        # default: $OUT if set, else bench/results
#   STEPS="fp32 bf16 bench" (default: all three; each may be run alone, e.g. STEPS=bench)
#
#   fp32   tiny models of every family: greedy tokens at TP=2 and PP=2 (SPMD: every rank
#          builds the same LLM, launched by mpirun -n 2 when mpirun and mpi4py are there,
#          else torchrun --nproc-per-node 2) equal one GPU's exactly; NCCL between the ranks.
#   bf16   workload A's widths (Llama-3.2-1B) and prompts: TP=2 vs TP=1 greedy tokens,
#          agreement over the first 32 steps (position-wise %, and the share of tokens before
#          each sequence's first divergence; the reference's top-2 gap where they diverge),
#          on a copy-trained model (>= 99% required) and a random one (BF16_MODELS).
#   bench  bench/throughput.py --workloads B --tp 2 --pp 2 --dp 2: TP=1 baseline, then TP=2,
#          PP=2 and 2 data-parallel replicas, in one run (BENCH_ARGS replaces those flags).
#
# Verdicts and logs go to OUT_DIR (fp32-verdict.json, bf16-agreement.json, *.log, the bench
# results file). NVLink multicast stays off (the device notes: it can take the host's GPUs
# out of service); the variables below are exported so every rank and replica inherits them.
# hpcinfer need not be pip-installed: a shim maps kernels/ to hpcinfer.kernels, as in
# run_gpu_checks.sh.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT_DIR=${1:-${OUT:-$REPO/bench/results}}
STEPS=${STEPS:-fp32 bf16 bench}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN} TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# Checkpoints (tiny ones and a 2.5 GB bf16 one) live outside OUT_DIR and are reused by later runs.
export CKPT_ROOT=${CKPT_ROOT:-/tmp/hpcinfer-multi-gpu}
export BF16_MODEL=trained   # set per bf16 run below; exported so mpirun -x passes it on

# shellcheck source=tests/gpu/shim.sh
source "$REPO/tests/gpu/shim.sh"
export PYTHONPATH="$PYTHONPATH:$REPO/bench"

nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
num_gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())') || exit 1
if (( num_gpus < 2 )); then
  echo "multi_gpu_checks: $num_gpus GPU(s) visible, 2 needed: run on nvidia-h200-x2" >&2
  exit 2
fi

if command -v mpirun >/dev/null && "$PY" -c 'import mpi4py' 2>/dev/null; then
  launch=(mpirun --allow-run-as-root --oversubscribe -n 2 -x PYTHONPATH -x NCCL_NVLS_ENABLE
          -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x NVSHMEM_DISABLE_NVLS -x NCCL_DEBUG
          -x TORCH_NCCL_ASYNC_ERROR_HANDLING -x TRITON_INTERPRET -x HF_HUB_OFFLINE -x CKPT_ROOT
          -x BF16_MODEL "$PY")
else
  launch=("$PY" -m torch.distributed.run --standalone --nproc-per-node 2)
fi
echo "two-rank launcher: ${launch[*]}"

# One script for every check; modes: ref (one process), spmd (every rank), bf16-ref, bf16-tp2.
cat > "$SCRATCH/check.py" <<'PYEOF'
import json, os, sys, time
import torch
from hpcinfer import LLM, SamplingParams

mode, out = sys.argv[1], sys.argv[2]
FAMILIES = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma", "opt"]
TINY = dict(device="cuda", dtype="float32", block_size=16, num_gpu_blocks_override=12,
            max_model_len=128, enable_prefix_caching=True)
rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("RANK", "0")))

def tiny_paths():
    from hpcinfer.testing.tiny import build_tiny_checkpoint
    root = os.path.join(os.environ["CKPT_ROOT"], "tiny")
    return {f: str(build_tiny_checkpoint(f, os.path.join(root, f))) for f in FAMILIES}

def tiny_tokens(path, **parallel):
    from hpcinfer.testing.distributed import MAX_TOKENS, PROMPTS
    llm = LLM(path, **TINY, **parallel)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                                ignore_eos=True), use_tqdm=False)
    engine = llm.llm_engine
    return ([o.outputs[0].token_ids for o in outs],
            {"preemptions": engine.num_preemptions, "prefix_hits": engine.prefix_cache_hits})

def bf16_setup():
    """Workload A's prompts and the BF16_MODEL checkpoint: "trained" = workload A's widths,
    4 layers, copy-trained here (hpcinfer/testing/copy_model.py; the first, one-process step
    trains it, the TP=2 ranks reuse it), "random" = the same widths with random weights."""
    import throughput
    prompts = [{"prompt_token_ids": p} for p, _ in throughput.make_requests("A")]
    if os.environ["BF16_MODEL"] == "random":
        shape = dict(throughput.SHAPES["llama-3.2-1b"], tie_word_embeddings=False)
        ckpt = throughput.write_checkpoint(
            os.path.join(os.environ["CKPT_ROOT"], "llama1b-untied"), shape,
            lm_head_std=3 * shape["hidden_size"] ** -0.5)
        return str(ckpt), prompts, None
    from hpcinfer.testing.copy_model import workload_a_copy_checkpoint
    ckpt, stats = workload_a_copy_checkpoint(os.path.join(os.environ["CKPT_ROOT"], "copy1b4"))
    return str(ckpt), prompts, stats

def bf16_run(tp, logprobs=None):
    ckpt, prompts, _ = bf16_setup()
    llm = LLM(ckpt, device="cuda", dtype="bfloat16", max_model_len=512, max_num_seqs=256,
              tensor_parallel_size=tp)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True,
                                                logprobs=logprobs), use_tqdm=False)
    return outs

if mode == "ref":          # one process, one GPU: the references
    paths = tiny_paths()
    refs = {f: dict(zip(("tokens", "stats"), tiny_tokens(p)), path=p) for f, p in paths.items()}
    json.dump(refs, open(out, "w"))
elif mode == "spmd":       # every rank: TP=2 and PP=2 for every family
    refs = json.load(open(sys.argv[3]))
    verdict = {}
    for family, ref in refs.items():
        for name, kw in (("tp2", {"tensor_parallel_size": 2}),
                         ("pp2", {"pipeline_parallel_size": 2})):
            t0 = time.time()
            tokens, stats = tiny_tokens(ref["path"], **kw)
            same = sum(a == b for a, b in zip(tokens, ref["tokens"]))
            verdict[f"{family}/{name}"] = {"equal": tokens == ref["tokens"],
                                           "prompts_equal": f"{same}/{len(tokens)}",
                                           **stats, "seconds": round(time.time() - t0, 1)}
            print(f"rank {rank} {family} {name}: {verdict[f'{family}/{name}']}", flush=True)
    if rank == 0:
        json.dump(verdict, open(out, "w"), indent=1)
elif mode == "bf16-ref":
    outs = bf16_run(1, logprobs=2)
    json.dump([{"tokens": o.outputs[0].token_ids,
                "top2_gaps": [(lambda v: v[0] - v[1])(sorted((x.logprob for x in lp.values()),
                                                             reverse=True))
                              for lp in o.outputs[0].logprobs]} for o in outs], open(out, "w"))
elif mode == "bf16-tp2":   # every rank (SPMD); rank 0 compares with the reference
    outs = bf16_run(2)
    if rank == 0:
        ref = json.load(open(sys.argv[3]))
        got = [o.outputs[0].token_ids for o in outs]
        total = sum(len(r["tokens"]) for r in ref)
        same = sum(a == b for g, r in zip(got, ref) for a, b in zip(g, r["tokens"]))
        before, gaps = 0, []
        for g, r in zip(got, ref):
            d = next((j for j, (a, b) in enumerate(zip(g, r["tokens"])) if a != b), len(g))
            before += d
            if d < len(g):
                gaps.append(round(r["top2_gaps"][d], 4))
        _, _, stats = bf16_setup()
        result = {"model": os.environ["BF16_MODEL"], "training": stats,
                  "position_wise_agreement_pct": 100 * same / total,
                  "tokens_before_first_divergence_pct": 100 * before / total,
                  "sequences_diverging": len(gaps), "num_sequences": len(got),
                  "reference_top2_gap_at_divergence": sorted(gaps)}
        print("bf16 TP=2 vs TP=1:", json.dumps(result), flush=True)
        json.dump(result, open(out, "w"), indent=1)
PYEOF

rc=0
if [[ " $STEPS " == *" fp32 "* ]]; then
  start=$(date +%s)
  "$PY" "$SCRATCH/check.py" ref "$OUT_DIR/fp32-refs.json" 2>&1 | tee "$OUT_DIR/fp32-ref.log"
  "${launch[@]}" "$SCRATCH/check.py" spmd "$OUT_DIR/fp32-verdict.json" "$OUT_DIR/fp32-refs.json" \
    2>&1 | tee "$OUT_DIR/fp32-spmd.log"
  step_rc=${PIPESTATUS[0]}
  if [[ $step_rc == 0 ]] && "$PY" - "$OUT_DIR/fp32-verdict.json" <<'PYEOF'
import json, sys
verdict = json.load(open(sys.argv[1]))
bad = {k: v for k, v in verdict.items() if not v["equal"]}
print(f"fp32 TP=2/PP=2 vs one GPU: {len(verdict) - len(bad)}/{len(verdict)} cases equal", bad or "")
sys.exit(1 if bad or len(verdict) != 14 else 0)
PYEOF
  then echo "fp32: ok in $(( $(date +%s) - start )) s"
  else echo "fp32: FAILED (exit $step_rc)"; rc=1
  fi
fi

# BF16_MODELS: "trained" (the issue's >= 99% is checked on it: a random-init model's
# near-ties flip under any change of reduction order, ~70% free-running between two correct
# single-GPU backends; docs/performance.md) and "random" (reported only).
for model in ${BF16_MODELS:-trained random}; do
  [[ " $STEPS " == *" bf16 "* ]] || break
  export BF16_MODEL=$model
  start=$(date +%s)
  "$PY" "$SCRATCH/check.py" bf16-ref "$OUT_DIR/bf16-ref-$model.json" 2>&1 \
    | tee "$OUT_DIR/bf16-ref-$model.log"
  "${launch[@]}" "$SCRATCH/check.py" bf16-tp2 "$OUT_DIR/bf16-agreement-$model.json" \
    "$OUT_DIR/bf16-ref-$model.json" 2>&1 | tee "$OUT_DIR/bf16-tp2-$model.log"
  step_rc=${PIPESTATUS[0]}
  echo "bf16 $model: exit $step_rc in $(( $(date +%s) - start )) s (agreement printed above)"
  if (( step_rc != 0 )); then rc=1
  elif [[ $model == trained ]] && ! "$PY" - "$OUT_DIR/bf16-agreement-$model.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
ok = r["training"]["held_acc"] >= 0.99 and r["position_wise_agreement_pct"] >= 99
print(f"bf16 TP=2 vs TP=1 on the trained model: {r['position_wise_agreement_pct']:.2f}% "
      f"(>= 99% needed; copy accuracy {r['training']['held_acc']}): {'ok' if ok else 'FAILED'}")
sys.exit(0 if ok else 1)
PYEOF
  then rc=1
  fi
done

if [[ " $STEPS " == *" bench "* ]]; then
  start=$(date +%s)
  read -r -a bench_args <<< "${BENCH_ARGS:---workloads B --tp 2 --pp 2 --dp 2}"
  "$PY" "$REPO/bench/throughput.py" --out "$OUT_DIR" --ckpt-root "$CKPT_ROOT" \
    "${bench_args[@]}" 2>&1 \
    | tee "$OUT_DIR/bench-parallel.log"
  step_rc=${PIPESTATUS[0]}
  echo "bench: exit $step_rc in $(( $(date +%s) - start )) s"
  (( step_rc == 0 )) || rc=1
fi
exit "$rc"
