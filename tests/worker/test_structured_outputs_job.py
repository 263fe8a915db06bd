"""Structured outputs through the real worker on a tiny RANDOM model: a job-level schema read
from a file, per-row constraints in the sampling column (JSONL and Parquet), OpenAI-batch
``response_format`` / ``structured_outputs`` rows on both urls, bad constraints set aside
as bad rows while every other row is answered, valid and equal to the Python API; and a
kill -9 in the middle of a constrained job, then a rerun: every row exactly once."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcinfer.testing.worker_jobs import (job_config, make_job, read_errors, read_results,
                                          run_worker, start_worker, write_jsonl,
                                          write_parquet)

pytestmark = pytest.mark.timeout(300)

SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["positive", "negative", "neutral"]},
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
        "keywords": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{2,5}$"},
                     "minItems": 1, "maxItems": 3},
    },
    "required": ["label", "score", "keywords"],
    "additionalProperties": False,
}
REGEX = r"[A-Z][a-z]{2,6} [0-9]{2}"
CHOICES = ["Paged attention keeps blocks", "Slurm cluster"]
GRAMMAR = 'root ::= "(" num ("," num){0,3} ")"\nnum ::= [1-9] [0-9]?'
BROKEN_GRAMMAR = 'root ::= "a" |'     # passes the login checks, fails xgrammar's parser
MAX_TOKENS = 200
# response_format keeps vLLM's whitespace rule (any, in runs of at most 32 characters), which
# a random model takes wherever it may: its rows need room.
OPENAI_MAX_TOKENS = 1500


def _check_schema(text: str) -> None:
    value = json.loads(text)
    assert set(value) == {"label", "score", "keywords"}, text
    assert value["label"] in ("positive", "negative", "neutral")
    assert isinstance(value["score"], int) and 1 <= value["score"] <= 5
    assert 1 <= len(value["keywords"]) <= 3
    assert all(re.fullmatch(r"[a-z]{2,5}", k) for k in value["keywords"])


def _rows() -> tuple[list[dict], dict]:
    """Input rows and, per id, how its output is checked (None: a bad row)."""
    words = ["cluster", "batch", "prompts", "Slurm", "GPU", "tokens", "answer", "world"]
    rows, checks = [], {}
    for i in range(8):   # the job's schema, greedy and seeded
        sampling = {"seed": i, "temperature": 1.0} if i % 2 else None
        rows.append({"id": f"j{i}", "prompt": f"Review {i}: the {words[i]} was fine.",
                     "sampling": sampling})
        checks[f"j{i}"] = _check_schema
    overrides = {
        # an option on one row only: in a Parquet struct column the others read it as null
        "r0": ({"structured_outputs": {"regex": REGEX, "disable_any_whitespace": True}},
               lambda t: _assert(re.fullmatch(REGEX, t), t)),
        "c0": ({"structured_outputs": {"choice": CHOICES}, "temperature": 1.0, "seed": 3},
               lambda t: _assert(t in CHOICES, t)),
        "g0": ({"structured_outputs": {"grammar": GRAMMAR}},
               lambda t: _assert(re.fullmatch(r"\(\d{1,2}(,\d{1,2}){0,3}\)", t), t)),
        "bad_compile": ({"structured_outputs": {"grammar": BROKEN_GRAMMAR}}, None),
        "bad_regex": ({"structured_outputs": {"regex": "(?=x)y"}}, None),
        "bad_two": ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, None),
    }
    for rid, (sampling, check) in overrides.items():
        rows.append({"id": rid, "prompt": f"Row {rid}: answer now.", "sampling": sampling})
        checks[rid] = check
    return rows, checks


def _assert(ok, text) -> None:
    assert ok, f"output {text!r} breaks its constraint"


def _config(model_dir, data: str, **sections):
    return job_config(model_dir, data, **{
        "input": {"sampling_field": "sampling", "max_bad_rows": 0.5},
        "sampling": {"temperature": 0.0, "max_tokens": MAX_TOKENS,
                     "structured_outputs": {"json": "schemas/review.json",
                                            "disable_any_whitespace": True}},
        "engine": {"max_num_seqs": 6, "max_num_batched_tokens": 256},
        **sections})


def _write_schema(root: Path) -> None:
    (root / "schemas").mkdir(parents=True, exist_ok=True)
    (root / "schemas" / "review.json").write_text(json.dumps(SCHEMA))


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "parquet-struct"])
def test_rows_follow_their_constraints_and_bad_ones_are_set_aside(tmp_path, model_dir, llm,
                                                                  fmt):
    rows, checks = _rows()
    suffix = fmt.split("-")[0]
    if fmt == "jsonl":
        write_jsonl(tmp_path / "data" / "in.jsonl", rows)
    elif fmt == "parquet":  # a Parquet sampling column holding JSON text
        write_parquet(tmp_path / "data" / "in.parquet",
                      [{**r, "sampling": json.dumps(r["sampling"]) if r["sampling"] else None}
                       for r in rows])
    else:  # a struct column: the keys a row does not set (nested ones too) read as null
        write_parquet(tmp_path / "data" / "in.parquet", rows)
    _write_schema(tmp_path)
    job_dir = make_job(tmp_path, _config(model_dir, f"data/in.{suffix}"))
    rc, out = run_worker(job_dir)
    assert rc == 0, out
    [records] = read_results(job_dir).values()
    answered = {r["id"]: r for r in records}
    assert set(answered) == {rid for rid, check in checks.items() if check is not None}
    for rid, record in answered.items():
        assert record["finish_reason"] == "stop", record
        checks[rid](record["text"])
    errors = {e["id"]: e for e in read_errors(job_dir)}
    assert set(errors) == {"bad_compile", "bad_regex", "bad_two"}
    assert errors["bad_compile"]["kind"] == "engine_rejected"
    assert "structured_outputs.grammar does not compile" in errors["bad_compile"]["reason"]
    assert errors["bad_regex"]["kind"] == "invalid_sampling"
    assert "lookaround" in errors["bad_regex"]["reason"]
    assert "exactly one of" in errors["bad_two"]["reason"]
    _equal_to_python_api(llm, rows[:2], answered)


@pytest.mark.parametrize("inline", ["dict", "json-text"])
def test_job_level_inline_schema(tmp_path, model_dir, inline):
    """sampling.structured_outputs.json given in the job file itself (a mapping, or JSON
    text), not as a schema file: every row follows it."""
    write_jsonl(tmp_path / "data" / "in.jsonl",
                [{"id": f"q{i}", "prompt": f"Review {i}: fine."} for i in range(4)])
    schema = SCHEMA if inline == "dict" else json.dumps(SCHEMA)
    config = _config(model_dir, "data/in.jsonl", sampling={
        "temperature": 0.0, "max_tokens": MAX_TOKENS,
        "structured_outputs": {"json": schema, "disable_any_whitespace": True}})
    job_dir = make_job(tmp_path, config)
    rc, out = run_worker(job_dir)
    assert rc == 0, out
    [records] = read_results(job_dir).values()
    assert [r["id"] for r in records] == [f"q{i}" for i in range(4)]
    for record in records:
        assert record["finish_reason"] == "stop", record
        _check_schema(record["text"])


def _equal_to_python_api(llm, rows, answered) -> None:
    from hpcinfer.sampling_params import SamplingParams, StructuredOutputsParams
    so = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    params = [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, structured_outputs=so),
              SamplingParams(temperature=1.0, seed=1, max_tokens=MAX_TOKENS,
                             structured_outputs=so)]
    outs = llm.generate([r["prompt"] for r in rows], params, use_tqdm=False)
    assert [o.outputs[0].text for o in outs] == [answered[r["id"]]["text"] for r in rows]


def _openai_rows() -> list[dict]:
    def line(cid, url, body):
        return {"custom_id": cid, "method": "POST", "url": url, "body": {
            "model": "tiny", "max_tokens": OPENAI_MAX_TOKENS, "temperature": 0, **body}}
    chat = "/v1/chat/completions"
    schema_format = {"type": "json_schema",
                     "json_schema": {"name": "review", "schema": SCHEMA, "strict": True}}
    return [
        line("chat-schema", chat, {"messages": [{"role": "user", "content": "Rate it"}],
                                   "response_format": schema_format}),
        line("chat-schema-seeded", chat, {"messages": [{"role": "user", "content": "Again"}],
                                          "temperature": 1.0, "seed": 5,
                                          "response_format": schema_format}),
        line("completion-schema", "/v1/completions", {"prompt": "Review: fine.",
                                                      "response_format": schema_format}),
        line("chat-object", chat, {"messages": [{"role": "user", "content": "As JSON"}],
                                   "response_format": {"type": "json_object"}}),
        line("completion-object", "/v1/completions", {
            "prompt": "JSON:", "response_format": {"type": "json_object"},
            "structured_outputs": None}),
        line("completion-grammar", "/v1/completions", {
            "prompt": "Tuple:", "structured_outputs": {"grammar": GRAMMAR}}),
        line("chat-text", chat, {"messages": [{"role": "user", "content": "free"}],
                                 "response_format": {"type": "text"}, "max_tokens": 5}),
        line("bad-type", chat, {"messages": [{"role": "user", "content": "x"}],
                                "response_format": {"type": "yaml"}}),
        line("bad-compile", "/v1/completions", {
            "prompt": "x", "structured_outputs": {"grammar": BROKEN_GRAMMAR}}),
    ]


def test_openai_batch_response_format(tmp_path, model_dir):
    rows = _openai_rows()
    write_jsonl(tmp_path / "data" / "batch.jsonl", rows)
    config = job_config(model_dir, "data/batch.jsonl", task="chat",
                        input={"format": "openai-batch", "id_field": None, "max_bad_rows": 0.5,
                               "prompt_field": None},
                        output={"format": "openai-batch"},
                        engine={"max_num_seqs": 6, "max_num_batched_tokens": 256})
    job_dir = make_job(tmp_path, config)
    rc, out = run_worker(job_dir)
    assert rc == 0, out
    [records] = read_results(job_dir).values()
    by_id = {r["custom_id"]: r["response"]["body"]["choices"][0] for r in records}
    assert set(by_id) == {r["custom_id"] for r in rows} - {"bad-type", "bad-compile"}
    for cid in ("chat-schema", "chat-schema-seeded"):
        assert by_id[cid]["finish_reason"] == "stop"
        _check_schema(by_id[cid]["message"]["content"])
    assert by_id["completion-schema"]["finish_reason"] == "stop"
    _check_schema(by_id["completion-schema"]["text"])
    assert re.fullmatch(r"\(\d{1,2}(,\d{1,2}){0,3}\)", by_id["completion-grammar"]["text"])
    for cid in ("chat-object", "completion-object"):
        choice = by_id[cid]
        text = choice["message"]["content"] if cid.startswith("chat") else choice["text"]
        if choice["finish_reason"] == "stop":   # unbounded strings: a random model may run out
            assert isinstance(json.loads(text), dict), text
        else:
            assert choice["finish_reason"] == "length" and text.lstrip().startswith("{"), text
    errors = {e["id"]: e for e in read_errors(job_dir)}
    assert set(errors) == {"bad-type", "bad-compile"}
    assert errors["bad-type"]["kind"] == "invalid_response_format"
    assert "does not compile" in errors["bad-compile"]["reason"]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["jsonl", "openai-batch"])
def test_kill_9_then_rerun_every_row_once_and_valid(tmp_path, model_dir, fmt):
    rows, key, config = _kill_job(tmp_path, model_dir, fmt)
    job_dir = make_job(tmp_path, config)
    log = tmp_path / "worker.log"
    proc = start_worker(job_dir, log_path=log, HPCINFER_WORKER_STEP_DELAY_S="0.01")
    shard = job_dir / "shards" / "00000"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        parts = list(shard.glob("part-*")) if shard.exists() else []
        if len(parts) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the job ended before the kill: " + log.read_text()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (shard / "DONE").exists()
    rc, out = run_worker(job_dir)
    assert rc == 0, out
    [records] = read_results(job_dir).values()
    ids = [r[key] for r in records]
    assert sorted(ids) == sorted(r[key] for r in rows) and len(ids) == len(set(ids))
    for record in records:
        if fmt == "jsonl":
            finish_reason, text = record["finish_reason"], record["text"]
        else:
            choice = record["response"]["body"]["choices"][0]
            finish_reason = choice["finish_reason"]
            text = choice["message"]["content"] if "message" in choice else choice["text"]
        assert finish_reason == "stop", record
        _check_schema(text)


def _kill_job(tmp_path: Path, model_dir, fmt: str) -> tuple[list[dict], str, dict]:
    """(rows, their id key, job config): 24 rows under the review schema, a third greedy."""
    output = {"dir": "out", "commit_every_rows": 2, "commit_every_s": 30}
    if fmt == "jsonl":
        rows = [{"id": f"k{i}", "prompt": f"Review {i}: it was fine.",
                 "sampling": {"seed": i, "temperature": 1.0} if i % 3 else None}
                for i in range(24)]
        write_jsonl(tmp_path / "data" / "in.jsonl", rows)
        _write_schema(tmp_path)
        return rows, "id", _config(model_dir, "data/in.jsonl", output=output)
    # chat and completions rows; response_format on every fourth (vLLM's whitespace rule:
    # room for it), compact structured_outputs on the others
    rows = []
    for i in range(24):
        url = "/v1/chat/completions" if i % 2 else "/v1/completions"
        body = ({"messages": [{"role": "user", "content": f"Review {i}: fine."}]}
                if i % 2 else {"prompt": f"Review {i}: it was fine."})
        if i % 4 == 0:
            body.update(max_tokens=OPENAI_MAX_TOKENS, response_format={
                "type": "json_schema", "json_schema": {"name": "review", "schema": SCHEMA}})
        else:
            body.update(max_tokens=MAX_TOKENS, structured_outputs={
                "json": SCHEMA, "disable_any_whitespace": True})
        body.update({"seed": i, "temperature": 1.0} if i % 3 else {"temperature": 0})
        rows.append({"custom_id": f"k{i}", "method": "POST", "url": url, "body": body})
    write_jsonl(tmp_path / "data" / "batch.jsonl", rows)
    config = job_config(model_dir, "data/batch.jsonl", task="chat",
                        input={"format": "openai-batch", "id_field": None,
                               "prompt_field": None},
                        output={"format": "openai-batch", **output},
                        engine={"max_num_seqs": 6, "max_num_batched_tokens": 256})
    return rows, "custom_id", config


# --- a job-level constraint that passes `hpcinfer validate` but not xgrammar ---------------
@pytest.mark.parametrize("constraint, words", [
    ({"grammar": 'root ::= answer\nanswer ::= "yes" | "no" |'},
     "structured_outputs.grammar does not compile: EBNF parser error at line 2, column "),
    ({"json": {"type": "object", "minProperties": 1}},
     "structured_outputs.json does not compile: minProperties is greater than the number of "
     "properties, but additional properties aren't allowed: 1 > 0"),
])
def test_job_constraint_xgrammar_refuses_fails_the_job_before_the_model(tmp_path, model_dir,
                                                                         constraint, words):
    write_jsonl(tmp_path / "data" / "in.jsonl",
                [{"id": f"q{i}", "prompt": f"Row {i}:"} for i in range(3)])
    config = job_config(model_dir, "data/in.jsonl",
                        sampling={"max_tokens": 20, "structured_outputs": constraint})
    job_dir = make_job(tmp_path, config, render=False)
    validate = _cli("validate", str(tmp_path / "job.yaml"))
    assert validate.returncode == 0, validate.stderr   # the login checks let it through
    run = _cli("run", str(tmp_path / "job.yaml"), "--local")
    out = run.stdout + run.stderr
    assert run.returncode != 0 and "worker exited with status 2" in out, out
    assert "worker crashed" not in out and "Traceback" not in out, out
    assert f"sampling.{words}" in out
    assert "fix sampling.structured_outputs in the job file" in out
    assert "engine ready" not in out and "KV cache" not in out      # stopped before the model
    assert not list((job_dir / "shards").glob("*/part-*"))           # and before the rows
    assert not read_errors(job_dir)
    status = _cli("status", str(job_dir))
    [task_line] = [ln for ln in status.stdout.splitlines() if " FAILED " in ln]
    assert f"sampling.{words}" in task_line, status.stdout


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcinfer.cli", *args], capture_output=True,
                          text=True, timeout=180)
