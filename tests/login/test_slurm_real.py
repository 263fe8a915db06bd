"""Against a real single-host Slurm (tests/conftest.py starts it): submit, arrays with a
throttle, status to completion, cancel, and a USR2 requeue through the rendered trap.
The worker is the real preflight (HPCINFER_PREFLIGHT_SLEEP_S keeps it alive for signals)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcinfer.slurm.status import all_finished, gather
from hpcinfer.testing.jobs import write_job

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(180)]


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "hpcinfer.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=60)
    return proc


def _submit(job: Path, **env: str) -> str:
    proc = _cli("submit", str(job), **env)
    assert proc.returncode == 0, proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("submitted job ")][0]
    return line.split()[2].rstrip(";")


def _wait(job_dir: Path, until, timeout_s: float = 120, poll_s: float = 0.5) -> tuple[dict, list[dict]]:
    """Poll status until `until(info)`; returns the last info and every info seen."""
    seen = []
    deadline = time.monotonic() + timeout_s
    while True:
        info = gather(job_dir)
        seen.append(info)
        if until(info):
            return info, seen
        assert time.monotonic() < deadline, f"timed out; last status: {json.dumps(info)}"
        time.sleep(poll_s)


def _records(job_dir: Path, task: int = 0) -> list[dict]:
    path = job_dir / "metrics" / f"task-{task:05d}-rank-000.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def test_single_job_runs_to_completion(slurm_cluster, tmp_path):
    job = write_job(tmp_path, rows=(3,), resources={"partition": slurm_cluster})
    job_id = _submit(job)
    job_dir = tmp_path / "out"
    info, _ = _wait(job_dir, all_finished)
    assert info["job_id"] == job_id and info["summary"] == {"COMPLETED": 1}
    [log] = list((job_dir / "logs").iterdir())
    assert log.name == f"slurm-{job_id}.out"
    assert "preflight ok" in log.read_text()
    [rec] = _records(job_dir)
    assert rec["backend"] == "slurm" and rec["slurm_job_id"] == job_id and rec["status"] == "ok"
    proc = _cli("status", str(job_dir))
    assert proc.returncode == 0 and "COMPLETED" in proc.stdout and job_id in proc.stdout


def test_array_of_four_with_throttle_two(slurm_cluster, tmp_path):
    job = write_job(tmp_path, rows=(2, 2, 2, 2), input={"shard_rows": 2},
                    resources={"array_parallelism": 2, "partition": slurm_cluster})
    job_dir = tmp_path / "out"
    job_id = _submit(job, HPCINFER_PREFLIGHT_SLEEP_S="2")
    assert "#SBATCH --array=0-3%2" in (job_dir / "submit.sbatch").read_text()
    info, seen = _wait(job_dir, all_finished, poll_s=0.3)
    assert info["summary"] == {"COMPLETED": 4}
    running = [sum(t["state"] == "RUNNING" for t in i["tasks"]) for i in seen]
    assert max(running) <= 2
    reasons = {t["reason"] for i in seen for t in i["tasks"] if t["state"] == "PENDING"}
    assert "JobArrayTaskLimit" in reasons, reasons
    for task in range(4):
        [rec] = _records(job_dir, task)
        assert rec["task"] == task and rec["shards"] == [task] and rec["rows"] == 2
        assert (job_dir / "logs" / f"slurm-{job_id}_{task}.out").is_file()


def test_cancel(slurm_cluster, tmp_path):
    job = write_job(tmp_path, rows=(3,), resources={"partition": slurm_cluster})
    job_dir = tmp_path / "out"
    job_id = _submit(job, HPCINFER_PREFLIGHT_SLEEP_S="120")
    _wait(job_dir, lambda i: i["tasks"][0]["state"] == "RUNNING", timeout_s=60)
    proc = _cli("cancel", str(job_dir))
    assert proc.returncode == 0 and f"cancelled job {job_id}" in proc.stdout
    info, _ = _wait(job_dir, all_finished, timeout_s=60)
    assert info["summary"] == {"CANCELLED": 1}
    log = job_dir / "logs" / f"slurm-{job_id}.out"
    deadline = time.monotonic() + 20      # the trap's last lines land just after the state
    while "not requeueing" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "stopped by SIGTERM (cancelled or out of time): not requeueing" in log.read_text()
    acct = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-o", "JobID,State", "-j", job_id],
                          capture_output=True, text=True).stdout
    assert "REQUEUED" not in acct, acct


def test_usr2_requeues_once_and_finishes_in_one_log(slurm_cluster, tmp_path):
    job = write_job(tmp_path, rows=(3,), resources={"partition": slurm_cluster},
                    resilience={"max_requeues": 1})
    job_dir = tmp_path / "out"
    job_id = _submit(job, HPCINFER_PREFLIGHT_SLEEP_S="6")
    log = job_dir / "logs" / f"slurm-{job_id}.out"
    deadline = time.monotonic() + 60
    while not (log.exists() and "rank 0/1" in log.read_text()):   # the worker is up
        assert time.monotonic() < deadline, "worker never started"
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=USR2", job_id], check=True)
    info, _ = _wait(job_dir, lambda i: all_finished(i) and len(_records(job_dir)) == 2, timeout_s=120)
    assert info["summary"] == {"COMPLETED": 1}
    text = log.read_text()
    assert "caught SIGUSR2; forwarding it to the worker" in text
    assert f"requeueing {job_id} (restart 1 of at most 1)" in text
    assert "(restart 0, at most 1)" in text and "(restart 1, at most 1)" in text
    first, second = _records(job_dir)
    assert (first["status"], first["restart_count"]) == ("requeue", 0)
    assert (second["status"], second["restart_count"]) == ("ok", 1)
    assert info["tasks"][0]["restarts"] == 1
    acct = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-o", "JobID,State", "-j", job_id],
                          capture_output=True, text=True).stdout
    assert f"{job_id}|REQUEUED" in acct and f"{job_id}|COMPLETED" in acct


def test_python_api_submit_wait_state(slurm_cluster, tmp_path):
    import hpcinfer
    job_file = write_job(tmp_path, rows=(2, 2), input={"shard_rows": 2},
                         resources={"partition": slurm_cluster})
    job = hpcinfer.submit(str(job_file))
    assert job.job_id.isdigit() and job.job_dir == (tmp_path / "out").resolve()
    assert job.wait(timeout_s=120, poll_s=0.5) == "COMPLETED"
    assert job.task_states() == {f"{job.job_id}_0": "COMPLETED", f"{job.job_id}_1": "COMPLETED"}
    assert hpcinfer.Job(tmp_path / "out").job_id == job.job_id      # reattach from the job dir


def test_slurm_rejection_is_one_line_with_slurms_message(slurm_cluster, tmp_path):
    job = write_job(tmp_path, rows=(2,), resources={"partition": "nosuchpartition"})
    proc = _cli("submit", str(job))
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert "sbatch failed" in line and "invalid partition" in line.lower()
    assert "resources.partition" in line


def test_two_ranks_through_srun_mpi(slurm_cluster, tmp_path):
    """tensor=2 on CPU: one task with 2 ranks started by `srun --mpi=pmix`; each rank reports."""
    job = write_job(tmp_path, rows=(2,), parallel={"tensor": 2},
                    resources={"partition": slurm_cluster})
    job_dir = tmp_path / "out"
    _submit(job)
    assert "launch=(srun --nodes=1 --ntasks=2 --kill-on-bad-exit=1 --mpi=pmix)" in \
        (job_dir / "submit.sbatch").read_text()
    info, _ = _wait(job_dir, all_finished)
    assert info["summary"] == {"COMPLETED": 1}
    ranks = sorted(json.loads((job_dir / "metrics" / f"task-00000-rank-{r:03d}.jsonl").read_text())["rank"]
                   for r in (0, 1))
    assert ranks == [0, 1]
    rec = json.loads((job_dir / "metrics" / "task-00000-rank-001.jsonl").read_text())
    assert rec["world_size"] == 2 and rec["status"] == "ok"


def test_array_task_requeues_only_itself(slurm_cluster, tmp_path):
    job = write_job(tmp_path, rows=(2, 2), input={"shard_rows": 2},
                    resources={"partition": slurm_cluster}, resilience={"max_requeues": 2})
    job_dir = tmp_path / "out"
    job_id = _submit(job, HPCINFER_PREFLIGHT_SLEEP_S="4")
    log = job_dir / "logs" / f"slurm-{job_id}_1.out"
    deadline = time.monotonic() + 60
    while not (log.exists() and "rank 0/1" in log.read_text()):
        assert time.monotonic() < deadline, "task 1 never started"
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=USR2", f"{job_id}_1"], check=True)
    info, _ = _wait(job_dir, lambda i: all_finished(i) and len(_records(job_dir, 1)) == 2)
    assert info["summary"] == {"COMPLETED": 2}
    assert f"requeueing {job_id}_1 (restart 1 of at most 2)" in log.read_text()
    assert [r["status"] for r in _records(job_dir, 1)] == ["requeue", "ok"]
    assert [r["status"] for r in _records(job_dir, 0)] == ["ok"]
    assert "requeueing" not in (job_dir / "logs" / f"slurm-{job_id}_0.out").read_text()


def test_failed_preflight_fails_the_job_and_resubmit_as_is_works(slurm_cluster, tmp_path):
    from hpcinfer.slurm.slurm import submit_job_dir
    job = write_job(tmp_path, rows=(2,), resources={"partition": slurm_cluster})
    assert _cli("render", str(job)).returncode == 0
    job_dir = tmp_path / "out"
    data = tmp_path / "data" / "part-0.jsonl"
    data.rename(data.with_suffix(".away"))                    # vanished between render and run
    job_id = submit_job_dir(job_dir)
    info, _ = _wait(job_dir, all_finished)
    # Slurm's exit code, then the worker's reason from its metrics (hpcinfer status)
    assert info["summary"] == {"FAILED": 1} and info["tasks"][0]["reason"].startswith(
        "exit 2:0: input ") and "part-0.jsonl is not readable here" in info["tasks"][0]["reason"]
    assert "part-0.jsonl is not readable here" in (job_dir / "logs" / f"slurm-{job_id}.out").read_text()
    data.with_suffix(".away").rename(data)
    second = submit_job_dir(job_dir)                            # cd JOBDIR && sbatch submit.sbatch
    info, _ = _wait(job_dir, all_finished)
    assert second != job_id and info["job_id"] == second and info["summary"] == {"COMPLETED": 1}
