"""collect: merge a job's committed parts into one output per shard (or one file), in input order.

Output goes to ``JOBDIR/outputs/``: ``NNNNN.<ext>`` per shard or ``results.<ext>``, plus
``errors.jsonl`` (all shards' bad rows, shard then row order). Bytes depend only on the
committed rows, never on how they were split into parts, so a resumed job collects to the
same bytes as an uninterrupted one. Only committed files are read; a shard without DONE is
collected as far as it got and reported as incomplete.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from hpcinfer.io.atomic import atomic_write, atomic_write_bytes
from hpcinfer.io.formats import dumps_line, format_of_part, make_format
from hpcinfer.io.ledger import (DONE_FILE, ERRORS_FILE, FAILED_FILE, SHARDS_DIR,
                                committed_parts)

log = logging.getLogger(__name__)

OUTPUTS_DIR = "outputs"
_SHARD_RE = re.compile(r"^\d{5}$")
_SUFFIX = {"jsonl": ".jsonl", "parquet": ".parquet", "openai-batch": ".openai.jsonl"}


class CollectError(Exception):
    pass


@dataclass
class CollectResult:
    files: list[Path] = field(default_factory=list)
    num_rows: int = 0
    num_errors: int = 0
    incomplete_shards: list[str] = field(default_factory=list)
    failed_shards: list[str] = field(default_factory=list)
    failed_reasons: dict[str, str] = field(default_factory=dict)   # shard name -> FAILED reason

    @property
    def is_complete(self) -> bool:
        return not self.incomplete_shards and not self.failed_shards

    def failure_message(self) -> str | None:
        """Why the job is not complete when a shard FAILED (an unreadable input file, more
        bad rows than input.max_bad_rows); None when none did."""
        if not self.failed_shards:
            return None
        shown = "; ".join(f"shard {name} FAILED: {self.failed_reasons.get(name, '?')}"
                          for name in self.failed_shards[:3])
        more = f" (and {len(self.failed_shards) - 3} more)" if len(self.failed_shards) > 3 else ""
        return (f"the job is not complete: {shown}{more}. The {self.num_rows} rows committed "
                "so far were collected, but they are not the job's answer: fix the cause and "
                "run the job again (it resumes), then collect")


def collect(job_dir: str | Path, format: str | None = None, single_file: bool = False,
            out_dir: str | Path | None = None) -> CollectResult:
    """Merge committed parts; `format` defaults to the job's output format (job.yaml)."""
    job_dir = Path(job_dir)
    shards = sorted(p for p in (job_dir / SHARDS_DIR).glob("*") if _SHARD_RE.match(p.name))
    if not shards:
        raise CollectError(f"{job_dir} has no shards/ directory with results: is it a job "
                           "directory, and has the job started?")
    source = _source_format(shards)
    target = format or _job_output_format(job_dir) or source
    _check_conversion(source, target)
    out = Path(out_dir) if out_dir else job_dir / OUTPUTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    result = CollectResult()
    for d in shards:
        if (d / FAILED_FILE).exists():
            result.failed_shards.append(d.name)
            result.failed_reasons[d.name] = _failed_reason(d)
        elif not (d / DONE_FILE).exists():
            result.incomplete_shards.append(d.name)
    if target == "parquet":
        _collect_parquet(shards, out, single_file, result)
    else:
        _collect_jsonl(shards, out, single_file, target, result)
    _collect_errors(shards, out, result)
    if result.incomplete_shards:
        log.warning("shards not finished (no DONE): %s", ", ".join(result.incomplete_shards))
    return result


def _failed_reason(shard: Path) -> str:
    try:
        return json.loads((shard / FAILED_FILE).read_text())["reason"]
    except (OSError, ValueError, KeyError):
        return "(no reason recorded)"


def _source_format(shards: list[Path]) -> str | None:
    kinds = {format_of_part(p) for d in shards for p in committed_parts(d)}
    if len(kinds) > 1:
        raise CollectError(f"parts of several formats ({', '.join(sorted(kinds))}) in one job: "
                           "output.format changed between runs; collect them separately")
    return kinds.pop() if kinds else None


def _job_output_format(job_dir: Path) -> str | None:
    path = job_dir / "job.yaml"
    if not path.exists():
        return None
    import yaml
    data = yaml.safe_load(path.read_text()) or {}
    return (data.get("output") or {}).get("format")


def _check_conversion(source: str | None, target: str) -> None:
    if target not in _SUFFIX:
        raise CollectError(f"unknown format {target!r}: use jsonl, parquet or openai-batch")
    if source is not None and (source == "openai-batch") != (target == "openai-batch"):
        raise CollectError(f"cannot convert {source} parts to {target}: OpenAI batch lines "
                           "and jsonl/parquet records have different fields")


