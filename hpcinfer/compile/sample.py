"""`hpcinfer validate` reads the data: the first rows of every input file, with the worker's
own reader (hpcinfer.io.readers), so a misnamed column or a broken line is found on the login
node instead of after the queue wait and the model load.

Bounded on large inputs: a JSONL or text file is read up to its N-th row only, a Parquet file
only in the row groups that hold its first N rows (pyarrow is imported only then). ``--full``
reads everything. A file none of whose sampled rows is usable is an error (exit 2) naming
file:line of its first bad rows; a file with some bad rows is a warning with counts.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

DEFAULT_SAMPLE_ROWS = 100
FULL_ID_CHECK_ROWS = 200_000      # up to this many rows validate also scans every id (< 1 s)
MAX_SHOWN = 3

# BadRow.kind -> the input key whose value most likely caused it
_CONTENT_KINDS = ("missing_prompt", "null_prompt", "bad_prompt_type", "empty_prompt",
                  "bad_messages")
_ID_KINDS = ("missing_id", "null_id", "bad_id_type", "empty_id")


@dataclass
class FileSample:
    """What the sample of one input file showed."""
    file: str
    num_rows: int = 0                  # rows read
    num_usable: int = 0
    bad_kinds: Counter = field(default_factory=Counter)
    shown: list[str] = field(default_factory=list)       # "file:line: reason", the first few

    @property
    def num_bad(self) -> int:
        return self.num_rows - self.num_usable


def sample_inputs(cfg, plan, max_rows: int | None = DEFAULT_SAMPLE_ROWS) -> list[FileSample]:
    """Read the first ``max_rows`` rows (None: all) of every input file of ``plan``.

    Raises ConfigError when a file cannot be read with this config, or when no sampled row of
    a file is usable; returns the per-file samples otherwise (the caller warns about bad rows).
    """
    from hpcinfer.io.readers import ShardReadError, ShardReader
    from hpcinfer.io.rows import InputRow, InputSpec
    try:
        spec = InputSpec.from_config(cfg.input, str(cfg.task))
    except ValueError as exc:
        raise cfg.error_at("input", str(exc), "fix the input block") from None
    samples = []
    for path, num_rows in _rows_per_file(plan).items():
        stop = num_rows if max_rows is None else min(num_rows, max_rows)
        sample = FileSample(path)
        reader = ShardReader(_Range(path, 0, stop), spec)
        try:
            for item in reader:
                sample.num_rows += 1
                if isinstance(item, InputRow):
                    sample.num_usable += 1
                    continue
                sample.bad_kinds[item.kind] += 1
                if len(sample.shown) < MAX_SHOWN:
                    sample.shown.append(f"{_where(item, reader.format, spec)}: {item.reason}")
        except ShardReadError as exc:
            raise cfg.error_at(_key_for_columns(cfg, exc.reason), f"cannot read input file "
                               f"{path}: {exc.reason}", "fix the file or the input block") from None
        if sample.num_rows and not sample.num_usable:
            raise _unusable(cfg, sample, max_rows)
        samples.append(sample)
    return samples


@dataclass(frozen=True)
class _Range:
    file: str
    start: int
    stop: int


def _rows_per_file(plan) -> dict[str, int]:
    rows: dict[str, int] = {}
    for shard in plan.shards:
        rows[shard.file] = max(rows.get(shard.file, 0), shard.stop)
    return rows


def _where(bad, fmt: str, spec) -> str:
    if fmt == "parquet":
        return f"{bad.file} row {bad.index}"
    if fmt == "text":
        # text rows count non-blank lines; their id is the physical line number
        line = bad.id if isinstance(bad.id, int) and spec.id_field else None
        return f"{bad.file}:{line}" if line else f"{bad.file} (prompt {bad.index + 1})"
    return f"{bad.file}:{bad.index + 1}"


def _unusable(cfg, sample: FileSample, max_rows: int | None):
    kind = sample.bad_kinds.most_common(1)[0][0]
    scope = "all" if max_rows is None else f"the first {sample.num_rows}"
    return cfg.error_at(_key_for_kind(cfg, kind),
                        f"none of {scope} rows of {sample.file} is usable "
                        f"({_counts(sample)}): {'; '.join(sample.shown)}",
                        "fix the column names under input (id_field, prompt_field, "
                        "messages_field, prompt_template) or the file")


def _counts(sample: FileSample) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in sample.bad_kinds.most_common())


def _key_for_kind(cfg, kind: str) -> str:
    if kind == "template_error":
        return "input.prompt_template"
    if kind in _ID_KINDS:
        return "input.id_field"
    if kind in _CONTENT_KINDS and cfg.input.format != "openai-batch":
        name = {"chat": "messages_field", "score": "text_1_field"}.get(
            str(cfg.task), "prompt_field" if cfg.task == "generate" else "text_field")
        return f"input.{name}"
    return "input.path"


def _key_for_columns(cfg, reason: str) -> str:
    # "it has no column 'prompt' (columns: ...)": point at the key that named that column
    for key in ("id_field", "prompt_field", "messages_field", "text_field", "text_1_field",
                "text_2_field", "sampling_field", "adapter_field", "image_field",
                "mm_processor_kwargs_field", "prompt_template", "passthrough"):
        value = getattr(cfg.input, key, None)
        names = value if isinstance(value, tuple) else (value,)
        if any(isinstance(n, str) and f"'{n}'" in reason for n in names):
            return f"input.{key}"
    return "input.path"


def warnings_of(cfg, samples: list[FileSample]) -> list[str]:
    """One line per file with bad sampled rows: counts and the first few, with file:line."""
    lines = []
    for s in samples:
        if not s.num_bad:
            continue
        line = (f"{s.file}: {s.num_bad} of {s.num_rows} sampled rows are bad ({_counts(s)}), "
                f"e.g. {s.shown[0]}")
        if _over_budget(cfg.input.max_bad_rows, s.num_bad, s.num_rows):
            line += (f"; that is over input.max_bad_rows ({cfg.input.max_bad_rows}): a task "
                     "with as many would stop and fail")
        lines.append(line)
    return lines


def _over_budget(budget, num_bad: int, num_rows: int) -> bool:
    """As the worker counts it (its rounding included), over the sampled rows."""
    from hpcinfer.worker.budget import allowed_bad_rows
    allowed = allowed_bad_rows(budget, num_rows)
    return allowed is not None and num_bad > allowed
