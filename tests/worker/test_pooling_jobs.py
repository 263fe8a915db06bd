"""Pooling job files (task: embed | classify | score) end to end, against the Python API:

- a Parquet job array with task embed on the real single-host Slurm, collected, equals
  ``LLM.embed`` row for row;
- the worker started directly, ``kill -9``'d mid-run (commit and step delays make the kills
  land while rows are in flight) and restarted, answers each row exactly once;
- a JSONL classify job run with ``hpcinfer run --local`` equals ``LLM.classify``;
- a JSONL score job: bad rows (empty, wrong type, over-long) go to errors.jsonl with
  on_long_prompt: error, and over-long pairs are cut to max_model_len with truncate.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcinfer.io.collect import collect
from hpcinfer.testing.tiny_pooling import build_tiny_pooling_checkpoint
from hpcinfer.testing.worker_jobs import (
    POOLING_ENGINE,
    job_config,
    make_job,
    pooling_llm,
    read_errors,
    read_results,
    run_worker,
    start_worker,
    worker_env,
    write_jsonl,
    write_parquet,
)

pytestmark = pytest.mark.timeout(240)
ENGINE = POOLING_ENGINE
WORDS = ["alpha", "beta", "gamma", "delta", "hello", "world", "cat", "sat", "on", "mat"]


def _texts(num_rows: int, start: int = 0) -> list[str]:
    """Mixed lengths (1 to 7 words), deterministic."""
    return [" ".join(WORDS[(i * 3 + k) % len(WORDS)] for k in range(1 + i % 7))
            for i in range(start, start + num_rows)]


def _rows(num_rows: int, start: int = 0) -> list[dict]:
    return [{"id": f"p{start + i}", "text": t, "topic": f"t{(start + i) % 3}"}
            for i, t in enumerate(_texts(num_rows, start))]


def _pooling_config(model_dir: Path, input_path, task: str, **sections) -> dict:
    fields = {"score": {"text_1_field": "query", "text_2_field": "doc"}}.get(
        task, {"text_field": "text"})
    config = job_config(model_dir, input_path, task=task, engine=ENGINE,
                        input={"prompt_field": None, **fields, **sections.pop("input", {})},
                        **sections)
    config.pop("sampling")
    return config


def _assert_embeddings_equal(records: list[dict], expected: list, tol: float = 1e-6) -> None:
    assert len(records) == len(expected)
    for rec, out in zip(records, expected):
        want = out.outputs.embedding
        assert len(rec["embedding"]) == len(want)
        assert max(abs(a - b) for a, b in zip(rec["embedding"], want)) <= tol, rec["id"]


@pytest.mark.slurm
def test_embed_parquet_array_on_slurm_equals_llm_embed(slurm_cluster, tmp_path, embed_model):
    data = tmp_path / "data"
    write_parquet(data / "a.parquet", _rows(7, 0))
    write_parquet(data / "b.parquet", _rows(5, 7))
    root = tmp_path / "job"
    root.mkdir()
    config = _pooling_config(embed_model, str(data / "*.parquet"), "embed",
                             input={"passthrough": ["topic"]},
                             output={"format": "parquet", "commit_every_rows": 3},
                             resources={"partition": slurm_cluster})
    make_job(root, config, render=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run([sys.executable, "-m", "hpcinfer.cli", "submit", str(root / "job.yaml")],
                          capture_output=True, text=True, timeout=60, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    job_dir = root / "out"
    from hpcinfer.slurm.status import all_finished, gather
    deadline = time.monotonic() + 150
    while not all_finished(info := gather(job_dir)):
        assert time.monotonic() < deadline, json.dumps(info)[-3000:]
        time.sleep(0.5)
    assert info["summary"] == {"COMPLETED": 2}, info
    proc = subprocess.run([sys.executable, "-m", "hpcinfer.cli", "collect", str(job_dir)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    import pyarrow as pa
    import pyarrow.parquet as pq
    tables = [pq.read_table(p) for p in sorted((job_dir / "outputs").glob("*.parquet"))]
    assert len(tables) == 2
    assert tables[0].schema.field("embedding").type == pa.list_(pa.float32())
    records = [r for t in tables for r in t.to_pylist()]
    rows = _rows(12)
    assert [r["id"] for r in records] == [r["id"] for r in rows]
    assert [r["topic"] for r in records] == [r["topic"] for r in rows]
    expected = pooling_llm(embed_model, "embed").embed([r["text"] for r in rows], use_tqdm=False)
    _assert_embeddings_equal(records, expected)
    assert [r["num_prompt_tokens"] for r in records] == \
        [len(o.prompt_token_ids) for o in expected]


def _wait_for(path: Path, text: str, proc, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in (path.read_text(errors="replace") if path.exists() else ""):
        assert proc.poll() is None, path.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} in {path}"
        time.sleep(0.05)


def test_kill_9_mid_run_then_restart_leaves_each_row_once(tmp_path, embed_model):
    num_rows = 48
    data = write_parquet(tmp_path / "data" / "a.parquet", _rows(num_rows))
    config = _pooling_config(embed_model, str(data), "embed",
                             output={"format": "parquet", "commit_every_rows": 2})
    job_dir = make_job(tmp_path / "job", config)
    shard = job_dir / "shards" / "00000"
    log = tmp_path / "worker.log"
    # 4 rows per chunk (2 * max_num_seqs), a 0.25 s sleep per chunk and per commit: the run
    # takes ~6 s after loading, so a kill 0.8 s after the first commit lands mid-run.
    slow = {"HPCINFER_IO_COMMIT_DELAY_S": "0.25", "HPCINFER_WORKER_STEP_DELAY_S": "0.25"}
    committed_at_kill = []
    for _ in range(2):
        proc = start_worker(job_dir, log_path=log, **slow)
        _wait_for(log, "engine ready", proc)
        deadline = time.monotonic() + 30
        while not list(shard.glob("part-*")) or len(committed_at_kill) and \
                len(list(shard.glob("part-*"))) <= committed_at_kill[-1]:
            assert proc.poll() is None and time.monotonic() < deadline, \
                log.read_text(errors="replace")[-3000:]
            time.sleep(0.05)
        time.sleep(0.8)
        assert proc.poll() is None, "the worker finished before the kill: give it more rows"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        committed_at_kill.append(len(list(shard.glob("part-*"))))
    assert not (shard / "DONE").exists()
    assert 0 < committed_at_kill[0] and committed_at_kill[-1] < num_rows // 2
    rc, out = run_worker(job_dir)
    assert rc == 0, out
    [records] = read_results(job_dir).values()
    assert [r["row_index"] for r in records] == list(range(num_rows))   # each row once
    expected = pooling_llm(embed_model, "embed").embed(_texts(num_rows), use_tqdm=False)
    _assert_embeddings_equal(records, expected)
    result = collect(job_dir)
    import pyarrow.parquet as pq
    [out_file] = [f for f in result.files if f.suffix == ".parquet"]
    assert pq.read_table(out_file).column("id").to_pylist() == [f"p{i}" for i in range(num_rows)]


def test_classify_jsonl_with_hpcinfer_run_local_equals_llm_classify(tmp_path):
    model = build_tiny_pooling_checkpoint("bert-cls", tmp_path / "m")
    rows = _rows(9)
    data = write_jsonl(tmp_path / "data" / "a.jsonl", rows)
    root = tmp_path / "job"
    make_job(root, _pooling_config(model, str(data), "classify"), render=False)
    env = worker_env()
    env.pop("HPCINFER_BACKEND")
    proc = subprocess.run([sys.executable, "-m", "hpcinfer.cli", "run", str(root / "job.yaml"),
                           "--local"], capture_output=True, text=True, timeout=120, env=env,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = collect(root / "out")
    [out_file] = [f for f in result.files if f.name == "00000.jsonl"]
    records = [json.loads(ln) for ln in out_file.read_text().splitlines()]
    assert list(records[0]) == ["row_index", "id", "probs", "num_prompt_tokens"]
    expected = pooling_llm(model, "classify").classify([r["text"] for r in rows], use_tqdm=False)
    assert [r["id"] for r in records] == [r["id"] for r in rows]
    for rec, out in zip(records, expected):
        assert len(rec["probs"]) == 3
        assert max(abs(a - b) for a, b in zip(rec["probs"], out.outputs.probs)) <= 1e-6


def test_score_jsonl_bad_rows_and_on_long_prompt(tmp_path):
    model = build_tiny_pooling_checkpoint("bert-cls", tmp_path / "m", num_labels=1)
    long_doc = " ".join(WORDS * 10)                  # 100 words: over 64 tokens
    pairs = [{"id": f"s{i}", "query": q, "doc": d} for i, (q, d) in enumerate(
        zip(_texts(6), _texts(6, 3)))]
    pairs.insert(2, {"id": "long", "query": "hello", "doc": long_doc})
    pairs.insert(4, {"id": "empty", "query": "", "doc": "cat"})
    pairs.insert(5, {"id": "typed", "query": "cat", "doc": 7})
    data = write_jsonl(tmp_path / "data" / "a.jsonl", pairs)
    llm = pooling_llm(model, "score", max_model_len=64)
    good = [p for p in pairs if p["id"].startswith("s")]
    expected = llm.score([p["query"] for p in good], [p["doc"] for p in good], use_tqdm=False)
    for policy in ("error", "truncate"):
        config = _pooling_config(model, str(data), "score", resilience={"on_long_prompt": policy},
                                 model={"id": str(model), "max_model_len": 64},
                                 input={"max_bad_rows": 3},    # the 3 bad pairs above
                                 output={"dir": f"out-{policy}"})
        job_dir = make_job(tmp_path / "job", config)
        rc, out = run_worker(job_dir)
        assert rc == 0, out
        [records] = read_results(job_dir).values()
        errors = {e["id"]: e for e in read_errors(job_dir)}
        answered = {r["id"]: r for r in records}
        for p, o in zip(good, expected):
            assert abs(answered[p["id"]]["score"] - o.outputs.score) <= 1e-6
        assert errors["empty"]["kind"] == "empty_prompt"
        assert errors["typed"]["kind"] == "bad_prompt_type"
        if policy == "error":
            assert errors["long"]["kind"] == "prompt_too_long"
            assert "on_long_prompt: truncate" in errors["long"]["reason"]
            assert len(records) == 6
        else:
            [cut] = llm.score("hello", long_doc, truncate_prompt_tokens=-1, use_tqdm=False)
            assert answered["long"]["num_prompt_tokens"] == 64
            assert abs(answered["long"]["score"] - cut.outputs.score) <= 1e-6
            assert len(records) == 7 and "long" not in errors


DOC_MODELS = {"embed": ("bert", {}), "classify": ("bert-cls", {}),
              "score": ("bert-cls", {"num_labels": 1}), "reward": ("llama-cls", {})}


@pytest.mark.parametrize("task", sorted(DOC_MODELS))
def test_docs_job_file_runs(tmp_path, task):
    """The job file of docs/tasks/<task>.md, with only the model, input and output paths
    replaced, runs and equals the Python API."""
    import re

    import yaml
    doc = (Path(__file__).parents[2] / "docs" / "tasks" / f"{task}.md").read_text()
    section = doc.split("## Job file", 1)[1]
    config = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.DOTALL).group(1))
    assert config["task"] == task
    kind, overrides = DOC_MODELS[task]
    model = build_tiny_pooling_checkpoint(kind, tmp_path / "m", **overrides)
    fields = [config["input"][k] for k in ("text_field", "text_1_field", "text_2_field")
              if k in config["input"]]
    texts = _texts(5)
    rows = [{config["input"]["id_field"]: f"d{i}", "source": "s",
             **{f: f"{t} {k}" for k, f in enumerate(fields)}} for i, t in enumerate(texts)]
    suffix = ".parquet" if config["input"]["path"].endswith(".parquet") else ".jsonl"
    data = (write_parquet if suffix == ".parquet" else write_jsonl)(
        tmp_path / "data" / f"a{suffix}", rows)
    config["model"]["id"] = str(model)
    config["input"]["path"] = str(data)
    config["output"]["dir"] = "out"
    job_dir = make_job(tmp_path / "job", config)
    rc, out = run_worker(job_dir)
    assert rc == 0, out
    [records] = read_results(job_dir).values()
    assert [r[config["input"]["id_field"]] for r in records] == [f"d{i}" for i in range(5)]
    llm = pooling_llm(model, task)
    inputs = [[r[f] for r in rows] for f in fields]
    if task == "embed":
        _assert_embeddings_equal(records, llm.embed(inputs[0], use_tqdm=False))
        return
    if task == "classify":
        got = [r["probs"] for r in records]
        want = [o.outputs.probs for o in llm.classify(inputs[0], use_tqdm=False)]
    elif task == "score":
        got = [[r["score"]] for r in records]
        want = [[o.outputs.score] for o in llm.score(*inputs, use_tqdm=False)]
    else:
        got = [[v for token in r["reward"] for v in token] for r in records]
        want = [o.outputs.data.flatten().tolist() for o in llm.reward(inputs[0], use_tqdm=False)]
    for g, w in zip(got, want):
        assert len(g) == len(w) and max(abs(a - b) for a, b in zip(g, w)) <= 1e-6


def test_warning_signal_commits_and_exits_requeue_then_resume(tmp_path, embed_model):
    """SIGUSR2 (Slurm's warning signal) mid-run: the pooling loop stops between chunks,
    commits, exits 3 (requeue me); the next run answers only the remaining rows."""
    num_rows = 24
    data = write_jsonl(tmp_path / "data" / "a.jsonl", _rows(num_rows))
    config = _pooling_config(embed_model, str(data), "embed", output={"commit_every_rows": 2})
    job_dir = make_job(tmp_path / "job", config)
    shard = job_dir / "shards" / "00000"
    log = tmp_path / "worker.log"
    proc = start_worker(job_dir, log_path=log, HPCINFER_WORKER_STEP_DELAY_S="0.4")
    deadline = time.monotonic() + 60
    while not list(shard.glob("part-*")):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR2)
    assert proc.wait(timeout=60) == 3, log.read_text()[-3000:]
    assert "received SIGUSR2" in log.read_text()
    assert not (shard / "DONE").exists()
    [first] = read_results(job_dir).values()
    assert 0 < len(first) < num_rows
    rc, out = run_worker(job_dir)
    assert rc == 0, out
    assert f"{len(first)} of {num_rows} rows already committed" in out
    [records] = read_results(job_dir).values()
    assert [r["row_index"] for r in records] == list(range(num_rows))
    _assert_embeddings_equal(records, pooling_llm(embed_model, "embed").embed(_texts(num_rows),
                                                                        use_tqdm=False))


def test_score_job_with_a_causal_lm_reranker_through_hf_overrides(tmp_path):
    """model.hf_overrides in a job file: a causal LM made a two-way reranker
    (classifier_from_token, as Qwen3-Reranker) scores each pair as LLM.score does."""
    from transformers import AutoTokenizer

    from hpcinfer.testing.tiny import build_tiny_checkpoint
    model = build_tiny_checkpoint("qwen3", tmp_path / "m")
    false, true = AutoTokenizer.from_pretrained(model).convert_ids_to_tokens([300, 311])
    overrides = {"architectures": ["Qwen3ForSequenceClassification"],
                 "classifier_from_token": [false, true], "is_original_qwen3_reranker": True}
    pairs = [{"id": f"s{i}", "query": q, "doc": d}
             for i, (q, d) in enumerate(zip(_texts(5), _texts(5, 3)))]
    data = write_jsonl(tmp_path / "data" / "a.jsonl", pairs)
    config = _pooling_config(model, str(data), "score",
                             model={"id": str(model), "hf_overrides": overrides})
    job_dir = make_job(tmp_path / "job", config)
    rc, out = run_worker(job_dir)
    assert rc == 0, out
    [records] = read_results(job_dir).values()
    expected = pooling_llm(model, "score", hf_overrides=overrides).score(
        [p["query"] for p in pairs], [p["doc"] for p in pairs], use_tqdm=False)
    assert [r["id"] for r in records] == [p["id"] for p in pairs]
    for rec, o in zip(records, expected):
        assert abs(rec["score"] - o.outputs.score) <= 1e-6
    assert len({round(r["score"], 6) for r in records}) > 1   # the pairs score differently
