"""OpenAI-batch pooling jobs (vLLM run-batch's /v1/embeddings and /v1/score) and the job
file's ``pooling:`` block, through the real worker, against the Python API:

- /v1/embeddings lines (str, [str], [int], [[int]], dimensions, base64) answered with vLLM's
  EmbeddingResponse bodies equal to ``LLM.embed`` per custom_id; bad requests in errors.jsonl;
  every line exactly once;
- /v1/score and /score lines (one-to-many, pairwise, queries/documents, use_activation)
  equal to ``LLM.score``;
- ``pooling: {pooling_type, dimensions, normalize}`` in a JSONL embed job equals
  ``LLM(pooler_config=...)`` and ``LLM.embed(..., pooling_params=PoolingParams(...))``.
"""
from __future__ import annotations

import base64
import json
import math
import struct
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
    write_jsonl,
)

pytestmark = pytest.mark.timeout(180)
ENGINE = POOLING_ENGINE
TOL = 1e-6


def _line(custom_id, url: str = "/v1/embeddings", **body) -> bytes:
    head = {} if custom_id is None else {"custom_id": custom_id}
    return json.dumps({**head, "method": "POST", "url": url,
                       "body": {"model": "tiny", **body}}).encode()


def _openai_job(tmp_path: Path, model: Path, task: str, lines: list[bytes], **sections):
    path = tmp_path / "data" / "batch.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines) + b"\n")
    config = job_config(model, str(path), task=task, engine=ENGINE,
                        # corpora of bad lines: no bad-row budget (test_bad_row_budget.py)
                        input={"format": "openai-batch", "id_field": None,
                               "prompt_field": None, "max_bad_rows": 1.0},
                        output={"format": "openai-batch", "commit_every_rows": 3}, **sections)
    config.pop("sampling")
    job_dir = make_job(tmp_path / "job", config)
    rc, out = run_worker(job_dir)
    assert rc == 0, out[-3000:]
    [records] = read_results(job_dir).values()
    return job_dir, records, {e["row_index"]: e for e in read_errors(job_dir)}


def _close(got: list[float], want: list[float]) -> bool:
    return len(got) == len(want) and max(abs(a - b) for a, b in zip(got, want)) <= TOL


def test_embeddings_requests_equal_llm_embed_and_bad_lines_are_errors(tmp_path, embed_model):
    from hpcinfer import PoolingParams
    llm = pooling_llm(embed_model, "embed")
    ids = llm.get_tokenizer()("the cat sat").input_ids
    good = {  # custom_id -> (body, the inputs LLM.embed gets, its PoolingParams)
        "e0": ({"input": "hello world"}, ["hello world"], None),
        "e1": ({"input": ["alpha beta", "gamma"]}, ["alpha beta", "gamma"], None),
        "e2": ({"input": ids}, [ids], None),
        "e3": ({"input": [ids, ids[:3]]}, [ids, ids[:3]], None),
        "e4": ({"input": "delta on mat", "dimensions": 8}, ["delta on mat"],
               PoolingParams(dimensions=8)),
        "e5": ({"input": ["cat", "mat"], "encoding_format": "base64"}, ["cat", "mat"], None),
        "e6": ({"input": "on the mat", "normalize": False}, ["on the mat"],
               PoolingParams(normalize=False)),
    }
    bad = [  # (kind, line)
        ("empty_prompt", _line("b0", input="")),
        ("bad_prompt_type", _line("b1", input=5)),
        ("url_task_mismatch", _line("b2", url="/v1/score", text_1="a", text_2="b")),
        ("engine_rejected", _line("b3", input="too many dims", dimensions=4096)),
        ("unsupported_body_key", _line("b4", input="x", temperature=0.5)),
        ("engine_rejected", _line("b5", input=[10 ** 6])),
        ("missing_id", _line(None, input="no custom id")),
        ("invalid_pooling", _line("b7", input="x", encoding_format="int8")),
    ]
    lines, kinds = [], {}
    for i, (custom_id, (body, _, _)) in enumerate(good.items()):
        lines.append(_line(custom_id, **body))
        kind, line = bad[i] if i < len(bad) else (None, None)
        if line:
            kinds[len(lines)] = kind
            lines.append(line)
    for kind, line in bad[len(good):]:
        kinds[len(lines)] = kind
        lines.append(line)
    job_dir, records, errors = _openai_job(tmp_path, embed_model, "embed", lines)

    assert {i: e["kind"] for i, e in errors.items()} == kinds
    assert "model's embedding size" in errors[next(i for i, k in kinds.items()
                                                   if k == "engine_rejected")]["reason"]
    # every line exactly once: answered or in errors.jsonl
    assert sorted([r["row_index"] for r in records] + list(errors)) == list(range(len(lines)))
    assert [r["custom_id"] for r in records] == list(good)
    for rec in records:
        body, inputs, params = good[rec["custom_id"]]
        want = llm.embed(inputs, pooling_params=params, use_tqdm=False)
        resp = rec["response"]
        assert resp["status_code"] == 200 and rec["error"] is None
        out = resp["body"]
        assert (out["object"], out["model"]) == ("list", "tiny")
        assert [d["index"] for d in out["data"]] == list(range(len(inputs)))
        assert {d["object"] for d in out["data"]} == {"embedding"}
        num_tokens = sum(len(o.prompt_token_ids) for o in want)
        assert out["usage"] == {"prompt_tokens": num_tokens, "total_tokens": num_tokens,
                                "completion_tokens": 0, "prompt_tokens_details": None}
        for d, o in zip(out["data"], want):
            got = d["embedding"]
            if body.get("encoding_format") == "base64":
                raw = base64.b64decode(got)
                got = list(struct.unpack(f"<{len(raw) // 4}f", raw))
            assert _close(got, o.outputs.embedding), rec["custom_id"]
    assert len(records[4]["response"]["body"]["data"][0]["embedding"]) == 8

    # collected: vLLM's line keys, no row_index, custom_ids in input order
    result = collect(job_dir)
    [out_file] = [f for f in result.files if f.name.endswith(".openai.jsonl")]
    collected = [json.loads(x) for x in out_file.read_text().splitlines()]
    assert [list(c) for c in collected] == [["id", "custom_id", "response", "error"]] * len(good)
    assert [c["custom_id"] for c in collected] == list(good)


