"""Shard readers: row ranges, Parquet row-group slicing, encodings, per-row overrides, ids."""
from __future__ import annotations

import json
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpcinfer.io.readers import ShardReadError, ShardReader, find_duplicate_ids
from hpcinfer.io.rows import BadRow, InputRow, InputSpec
from hpcinfer.testing.io_corpus import good_row, write_prompt_parquet

SPEC = InputSpec(id_field="id", prompt_field="prompt", sampling_field="sampling",
                 passthrough=("topic",))


def _read(path, start, stop, spec=SPEC):
    return list(ShardReader(types.SimpleNamespace(file=str(path), start=start, stop=stop), spec))


def test_jsonl_shard_starts_at_its_row_offset(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(good_row(i)) + "\n" for i in range(50)))
    rows = _read(path, 17, 29)
    assert [r.index for r in rows] == list(range(17, 29))
    assert [r.id for r in rows] == [f"r{i}" for i in range(17, 29)]
    assert rows[0].sampling == {"temperature": 0.0, "max_tokens": 8 + 17 % 5}
    assert rows[0].passthrough == {"topic": "t3"}


def test_parquet_shard_slices_row_groups(tmp_path):
    path = tmp_path / "in.parquet"
    write_prompt_parquet(path, 1000, row_group_rows=128)
    for start, stop in [(0, 1000), (130, 131), (250, 777), (900, 1000)]:
        rows = _read(path, start, stop)
        assert [r.index for r in rows] == list(range(start, stop))
        assert [r.prompt for r in rows] == [good_row(i)["prompt"] for i in range(start, stop)]
    reader = ShardReader(types.SimpleNamespace(file=str(path), start=0, stop=1), SPEC)
    assert reader.column_types() == {"id": pa.string(), "topic": pa.string()}


def test_plan_longer_than_file_is_a_shard_error(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(good_row(0)) + "\n")
    with pytest.raises(ShardReadError, match="changed after the job was planned"):
        _read(path, 0, 5)


def test_bom_crlf_and_unicode(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(good_row(0)).encode() + b"\r\n"
                     + json.dumps({"id": 1, "prompt": "日本語 \ud83d\ude00"}).encode() + b"\r\n")
    rows = _read(path, 0, 2)
    assert all(isinstance(r, InputRow) for r in rows), rows
    assert rows[1].prompt == "日本語 😀" and rows[1].id == 1


def test_parquet_struct_sampling_nulls_mean_not_overridden(tmp_path):
    path = tmp_path / "s.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"id": 1, "prompt": "a", "sampling": {"temperature": 0.5, "max_tokens": None}},
        {"id": 2, "prompt": "b", "sampling": {"temperature": None, "max_tokens": 0}},
        {"id": 3, "prompt": "c", "sampling": None},
    ]), path)
    spec = InputSpec(id_field="id", prompt_field="prompt", sampling_field="sampling")
    rows = _read(path, 0, 3, spec)
    assert rows[0].sampling == {"temperature": 0.5}
    assert isinstance(rows[1], BadRow) and "max_tokens must be >= 1" in rows[1].reason
    assert rows[2].sampling == {}


def test_parquet_map_sampling_reads_as_a_mapping(tmp_path):
    # pandas dicts are often written with a map type: [(key, value), ...] in pyarrow
    path = tmp_path / "m.parquet"
    kind = pa.map_(pa.string(), pa.float64())
    pq.write_table(pa.table({
        "id": [1, 2, 3], "prompt": ["a", "b", "c"],
        "sampling": pa.array([[("temperature", 0.5), ("top_p", 0.9)], [], None], type=kind)}),
        path)
    spec = InputSpec(id_field="id", prompt_field="prompt", sampling_field="sampling")
    rows = _read(path, 0, 3, spec)
    assert [r.sampling for r in rows] == [{"temperature": 0.5, "top_p": 0.9}, {}, {}]


def test_parquet_chat_messages_column(tmp_path):
    path = tmp_path / "chat.parquet"
    msgs = [{"role": "user", "content": "hi"}]
    pq.write_table(pa.Table.from_pylist([{"id": "a", "messages": msgs}]), path)
    rows = _read(path, 0, 1, InputSpec(task="chat", id_field="id", messages_field="messages"))
    assert rows[0].messages == msgs


def test_no_id_field_identifies_rows_by_file_and_index(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "a"}\n')
    rows = _read(path, 0, 2, InputSpec(id_field=None))
    assert [r.key for r in rows] == [f"{path}#0", f"{path}#1"]
    assert [r.id for r in rows] == [None, None]


def test_find_duplicate_ids_across_files(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.parquet"
    a.write_text("".join(json.dumps({"id": i, "prompt": "x"}) + "\n" for i in range(100))
                 + "{broken\n" + json.dumps({"id": 7, "prompt": "again"}) + "\n")
    pq.write_table(pa.table({"id": [200, 5, 201], "prompt": ["x"] * 3}), b)
    dups = find_duplicate_ids([a, b], "id")
    assert {d.id: d.locations for d in dups} == {
        7: ((str(a), 7), (str(a), 101)), 5: ((str(a), 5), (str(b), 1))}
    assert find_duplicate_ids([a], "prompt")[0].locations[:2] == ((str(a), 0), (str(a), 1))


def test_input_spec_from_config_mapping():
    spec = InputSpec.from_config({"id_field": "qid", "prompt_field": "q", "passthrough": ["x"],
                                  "format": "auto", "shard_rows": 10}, task="generate")
    assert spec.columns() == ["qid", "q", "x"]
    with pytest.raises(ValueError, match="messages_field"):
        InputSpec(task="chat")
