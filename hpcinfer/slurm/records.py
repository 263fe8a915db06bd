"""The job dir's record of its submissions (submissions.jsonl), one JSON line per submit.

Written only by the backends (slurm.py, local.py); read by status and cancel.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

RECORD_NAME = "submissions.jsonl"


def record_submission(job_dir: str | os.PathLike, backend: str, job_id: str, num_tasks: int,
                      **extra) -> None:
    """``extra``: backend facts, e.g. the local runner's pid and host (status checks them)."""
    line = json.dumps({"backend": backend, "job_id": job_id, "num_tasks": num_tasks,
                       "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       **extra})
    # One short append per submit: atomic for lines this size on POSIX (O_APPEND).
    with open(Path(job_dir) / RECORD_NAME, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def submissions(job_dir: str | os.PathLike) -> list[dict]:
    path = Path(job_dir) / RECORD_NAME
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def last_submission(job_dir: str | os.PathLike) -> dict | None:
    subs = submissions(job_dir)
    return subs[-1] if subs else None
