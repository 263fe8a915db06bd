"""Progress: rows done/total, in/out tok/s, KV use, preemptions, ETA.

On a terminal it draws a rich progress bar; otherwise (Slurm logs) it logs one line every
``every_s`` seconds. Either way it appends the same numbers to the metrics file, which is
what ``hpcinfer status`` shows.
"""
from __future__ import annotations

import logging
import os
import sys
import time

from hpcinfer.worker.metrics import MetricsWriter

log = logging.getLogger("hpcinfer.worker")
EVERY_ENV = "HPCINFER_PROGRESS_EVERY_S"


class Progress:
    def __init__(self, rows_total: int, rows_done: int, metrics: MetricsWriter | None, *,
                 every_s: float | None = None, use_bar: bool | None = None):
        self.rows_total = rows_total
        self.rows_done_at_start = rows_done
        self.rows_done = rows_done
        self.num_errors = 0
        self.metrics = metrics
        self.every_s = float(os.environ.get(EVERY_ENV, "5")) if every_s is None else every_s
        self.started_s = time.monotonic()
        self._last_s = self.started_s
        self.engine = None                      # LLMEngine once loaded (token counts, KV)
        self.shard: int | None = None
        use_bar = sys.stderr.isatty() if use_bar is None else use_bar
        self._bar = _RichBar(rows_total, rows_done) if use_bar else None

    def add_rows(self, num_rows: int, num_errors: int = 0) -> None:
        self.rows_done += num_rows
        self.num_errors += num_errors

    def snapshot(self) -> dict:
        elapsed_s = max(time.monotonic() - self.started_s, 1e-6)
        rows_run = self.rows_done - self.rows_done_at_start
        rows_per_s = rows_run / elapsed_s
        left = self.rows_total - self.rows_done
        snap = {"event": "progress", "status": "running", "shard": self.shard,
                "rows_done": self.rows_done, "rows_total": self.rows_total,
                "rows_errors": self.num_errors, "rows_per_s": round(rows_per_s, 3),
                "eta_s": round(left / rows_per_s, 1) if rows_per_s > 0 else None,
                "elapsed_s": round(elapsed_s, 1)}
        engine = self.engine
        if engine is not None:
            stats = engine.stats
            snap.update(prompt_tokens=stats.num_prompt_tokens,
                        output_tokens=stats.num_generated_tokens,
                        in_tok_per_s=round(stats.num_prompt_tokens / elapsed_s, 1),
                        out_tok_per_s=round(stats.num_generated_tokens / elapsed_s, 1),
                        kv_use=round(engine.kv_cache_usage, 4),
                        preemptions=engine.num_preemptions,
                        in_flight=engine.get_num_unfinished_requests())
        return snap

    def tick(self, force: bool = False) -> None:
        if self._bar is not None:
            self._bar.update(self.rows_done)
        now = time.monotonic()
        if not force and now - self._last_s < self.every_s:
            return
        self._last_s = now
        snap = self.snapshot()
        if self._bar is None:
            log.info("progress: %s", format_line(snap))
        if self.metrics is not None:
            self.metrics.write(snap)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def format_line(s: dict) -> str:
    eta = "-" if s.get("eta_s") is None else f"{s['eta_s']:.0f}s"
    line = (f"rows {s['rows_done']}/{s['rows_total']} ({s['rows_errors']} bad), "
            f"{s['rows_per_s']:.1f} rows/s, ETA {eta}")
    if "in_tok_per_s" in s:
        line += (f", in {s['in_tok_per_s']:.0f} tok/s, out {s['out_tok_per_s']:.0f} tok/s, "
                 f"KV {100 * s['kv_use']:.0f}%, {s['preemptions']} preemptions")
    return line


class _RichBar:
    def __init__(self, total: int, done: int):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                                   TimeRemainingColumn)
        self._progress = RichProgress("rows", BarColumn(), MofNCompleteColumn(),
                                      TimeRemainingColumn(), transient=False)
        self._task = self._progress.add_task("rows", total=total, completed=done)
        self._progress.start()

    def update(self, done: int) -> None:
        self._progress.update(self._task, completed=done)

    def close(self) -> None:
        self._progress.stop()
