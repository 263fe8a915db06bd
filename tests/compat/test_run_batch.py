"""vLLM's OpenAI batch runner at its own path and command line
(``python -m hpcinfer.entrypoints.openai.run_batch -i ... -o ... --model ...``): the run is a
local hpcinfer job, the output vLLM's (answers and 400 lines in input order), and the same
command again resumes (here: finds everything answered and writes the same bytes)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hpcinfer.testing import vllm_sdist
from hpcinfer.testing.pytest_fixtures import checkpoint  # noqa: F401

pytestmark = pytest.mark.timeout(600)


def _run_batch(cwd, *args):
    return subprocess.run([sys.executable, "-m", "hpcinfer.entrypoints.openai.run_batch",
                           *args], cwd=cwd, capture_output=True, text=True, timeout=500)


@pytest.fixture(scope="module")
def work(tmp_path_factory, checkpoint):
    import shutil
    import tarfile
    work = tmp_path_factory.mktemp("run-batch")
    # vLLM's example: its README runs it with --model meta-llama/Meta-Llama-3-8B-Instruct
    shutil.copytree(checkpoint("llama"), work / "meta-llama" / "Meta-Llama-3-8B-Instruct")
    with tarfile.open(vllm_sdist.fetch()) as tar:
        (work / "openai_example_batch.jsonl").write_bytes(tar.extractfile(
            f"vllm-{vllm_sdist.VERSION}/examples/offline_inference/openai_batch/"
            "openai_example_batch.jsonl").read())
    return work


def test_vllm_example_file_with_its_readme_command(work):
    proc = _run_batch(work, "-i", "openai_example_batch.jsonl", "-o", "results.jsonl",
                      "--model", "meta-llama/Meta-Llama-3-8B-Instruct")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [json.loads(x) for x in (work / "results.jsonl").read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == ["request-1", "request-2"]
    for line in lines:
        assert line["error"] is None and line["response"]["status_code"] == 200
        assert line["response"]["body"]["object"] == "chat.completion"


def test_answers_errors_in_order_equal_the_python_api_and_a_rerun_is_the_same(work):
    from hpcinfer import LLM, SamplingParams
    model = str(work / "meta-llama" / "Meta-Llama-3-8B-Instruct")
    chat = [{"role": "user", "content": "Hello there"}]
    requests = [
        {"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "m", "messages": chat, "max_completion_tokens": 6,
                  "temperature": 0}},
        {"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "m", "messages": "not a list"}},
        {"custom_id": "p1", "method": "POST", "url": "/v1/completions",
         "body": {"model": "m", "prompt": "Once upon a time", "max_tokens": 5,
                  "temperature": 0}},
    ]
    (work / "req.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    args = ["-i", "req.jsonl", "-o", "out.jsonl", "--model", model, "--max-model-len", "128",
            "--disable-log-requests"]
    proc = _run_batch(work, *args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    first = (work / "out.jsonl").read_bytes()
    lines = [json.loads(x) for x in first.decode().splitlines()]
    assert [x["custom_id"] for x in lines] == ["c1", "bad", "p1"]
    assert lines[1]["response"]["status_code"] == 400 and lines[1]["response"]["body"] is None
    assert lines[1]["error"].startswith("bad_messages: ")
    llm = LLM(model, device="cpu", max_model_len=128)
    greedy = SamplingParams(temperature=0, max_tokens=6)
    want_chat = llm.chat(chat, greedy, use_tqdm=False)[0].outputs[0].text
    want_text = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=5),
                             use_tqdm=False)[0].outputs[0].text
    assert lines[0]["response"]["body"]["choices"][0]["message"]["content"] == want_chat
    assert lines[2]["response"]["body"]["choices"][0]["text"] == want_text
    again = _run_batch(work, *args)                   # resumes: nothing left to answer
    assert again.returncode == 0, again.stderr[-3000:]
    assert (work / "out.jsonl").read_bytes() == first


def test_hpcinfer_run_batch_is_the_same_command(work):
    """`hpcinfer run-batch` (as `vllm run-batch`) takes the same flags and writes the same
    output as the module path."""
    args = ["-i", "openai_example_batch.jsonl", "-o", "cli.jsonl", "--model",
            "meta-llama/Meta-Llama-3-8B-Instruct"]
    proc = subprocess.run([sys.executable, "-m", "hpcinfer.cli", "run-batch", *args], cwd=work,
                          capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    module = _run_batch(work, *args[:3], "module.jsonl", *args[4:])
    assert module.returncode == 0, module.stderr[-3000:]
    assert (work / "cli.jsonl").read_bytes() == (work / "module.jsonl").read_bytes()
    help_text = subprocess.run([sys.executable, "-m", "hpcinfer.cli", "--help"],
                               capture_output=True, text=True, timeout=60).stdout
    assert "run-batch" in help_text


def test_flags_a_job_file_is_needed_for_are_refused_and_urls_are_not_fetched(work):
    proc = _run_batch(work, "-i", "openai_example_batch.jsonl", "-o", "x.jsonl", "--model",
                      "meta-llama/Meta-Llama-3-8B-Instruct", "--enable-lora")
    assert proc.returncode != 0 and "--enable-lora cannot be given here" in proc.stderr
    proc = _run_batch(work, "-i", "https://example.com/b.jsonl", "-o", "x.jsonl")
    assert proc.returncode != 0 and "URLs are not fetched here" in proc.stderr
