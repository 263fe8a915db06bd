"""sampling.prompt_logprobs in a job: the prompt_logprobs column (JSONL rows to jsonl, Parquet
rows to parquet, OpenAI-batch rows to jsonl) and, for OpenAI-batch output, vLLM's
``prompt_logprobs`` in the response (chat: the body; completions: the choice) equal
LLM.generate / LLM.chat's RequestOutput.prompt_logprobs for the same rows; validate refuses
the switch where no prompt is scored (pooling tasks)."""
from __future__ import annotations

import pytest

from hpcinfer.config.errors import ConfigError
from hpcinfer.testing.worker_jobs import (job_config, make_job, prompt_rows, read_results,
                                          run_worker, write_jsonl, write_parquet)

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_column_equals_python_api(tmp_path, model_dir, llm, fmt):
    from hpcinfer import SamplingParams
    rows = prompt_rows(5)
    write = write_jsonl if fmt == "jsonl" else write_parquet
    write(tmp_path / "data" / f"in.{fmt}", rows)
    config = job_config(model_dir, f"data/in.{fmt}", output={"format": fmt},
                        sampling={"prompt_logprobs": 2})
    job_dir = make_job(tmp_path, config)
    rc, out = run_worker(job_dir)
    assert rc == 0, out
    [records] = read_results(job_dir).values()
    expected = llm.generate([r["prompt"] for r in rows],
                            SamplingParams(temperature=0.0, max_tokens=6, prompt_logprobs=2),
                            use_tqdm=False)
    for record, want in zip(records, expected, strict=True):
        _check_column(record["prompt_logprobs"], want)


def _check_column(got, want) -> None:
    """got: a prompt_logprobs column value; want: the Python API's RequestOutput."""
    assert got[0] is None and len(got) == len(want.prompt_token_ids)
    for token_id, position, entry in zip(want.prompt_token_ids[1:], got[1:],
                                         want.prompt_logprobs[1:]):
        assert position[0]["token_id"] == token_id        # the prompt token first
        assert {p["token_id"] for p in position} == set(entry)
        for p in position:
            assert abs(p["logprob"] - entry[p["token_id"]].logprob) < 1e-5


def _openai_rows() -> list[dict]:
    chat = [{"role": "user", "content": "How are the GPUs today?"}]
    return [
        {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "tiny", "messages": chat, "max_tokens": 6, "temperature": 0}},
        {"custom_id": "completion", "method": "POST", "url": "/v1/completions",
         "body": {"model": "tiny", "prompt": "Hello cluster: what is batch?", "max_tokens": 6,
                  "temperature": 0}},
    ]


def _python_api(llm, rows) -> dict:
    from hpcinfer import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=6, prompt_logprobs=2)
    [chat] = llm.chat([rows[0]["body"]["messages"]], params, use_tqdm=False)
    [completion] = llm.generate([rows[1]["body"]["prompt"]], params, use_tqdm=False)
    return {"chat": chat, "completion": completion}


def test_openai_batch_output_puts_them_where_vllm_does(tmp_path, model_dir, llm):
    rows = _openai_rows()
    write_jsonl(tmp_path / "data" / "batch.jsonl", rows)
    config = job_config(model_dir, "data/batch.jsonl",
                        input={"format": "openai-batch", "id_field": None,
                               "prompt_field": None},
                        output={"format": "openai-batch"}, sampling={"prompt_logprobs": 2})
    job_dir = make_job(tmp_path, config)
    rc, out = run_worker(job_dir)
    assert rc == 0, out
    [records] = read_results(job_dir).values()
    bodies = {r["custom_id"]: r["response"]["body"] for r in records}
    expected = _python_api(llm, rows)
    # vLLM's ChatCompletionResponse.prompt_logprobs and CompletionResponseChoice.prompt_logprobs
    assert "prompt_logprobs" not in bodies["chat"]["choices"][0]
    assert "prompt_logprobs" not in bodies["completion"]
    got = {"chat": bodies["chat"]["prompt_logprobs"],
           "completion": bodies["completion"]["choices"][0]["prompt_logprobs"]}
    for cid, want in expected.items():
        positions = got[cid]
        assert positions[0] is None and len(positions) == len(want.prompt_token_ids), cid
        for token_id, position, entry in zip(want.prompt_token_ids[1:], positions[1:],
                                             want.prompt_logprobs[1:]):
            assert list(position)[0] == str(token_id)     # the prompt token first
            assert set(position) == {str(t) for t in entry}
            for key, value in position.items():
                logprob = entry[int(key)]
                assert set(value) == {"logprob", "rank", "decoded_token"}
                assert abs(value["logprob"] - logprob.logprob) < 1e-5
                assert value["rank"] == logprob.rank
                assert value["decoded_token"] == logprob.decoded_token
                assert isinstance(value["decoded_token"], str)
        assert bodies[cid]["usage"]["prompt_tokens"] == len(want.prompt_token_ids)


def test_openai_batch_rows_to_jsonl_column(tmp_path, model_dir, llm):
    rows = _openai_rows()
    write_jsonl(tmp_path / "data" / "batch.jsonl", rows)
    config = job_config(model_dir, "data/batch.jsonl",
                        input={"format": "openai-batch", "id_field": None,
                               "prompt_field": None},
                        output={"format": "jsonl"}, sampling={"prompt_logprobs": 2})
    job_dir = make_job(tmp_path, config)
    rc, out = run_worker(job_dir)
    assert rc == 0, out
    [records] = read_results(job_dir).values()
    expected = _python_api(llm, rows)
    for record, cid in zip(records, ("chat", "completion"), strict=True):
        _check_column(record["prompt_logprobs"], expected[cid])


def test_no_column_without_the_switch(tmp_path, model_dir):
    write_jsonl(tmp_path / "data" / "in.jsonl", prompt_rows(2))
    job_dir = make_job(tmp_path, job_config(model_dir, "data/in.jsonl"))
    rc, out = run_worker(job_dir)
    assert rc == 0, out
    [records] = read_results(job_dir).values()
    assert all("prompt_logprobs" not in r for r in records)


def test_pooling_task_is_refused_at_validate(tmp_path, model_dir):
    write_jsonl(tmp_path / "data" / "in.jsonl", prompt_rows(2))
    config = job_config(model_dir, "data/in.jsonl", task="embed",
                        input={"text_field": "prompt", "prompt_field": None},
                        sampling={"prompt_logprobs": 1})
    with pytest.raises(ConfigError, match=r"sampling.prompt_logprobs: prompt logprobs are "
                                          r"written by generate/chat jobs only"):
        make_job(tmp_path, config)


def test_openai_body_prompt_logprobs_says_where_the_switch_is():
    from hpcinfer.io import openai_batch
    obj = {"custom_id": "x", "method": "POST", "url": "/v1/completions",
           "body": {"prompt": "hi", "prompt_logprobs": 1}}
    _, (kind, reason) = openai_batch.parse_request(obj, "generate")
    assert kind == "unsupported_body_key"
    assert "write `prompt_logprobs: k` under sampling in the job file" in reason
    obj["body"]["prompt_logprobs"] = None          # null: not asked, as vLLM reads it
    assert openai_batch.parse_request(obj, "generate")[1] is None
