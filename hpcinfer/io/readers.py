"""Streaming shard readers: JSONL and text line by line, Parquet batch by batch, memory flat.

Text input (.txt) is one prompt per line, as Ray Data's read_text gives it: blank lines are
skipped (they are not rows at all, on both sides: the compiler counts rows with
``count_text_rows``), a row's index is its position among the non-blank lines and its id the
1-based physical line number, so errors and outputs point at the line in an editor.

A shard is rows [start, stop) of one file (``hpcinfer.compile.plan.Shard``: any object with
``file``, ``start`` and ``stop`` works). Every row in the range comes out as an ``InputRow``
or a ``BadRow``; a file that cannot be read at all raises ``ShardReadError`` naming it, so
the worker can fail that shard and go on with the others.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from hpcinfer.io.rows import BadRow, InputRow, InputSpec, excerpt, validate_record

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
TEXT_SUFFIXES = (".txt",)
PARQUET_BATCH_ROWS = 2048


class ShardReadError(Exception):
    """A whole input file is unreadable (missing, corrupt, truncated, wrong columns)."""

    def __init__(self, file: str, reason: str):
        self.file = file
        self.reason = reason
        super().__init__(f"cannot read input file {file}: {reason}. Fix or regenerate the "
                         "file (or remove it from input.path); other shards are unaffected")


def resolve_format(path: str, fmt: str = "auto") -> str:
    """jsonl | parquet | openai-batch for one file (auto: from the suffix)."""
    if fmt != "auto":
        return fmt
    lower = str(path).lower()
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(TEXT_SUFFIXES):
        return "text"
    raise ShardReadError(str(path), "cannot tell its format from the suffix: name it *.jsonl, "
                         "*.parquet or *.txt, or set input.format")


def is_blank_line(line: bytes) -> bool:
    """A text-input line that is not a row (empty or only whitespace)."""
    return not line.strip()


def count_text_rows(path: str) -> int:
    """Rows of a text input: its non-blank lines."""
    with open(path, "rb") as f:
        return sum(1 for line in f if not is_blank_line(line))


class ShardReader:
    """Iterate ``InputRow | BadRow`` over one shard, in input order.

    Usage::

        reader = ShardReader(shard, spec)
        for item in reader:          # InputRow | BadRow, each with .index
            ...
        reader.num_rows              # rows seen (== shard rows once exhausted)

    Duplicate ids within the shard: the first occurrence is the row, later ones are bad
    rows (kind duplicate_id). All rows are read and validated even when the caller skips
    done ones, so the duplicate verdict is the same on every restart.
    """

    def __init__(self, shard: Any, spec: InputSpec, *, batch_rows: int = PARQUET_BATCH_ROWS):
        self.file = str(shard.file)
        self.start, self.stop = int(shard.start), int(shard.stop)
        self.spec = spec
        self.format = resolve_format(self.file, spec.format)
        self.batch_rows = batch_rows
        self.num_rows = 0
        self._first_index_of: dict[Any, int] = {}

    def __iter__(self) -> Iterator[InputRow | BadRow]:
        records = {"parquet": self._parquet_records, "text": self._text_records}.get(
            self.format, self._jsonl_records)()
        for index, obj, raw in records:
            self.num_rows += 1
            if isinstance(obj, BadRow):
                yield obj
                continue
            item = validate_record(index, self.file, obj, self.spec, raw)
            if isinstance(item, InputRow) and self.spec.id_name:
                item = self._check_duplicate(item, raw if raw is not None else obj)
            yield item
        self._first_index_of = {}       # ~100 bytes per row: free it once the shard is read

    def _check_duplicate(self, row: InputRow, raw: Any) -> InputRow | BadRow:
        first = self._first_index_of.setdefault(row.key, row.index)
        if first == row.index:
            return row
        return BadRow(row.index, self.file, row.id, "duplicate_id",
                      f"id {row.key!r} already used by row {first} of this file: ids must be "
                      "unique (run hpcinfer validate to list all duplicates)", excerpt(raw))

    # -- JSONL -------------------------------------------------------------------------
    def _jsonl_records(self) -> Iterator[tuple[int, Any, bytes]]:
        try:
            f = open(self.file, "rb")
        except OSError as exc:
            raise ShardReadError(self.file, exc.strerror or str(exc)) from None
        with f:
            for _ in zip(range(self.start), f):      # skip to the shard's first line
                pass
            for index in range(self.start, self.stop):
                line = f.readline()
                if not line:
                    raise ShardReadError(self.file, f"it ends at line {index} but the plan "
                                         f"expects rows up to {self.stop}: the file changed "
                                         "after the job was planned; re-render the job")
                yield index, self._decode_line(index, line), line

    # -- text: one prompt per line ---------------------------------------------------------
    def _text_records(self) -> Iterator[tuple[int, Any, bytes]]:
        try:
            f = open(self.file, "rb")
        except OSError as exc:
            raise ShardReadError(self.file, exc.strerror or str(exc)) from None
        index = 0
        with f:
            for line_number, line in enumerate(f, start=1):
                if is_blank_line(line):
                    continue
                if index >= self.stop:
                    return
                if index >= self.start:
                    yield index, self._text_row(index, line_number, line), line
                index += 1
        if index < self.stop:
            raise ShardReadError(self.file, f"it has {index} non-blank lines but the plan "
                                 f"expects rows up to {self.stop}: the file changed after the "
                                 "job was planned; re-render the job")

    def _text_row(self, index: int, line_number: int, line: bytes) -> Any:
        line = line.rstrip(b"\r\n")
        if line_number == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]                          # UTF-8 byte-order mark
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            return BadRow(index, self.file, line_number, "not_utf8",
                          f"line {line_number} is not UTF-8 (byte {exc.start}): re-encode the "
                          "file as UTF-8", excerpt(line))
        row = {self.spec.text_column: text}
        if self.spec.id_field:
            row[self.spec.id_field] = line_number
        return row

    def _decode_line(self, index: int, line: bytes) -> Any:
        line = line.rstrip(b"\r\n")
        if index == 0 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]                          # UTF-8 byte-order mark
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            return BadRow(index, self.file, None, "not_utf8",
                          f"line is not UTF-8 (byte {exc.start}): re-encode the file as "
                          "UTF-8", excerpt(line))
        if not text.strip():
            return BadRow(index, self.file, None, "blank_line", "line is empty", "")
        try:
            return json.loads(text)
        except ValueError as exc:
            return BadRow(index, self.file, None, "invalid_json", f"line is not valid JSON "
                          f"({exc})", excerpt(text))

    # -- Parquet -----------------------------------------------------------------------
    def _parquet_records(self) -> Iterator[tuple[int, Any, None]]:
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            parquet = pq.ParquetFile(self.file)
        except (OSError, pa.ArrowException) as exc:
            raise ShardReadError(self.file, f"not a readable Parquet file ({exc})") from None
        columns = self._parquet_columns(parquet.schema_arrow)
        # Map columns (pandas dicts written with a map type) read as [(key, value), ...]: give
        # the row a dict, as a struct column or a JSONL object would (sampling overrides,
        # mm_processor_kwargs).
        maps = [c for c in columns if pa.types.is_map(parquet.schema_arrow.field(c).type)]
        groups, first_index = _row_groups_covering(parquet.metadata, self.start, self.stop)
        index = first_index
        try:
            for batch in parquet.iter_batches(batch_size=self.batch_rows, row_groups=groups,
                                              columns=columns, use_threads=False):
                lo, hi = max(self.start - index, 0), min(self.stop - index, batch.num_rows)
                if lo < hi:
                    for offset, obj in enumerate(batch.slice(lo, hi - lo).to_pylist()):
                        for name in maps:
                            if obj.get(name) is not None:
                                obj[name] = dict(obj[name])
                        yield index + lo + offset, obj, None
                index += batch.num_rows
                if index >= self.stop:
                    break                    # the rest of the row group is not this shard's
        except (OSError, pa.ArrowException) as exc:
            raise ShardReadError(self.file, f"Parquet data is corrupt near row {index} "
                                 f"({exc})") from None
        if index < self.stop:
            raise ShardReadError(self.file, f"it has {index} rows but the plan expects rows "
                                 f"up to {self.stop}: re-render the job")

    def _parquet_columns(self, schema) -> list[str]:
        wanted = ["custom_id", "method", "url", "body"] if self.spec.is_openai \
            else self.spec.columns()
        missing = [c for c in wanted if c not in schema.names]
        if missing:
            raise ShardReadError(self.file, f"it has no column {', '.join(map(repr, missing))} "
                                 f"(columns: {', '.join(schema.names[:12])}); fix the "
                                 "input.*_field / passthrough names")
        return wanted

    def column_types(self) -> dict:
        """Arrow types of the id and passthrough columns (Parquet input; {} for JSONL), so
        Parquet outputs keep the input's types instead of inferring them per part."""
        if self.format != "parquet" or self.spec.is_openai:
            return {}
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            schema = pq.read_schema(self.file)
        except (OSError, pa.ArrowException) as exc:
            raise ShardReadError(self.file, f"not a readable Parquet file ({exc})") from None
        names = [n for n in (self.spec.id_field, *self.spec.passthrough) if n]
        return {n: schema.field(n).type for n in names if n in schema.names}


