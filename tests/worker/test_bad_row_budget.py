"""input.max_bad_rows: a job with 30% bad rows (a misnamed prompt column on 6 of 20 rows)
stops past the default 5% budget, exits non-zero, and `hpcinfer status` says why; `collect`
refuses to call it complete; a rerun with a raised budget resumes and finishes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hpcinfer.testing.worker_jobs import (job_config, make_job, prompt_rows, read_errors,
                                          read_results, run_worker, write_jsonl)

pytestmark = pytest.mark.timeout(240)
BAD = {1, 4, 7, 10, 13, 16}             # 6 of 20 rows


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcinfer.cli", *args], capture_output=True,
                          text=True, timeout=180, cwd=cwd)


def test_thirty_percent_bad_rows_fail_the_job_and_status_says_why(tmp_path, model_dir):
    rows = prompt_rows(20)
    for i in BAD:                       # what a misnamed column looks like on these rows
        rows[i] = {"id": rows[i]["id"], "question": rows[i].pop("prompt")}
    write_jsonl(tmp_path / "data" / "p.jsonl", rows)
    job_dir = make_job(tmp_path, job_config(model_dir, "data/p.jsonl"), render=False)
    job = str(tmp_path / "job.yaml")

    run = _cli("run", job, "--local")
    assert run.returncode != 0, run.stdout + run.stderr
    status = _cli("status", str(job_dir))
    assert status.returncode == 0, status.stderr
    [task_line] = [ln for ln in status.stdout.splitlines() if " FAILED " in ln]
    # allowed: 5% of 20 = 1 row; the second bad row (row 4) stops the task
    assert "2 of 20 rows bad (> input.max_bad_rows: 0.05 of 20 rows = 1)" in task_line
    assert "p.jsonl row 1: missing_prompt" in task_line
    info = json.loads(_cli("status", str(job_dir), "--json").stdout)
    [task] = info["tasks"]
    assert task["state"] == "FAILED" and task["shard_progress"][0]["state"] == "failed"
    assert [e["row_index"] for e in read_errors(job_dir)] == [1, 4]

    collect = _cli("collect", str(job_dir))
    assert collect.returncode == 2, collect.stdout + collect.stderr
    assert "the job is not complete: shard 00000 FAILED: 2 of 20 rows bad" in collect.stderr

    # The same config again fails at once, before loading the model (the bad rows committed
    # by the first run count).
    rc, out = run_worker(job_dir)
    assert rc == 2 and "rows bad" in out and "engine ready" not in out, out

    # A raised budget resumes: every row once, the bad ones in errors.jsonl.
    rerun = _cli("run", job, "--local", "--set", "input.max_bad_rows=0.5")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr
    [results] = read_results(job_dir).values()
    assert sorted(r["row_index"] for r in results) == sorted(set(range(20)) - BAD)
    assert sorted(e["row_index"] for e in read_errors(job_dir)) == sorted(BAD)
    assert _cli("collect", str(job_dir)).returncode == 0
    assert " COMPLETED " in _cli("status", str(job_dir)).stdout
