"""SPMD under real Slurm (single-host cluster): `srun --mpi=pmix -n 2` (mpi4py over PMIx) and
plain `srun --mpi=none -n 2` (SLURM_PROCID/SLURM_NTASKS, port from the job id) each run a TP=2
script on both ranks, which print the single-process tokens."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpcinfer.testing.tiny import tiny_checkpoint

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("mpi", ["pmix", "none"])
def test_srun_tp2_equals_one_process(slurm_cluster, mpi):
    from hpcinfer import LLM, SamplingParams
    model = str(tiny_checkpoint("llama3"))  # (tiny qwen2 repeats one token)
    want = [o.outputs[0].token_ids for o in LLM(model, device="cpu", dtype="float32").generate(
        ["Hello, my name is", "Slurm schedules jobs"],
        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)]
    proc = subprocess.run(["srun", "-p", slurm_cluster, "-n", "2", f"--mpi={mpi}",
                           "--kill-on-bad-exit=1", sys.executable,
                           str(HERE / "spmd_generate.py"), model, "2", "1"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = sorted(x for x in proc.stdout.splitlines() if x.startswith("TOKENS "))
    assert [x.split(" ", 2)[1] for x in lines] == ["rank=0", "rank=1"]
    for line in lines:
        assert json.loads(line.split(" ", 2)[2]) == want
