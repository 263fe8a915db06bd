"""Input discovery: globs -> files -> row counts -> shards.

Counting is cheap on purpose (login nodes): Parquet row counts come from the footer
metadata (pyarrow, imported only when a Parquet file is present); JSONL rows are counted by
streaming newlines, never parsed; text rows are the non-blank lines (blank ones are not rows). A row is a physical line: the reader later treats a blank
or broken line as a bad row of that shard, so row ranges stay stable either way.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from hpcinfer.compile.errors import plan_error
from hpcinfer.compile.plan import Shard

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
TEXT_SUFFIXES = (".txt",)
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class InputFile:
    path: str
    format: str      # jsonl | parquet | text | openai-batch
    num_rows: int


def discover(cfg) -> list[InputFile]:
    """Files matched by input.path (sorted, deduplicated) with their row counts."""
    patterns = cfg.input.path if isinstance(cfg.input.path, (list, tuple)) else [cfg.input.path]
    files: list[str] = []
    for pattern in patterns:
        matched = sorted(glob.glob(str(pattern), recursive=True))
        if not matched:
            raise plan_error(cfg, "input.path", f"{pattern!r} matches no file",
                             "check the path (relative paths are resolved against the job "
                             "file's directory) or the glob pattern")
        files.extend(m for m in matched if m not in files)
    return [_inspect(cfg, path) for path in files]


def _inspect(cfg, path: str) -> InputFile:
    fmt = _format_of(cfg, path)
    try:
        if fmt == "parquet":
            num_rows = _parquet_rows(cfg, path)
        elif fmt == "text":
            from hpcinfer.io.readers import count_text_rows
            num_rows = count_text_rows(path)
        else:
            num_rows = count_jsonl_rows(path)
    except OSError as exc:
        raise plan_error(cfg, "input.path", f"input file {path} is not readable "
                         f"({exc.strerror or exc})",
                         "check that it exists and that you may read it, or remove it from the glob") from None
    return InputFile(path=path, format=fmt, num_rows=num_rows)


def _format_of(cfg, path: str) -> str:
    fmt = getattr(cfg.input, "format", "auto") or "auto"
    if fmt != "auto":
        return str(fmt)
    lower = path.lower()
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(TEXT_SUFFIXES):
        return "text"
    raise plan_error(cfg, "input.format", f"cannot tell the format of {path} from its suffix",
                     "name files *.jsonl, *.parquet or *.txt (one prompt per line), or set "
                     "input.format: jsonl | parquet | text | openai-batch")


def count_jsonl_rows(path: str) -> int:
    """Lines in the file; a last line without a trailing newline counts too."""
    num_newlines = 0
    last = b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            num_newlines += chunk.count(b"\n")
            last = chunk[-1:]
    return num_newlines + (0 if last == b"\n" else 1)


def _parquet_rows(cfg, path: str) -> int:
    import pyarrow.parquet as pq  # only when a Parquet input exists: it costs ~0.2 s to import
    if os.path.isdir(path):
        raise IsADirectoryError(21, "Is a directory", path)
    try:
        parquet = pq.ParquetFile(path)
    except OSError:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid for non-Parquet bytes
        raise plan_error(cfg, "input.path", f"{path} is not a valid Parquet file ({exc})",
                         "regenerate the file or drop it from the glob") from None
    id_field = getattr(cfg.input, "id_field", None)
    names = parquet.schema_arrow.names
    if id_field and id_field not in names:
        raise plan_error(cfg, "input.id_field",
                         f"Parquet file {path} has no column {id_field!r} (columns: "
                         f"{', '.join(names[:8])}{', ...' if len(names) > 8 else ''})",
                         "set input.id_field to an existing column, or to null to identify "
                         "rows by (file, row index)")
    return parquet.metadata.num_rows


def make_shards(files: list[InputFile], shard_rows: int) -> tuple[Shard, ...]:
    """Split every file into row ranges of at most shard_rows; shards never span files."""
    shards: list[Shard] = []
    for f in files:
        for start in range(0, f.num_rows, shard_rows):
            shards.append(Shard(index=len(shards), file=f.path, start=start,
                                stop=min(start + shard_rows, f.num_rows)))
    return tuple(shards)


def input_dirs(files: list[InputFile]) -> list[str]:
    """Directories to bind into a container so every input is visible at the same path."""
    return sorted({str(Path(f.path).resolve().parent) for f in files})


def check_unique_ids(cfg, paths) -> None:
    """`hpcinfer validate`: refuse duplicate ids across all input files (the worker refuses
    them too). Two streaming passes over the id column (hpcinfer.io.readers)."""
    from hpcinfer.io.readers import find_duplicate_ids
    fmt = str(getattr(cfg.input, "format", "auto") or "auto")
    id_name = "custom_id" if fmt == "openai-batch" else getattr(cfg.input, "id_field", None)
    if not id_name or not paths:
        return
    dups = find_duplicate_ids(list(paths), id_name, fmt)
    if dups:
        shown = "; ".join(f"{d.id!r} at " + ", ".join(f"{Path(f).name} row {i}"
                                                     for f, i in d.locations[:3])
                          for d in dups[:5])
        raise plan_error(cfg, "input.id_field", f"duplicate {id_name} values in the input "
                         f"({shown}{'; ...' if len(dups) > 5 else ''})",
                         "make the ids unique (each row is answered once per id), or set "
                         "input.id_field: null to identify rows by (file, row index)")
