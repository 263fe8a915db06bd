"""TP=2, TP=4, PP=2 and TP=2 x PP=2 under a real mpirun (gloo, CPU): greedy fp32 tokens of every
tiny family equal the single-process engine's, on every rank, with prefix caching on and a KV
pool small enough that sequences are preempted. One mpirun per world size checks all cases
(hpcinfer.testing.distributed) and writes a JSON verdict."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from hpcinfer.testing.require import require
from hpcinfer.testing.tiny import TINY_FAMILIES

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}




@pytest.fixture(scope="module")
def references(tmp_path_factory):
    path = tmp_path_factory.mktemp("refs") / "refs.json"
    proc = subprocess.run([sys.executable, "-m", "hpcinfer.testing.distributed", "reference",
                           str(path), *TINY_FAMILIES], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    refs = json.loads(path.read_text())
    for family, ref in refs.items():  # the pool really is small enough, and prefixes shared
        assert ref["preemptions"] > 0 and ref["prefix_hits"] > 0, (family, ref)
    return path


@pytest.mark.parametrize("ranks, layouts", [(2, ["2:1", "1:2"]), (4, ["4:1", "2:2"])],
                         ids=["tp2-pp2", "tp4-tp2xpp2"])
def test_parallel_tokens_equal_single_process(references, ranks, layouts, tmp_path):
    mpirun = shutil.which("mpirun")
    require(mpirun is not None, "mpirun (Open MPI) is not installed: run dev/setup.sh")
    cases = [f"{family}:{layout}" for family in TINY_FAMILIES for layout in layouts]
    verdict_path = tmp_path / "verdict.json"
    proc = subprocess.run([mpirun, "--allow-run-as-root", "--oversubscribe", "-n", str(ranks),
                           sys.executable, "-m", "hpcinfer.testing.distributed", "check",
                           str(references), str(verdict_path), *cases],
                          env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"mpirun failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    verdict = json.loads(verdict_path.read_text())
    assert sorted(verdict) == sorted(cases)
    failed = {case: v["first_mismatch"] for case, v in verdict.items() if not v["ok"]}
    assert not failed, f"tokens differ from the single-process engine: {failed}"
    for case, v in verdict.items():
        assert v["preemptions"] > 0 and v["prefix_hits"] > 0, (case, v)
