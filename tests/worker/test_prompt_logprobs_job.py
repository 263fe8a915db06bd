"""sampling.prompt_logprobs in a job: the prompt_logprobs column (jsonl and parquet) equals
LLM.generate's RequestOutput.prompt_logprobs for the same rows; validate refuses it where no
column could hold it."""
from __future__ import annotations

import pytest

from hpcinfer.config.errors import ConfigError
from hpcinfer.testing.worker_jobs import (job_config, make_job, prompt_rows, read_results,
                                          run_worker, write_jsonl)

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_column_equals_python_api(tmp_path, model_dir, llm, fmt):
    from hpcinfer import SamplingParams
    rows = prompt_rows(5)
    write_jsonl(tmp_path / "data" / "in.jsonl", rows)
    config = job_config(model_dir, "data/in.jsonl", output={"format": fmt},
                        sampling={"prompt_logprobs": 2})
    job_dir = make_job(tmp_path, config)
    rc, out = run_worker(job_dir)
    assert rc == 0, out
    [records] = read_results(job_dir).values()
    expected = llm.generate([r["prompt"] for r in rows],
                            SamplingParams(temperature=0.0, max_tokens=6, prompt_logprobs=2),
                            use_tqdm=False)
    for record, want in zip(records, expected, strict=True):
        got = record["prompt_logprobs"]
        assert got[0] is None and len(got) == len(want.prompt_token_ids)
        for token_id, position, entry in zip(want.prompt_token_ids[1:], got[1:],
                                             want.prompt_logprobs[1:]):
            assert position[0]["token_id"] == token_id        # the prompt token first
            assert {p["token_id"] for p in position} == set(entry)
            for p in position:
                assert abs(p["logprob"] - entry[p["token_id"]].logprob) < 1e-5


def test_no_column_without_the_switch(tmp_path, model_dir):
    write_jsonl(tmp_path / "data" / "in.jsonl", prompt_rows(2))
    job_dir = make_job(tmp_path, job_config(model_dir, "data/in.jsonl"))
    rc, out = run_worker(job_dir)
    assert rc == 0, out
    [records] = read_results(job_dir).values()
    assert all("prompt_logprobs" not in r for r in records)


def test_openai_batch_output_is_refused_at_validate(tmp_path, model_dir):
    write_jsonl(tmp_path / "data" / "in.jsonl", prompt_rows(2))
    config = job_config(model_dir, "data/in.jsonl", output={"format": "openai-batch"},
                        sampling={"prompt_logprobs": 1})
    with pytest.raises(ConfigError, match=r"sampling.prompt_logprobs.*jsonl or parquet"):
        make_job(tmp_path, config)
