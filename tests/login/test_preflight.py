"""The preflight worker (exit 0 / 2 / 3) and the local backend's requeue loop."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hpcinfer.compile.jobdir import compile_job, write_job_dir
from hpcinfer.config import load_job
from hpcinfer.testing.jobs import write_job


def _job_dir(tmp_path: Path, **sections) -> Path:
    return write_job_dir(compile_job(load_job(write_job(tmp_path, **sections))))


def _worker(job_dir: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hpcinfer.worker", str(job_dir)],
                            env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _records(job_dir: Path, task: int = 0) -> list[dict]:
    path = job_dir / "metrics" / f"task-{task:05d}-rank-000.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_ok_reports_environment(tmp_path):
    job_dir = _job_dir(tmp_path, rows=(4,))
    proc = _worker(job_dir, SLURM_RESTART_COUNT="2", CUDA_VISIBLE_DEVICES="0,1")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "preflight ok" in out
    [rec] = _records(job_dir)
    assert rec["status"] == "ok" and rec["restart_count"] == 2 and rec["rows"] == 4
    assert rec["gpus"]["cuda_visible_devices"] == "0,1" and rec["gpus"]["count"] >= 2
    assert rec["shards"] == [0] and rec["world_size"] >= 1


def test_array_task_without_task_id_and_missing_input_exit_2(tmp_path):
    job_dir = _job_dir(tmp_path, rows=(5, 5))
    env = {k: v for k, v in os.environ.items() if k != "SLURM_ARRAY_TASK_ID"}
    proc = subprocess.run([sys.executable, "-m", "hpcinfer.worker", str(job_dir)], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "SLURM_ARRAY_TASK_ID" in proc.stderr
    (tmp_path / "data" / "part-1.jsonl").unlink()
    proc = _worker(job_dir, SLURM_ARRAY_TASK_ID="1")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "part-1.jsonl is not readable" in out
    assert _records(job_dir, task=1)[-1]["status"] == "failed"
    proc = _worker(job_dir, SLURM_ARRAY_TASK_ID="0")      # the other shard is fine
    assert proc.wait(timeout=60) == 0


def test_warning_signal_exits_3(tmp_path):
    job_dir = _job_dir(tmp_path, rows=(3,))
    proc = _worker(job_dir, HPCINFER_PREFLIGHT_SLEEP_S="30")
    time.sleep(1.5)       # imports + checks; the handler is installed before both
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 3, out
    assert "received SIGUSR2" in out
    assert _records(job_dir)[-1]["status"] == "requeue"


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def test_local_backend_reruns_a_task_that_asks_for_requeue(tmp_path):
    job = write_job(tmp_path, rows=(3,), resilience={"max_requeues": 1})
    proc = subprocess.Popen([sys.executable, "-m", "hpcinfer.cli", "run", str(job), "--local"],
                            env={**os.environ, "HPCINFER_PREFLIGHT_SLEEP_S": "3"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    bash_pid = None
    while bash_pid is None and time.monotonic() < deadline:
        bash_pid = next(iter(_children(proc.pid)), None)
        time.sleep(0.05)
    assert bash_pid is not None
    time.sleep(1.5)
    os.kill(bash_pid, signal.SIGUSR2)     # what `scancel --batch --signal=USR2` does
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "caught SIGUSR2; forwarding it to the worker" in out
    assert "exit 3 asks the local backend to run this script again" in out
    [log] = list((tmp_path / "out" / "logs").iterdir())
    text = log.read_text()
    assert "(restart 0, at most 1)" in text and "(restart 1, at most 1)" in text
    assert [r["status"] for r in _records(tmp_path / "out")] == ["requeue", "ok"]


def test_small_dev_shm_is_reported(tmp_path):
    profile = tmp_path / "site.yaml"
    profile.write_text("slurm: {shm_size: 900T}\n")
    job_dir = _job_dir(tmp_path, rows=(2,), cluster=str(profile))
    proc = _worker(job_dir)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "/dev/shm has" in out and "asks for 900T" in out
    [rec] = _records(job_dir)
    assert rec["shm_wanted_bytes"] == 900 * 2**40 and rec["shm_free_bytes"] < rec["shm_wanted_bytes"]
