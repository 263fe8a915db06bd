"""Two real processes on CPU (gloo) running one test script, for the tensor/expert-parallel
equality tests that need no mpirun (tests/models/test_tensor_parallel.py, tests/moe/).

The script gets ``RANK PORT ARGS...`` on its command line, initialises the gloo group itself
on ``tcp://127.0.0.1:PORT`` and prints ``rank R ok`` when its checks pass.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(tmp_path: Path, script_text: str, args: list[str],
                  timeout_s: float = 180) -> list[str]:
    """Run ``script_text`` as ranks 0 and 1; fail with a rank's output tail unless both exit 0
    and say ``rank R ok``. Returns both outputs."""
    script = Path(tmp_path) / "rank.py"
    script.write_text(script_text)
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}   # two ranks on two cores
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), port, *args],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for rank in range(2)]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=timeout_s)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{out[-3000:]}"
        assert f"rank {rank} ok" in out, f"rank {rank} did not finish its checks:\n{out[-3000:]}"
    return outputs
