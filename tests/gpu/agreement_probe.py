"""bf16 agreement probe (issue 8): is the Triton backend's residual disagreement with
torch_ref a kernel error or bf16 rounding, and does keeping P in fp32 for P@V help?

GPU only; run by tests/gpu/agreement_probe.sh (one device call), not by pytest. Model: the
Llama-3.2-1B-width 4-layer random checkpoint of test_engine_gpu.py (LM-head std
3/sqrt(2048)), 64 prompts x 256 random ids, 32 greedy steps, synchronous scheduling.

Truth: torch_ref attention + torch ops in fp32 (free-running tokens T). For each bf16
configuration (torch_ref + torch ops; Triton + graphs with P rounded to bf16 for P@V, the
current default; Triton with P kept in fp32, tf32x3 and ieee) it measures:
  free vs fp32   each backend's own tokens against T, position-wise;
  forced vs fp32 fed T, per-step argmax against T (the accuracy of one step);
  free vs ref    against torch_ref-bf16's own tokens (the issue's metric);
  forced vs ref  fed torch_ref-bf16's tokens, per-step argmax against them.
Writes one JSON line per configuration to RESULTS_DIR/agreement-probe.jsonl.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
log = logging.getLogger("agreement_probe")


DEVICE = os.environ.get("PROBE_DEVICE", "cuda")   # "cpu": a smoke run of the plumbing


def greedy_run(path: str, prompts, *, dtype: str, fast: bool, forced=None) -> list[list[int]]:
    """32 greedy steps; fast = Triton + CUDA graphs, else torch_ref + torch ops (eager).
    Returns each prompt's per-step argmax (its own tokens when forced is None)."""
    from hpcinfer.testing.greedy import agreement_run
    wrapper = agreement_run(path, prompts, fast=fast, forced=forced, dtype=dtype, device=DEVICE)
    return [wrapper.argmax[i] for i in range(len(prompts))]


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    total = sum(len(x) for x in b)
    return round(sum(p == q for x, y in zip(a, b) for p, q in zip(x, y)) / total, 4)


def main(results_dir: Path) -> None:
    from hpcinfer.kernels import paged_tiles
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("bench_throughput",
                                                  REPO / "bench" / "throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    shape = dict(bench.SHAPES["llama-3.2-1b"], tie_word_embeddings=False)
    g = torch.Generator().manual_seed(0)
    if DEVICE == "cuda":
        path = str(bench.write_checkpoint(Path(os.environ.get("TMPDIR", "/tmp")) / "probe1b4",
                                          shape, layers=4, max_position_embeddings=4096,
                                          lm_head_std=3 * 2048 ** -0.5))
        prompts = torch.randint(0, 128000, (64, 256), generator=g).tolist()
    else:
        from hpcinfer.testing.tiny import tiny_checkpoint
        path = str(tiny_checkpoint("llama3"))
        prompts = torch.randint(0, 100, (3, 9), generator=g).tolist()
    out = results_dir / "agreement-probe.jsonl"
    device = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"

    def record(row: dict) -> None:
        row = {"device": device, **row}
        log.info("%s", json.dumps(row))
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")

    start = time.perf_counter()
    truth = greedy_run(path, prompts, dtype="float32", fast=False)
    truth_again = greedy_run(path, prompts, dtype="float32", fast=False, forced=truth)
    record({"config": "torch_ref fp32 (truth)", "forced_vs_fp32": agreement(truth_again, truth),
            "seconds": round(time.perf_counter() - start, 1)})

    ref = greedy_run(path, prompts, dtype="bfloat16", fast=False)
    record({"config": "torch_ref bf16", "free_vs_fp32": agreement(ref, truth),
            "forced_vs_fp32": agreement(greedy_run(path, prompts, dtype="bfloat16",
                                                   fast=False, forced=truth), truth),
            "free_vs_ref": 1.0, "forced_vs_ref": 1.0})
    modes = [("triton bf16, P bf16 (default)", {}),
             ("triton bf16, P fp32 tf32x3", {"decode": "tf32x3", "prefill": "tf32x3"}),
             ("triton bf16, P fp32 ieee", {"decode": "ieee", "prefill": "ieee"}),
             ("triton bf16, P fp32 tf32x3 decode only", {"decode": "tf32x3"})]
    for name, mode in modes:
        paged_tiles.PV_FP32.clear()
        paged_tiles.PV_FP32.update(mode)
        t0 = time.perf_counter()
        free = greedy_run(path, prompts, dtype="bfloat16", fast=True)
        record({"config": name, "pv_fp32": mode,
                "free_vs_fp32": agreement(free, truth),
                "forced_vs_fp32": agreement(greedy_run(path, prompts, dtype="bfloat16",
                                                       fast=True, forced=truth), truth),
                "free_vs_ref": agreement(free, ref),
                "forced_vs_ref": agreement(greedy_run(path, prompts, dtype="bfloat16",
                                                      fast=True, forced=ref), ref),
                "seconds": round(time.perf_counter() - t0, 1)})
    paged_tiles.PV_FP32.clear()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
