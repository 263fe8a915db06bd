"""Output formats: one answered row -> a record dict -> bytes of a part file, and back.

Every record carries ``row_index`` (the row's position in its input file): the ledger reads
it to know what is done and collect sorts by it. Field order is fixed so equal results give
equal bytes. Formats:

- jsonl: ``{"row_index", <id>, <passthrough...>, "text", "num_prompt_tokens",
  "num_output_tokens", "finish_reason"[, "logprobs"][, "prompt_logprobs"]}`` one JSON object
  per line.
  ``text`` is named by output.text_field (e.g. ``generated_text``, as Ray Data's template
  writes it).
- parquet: the same columns with an explicit schema.
- openai-batch: the OpenAI batch output line plus ``row_index`` (collect drops it); with
  sampling.prompt_logprobs, vLLM's ``prompt_logprobs`` in the response body (chat) or its
  choice (completions), as vLLM's server writes them (openai_batch.response_line).

Pooling tasks (embed/classify/score/reward) write ``{"row_index", <id>, <passthrough...>,
<embedding|probs|score|reward>, "num_prompt_tokens"}`` instead: JSONL arrays, Parquet
``list<float32>`` (embedding, probs), ``float64`` (score), ``list<list<float32>>`` (reward:
per token, per label).
"""
from __future__ import annotations

import copy
import json
from typing import IO, Any

from hpcinfer.io import openai_batch

FORMATS = ("jsonl", "parquet", "openai-batch")
RESULT_FIELDS = ("text", "num_prompt_tokens", "num_output_tokens", "finish_reason")


