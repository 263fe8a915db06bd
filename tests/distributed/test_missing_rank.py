"""A rank that never arrives: within the timeout, one message names it and its host, and the
job ends (no hang) -- for a worker rank and for rank 0 itself."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcinfer.testing.require import require

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 4




@pytest.mark.parametrize("late, reporter_wait", [(2, TIMEOUT_S), (0, TIMEOUT_S + 10)],
                         ids=["worker-rank", "rank-0"])
def test_missing_rank_is_named_within_the_timeout(late, reporter_wait):
    mpirun = shutil.which("mpirun")
    require(mpirun is not None, "mpirun (Open MPI) is not installed: run dev/setup.sh")
    start = time.monotonic()
    proc = subprocess.run([mpirun, "--allow-run-as-root", "--oversubscribe", "-n", "3",
                           sys.executable, str(HERE / "missing_rank.py"), str(late),
                           str(TIMEOUT_S)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=120)
    elapsed = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "joined" not in proc.stdout  # nobody went on into a half-formed world
    message = f"rank {late} (host {socket.gethostname()}) did not reach init_world() within"
    assert output.count(message) == 1, output[-3000:]  # named once, with its host
    # The reporter's deadline plus interpreter/MPI start-up and teardown; the stuck rank
    # would sleep 600 s.
    assert elapsed < reporter_wait + 40, elapsed


def test_ranks_given_different_prompts_fail_fast_with_a_clear_message():
    from hpcinfer.testing.tiny import tiny_checkpoint
    mpirun = shutil.which("mpirun")
    require(mpirun is not None, "mpirun (Open MPI) is not installed: run dev/setup.sh")
    proc = subprocess.run([mpirun, "--allow-run-as-root", "--oversubscribe", "-n", "2",
                           sys.executable, str(HERE / "diverge.py"),
                           str(tiny_checkpoint("llama"))],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "no error" not in proc.stdout
    assert "rank 1: rank 1's engine scheduled another batch than rank 0's" in proc.stdout, (
        proc.stdout[-2000:] + proc.stderr[-2000:])
    assert "every rank must give LLM the same prompts" in proc.stdout