def _row_groups_covering(metadata, start: int, stop: int) -> tuple[list[int], int]:
    """Row groups overlapping [start, stop) and the file row index of the first one."""
    groups, first_index, offset = [], None, 0
    for g in range(metadata.num_row_groups):
        n = metadata.row_group(g).num_rows
        if offset < stop and offset + n > start:
            groups.append(g)
            first_index = offset if first_index is None else first_index
        offset += n
    return groups, first_index if first_index is not None else offset


@dataclass(frozen=True)
class DuplicateId:
    id: Any
    locations: tuple[tuple[str, int], ...]    # (file, row index), in input order


def find_duplicate_ids(paths: Iterable[str], id_field: str, fmt: str = "auto",
                       max_reported: int = 20) -> list[DuplicateId]:
    """Ids used by more than one row across the input files (cheap: two streaming passes).

    Pass 1 keeps an 8-byte hash per id (~70 bytes each in a set, so millions of rows fit);
    pass 2 collects the locations of the few ids whose hash repeated.
    """
    paths = [str(p) for p in paths]
    seen: set[int] = set()
    suspects: set[int] = set()
    for _, _, value in _iter_ids(paths, id_field, fmt):
        h = _id_hash(value)
        if h in seen:
            suspects.add(h)
        seen.add(h)
    del seen
    if not suspects:
        return []
    where: dict[Any, list[tuple[str, int]]] = {}
    for path, index, value in _iter_ids(paths, id_field, fmt):
        if _id_hash(value) in suspects:
            where.setdefault(_hashable(value), []).append((path, index))
    dups = [DuplicateId(v, tuple(locs)) for v, locs in where.items() if len(locs) > 1]
    return dups[:max_reported]


def _hashable(value: Any) -> Any:
    return value if isinstance(value, (str, int)) else json.dumps(value, sort_keys=True)


def _id_hash(value: Any) -> int:
    data = json.dumps(value, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _iter_ids(paths: list[str], id_field: str, fmt: str) -> Iterator[tuple[str, int, Any]]:
    """(file, row index, id) for rows with a non-null id; unreadable rows are skipped."""
    for path in paths:
        if resolve_format(path, fmt) == "text":
            continue                    # ids are line numbers: unique by construction
        if resolve_format(path, fmt) == "parquet":
            import pyarrow.parquet as pq
            index = 0
            for batch in pq.ParquetFile(path).iter_batches(columns=[id_field]):
                for value in batch.column(0).to_pylist():
                    if value is not None:
                        yield path, index, value
                    index += 1
            continue
        with open(path, "rb") as f:
            for index, line in enumerate(f):
                try:
                    value = json.loads(line).get(id_field)
                except (ValueError, AttributeError):
                    continue
                if value is not None:
                    yield path, index, value
