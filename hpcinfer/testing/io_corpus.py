"""Test data for the IO path: good rows, a corpus of bad rows and bad files, a fake answer.

Used by tests/io, the kill-test worker script and bench/io_path.py. No engine involved: the
"answer" is a deterministic function of the row (the prompt reversed).
"""
from __future__ import annotations

import json
from pathlib import Path

from hpcinfer.io.rows import InputRow, OutputRecord


def reverse_answer(row: InputRow) -> OutputRecord:
    """Deterministic stand-in for the engine."""
    text = row.prompt if row.prompt is not None else \
        "|".join(m["content"] if isinstance(m["content"], str) else "" for m in row.messages)
    return OutputRecord(text=text[::-1], num_prompt_tokens=len(text),
                        num_output_tokens=min(len(text), 16), finish_reason="length")


def good_row(i: int) -> dict:
    return {"id": f"r{i}", "prompt": f"question {i}: what is {i} + {i}? é",
            "sampling": {"temperature": 0.0, "max_tokens": 8 + i % 5}, "topic": f"t{i % 7}"}


def good_chat_row(i: int) -> dict:
    return {"id": f"c{i}", "messages": [{"role": "system", "content": "be brief"},
                                        {"role": "user", "content": f"hello {i}"}]}


# (kind expected in errors.jsonl, raw JSONL line bytes) for a generate job with
# id_field=id, prompt_field=prompt, sampling_field=sampling.
BAD_PROMPT_LINES: list[tuple[str, bytes]] = [
    ("invalid_json", b'{"id": "b1", "prompt": "x"'),
    ("invalid_json", b"not json at all"),
    ("not_object", b'["id", "prompt"]'),
    ("not_object", b"42"),
    ("not_utf8", b'{"id": "b2", "prompt": "caf\xe9"}'),
    ("blank_line", b"   "),
    ("missing_id", b'{"prompt": "no id"}'),
    ("null_id", b'{"id": null, "prompt": "null id"}'),
    ("bad_id_type", b'{"id": 1.5, "prompt": "float id"}'),
    ("bad_id_type", b'{"id": true, "prompt": "bool id"}'),
    ("empty_id", b'{"id": "", "prompt": "empty id"}'),
    ("missing_prompt", b'{"id": "b3", "text": "wrong field"}'),
    ("null_prompt", b'{"id": "b4", "prompt": null}'),
    ("bad_prompt_type", b'{"id": "b5", "prompt": 17}'),
    ("bad_prompt_type", b'{"id": "b6", "prompt": ["a", "b"]}'),
    ("empty_prompt", b'{"id": "b7", "prompt": ""}'),
    ("invalid_sampling", b'{"id": "b8", "prompt": "x", "sampling": {"temprature": 0.5}}'),
    ("invalid_sampling", b'{"id": "b9", "prompt": "x", "sampling": {"temperature": -1}}'),
    ("invalid_sampling", b'{"id": "b10", "prompt": "x", "sampling": {"top_p": 0}}'),
    ("invalid_sampling", b'{"id": "b11", "prompt": "x", "sampling": {"max_tokens": "ten"}}'),
    ("invalid_sampling", b'{"id": "b12", "prompt": "x", "sampling": {"max_tokens": 4, '
                         b'"min_tokens": 9}}'),
    ("invalid_sampling", b'{"id": "b13", "prompt": "x", "sampling": [1, 2]}'),
    ("invalid_sampling", b'{"id": "b14", "prompt": "x", "sampling": {"stop": [1]}}'),
    ("duplicate_id", b'{"id": "r0", "prompt": "same id as the first good row"}'),
]

# Bad rows for a chat job (messages_field=messages).
BAD_CHAT_LINES: list[tuple[str, bytes]] = [
    ("missing_prompt", b'{"id": "m1"}'),
    ("bad_prompt_type", b'{"id": "m2", "messages": "hello"}'),
    ("bad_messages", b'{"id": "m3", "messages": []}'),
    ("bad_messages", b'{"id": "m4", "messages": ["hello"]}'),
    ("bad_messages", b'{"id": "m5", "messages": [{"role": "wizard", "content": "x"}]}'),
    ("bad_messages", b'{"id": "m6", "messages": [{"role": "user"}]}'),
    ("bad_messages", b'{"id": "m7", "messages": [{"role": "user", "content": 5}]}'),
]


def openai_line(custom_id: str, *, url: str = "/v1/chat/completions", **body) -> bytes:
    if not body:
        body = ({"messages": [{"role": "user", "content": f"hi {custom_id}"}]}
                if url.endswith("chat/completions") else {"prompt": f"say {custom_id}"})
    body.setdefault("model", "tiny")
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url,
                       "body": body}).encode()


BAD_OPENAI_LINES: list[tuple[str, bytes]] = [
    ("missing_id", b'{"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}'),
    ("unknown_url", openai_line("o1", url="/v1/images/generations", prompt="x")),
    ("url_task_mismatch", openai_line("o2", url="/v1/embeddings", input="x")),
    ("bad_method", b'{"custom_id": "o3", "method": "GET", "url": "/v1/completions", '
                   b'"body": {"prompt": "x"}}'),
    ("bad_body", b'{"custom_id": "o4", "method": "POST", "url": "/v1/completions", '
                 b'"body": "prompt"}'),
    ("missing_prompt", openai_line("o5", url="/v1/chat/completions", temperature=0.1)),
    ("unsupported_body_key", openai_line("o6", messages=[{"role": "user", "content": "x"}],
                                         tools=[{"type": "function"}])),
    ("invalid_sampling", openai_line("o7", prompt="x", url="/v1/completions",
                                     temperature=-0.5)),
    ("bad_messages", openai_line("o8", messages=[{"role": "robot", "content": "x"}])),
]


def write_mixed_jsonl(path: Path, num_good: int, bad: list[tuple[str, bytes]],
                      every: int = 7, make_good=good_row) -> dict[int, str]:
    """Good rows with the bad lines spread among them; returns {row index: bad kind}."""
    lines: list[bytes] = []
    kinds: dict[int, str] = {}
    bad_iter = iter(bad)
    for i in range(num_good):
        lines.append(json.dumps(make_good(i), ensure_ascii=False).encode())
        if i % every == every - 1:
            item = next(bad_iter, None)
            if item is not None:
                kinds[len(lines)] = item[0]
                lines.append(item[1])
    for kind, line in bad_iter:
        kinds[len(lines)] = kind
        lines.append(line)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return kinds


def write_prompt_parquet(path: Path, num_rows: int, row_group_rows: int = 1000) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [good_row(i) for i in range(num_rows)]
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, path, row_group_size=row_group_rows)
