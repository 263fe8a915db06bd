"""Round trips for every output format, and collect's order and determinism."""
from __future__ import annotations

import json
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpcinfer.io import ledger
from hpcinfer.io.collect import CollectError, collect
from hpcinfer.io.formats import make_format
from hpcinfer.io.rows import InputRow, InputSpec, OutputRecord
from hpcinfer.io.writers import PartWriter
from hpcinfer.testing.io_corpus import openai_line, reverse_answer

LOGPROBS = [[(5, -0.25), (9, -1.5)], [(2, -0.125)]]


def _row(i: int, **kw) -> InputRow:
    return InputRow(index=i, file="in.jsonl", key=f"k{i}", id=f"k{i}", prompt=f"p{i}",
                    passthrough={"topic": f"t{i}", "score": i / 2}, **kw)


def _out(i: int) -> OutputRecord:
    return OutputRecord(f"answer {i} ✓", 3 + i, 2, "stop" if i % 2 else "length", LOGPROBS)


def _write(shard_dir, fmt, order, commit_every):
    writer = PartWriter(shard_dir, fmt, commit_every_rows=commit_every)
    for i in order:
        writer.add_result(_row(i), _out(i))
        writer.maybe_commit()
    writer.commit()
    return writer


@pytest.mark.parametrize("name", ["jsonl", "parquet"])
def test_record_round_trip(tmp_path, name):
    fmt = make_format(name, id_name="id", passthrough=("topic", "score"), logprobs=True)
    _write(tmp_path, fmt, [2, 0, 1], commit_every=10)
    (part,) = ledger.committed_parts(tmp_path)
    assert part.name == f"part-000000{fmt.suffix}"
    records = fmt.read(part)
    assert [r["row_index"] for r in records] == [2, 0, 1]
    assert records[1] == {"row_index": 0, "id": "k0", "topic": "t0", "score": 0.0,
                          "text": "answer 0 ✓", "num_prompt_tokens": 3, "num_output_tokens": 2,
                          "finish_reason": "length",
                          "logprobs": [[{"token_id": 5, "logprob": -0.25},
                                        {"token_id": 9, "logprob": -1.5}],
                                       [{"token_id": 2, "logprob": -0.125}]]}
    if name == "parquet":
        schema = pq.read_schema(part)
        assert schema.field("text").type == pa.string()
        assert schema.field("num_output_tokens").type == pa.int64()


