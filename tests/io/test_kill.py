"""Exactly-once under kill -9, without an engine.

A subprocess answers two shards (result = reversed prompt) with a commit every few rows and
a test-only delay inside each commit (between fsync and rename), and is killed at random
moments, then restarted, until it finishes. Afterwards every row is committed exactly once
and collect's bytes equal those of an uninterrupted run with different commit sizes.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcinfer.io.atomic import COMMIT_DELAY_ENV, TEMP_PREFIX
from hpcinfer.io.collect import collect
from hpcinfer.testing.io_corpus import BAD_PROMPT_LINES, write_mixed_jsonl

WORKER = Path(__file__).with_name("kill_worker.py")
NUM_SHARDS = 2


def _start(input_path: Path, job_dir: Path, fmt: str, commit_every: int, delay_s: float):
    env = {**os.environ, COMMIT_DELAY_ENV: str(delay_s)}
    proc = subprocess.Popen([sys.executable, str(WORKER), str(input_path), str(job_dir), fmt,
                             str(NUM_SHARDS), str(commit_every)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


def _run_to_end(input_path, job_dir, fmt, commit_every, delay_s=0.0) -> None:
    proc = _start(input_path, job_dir, fmt, commit_every, delay_s)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "finished" in out


def _temps(job_dir: Path) -> list[str]:
    return [p.name for p in job_dir.glob("shards/*/*") if p.name.startswith(TEMP_PREFIX)]


def _collected(job_dir: Path, fmt: str) -> dict[str, bytes]:
    result = collect(job_dir, format=fmt)
    assert not result.incomplete_shards and not result.failed_shards
    return {p.name: p.read_bytes() for p in result.files}


@pytest.mark.parametrize("fmt,num_kills", [("jsonl", 20), ("parquet", 8)])
def test_kill9_at_random_moments_then_restart_is_exactly_once(tmp_path, fmt, num_kills):
    seed = int(os.environ.get("HPCINFER_KILL_SEED", random.randrange(1 << 30)))
    print(f"kill test seed={seed} (rerun with HPCINFER_KILL_SEED={seed})")
    rng = random.Random(seed)
    input_path = tmp_path / "in.jsonl"
    # every=5 keeps all bad lines in shard 0 (the duplicate id is a within-shard check)
    bad_kinds = write_mixed_jsonl(input_path, 600, BAD_PROMPT_LINES, every=5)
    num_rows = 600 + len(BAD_PROMPT_LINES)

    reference = tmp_path / "reference"
    _run_to_end(input_path, reference, fmt, commit_every=1000)

    job = tmp_path / "killed"
    kills_inside_commit = 0
    for _ in range(num_kills):
        # ~150 commits of >= 10 ms each: 20 kills at <= 80 ms never let the job finish.
        proc = _start(input_path, job, fmt, commit_every=4, delay_s=0.01)
        time.sleep(rng.uniform(0.0, 0.08))
        assert proc.poll() is None, f"worker ended before its kill (seed={seed})"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        kills_inside_commit += bool(_temps(job))
    assert not (job / "shards/00001/DONE").exists(), "the kills must interrupt real work"
    _run_to_end(input_path, job, fmt, commit_every=4)

    print(f"{kills_inside_commit} of {num_kills} kills landed inside a commit")
    assert kills_inside_commit >= 1, f"no kill landed inside a commit (seed={seed})"
    assert not _temps(job), "the finishing run must delete leftover temp files"
    got, want = _collected(job, fmt), _collected(reference, fmt)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == want[name], f"{name} differs from the uninterrupted run (seed={seed})"

    # Every input row exactly once: in a result or in errors.jsonl, never both, never twice.
    seen: list[tuple[int, int]] = []
    errors = [json.loads(line) for line in got["errors.jsonl"].splitlines()]
    seen += [(e["shard"], e["row_index"]) for e in errors]
    for shard in range(NUM_SHARDS):
        seen += [(shard, i) for i in _result_indices(job / "outputs", shard, fmt)]
    per_shard = -(-num_rows // NUM_SHARDS)
    assert sorted(seen) == [(i // per_shard, i) for i in range(num_rows)]
    assert {e["row_index"]: e["kind"] for e in errors} == bad_kinds


def _result_indices(out_dir: Path, shard: int, fmt: str) -> list[int]:
    path = out_dir / f"{shard:05d}.{fmt}"
    if fmt == "parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path, columns=["row_index"]).column(0).to_pylist()
    return [json.loads(line)["row_index"] for line in path.read_bytes().splitlines()]