def dumps_line(record: dict) -> str:
    """One JSONL line; non-ASCII kept readable unless it cannot be UTF-8 (lone surrogates)."""
    line = json.dumps(record, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(record)
    return line + "\n"


def write_jsonl(records: list[dict], f: IO[bytes]) -> None:
    f.write("".join(map(dumps_line, records)).encode("utf-8"))


def read_jsonl(path) -> list[dict]:
    with open(path, "rb") as f:
        return [json.loads(line) for line in f if line.strip()]


class JsonlFormat:
    name = "jsonl"
    suffix = ".jsonl"

    def __init__(self, *, id_name: str | None = "id", passthrough: tuple[str, ...] = (),
                 logprobs: bool = False, column_types: dict | None = None,
                 text_field: str = "text", prompt_logprobs: bool = False, **_: Any):
        reserved = {"row_index", *RESULT_FIELDS[1:], text_field, "logprobs", "prompt_logprobs"}
        clash = reserved & (set(passthrough) | {id_name})
        if clash:
            raise ValueError(f"input.passthrough / id_field name {sorted(clash)} clashes with "
                             f"an output field ({', '.join(sorted(reserved))}): rename the "
                             "input column or drop it from input.passthrough")
        self.id_name = id_name
        self.passthrough = tuple(c for c in passthrough if c != id_name)
        self.logprobs = logprobs
        self.prompt_logprobs = prompt_logprobs
        self.column_types = column_types or {}
        self.text_field = text_field

    def with_column_types(self, column_types: dict) -> "JsonlFormat":
        """A copy that writes these input columns with these Arrow types (Parquet)."""
        clone = copy.copy(self)
        clone.column_types = {**self.column_types, **column_types}
        return clone

    def _row_fields(self, row) -> dict[str, Any]:
        """What every record starts with: the row's index, its id and the passthrough columns."""
        rec: dict[str, Any] = {"row_index": row.index}
        if self.id_name:
            rec[self.id_name] = row.id
        for name in self.passthrough:
            rec[name] = row.passthrough.get(name)
        return rec

    def record(self, row, out) -> dict:
        rec = self._row_fields(row)
        rec[self.text_field] = out.text
        rec["num_prompt_tokens"] = out.num_prompt_tokens
        rec["num_output_tokens"] = out.num_output_tokens
        rec["finish_reason"] = out.finish_reason
        if self.logprobs:
            rec["logprobs"] = None if out.logprobs is None else [
                [{"token_id": int(t), "logprob": float(lp)} for t, lp in pos]
                for pos in out.logprobs]
        if self.prompt_logprobs:
            rec["prompt_logprobs"] = None if out.prompt_logprobs is None else [
                None if pos is None else
                [{"token_id": int(t), "logprob": float(lp)} for t, lp, *_ in pos]
                for pos in out.prompt_logprobs]
        return rec

    def write(self, records: list[dict], f: IO[bytes]) -> None:
        write_jsonl(records, f)

    def read(self, path) -> list[dict]:
        return read_jsonl(path)

    def read_indices(self, path) -> list[int]:
        return [r["row_index"] for r in read_jsonl(path)]


class OpenAIBatchFormat(JsonlFormat):
    name = "openai-batch"
    suffix = ".openai.jsonl"

    def __init__(self, *, model: str = "", created_s: int = 0, **kwargs: Any):
        super().__init__(**{**kwargs, "id_name": "custom_id", "passthrough": ()})
        self.model = model
        self.created_s = created_s

    def record(self, row, out) -> dict:
        line = openai_batch.response_line(row, out, created_s=self.created_s, model=self.model)
        line["row_index"] = row.index
        return line


class ParquetFormat(JsonlFormat):
    name = "parquet"
    suffix = ".parquet"

    def write(self, records: list[dict], f: IO[bytes]) -> None:
        import pyarrow.parquet as pq
        pq.write_table(self.to_table(records), f, compression="zstd")

    def to_table(self, records: list[dict]):
        import pyarrow as pa
        names = list(records[0]) if records else self._names()
        arrays = [self._array(name, [r[name] for r in records]) for name in names]
        return pa.Table.from_arrays(arrays, names=names)

    def _names(self) -> list[str]:
        results = [self.text_field if f == "text" else f for f in RESULT_FIELDS]
        return ["row_index", *([self.id_name] if self.id_name else []), *self.passthrough,
                *results, *(["logprobs"] if self.logprobs else []),
                *(["prompt_logprobs"] if self.prompt_logprobs else [])]

    def _array(self, name: str, values: list):
        import pyarrow as pa
        fixed = _fixed_types()
        if name == getattr(self, "text_field", "text"):
            return pa.array(values, pa.string())
        if name in fixed and name != "text":     # "text" may be a passthrough column here
            return pa.array(values, fixed[name])
        if name in self.column_types:
            return pa.array(values, self.column_types[name])
        if _is_mixed_str_int(values):
            # JSONL ids like 7 and "a7" in one column: strings for all (str(7) == "7").
            return pa.array([None if v is None else str(v) for v in values], pa.string())
        try:
            return pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # Mixed types in a JSONL column: keep the values as JSON text (documented).
            return pa.array([None if v is None else json.dumps(v, ensure_ascii=False)
                             for v in values], pa.string())

    def read(self, path) -> list[dict]:
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()

    def read_indices(self, path) -> list[int]:
        import pyarrow.parquet as pq
        return pq.read_table(path, columns=["row_index"]).column(0).to_pylist()


def _is_mixed_str_int(values: list) -> bool:
    kinds = {type(v) for v in values if v is not None}
    return kinds == {str, int}


def _fixed_types() -> dict:
    import pyarrow as pa
    token = pa.struct([("token_id", pa.int64()), ("logprob", pa.float64())])
    return {"row_index": pa.int64(), "text": pa.string(), "num_prompt_tokens": pa.int64(),
            "num_output_tokens": pa.int64(), "finish_reason": pa.string(),
            "logprobs": pa.list_(pa.list_(token)), "prompt_logprobs": pa.list_(pa.list_(token))}


# pooling task -> the output column holding its result
POOLING_FIELDS = {"embed": "embedding", "classify": "probs", "score": "score",
                  "reward": "reward"}


class PoolingJsonlFormat(JsonlFormat):
    """A pooling task's records; ``out`` has ``value`` (the result) and ``num_prompt_tokens``."""

    def __init__(self, *, task: str, **kwargs: Any):
        self.task = task
        self.field = POOLING_FIELDS[task]
        names = set(kwargs.get("passthrough", ())) | {kwargs.get("id_name", "id")}
        clash = {self.field, "num_prompt_tokens"} & names
        if clash:
            raise ValueError(f"input.passthrough / id_field name {sorted(clash)} clashes with "
                             f"an output field of task {task}: rename the input column or drop "
                             "it from input.passthrough")
        super().__init__(**{**kwargs, "logprobs": False})

    def record(self, row, out) -> dict:
        rec = self._row_fields(row)
        rec[self.field] = out.value
        rec["num_prompt_tokens"] = out.num_prompt_tokens
        return rec


class PoolingParquetFormat(PoolingJsonlFormat, ParquetFormat):
    def _names(self) -> list[str]:
        return ["row_index", *([self.id_name] if self.id_name else []), *self.passthrough,
                self.field, "num_prompt_tokens"]

    def _array(self, name: str, values: list):
        import pyarrow as pa
        if name == self.field:
            f32 = pa.list_(pa.float32())
            kind = {"embedding": f32, "probs": f32, "score": pa.float64(),
                    "reward": pa.list_(f32)}[name]
            return pa.array(values, kind)
        return super()._array(name, values)


class PoolingOpenAIBatchFormat(OpenAIBatchFormat):
    """/v1/embeddings and /v1/score rows (task embed / score): vLLM's response bodies."""

    def __init__(self, *, task: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.task = task

    def record(self, row, out) -> dict:
        line = openai_batch.pooling_response_line(row, out, created_s=self.created_s,
                                                  model=self.model)
        line["row_index"] = row.index
        return line


_CLASSES = {"jsonl": JsonlFormat, "parquet": ParquetFormat, "openai-batch": OpenAIBatchFormat}
_POOLING_CLASSES = {"jsonl": PoolingJsonlFormat, "parquet": PoolingParquetFormat}
OPENAI_POOLING_TASKS = ("embed", "score")      # the tasks with an OpenAI url (openai_batch)


def make_format(name: str, task: str = "generate", **options: Any) -> JsonlFormat:
    """Format object by name; options: id_name, passthrough, logprobs, column_types,
    model and created_s (openai-batch). A pooling ``task`` gets its own record layout."""
    if name not in _CLASSES:
        raise ValueError(f"unknown output format {name!r}: use one of {', '.join(FORMATS)}")
    if task in POOLING_FIELDS:
        if name == "openai-batch" and task in OPENAI_POOLING_TASKS:
            return PoolingOpenAIBatchFormat(task=task, **options)
        if name not in _POOLING_CLASSES:
            raise ValueError(f"output.format {name} is not written for task {task}: use "
                             "jsonl or parquet")
        for key in ("model", "created_s"):
            options.pop(key, None)
        return _POOLING_CLASSES[name](task=task, **options)
    return _CLASSES[name](**options)


def format_of_part(path) -> str:
    """jsonl | parquet | openai-batch from a part file name (openai parts end .openai.jsonl)."""
    name = str(path)
    if name.endswith(".parquet"):
        return "parquet"
    return "openai-batch" if name.endswith(".openai.jsonl") else "jsonl"
