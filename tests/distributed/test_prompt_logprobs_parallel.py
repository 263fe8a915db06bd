"""Prompt logprobs under TP=2 and PP=2 (real mpirun, gloo, CPU, fp32, chunked prefill): every
rank returns the single-process engine's entries (same tokens and ranks, values to 1e-5)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hpcinfer.testing.require import require
from hpcinfer.testing.tiny import tiny_checkpoint

SCRIPT = Path(__file__).resolve().parent / "prompt_logprobs_spmd.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def run(tmp_path, name, launcher, tp, pp):
    out = tmp_path / name
    out.mkdir()
    proc = subprocess.run([*launcher, sys.executable, str(SCRIPT),
                           str(tiny_checkpoint("llama")), str(tp), str(pp), str(out)],
                          env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return {p.name: json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))}


@pytest.mark.slow  # ~25 s each on 2 cores (three engine starts)
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_every_rank_returns_the_single_process_entries(tmp_path, tp, pp):
    mpirun = shutil.which("mpirun")
    require(mpirun is not None, "mpirun (Open MPI) is not installed: run dev/setup.sh")
    want = run(tmp_path, "single", [], 1, 1)["rank0.json"]
    ranks = run(tmp_path, "parallel", [mpirun, "--allow-run-as-root", "--oversubscribe",
                                       "-n", "2"], tp, pp)
    assert sorted(ranks) == ["rank0.json", "rank1.json"]
    for got in ranks.values():
        for got_prompt, want_prompt in zip(got, want, strict=True):
            assert got_prompt[0] is None and len(got_prompt) == len(want_prompt)
            for g, w in zip(got_prompt[1:], want_prompt[1:]):
                assert [t for t, _, _ in g] == [t for t, _, _ in w]
                assert [r for _, _, r in g] == [r for _, _, r in w]
                assert all(abs(a[1] - b[1]) < 1e-5 for a, b in zip(g, w))
