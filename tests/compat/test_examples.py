"""vLLM's offline examples' calls and flags, run as scripts on CPU with tiny checkpoints.

tests/compat/examples/ holds one script per vLLM example flow (named in each docstring):
the same imports, calls and command-line flags. They run in one subprocess
(run_examples.py) in a directory where the model names they use ("tiny-llama", ...) are
tiny random checkpoints, then each script's output is checked.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
RUNS = [
    ("examples/generate.py", "--max-tokens", "8", "--temperature", "0.5"),
    ("examples/generate.py", "--max_tokens=8", "--temperature", "0", "--max-model-len", "128",
     "--swap-space", "8", "--no-enable-prefix-caching", "-tp", "1"),
    ("examples/chat.py", "--max-tokens", "8", "--temperature", "0.5"),
    ("examples/pooling.py", "classify"),
    ("examples/pooling.py", "embed"),
    ("examples/pooling.py", "score"),
    ("examples/pooling.py", "reward"),
    ("examples/llm_engine.py", "--model", "tiny-llama", "--max-model-len", "256"),
    ("examples/prefix_caching.py",),
    ("examples/metrics.py",),
    ("examples/default_sampling.py",),
    ("examples/async_streaming.py",),
    ("examples/generate.py", "--quantization", "awq"),
]
GENERATION_CONFIG = {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "max_new_tokens": 6}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> list[tuple[int, str]]:
    from hpcinfer.testing.tiny import build_tiny_checkpoint
    from hpcinfer.testing.tiny_pooling import build_tiny_pooling_checkpoint

    work = tmp_path_factory.mktemp("compat")
    llama = build_tiny_checkpoint("llama", work / "tiny-llama")
    (llama / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    build_tiny_pooling_checkpoint("llama-cls", work / "tiny-llama-cls")
    build_tiny_pooling_checkpoint("llama-embed", work / "tiny-llama-embed")
    build_tiny_pooling_checkpoint("xlm-roberta-cls", work / "tiny-reranker", num_labels=1)
    runs = [[str(HERE / script), *argv] for script, *argv in RUNS]
    proc = subprocess.run([sys.executable, str(HERE / "run_examples.py"), json.dumps(runs)],
                          cwd=work, capture_output=True, text=True, timeout=600)
    blocks = re.findall(r"=== BEGIN (\d+)\n(.*?)=== END \1 rc=(-?\d+)\n", proc.stdout, re.S)
    assert len(blocks) == len(RUNS), proc.stdout[-3000:] + proc.stderr[-3000:]
    return [(int(rc), text) for _, text, rc in blocks]


def _ok(outputs, i) -> str:
    rc, text = outputs[i]
    assert rc == 0, text
    return text


@pytest.mark.slow
def test_generate_flags_reach_the_sampling_params(outputs):
    lines = re.findall(r"tokens: (\d+), text", _ok(outputs, 0))
    assert lines and all(n == "8" for n in lines)  # --max-tokens 8 over the config's 6
    # underscore spelling, an ignored vLLM flag, --no-* booleans and -tp parse and run
    assert re.findall(r"tokens: (\d+), text", _ok(outputs, 1)) == ["8", "8"]


@pytest.mark.slow
def test_chat_batches_and_tools(outputs):
    text = _ok(outputs, 2)
    assert "single: 8 tokens" in text and "batch: 4 outputs" in text and "tools: 8 tokens" in text


@pytest.mark.slow
def test_pooling_tasks_from_parser_defaults(outputs):
    assert _ok(outputs, 3).count("classify: 3 probs, sum 1.0000") == 2
    assert _ok(outputs, 4).count("embed: size") == 2
    assert _ok(outputs, 5).count("score: ") == 2
    assert _ok(outputs, 6).count("reward: shape") == 2


@pytest.mark.slow
def test_llm_engine_loop_best_of_and_reset(outputs):
    text = _ok(outputs, 7)
    assert "reset prefix cache: True" in text
    assert "request 2: 2 outputs" in text  # n=2 of best_of=5
    assert re.search(r"request 0: 1 outputs, \[16\] tokens", text)
    found = re.search(r"request 0: prompt logprobs for (\d+) of (\d+) prompt tokens, first None",
                      text)
    assert found and found.group(1) == found.group(2)


@pytest.mark.slow
def test_prefix_caching_same_answers_and_hits(outputs):
    text = _ok(outputs, 8)
    assert "Generated answers are the same: True" in text
    assert int(re.search(r"prefix cache hits: (\d+)", text).group(1)) > 0


@pytest.mark.slow
def test_metrics_by_reader_type(outputs):
    text = _ok(outputs, 9)
    assert "vllm:generation_tokens (counter) = 32" in text  # 2 prompts x max_tokens 16
    assert "vllm:num_requests_running (gauge) = 0.0" in text
    assert "vllm:e2e_request_latency_seconds (histogram) count = 2 +Inf = 2" in text


@pytest.mark.slow
def test_generation_config_defaults(outputs):
    text = _ok(outputs, 10)
    assert "defaults: top_k=20 top_p=0.8 max_tokens=6" in text and "tokens: 6" in text


@pytest.mark.slow
def test_async_streaming_deltas_add_up(outputs):
    text = _ok(outputs, 11)
    found = re.findall(r"prompt \d: (\d+) deltas, same tokens: (\w+)", text)
    assert len(found) == 2 and all(int(n) > 1 and same == "True" for n, same in found)


@pytest.mark.slow
def test_quantization_flag_on_an_unquantized_checkpoint_is_refused(outputs):
    rc, text = outputs[12]
    assert rc == 1
    assert "quantization awq: needs a checkpoint quantized that way" in text
