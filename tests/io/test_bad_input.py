"""Bad-input corpus: >= 20 kinds of bad row and 3+ kinds of bad file mixed into good data.

Good rows are all answered, each bad row is in errors.jsonl once with its kind and a reason,
nothing is lost or duplicated, and an unreadable file fails its shard only.
"""
from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from hpcinfer.io import ledger
from hpcinfer.io.collect import collect
from hpcinfer.io.formats import make_format
from hpcinfer.io.readers import ShardReadError
from hpcinfer.io.rows import InputSpec
from hpcinfer.io.shard_loop import BadRowError, process_shard
from hpcinfer.testing.io_corpus import (BAD_CHAT_LINES, BAD_OPENAI_LINES, BAD_PROMPT_LINES,
                                        good_chat_row, openai_line, reverse_answer,
                                        write_mixed_jsonl, write_prompt_parquet)

PROMPT_SPEC = InputSpec(id_field="id", prompt_field="prompt", sampling_field="sampling",
                        passthrough=("topic",))
CHAT_SPEC = InputSpec(task="chat", id_field="id", messages_field="messages")
OPENAI_SPEC = InputSpec(task="chat", format="openai-batch")


def _shard(path: Path, stop: int, start: int = 0):
    return types.SimpleNamespace(file=str(path), start=start, stop=stop)


def _num_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n")


def _run(tmp_path, name, path, spec, fmt="jsonl", index=0, **kw):
    job = tmp_path / "job"
    process_shard(_shard(path, _num_lines(path)), spec, ledger.shard_dir(job, index),
                  make_format(fmt, id_name=spec.id_name, passthrough=spec.passthrough),
                  reverse_answer, commit_every_rows=9, **kw)
    return job


def test_bad_row_kinds_are_many_and_distinct():
    kinds = {k for k, _ in BAD_PROMPT_LINES + BAD_CHAT_LINES + BAD_OPENAI_LINES}
    assert len(kinds) >= 20, sorted(kinds)


@pytest.mark.parametrize("spec,bad,make_good,num_good", [
    (PROMPT_SPEC, BAD_PROMPT_LINES, None, 200),
    (CHAT_SPEC, BAD_CHAT_LINES, good_chat_row, 60),
])
def test_bad_rows_go_to_errors_and_good_rows_are_all_answered(tmp_path, spec, bad, make_good,
                                                              num_good):
    path = tmp_path / "in.jsonl"
    kwargs = {"make_good": make_good} if make_good else {}
    kinds = write_mixed_jsonl(path, num_good, bad, every=3, **kwargs)
    job = _run(tmp_path, "job", path, spec)
    result = collect(job, format="jsonl")
    assert result.num_rows == num_good and result.num_errors == len(bad)
    errors = [json.loads(line) for line in (job / "outputs/errors.jsonl").read_text().splitlines()]
    assert {e["row_index"]: e["kind"] for e in errors} == kinds
    for e in errors:
        assert e["reason"] and e["file"] == str(path)
    by_index = {e["row_index"]: e for e in errors}
    raw_lines = path.read_bytes().split(b"\n")
    for index, e in by_index.items():   # the excerpt shows the offending line
        if e["kind"] != "blank_line":
            assert e["excerpt"][:10] == raw_lines[index].decode("utf-8", "backslashreplace")[:10]
    outputs = [json.loads(line) for line in (job / "outputs/00000.jsonl").read_text().splitlines()]
    good = [json.loads(line) for i, line in enumerate(raw_lines[:-1]) if i not in kinds]
    assert [o["id"] for o in outputs] == [g["id"] for g in good]
    assert all(o["text"] for o in outputs)


def test_openai_batch_bad_requests(tmp_path):
    path = tmp_path / "batch.jsonl"
    good = [openai_line(f"g{i}") for i in range(20)] + \
           [openai_line(f"t{i}", url="/v1/completions") for i in range(5)]
    lines = good + [line for _, line in BAD_OPENAI_LINES]
    path.write_bytes(b"\n".join(lines) + b"\n")
    job = _run(tmp_path, "job", path, OPENAI_SPEC, fmt="openai-batch")
    collect(job)
    errors = [json.loads(line) for line in (job / "outputs/errors.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in errors] == [k for k, _ in BAD_OPENAI_LINES]
    answered = (job / "outputs/00000.openai.jsonl").read_text().splitlines()
    assert [json.loads(line)["custom_id"] for line in answered] == \
        [f"g{i}" for i in range(20)] + [f"t{i}" for i in range(5)]


def test_on_bad_row_fail_stops_at_the_first_bad_row(tmp_path):
    path = tmp_path / "in.jsonl"
    write_mixed_jsonl(path, 10, BAD_PROMPT_LINES[:1], every=4)
    with pytest.raises(BadRowError, match="row 4.*on_bad_row: fail"):
        _run(tmp_path, "job", path, PROMPT_SPEC, on_bad_row="fail")


def _corrupt_parquet(path: Path, tmp_path: Path) -> None:
    path.write_bytes(b"PAR1" + bytes(range(256)) * 20)


def _truncated_parquet(path: Path, tmp_path: Path) -> None:
    whole = tmp_path / "whole.parquet"
    write_prompt_parquet(whole, 500, row_group_rows=100)
    data = whole.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_pages_parquet(path: Path, tmp_path: Path) -> None:
    """Footer intact, data pages overwritten: fails while reading, not on open."""
    whole = tmp_path / "whole.parquet"
    write_prompt_parquet(whole, 500, row_group_rows=100)
    data = bytearray(whole.read_bytes())
    data[200: len(data) // 2] = b"\xab" * (len(data) // 2 - 200)
    path.write_bytes(bytes(data))


def _missing_column_parquet(path: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"id": ["a", "b"], "question": ["x", "y"]}), path)


def _missing_file(path: Path, tmp_path: Path) -> None:
    pass


def _directory_not_file(path: Path, tmp_path: Path) -> None:
    path.mkdir()


@pytest.mark.parametrize("make_bad", [_corrupt_parquet, _truncated_parquet, _corrupt_pages_parquet,
                                      _missing_column_parquet, _missing_file,
                                      _directory_not_file])
def test_bad_file_fails_its_shard_only(tmp_path, make_bad):
    job = tmp_path / "job"
    bad = tmp_path / "bad.parquet"
    make_bad(bad, tmp_path)
    good = tmp_path / "good.parquet"
    write_prompt_parquet(good, 50)
    fmt = make_format("jsonl", id_name="id", passthrough=("topic",))
    shards = [(_shard(bad, 500), 0), (_shard(good, 50), 1)]
    outcomes = []
    for shard, index in shards:                     # what the worker does per shard
        try:
            process_shard(shard, PROMPT_SPEC, ledger.shard_dir(job, index), fmt,
                          reverse_answer, commit_every_rows=10)
            outcomes.append("done")
        except ShardReadError as exc:
            assert str(bad) in str(exc) and "other shards are unaffected" in str(exc)
            outcomes.append("failed")
    assert outcomes == ["failed", "done"]
    failed = json.loads((ledger.shard_dir(job, 0) / "FAILED").read_text())
    assert str(bad) in failed["reason"]
    result = collect(job, format="jsonl")
    assert result.failed_shards == ["00000"] and result.num_rows == 50