def test_score_requests_equal_llm_score(tmp_path):
    model = build_tiny_pooling_checkpoint("bert-cls", tmp_path / "m", num_labels=1)
    llm = pooling_llm(model, "score")
    docs = ["the cat sat on the mat", "hello world", "gamma delta"]
    good = {  # custom_id -> (url, body, (text_1, text_2) for LLM.score, activation)
        "s0": ("/v1/score", {"text_1": "where is the cat", "text_2": docs},
               ("where is the cat", docs), None),
        "s1": ("/v1/score", {"text_1": ["alpha", "beta"], "text_2": ["gamma", "delta"]},
               (["alpha", "beta"], ["gamma", "delta"]), None),
        "s2": ("/score", {"queries": "hello", "documents": ["world", "mat"]},
               ("hello", ["world", "mat"]), None),
        "s3": ("/v1/score", {"text_1": "cat", "text_2": "mat", "use_activation": False},
               ("cat", "mat"), False),
    }
    bad = [
        ("score_length_mismatch", _line("b0", url="/v1/score", text_1=["a", "b"],
                                        text_2=["c", "d", "e"])),
        ("missing_prompt", _line("b1", url="/v1/score", text_1="a")),
        ("url_task_mismatch", _line("b2", input="embed me")),
        ("bad_prompt_type", _line("b3", url="/v1/score", text_1="a", text_2=[1, 2])),
    ]
    lines = [_line(cid, url=url, **body) for cid, (url, body, _, _) in good.items()]
    lines += [line for _, line in bad]
    _, records, errors = _openai_job(tmp_path, model, "score", lines)
    assert [e["kind"] for _, e in sorted(errors.items())] == [k for k, _ in bad]
    assert [e["id"] for _, e in sorted(errors.items())] == ["b0", "b1", "b2", "b3"]
    assert [r["custom_id"] for r in records] == list(good)
    from hpcinfer import PoolingParams
    for rec in records:
        _, _, (text_1, text_2), activation = good[rec["custom_id"]]
        want = llm.score(text_1, text_2, pooling_params=PoolingParams(activation=activation),
                         use_tqdm=False)
        body = rec["response"]["body"]
        assert body["id"].startswith("score-") and body["object"] == "list"
        assert [d["object"] for d in body["data"]] == ["score"] * len(want)
        assert [d["index"] for d in body["data"]] == list(range(len(want)))
        assert _close([d["score"] for d in body["data"]], [o.outputs.score for o in want])
        assert body["usage"]["prompt_tokens"] == sum(len(o.prompt_token_ids) for o in want)
    # use_activation: false gives the logit; the default is its sigmoid
    logit = records[3]["response"]["body"]["data"][0]["score"]
    sigmoid = llm.score("cat", "mat", use_tqdm=False)[0].outputs.score
    assert abs(1 / (1 + math.exp(-logit)) - sigmoid) <= TOL and abs(logit - sigmoid) > 1e-3


