"""`hpcinfer status` tells a live local run from a dead one: a real `hpcinfer run --local`
shows RUNNING while its worker runs, and after kill -9 of its processes status says DIED
with the worker's pid and host, without an ETA."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from hpcinfer.testing.worker_jobs import job_config, make_job, prompt_rows, write_jsonl

pytestmark = pytest.mark.timeout(180)


def _status(job_dir) -> dict:
    proc = subprocess.run([sys.executable, "-m", "hpcinfer.cli", "status", str(job_dir),
                           "--json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _wait_for_progress(job_dir, run: subprocess.Popen, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert run.poll() is None, "the local run ended before it was killed"
        for path in (job_dir / "metrics").glob("*.jsonl"):
            if '"event": "progress"' in path.read_text():
                return
        time.sleep(0.3)
    raise AssertionError("no progress line within the time limit")


def test_status_after_kill_9_of_a_local_run_says_it_died(tmp_path, model_dir):
    write_jsonl(tmp_path / "data" / "p.jsonl", prompt_rows(40))
    job_dir = make_job(tmp_path, job_config(model_dir, "data/p.jsonl"), render=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(HPCINFER_PROGRESS_EVERY_S="0.5", HPCINFER_WORKER_STEP_DELAY_S="0.3")
    run = subprocess.Popen([sys.executable, "-m", "hpcinfer.cli", "run",
                            str(tmp_path / "job.yaml"), "--local"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)      # its own group: killed as one below
    try:
        _wait_for_progress(job_dir, run)
        [live] = _status(job_dir)["tasks"]
        assert live["state"] == "RUNNING" and live["throughput"]["rows_per_s"] is not None
    finally:
        os.killpg(run.pid, signal.SIGKILL)              # runner, bash and worker at once
        run.wait()
    [dead] = _status(job_dir)["tasks"]
    assert dead["state"] == "DIED", dead
    assert "is gone without its last metrics line" in dead["reason"], dead
    assert dead["throughput"]["eta_s"] is None
    text = subprocess.run([sys.executable, "-m", "hpcinfer.cli", "status", str(job_dir)],
                          capture_output=True, text=True, timeout=60).stdout
    assert " DIED " in text and "ETA" not in text and "RUNNING" not in text, text


def test_a_failed_tasks_reason_falls_back_to_its_logs_last_error_line(tmp_path):
    """No worker message (it died before writing one): status quotes the log's last error."""
    from hpcinfer.slurm.status import last_error_line
    log = tmp_path / "slurm-42_3.out"
    log.write_text(
        "2026-12-02 23:11:21,053 hpcinfer.worker rank 0@node1 INFO task 3 rank 0/1 on node1\n"
        "2026-12-02 23:11:22,001 hpcinfer.worker rank 0@node1 ERROR cannot load model /m: "
        "no config.json\n"
        "hpcinfer: job 42_3 exits 2\n")
    assert last_error_line(log) == "cannot load model /m: no config.json"
    log.write_text("slurmstepd: error: Detected 1 oom_kill event in StepId=42.0. Some of the "
                   "step tasks have been OOM Killed.\n")
    assert last_error_line(log).startswith("slurmstepd: error: Detected 1 oom_kill event")
    assert last_error_line(tmp_path / "missing.out") is None
