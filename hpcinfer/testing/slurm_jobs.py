"""Worker jobs on the real test Slurm: submit a job file, wait for it, read its logs.

``submit`` runs ``hpcinfer submit`` the way a user does (a fresh environment without the
test runner's own SLURM_* variables); ``wait_finished`` polls ``hpcinfer status``'s data
until every task reached a final state. Used by tests/worker/test_distributed_worker.py
and tests/worker/test_slurm.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from hpcinfer.slurm.status import all_finished, gather
from hpcinfer.testing.worker_jobs import make_job


def submit(root: Path, config: dict) -> tuple[Path, str]:
    """Write root/job.yaml and submit it; (job dir, Slurm job id)."""
    make_job(root, config, render=False)
    proc = subprocess.run([sys.executable, "-m", "hpcinfer.cli", "submit", str(root / "job.yaml")],
                          check=False, capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")})
    assert proc.returncode == 0, proc.stderr
    [line] = [ln for ln in proc.stdout.splitlines() if ln.startswith("submitted job ")]
    return root / config["output"]["dir"], line.split()[2].rstrip(";")


def job_logs(job_dir: Path) -> str:
    """Every log file of the job, concatenated ("" before the first one exists)."""
    logs = Path(job_dir) / "logs"
    return "\n".join(p.read_text(errors="replace") for p in sorted(logs.iterdir())) \
        if logs.is_dir() else ""


def wait_finished(job_dir: Path, timeout_s: float = 150) -> dict:
    """`hpcinfer status` data once every task is in a final state (assert on timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = gather(job_dir)
        if all_finished(info):
            return info
        assert time.monotonic() < deadline, json.dumps(info)[-3000:] + job_logs(job_dir)[-3000:]
        time.sleep(0.5)


def wait_log(job_dir: Path, text: str, timeout_s: float = 90) -> float:
    """Wait until ``text`` is in the job's logs; returns time.monotonic() when seen."""
    deadline = time.monotonic() + timeout_s
    while text not in job_logs(job_dir):
        assert time.monotonic() < deadline, f"no {text!r} in the logs: {job_logs(job_dir)[-3000:]}"
        time.sleep(0.1)
    return time.monotonic()