def test_job_pooling_block_equals_pooler_config_and_pooling_params(tmp_path, embed_model):
    from hpcinfer import PoolingParams
    texts = ["hello world", "the cat sat on the mat", "alpha", "gamma delta beta"]
    data = write_jsonl(tmp_path / "data" / "a.jsonl",
                       [{"id": f"p{i}", "text": t} for i, t in enumerate(texts)])
    pooling = {"pooling_type": "cls", "dimensions": 8, "normalize": True}
    config = job_config(embed_model, str(data), task="embed", engine=ENGINE, pooling=pooling,
                        input={"prompt_field": None, "text_field": "text"})
    config.pop("sampling")
    job_dir = make_job(tmp_path / "job", config)
    rc, out = run_worker(job_dir)
    assert rc == 0, out[-3000:]
    [records] = read_results(job_dir).values()
    by_config = pooling_llm(embed_model, "embed", pooler_config={**pooling, "pooling_type": "CLS"})
    want = by_config.embed(texts, use_tqdm=False)
    # the same through per-call PoolingParams on an LLM whose pooling type is CLS
    per_call = pooling_llm(embed_model, "embed", pooler_config={"pooling_type": "CLS"}).embed(
        texts, pooling_params=PoolingParams(dimensions=8, normalize=True), use_tqdm=False)
    default = pooling_llm(embed_model, "embed").embed(texts, use_tqdm=False)
    for rec, a, b, d in zip(records, want, per_call, default):
        assert len(rec["embedding"]) == 8
        assert _close(rec["embedding"], a.outputs.embedding)
        assert _close(rec["embedding"], b.outputs.embedding)
        assert abs(sum(x * x for x in rec["embedding"]) - 1) < 1e-5
        # CLS + 8 dims is not the checkpoint's MEAN pooling cut to 8
        assert not _close(rec["embedding"], d.outputs.embedding[:8])


@pytest.mark.parametrize("task", ["embed", "score"])
def test_docs_openai_batch_example_runs(tmp_path, task):
    """docs/tasks/<task>.md's OpenAI batch request lines and job file, with only the model,
    input and output paths replaced, run and equal the Python API."""
    import re

    import yaml

    from hpcinfer import PoolingParams
    doc = (Path(__file__).parents[2] / "docs" / "tasks" / f"{task}.md").read_text()
    section = doc.split("## OpenAI batch input", 1)[1]
    lines = re.search(r"```jsonl\n(.*?)```", section, re.DOTALL).group(1).strip().splitlines()
    config = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.DOTALL).group(1))
    assert config["task"] == task and config["input"]["format"] == "openai-batch"
    model = build_tiny_pooling_checkpoint(*(("bert",) if task == "embed" else ("bert-cls",)),
                                          tmp_path / "m", **({"num_labels": 1}
                                                             if task == "score" else {}))
    data = tmp_path / "data" / "requests.jsonl"
    data.parent.mkdir()
    data.write_text("\n".join(lines) + "\n")
    config["model"]["id"] = str(model)
    config["input"]["path"] = str(data)
    config["output"]["dir"] = "out"
    job_dir = make_job(tmp_path / "job", config)
    rc, out = run_worker(job_dir)
    assert rc == 0, out[-3000:]
    [records] = read_results(job_dir).values()
    requests = [json.loads(line) for line in lines]
    assert [r["custom_id"] for r in records] == [q["custom_id"] for q in requests]
    assert not read_errors(job_dir)
    llm = pooling_llm(model, task)
    for rec, request in zip(records, requests):
        body, data_out = request["body"], rec["response"]["body"]["data"]
        if task == "embed":
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            want = [o.outputs.embedding for o in llm.embed(
                inputs, pooling_params=PoolingParams(dimensions=body.get("dimensions")),
                use_tqdm=False)]
            got = [d["embedding"] for d in data_out]
        else:
            text_1 = body.get("text_1", body.get("queries"))
            text_2 = body.get("text_2", body.get("documents"))
            want = [[o.outputs.score] for o in llm.score(text_1, text_2, use_tqdm=False)]
            got = [[d["score"]] for d in data_out]
        assert len(got) == len(want)
        assert all(_close(g, w) for g, w in zip(got, want)), request["custom_id"]


def test_worker_refuses_a_job_yaml_edited_past_validate(tmp_path, embed_model):
    """validate refuses OpenAI batch input with JSONL output (tests/login); a resolved
    job.yaml edited after rendering is refused by the worker too, before any model loads."""
    import yaml
    path = write_jsonl(tmp_path / "data" / "a.jsonl", [
        {"custom_id": "e1", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": "m", "input": "embed me"}}])
    config = job_config(embed_model, str(path), task="embed",
                        input={"format": "openai-batch", "id_field": None, "prompt_field": None},
                        output={"format": "openai-batch"})
    job_dir = make_job(tmp_path / "job", config)
    resolved = yaml.safe_load((job_dir / "job.yaml").read_text())
    resolved["output"]["format"] = "jsonl"
    (job_dir / "job.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    rc, out = run_worker(job_dir)
    assert rc == 2, out[-3000:]
    assert "write `format: openai-batch` under output" in out
    assert "engine ready" not in out and not list(job_dir.glob("shards/*/part-*"))