def test_openai_batch_output_lines(tmp_path):
    fmt = make_format("openai-batch", model="fallback", created_s=1700000000)
    chat = InputRow(0, "b.jsonl", "req-1", "req-1", messages=[{"role": "user", "content": "hi"}],
                    url="/v1/chat/completions", body={"model": "tiny-chat", "messages": []})
    text = InputRow(1, "b.jsonl", "req-2", "req-2", prompt="say", url="/v1/completions",
                    body={"prompt": "say"})
    writer = PartWriter(tmp_path, fmt)
    writer.add_result(chat, OutputRecord("hello", 4, 1, "stop"))
    writer.add_result(text, OutputRecord("ok", 2, 1, "length"))
    (path,) = writer.commit()
    assert path.name == "part-000000.openai.jsonl"
    a, b = [json.loads(line) for line in path.read_text().splitlines()]
    assert a["custom_id"] == "req-1" and a["error"] is None and a["id"].startswith("batch_req_")
    assert a["response"]["status_code"] == 200
    body = a["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "tiny-chat"
    assert body["created"] == 1700000000
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                                "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}
    assert b["response"]["body"]["object"] == "text_completion"
    assert b["response"]["body"]["choices"][0]["text"] == "ok"
    assert b["response"]["body"]["model"] == "fallback"
    # Same custom_id -> same ids on every run (resumed jobs collect to the same bytes).
    assert a["id"] == json.loads(path.read_text().splitlines()[0])["id"]


def test_openai_request_body_maps_to_sampling(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_bytes(openai_line("x", messages=[{"role": "user", "content": "q"}],
                                 max_completion_tokens=7, temperature=0.2, logprobs=True,
                                 top_logprobs=3, stop=["\n"], user="u1") + b"\n")
    (row,) = _read(path, InputSpec(task="chat", format="openai-batch"))
    assert row.sampling == {"max_tokens": 7, "temperature": 0.2, "logprobs": 3, "stop": ["\n"]}
    assert row.messages == [{"role": "user", "content": "q"}] and row.key == "x"


def _read(path, spec):
    from hpcinfer.io.readers import ShardReader
    n = path.read_bytes().count(b"\n")
    return list(ShardReader(types.SimpleNamespace(file=str(path), start=0, stop=n), spec))


def test_lone_surrogate_in_passthrough_still_commits(tmp_path):
    fmt = make_format("jsonl", id_name="id", passthrough=("note",))
    row = InputRow(0, "f", "a", "a", prompt="x", passthrough={"note": "bad \ud800 half"})
    writer = PartWriter(tmp_path, fmt)
    writer.add_result(row, OutputRecord("é", 1, 1, "stop"))
    (path,) = writer.commit()
    assert json.loads(path.read_bytes())["note"] == "bad \ud800 half"


@pytest.mark.parametrize("name", ["jsonl", "parquet"])
def test_collect_is_input_ordered_and_independent_of_commit_split(tmp_path, name):
    fmt = make_format(name, id_name="id", passthrough=("topic", "score"))
    order = [7, 3, 0, 9, 1, 4, 8, 2, 6, 5]
    for job, commit_every in (("a", 1), ("b", 3), ("c", 100)):
        _write(ledger.shard_dir(tmp_path / job, 0), fmt, order, commit_every)
        _write(ledger.shard_dir(tmp_path / job, 1), fmt, order[::-1], commit_every)
    outputs = {}
    for job in "abc":
        files = collect(tmp_path / job, format=name).files
        outputs[job] = [f.read_bytes() for f in files]
    assert outputs["a"] == outputs["b"] == outputs["c"]
    single = collect(tmp_path / "a", format=name, single_file=True).files[0]
    if name == "parquet":
        table = pq.read_table(single)
        assert table.column("row_index").to_pylist() == list(range(10)) * 2
    else:
        assert [json.loads(line)["row_index"] for line in single.read_text().splitlines()] \
            == list(range(10)) * 2


def test_collect_converts_jsonl_parts_to_parquet_with_mixed_ids(tmp_path):
    fmt = make_format("jsonl", id_name="id", passthrough=("topic",))
    writer = PartWriter(ledger.shard_dir(tmp_path, 0), fmt, commit_every_rows=2)
    for i, rid in enumerate([5, "x6", 7, 8]):            # ints and strings in one id column
        writer.add_result(InputRow(i, "f", rid, rid, prompt="p", passthrough={"topic": None}),
                          OutputRecord("t", 1, 1, "stop"))
        writer.maybe_commit()
    writer.commit()
    (path, _) = collect(tmp_path, format="parquet").files
    table = pq.read_table(path)
    assert table.column("id").to_pylist() == ["5", "x6", "7", "8"]
    assert table.column("topic").to_pylist() == [None] * 4
    with pytest.raises(CollectError, match="cannot convert"):
        collect(tmp_path, format="openai-batch")


def test_collect_reports_unfinished_shards(tmp_path):
    fmt = make_format("jsonl", id_name="id")
    _write(ledger.shard_dir(tmp_path, 0), fmt, [0, 1], 1)
    ledger.mark_done(ledger.shard_dir(tmp_path, 0), 2)
    _write(ledger.shard_dir(tmp_path, 1), fmt, [0], 1)
    result = collect(tmp_path, format="jsonl")
    assert result.incomplete_shards == ["00001"] and result.num_rows == 3
    with pytest.raises(CollectError, match="no shards"):
        collect(tmp_path / "nothing")


def test_reverse_answer_is_deterministic():
    row = _row(3)
    assert reverse_answer(row) == reverse_answer(row) == OutputRecord("3p", 2, 2, "length")


def test_parquet_input_column_types_survive_to_parquet_output(tmp_path):
    from hpcinfer.io.shard_loop import process_shard
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": pa.array([1, 2, 3, 4], pa.int32()),
                             "prompt": ["a", "b", "c", "d"],
                             "score": pa.array([None, None, 7, 8], pa.int16())}), src)
    spec = InputSpec(id_field="id", prompt_field="prompt", passthrough=("score",))
    job = tmp_path / "job"
    process_shard(types.SimpleNamespace(file=str(src), start=0, stop=4), spec,
                  ledger.shard_dir(job, 0),
                  make_format("parquet", id_name="id", passthrough=("score",)),
                  reverse_answer, commit_every_rows=2)
    first = ledger.committed_parts(ledger.shard_dir(job, 0))[0]
    assert pq.read_schema(first).field("score").type == pa.int16()   # all-null part, typed
    (path, _) = collect(job).files
    table = pq.read_table(path)
    assert table.schema.field("id").type == pa.int32()
    assert table.column("score").to_pylist() == [None, None, 7, 8]


def test_openai_embeddings_and_score_requests(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_bytes(openai_line("e", url="/v1/embeddings", input=["one text"]) + b"\n")
    (row,) = _read(path, InputSpec(task="embed", format="openai-batch"))
    assert row.texts == ("one text",) and row.url == "/v1/embeddings"
    path.write_bytes(openai_line("s", url="/v1/score", text_1="q", text_2="d") + b"\n")
    (row,) = _read(path, InputSpec(task="score", format="openai-batch"))
    assert row.texts == ("q", "d")


def test_prompt_too_long_error_record(tmp_path):
    from hpcinfer.io.rows import prompt_too_long
    bad = prompt_too_long(_row(4), num_prompt_tokens=5000, max_model_len=4096)
    writer = PartWriter(tmp_path, make_format("jsonl"))
    writer.add_error(bad)
    (path,) = writer.commit()
    rec = json.loads(path.read_text())
    assert rec["kind"] == "prompt_too_long" and rec["row_index"] == 4 and rec["id"] == "k4"
    assert "5000 tokens" in rec["reason"] and "on_long_prompt: truncate " in rec["reason"]
    assert rec["excerpt"] == "p4"


def test_collect_defaults_to_the_jobs_output_format(tmp_path):
    _write(ledger.shard_dir(tmp_path, 0), make_format("jsonl", id_name="id"), [1, 0], 1)
    (tmp_path / "job.yaml").write_text("name: x\noutput: {dir: x, format: parquet}\n")
    (path, _) = collect(tmp_path).files
    assert path.name == "00000.parquet"
    assert pq.read_table(path).column("row_index").to_pylist() == [0, 1]
