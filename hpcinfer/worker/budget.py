"""The bad-row budget (``input.max_bad_rows``): how many rows of a task may go to errors.jsonl
before the task stops and fails.

Why: a job whose every row is bad (a misnamed prompt column, the wrong file) used to end
COMPLETED with exit 0 and "0 results, N bad rows", which on a cluster one learns only after the
queue. Past the budget the shard loop stops admitting, commits what finished (good rows and
the bad rows' errors.jsonl lines alike), marks the shard FAILED with the reason, and the task
exits 2: Slurm shows FAILED, ``hpcinfer status`` shows the reason, ``hpcinfer collect``
refuses to call the job complete.

The count covers the task's rows across its shards and across restarts: bad rows committed
by an earlier run count too (they are in errors.jsonl), so a requeue cannot reset it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from hpcinfer.io.shard_loop import BadRowError

NUM_REASONS = 3      # reasons quoted in the message


class BudgetExceeded(BadRowError):
    """More bad rows than input.max_bad_rows allows; str() says how many and why."""


def allowed_bad_rows(setting, num_rows: int) -> int | None:
    """The count a setting allows: an int is a count, a float a fraction of ``num_rows``
    rounded up (so a 10-row test job may have its one odd row), but short of every row when
    the fraction is below 1 (a task whose every row is bad fails, however small); None: no
    budget."""
    if setting is None:
        return None
    if isinstance(setting, float):
        allowed = math.ceil(setting * num_rows - 1e-9)
        return allowed if setting >= 1 else max(min(allowed, num_rows - 1), 0)
    return int(setting)


class BadRowBudget:
    """One task's budget; the shard loops call ``add`` for each bad row they set aside."""

    def __init__(self, setting, num_rows: int, num_bad: int = 0, reasons: list[str] = ()):
        self.setting = setting
        self.num_rows = num_rows
        self.allowed = allowed_bad_rows(setting, num_rows)
        self.num_bad = num_bad
        self.reasons = list(reasons)[:NUM_REASONS]

    @classmethod
    def for_task(cls, setting, shard_dirs: list[Path], num_rows: int) -> BadRowBudget:
        """The budget with the bad rows already committed in these shard dirs counted."""
        num_bad, reasons = 0, []
        for directory in shard_dirs:
            path = Path(directory) / "errors.jsonl"
            if not path.is_file():
                continue
            with open(path, "rb") as f:
                for line in f:
                    if not line.strip():
                        continue
                    num_bad += 1
                    if len(reasons) < NUM_REASONS:
                        reasons.append(_reason(json.loads(line)))
        return cls(setting, num_rows, num_bad, reasons)

    @property
    def is_exceeded(self) -> bool:
        return self.allowed is not None and self.num_bad > self.allowed

    def add(self, record: dict) -> None:
        """Count one bad row (its errors.jsonl record); raises BudgetExceeded past the budget."""
        self.num_bad += 1
        if len(self.reasons) < NUM_REASONS:
            self.reasons.append(_reason(record))
        if self.is_exceeded:
            raise BudgetExceeded(self.message())

    def message(self) -> str:
        what = (f"{self.setting:g} of {self.num_rows} rows = {self.allowed}"
                if isinstance(self.setting, float) else f"{self.allowed}")
        return (f"{self.num_bad} of {self.num_rows} rows bad (> input.max_bad_rows: {what}); "
                f"first reasons: {'; '.join(self.reasons)}. The task stopped: fix the input or "
                "the input: section (hpcinfer validate shows the bad rows), or raise "
                "input.max_bad_rows; every bad row is in shards/*/errors.jsonl")


def _reason(record: dict) -> str:
    where = f"{Path(str(record.get('file') or '?')).name} row {record.get('row_index')}"
    text = " ".join(str(record.get("reason", "")).split())
    return f"{where}: {record.get('kind')}: {text[:160]}"
