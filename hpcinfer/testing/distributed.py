"""Tensor/pipeline-parallel equality checks, run under a real ``mpirun`` (tests/distributed).

One mpirun runs many cases (interpreter and MPI start-up dominate on 2 cores)::

    python -m hpcinfer.testing.distributed reference REFS.json llama opt ...      # one process
    mpirun -n 4 python -m hpcinfer.testing.distributed check REFS.json VERDICT.json \
        llama:4:1 llama:2:2 ...                                                   # family:tp:pp

``reference`` builds each tiny checkpoint next to REFS.json and writes its path and the
single-process greedy tokens; ``check`` builds the same ``LLM`` on
every rank for each case (SPMD), gathers every rank's tokens on rank 0 and writes a JSON
verdict: per case, whether every rank's tokens equal the reference, the preemptions and prefix
cache hits seen (the pool is sized so that both happen), and the first mismatch.
"""
from __future__ import annotations

import json
import os
import sys
import traceback

# A shared prefix (prefix-cache hits) and lengths that overflow a 24-block pool of 4-token
# blocks once several sequences decode together (preemption by recompute).
PROMPTS = [
    "The quick brown fox jumps over the lazy dog. A cluster schedules jobs with Slurm",
    "The quick brown fox jumps over the lazy dog. Batch inference reads prompts",
    "Hello, world! How are you today?",
    "Paged attention keeps keys and values in fixed-size blocks of the KV cache, and",
    "def main():\n    print('hello')",
    "Numbers like 12345 and 67890 appear in text",
]
MAX_TOKENS = 24
ENGINE_ARGS = dict(dtype="float32", device="cpu", block_size=4, num_gpu_blocks_override=24,
                   max_model_len=64, max_num_seqs=6, enable_prefix_caching=True, seed=0,
                   attention_backend="torch_ref")


def generate(path: str, **parallel) -> tuple[list[list[int]], dict]:
    """Greedy tokens of PROMPTS for a checkpoint, and the engine's counters."""
    from hpcinfer import LLM, SamplingParams

    llm = LLM(path, **ENGINE_ARGS, **parallel)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                                ignore_eos=True), use_tqdm=False)
    engine = llm.llm_engine
    stats = {"preemptions": engine.num_preemptions, "prefix_hits": engine.prefix_cache_hits}
    return [list(o.outputs[0].token_ids) for o in outs], stats


def write_references(path: str, families: list[str]) -> None:
    from pathlib import Path

    from hpcinfer.testing.tiny import build_tiny_checkpoint
    refs = {}
    for family in families:
        checkpoint = build_tiny_checkpoint(family, Path(path).parent / f"tiny-{family}")
        tokens, stats = generate(str(checkpoint))
        refs[family] = {"path": str(checkpoint), "tokens": tokens, **stats}
    with open(path, "w") as f:
        json.dump(refs, f)


def check(refs_path: str, verdict_path: str, cases: list[str]) -> bool:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    with open(refs_path) as f:
        refs = json.load(f)
    verdict = {}
    for case in cases:
        family, tp, pp = case.split(":")
        tokens, stats = generate(refs[family]["path"], tensor_parallel_size=int(tp),
                                 pipeline_parallel_size=int(pp))
        everyone = comm.gather(tokens, root=0)
        if rank == 0:
            want = refs[family]["tokens"]
            bad = [(r, i) for r, got in enumerate(everyone) for i, (a, b) in
                   enumerate(zip(got, want)) if a != b]
            verdict[case] = {"ok": not bad and all(len(g) == len(want) for g in everyone),
                             **stats, "first_mismatch": (
                                 None if not bad else {"rank": bad[0][0], "prompt": bad[0][1],
                                                       "got": everyone[bad[0][0]][bad[0][1]],
                                                       "want": want[bad[0][1]]})}
    if rank == 0:
        with open(verdict_path, "w") as f:
            json.dump(verdict, f, indent=1)
    return True


def main(argv: list[str]) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if argv[0] == "reference":
        write_references(argv[1], argv[2:])
        return 0
    if argv[0] == "check":
        try:
            check(argv[1], argv[2], argv[3:])
        except Exception:
            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            from mpi4py import MPI
            MPI.COMM_WORLD.Abort(1)  # never leave the other ranks in a collective
        return 0
    raise SystemExit(f"unknown command {argv[0]!r}: use reference or check")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