def _shard_records(shard: Path) -> list[dict]:
    records = []
    for part in committed_parts(shard):
        records.extend(make_format(format_of_part(part)).read(part))
    records.sort(key=lambda r: r["row_index"])
    _check_unique(shard, [r["row_index"] for r in records])
    return records


def _check_unique(shard: Path, sorted_indices: list[int]) -> None:
    for a, b in zip(sorted_indices, sorted_indices[1:]):
        if a == b:
            raise CollectError(f"shard {shard}: row {a} is in two committed parts; the shard "
                               "directory was written by two workers at once")


def _collect_jsonl(shards: list[Path], out: Path, single_file: bool, target: str,
                   result: CollectResult) -> None:
    strip = target == "openai-batch"

    def lines(shard: Path) -> list[str]:
        records = _shard_records(shard)
        result.num_rows += len(records)
        if strip:
            for r in records:
                r.pop("row_index")
        return [dumps_line(r) for r in records]

    suffix = _SUFFIX[target]
    if single_file:
        path = out / f"results{suffix}"

        def write_all(f) -> None:
            for shard in shards:          # one shard's records in memory at a time
                f.write("".join(lines(shard)).encode())
        atomic_write(path, write_all)
        result.files.append(path)
        return
    for shard in shards:
        path = atomic_write_bytes(out / f"{shard.name}{suffix}", "".join(lines(shard)).encode())
        result.files.append(path)


def _collect_parquet(shards: list[Path], out: Path, single_file: bool,
                     result: CollectResult) -> None:
    """One shard in memory at a time; the schema is unified over all shards first."""
    import pyarrow.parquet as pq
    schema = _unified_schema([_shard_schema(s) for s in shards])

    def tables():
        for shard in shards:
            table = _cast(_shard_table(shard), schema)
            result.num_rows += table.num_rows
            yield shard, table

    if single_file:
        path = out / "results.parquet"

        def write_all(f):
            with pq.ParquetWriter(f, schema, compression="zstd") as w:
                for _, table in tables():
                    w.write_table(table)
        atomic_write(path, write_all)
        result.files.append(path)
        return
    for shard, table in tables():
        path = out / f"{shard.name}.parquet"
        atomic_write(path, lambda f, t=table: pq.write_table(t, f, compression="zstd"))
        result.files.append(path)


def _shard_schema(shard: Path):
    import pyarrow.parquet as pq
    parts = committed_parts(shard)
    if parts and format_of_part(parts[0]) == "parquet":
        return _unified_schema([pq.read_schema(p) for p in parts])
    return _shard_table(shard).schema      # jsonl parts: types come from the values


def _shard_table(shard: Path):
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    parts = committed_parts(shard)
    if parts and format_of_part(parts[0]) == "parquet":
        tables = [pq.read_table(p) for p in parts]
        table = pa.concat_tables([_cast(t, _unified_schema([x.schema for x in tables]))
                                  for t in tables]) if tables else None
    else:  # jsonl parts -> parquet
        records = [r for p in parts for r in make_format("jsonl").read(p)]
        table = make_format("parquet").to_table(records) if records else None
    if table is None:
        return make_format("parquet").to_table([])
    table = table.take(pc.sort_indices(table, [("row_index", "ascending")])).combine_chunks()
    _check_unique(shard, table.column("row_index").to_pylist())
    return table


def _unified_schema(schemas: list):
    """One schema for parts whose inferred column types differ (null vs typed, int vs str)."""
    import pyarrow as pa
    names = list(dict.fromkeys(n for s in schemas for n in s.names))
    fields = []
    for name in names:
        types = {s.field(name).type for s in schemas if name in s.names} - {pa.null()}
        if not types:
            fields.append(pa.field(name, pa.null()))
        elif len(types) == 1:
            fields.append(pa.field(name, types.pop()))
        elif types <= {pa.int64(), pa.string()}:
            fields.append(pa.field(name, pa.string()))
        else:
            raise CollectError(f"column {name!r} has different types in different parts "
                               f"({', '.join(map(str, types))}): collect with --format jsonl")
    return pa.schema(fields)


def _cast(table, schema):
    import pyarrow as pa
    columns = []
    for f in schema:
        if f.name in table.column_names:
            columns.append(table.column(f.name).cast(f.type))
        else:
            columns.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _collect_errors(shards: list[Path], out: Path, result: CollectResult) -> None:
    records = []
    for shard in shards:
        path = shard / ERRORS_FILE
        if path.exists():
            with open(path, "rb") as f:
                shard_records = [json.loads(line) for line in f if line.strip()]
            shard_records.sort(key=lambda r: r["row_index"])
            records.extend({"shard": int(shard.name), **r} for r in shard_records)
    result.num_errors = len(records)
    path = atomic_write_bytes(out / ERRORS_FILE, "".join(map(dumps_line, records)).encode())
    result.files.append(path)
