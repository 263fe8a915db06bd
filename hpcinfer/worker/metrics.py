"""Metrics lines: JOBDIR/metrics/task-TTTTT-rank-RRR.jsonl, one JSON object per line.

One file per rank, so each has one writer. The preflight writes the first line; the worker
appends progress lines (``event: progress``) every few seconds and a last line with
``status`` ok | failed | requeue. ``hpcinfer status`` reads the last line of each file.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger("hpcinfer.worker")


def metrics_path(job_dir: Path, task_id: int | None, rank: int) -> Path:
    task = task_id if task_id is not None else 0
    return Path(job_dir) / "metrics" / f"task-{task:05d}-rank-{rank:03d}.jsonl"


class MetricsWriter:
    def __init__(self, job_dir: Path, task_id: int | None, rank: int, base: dict | None = None):
        self.path = metrics_path(job_dir, task_id, rank)
        self.base = dict(base or {})          # fields repeated on every line (task, rank, host)

    def write(self, record: dict) -> None:
        line = {**self.base, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **record}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line, sort_keys=True, default=str) + "\n")
        except OSError as exc:    # metrics are for humans: never stop the job over them
            log.warning("cannot write metrics to %s: %s", self.path, exc)
