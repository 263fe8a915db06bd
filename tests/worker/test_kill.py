"""Kill test: the real worker (engine and all) killed with SIGKILL at random moments, 20
times, then run to the end: every row exactly once, collected output byte-identical to an
uninterrupted run. Commits are every 2 rows with a delay inside each commit
(HPCINFER_IO_COMMIT_DELAY_S), so some kills land during a commit (asserted).

Rerun one sequence with HPCINFER_KILL_SEED=<seed> (the seed is printed)."""
from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from hpcinfer.io.collect import collect
from hpcinfer.testing.worker_jobs import (job_config, make_job, prompt_rows, read_results,
                                          run_worker, start_worker)

pytestmark = pytest.mark.timeout(300)
NUM_KILLS = 20
BAD_LINES = [b'{"id": "bad1", "prompt": ', b'{"id": "bad2", "prompt": 7}', b"   "]


def _write_input(path: Path, num_rows: int) -> None:
    lines = [json.dumps(r).encode() for r in prompt_rows(num_rows)]
    for k, bad in enumerate(BAD_LINES):
        lines.insert(20 + 30 * k, bad)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines) + b"\n")


def _collected(job_dir: Path) -> dict[str, bytes]:
    result = collect(job_dir)
    return {p.name: p.read_bytes() for p in result.files}


def test_kill_9_at_random_moments_then_restart(tmp_path, model_dir):
    seed = int(os.environ.get("HPCINFER_KILL_SEED", random.randrange(10**6)))
    print(f"kill test seed: {seed} (rerun with HPCINFER_KILL_SEED={seed})")
    rng = random.Random(seed)
    data = tmp_path / "data" / "prompts.jsonl"
    _write_input(data, 160)
    config = job_config(model_dir, str(data), output={"commit_every_rows": 2})
    reference = make_job(tmp_path / "reference", config)
    rc, out = run_worker(reference)
    assert rc == 0, out
    expected = _collected(reference)

    job_dir = make_job(tmp_path / "killed", config)
    shard = job_dir / "shards" / "00000"
    log = tmp_path / "killed.log"
    slow = {"HPCINFER_IO_COMMIT_DELAY_S": "0.15", "HPCINFER_WORKER_STEP_DELAY_S": "0.03"}
    kills_in_commit = 0
    num_kills = 0
    for run in range(NUM_KILLS):
        proc = start_worker(job_dir, log_path=log, **slow)
        if not _wait_ready(log, run, proc):
            break                                      # finished before the kill
        time.sleep(rng.uniform(0.0, 1.0))
        if proc.poll() is not None:
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        num_kills += 1
        kills_in_commit += any(p.name.startswith(".tmp-") for p in shard.iterdir())
    print(f"{num_kills} kills, {kills_in_commit} inside a commit")
    assert num_kills == NUM_KILLS, "the job finished before 20 kills: give it more rows"
    assert kills_in_commit >= 1, "no kill landed inside a commit (seed above)"
    assert not (shard / "DONE").exists()

    rc, out = run_worker(job_dir)
    assert rc == 0, out
    assert "removed" in log.read_text() or kills_in_commit == 0
    [records] = read_results(job_dir).values()
    indices = [r["row_index"] for r in records]
    assert len(indices) == len(set(indices)) == 160
    assert _collected(job_dir) == expected


def _wait_ready(log: Path, run: int, proc) -> bool:
    """Wait for this run's "engine ready" line (the log is appended by every run)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if text.count("engine ready") > run:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    raise AssertionError(f"run {run}: no 'engine ready' in the log: {log.read_text()[-2000:]}")
