"""vLLM's own offline examples (vLLM 0.11.0's examples/offline_inference, read from its sdist
on PyPI by hpcinfer.testing.vllm_sdist; not kept here) run to the end with only their imports
changed from ``vllm`` to ``hpcinfer``. The hub models they name are tiny random checkpoints
in directories of the same names (``facebook/opt-125m``, ...) in the working directory, so
not even the model strings change; flags are the ones issue 18 names. multilora_inference.py's
adapter comes from ``snapshot_download`` of its hub id: a tiny PEFT adapter of the same name in
a Hugging Face cache the run points at (offline).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hpcinfer.testing import vllm_sdist

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

HERE = Path(__file__).parent
# (example, extra argv); the order is the order they run in, in one process.
RUNS = [
    ("basic/basic.py",),
    ("basic/generate.py", "--max-tokens", "8", "--temperature", "0.5"),
    ("basic/chat.py", "--max-tokens", "8", "--temperature", "0.5"),
    ("basic/classify.py",),
    ("basic/embed.py",),
    ("basic/score.py",),
    ("basic/reward.py",),
    ("llm_engine_example.py",),
    ("prefix_caching.py",),
    ("metrics.py",),
    ("async_llm_streaming.py",),
    ("structured_outputs.py",),
    ("automatic_prefix_caching.py",),
    ("reproducibility.py",),
    ("multilora_inference.py",),
    ("context_extension.py",),
    ("simple_profiling.py",),
    ("vision_language.py", "--model-type", "llava"),
    ("vision_language.py", "--model-type", "gemma3"),   # with its do_pan_and_scan
    ("vision_language.py", "--model-type", "qwen2_vl"),   # no torchvision here: image-only
    ("vision_language.py", "--model-type", "qwen2_5_vl"),
    ("pooling/qwen3_reranker.py",),
    ("lora_with_quantization_inference.py",),   # bitsandbytes (online nf4), AWQ, GPTQ bases
    ("pooling/embed_matryoshka_fy.py",),        # PoolingParams(dimensions=32), runner="pooling"
]
# What each prints when it got its results: (text, at least this many times).
PRINTS = {
    "basic/basic.py": ("Output:", 4),
    "basic/generate.py": ("Generated text:", 4),
    "basic/chat.py": ("Generated text:", 2),
    "basic/classify.py": ("Class Probabilities:", 4),
    "basic/embed.py": ("Embeddings:", 4),
    "basic/score.py": ("Score:", 2),
    "basic/reward.py": ("(size=", 4),
    "llm_engine_example.py": ("RequestOutput(", 3),
    "prefix_caching.py": ("Generated answers are the same: True", 1),
    "metrics.py": ("vllm:generation_tokens (counter)", 1),
    "async_llm_streaming.py": ("All streaming examples completed!", 1),
    "structured_outputs.py": ("Structured outputs by", 4),
    "automatic_prefix_caching.py": ("Generation time:", 2),
    "reproducibility.py": ("Generated text:", 4),
    "multilora_inference.py": ("RequestOutput(", 4),
    "context_extension.py": ("Generated text:", 1),
    "simple_profiling.py": ("Generated text:", 4),
    "vision_language.py": ("-" * 50 + "\n", 5),   # a rule before each of 4 answers, one after
    "pooling/qwen3_reranker.py": ("-" * 30 + "\n", 2),
    "lora_with_quantization_inference.py": ("Output:", 12),   # 4 requests x 3 quantized bases
    "pooling/embed_matryoshka_fy.py": ("(size=32)", 6),   # six prompts, cut to 32 dimensions
}
HUB_ADAPTER = "yard1/llama-2-7b-sql-lora-test"   # multilora_inference.py's snapshot_download
# lora_with_quantization_inference.py's adapters (snapshot_download) and quantized bases
QUANT_LORA_ADAPTERS = ("timdettmers/qlora-flan-7b", "jashing/tinyllama-colorist-lora")
QUANT_LORA_BASES = {"awq": "TheBloke/TinyLlama-1.1B-Chat-v0.3-AWQ",
                    "gptq_sym": "TheBloke/TinyLlama-1.1B-Chat-v0.3-GPTQ"}


def _models(work: Path) -> None:
    from hpcinfer.testing.tiny import build_tiny_checkpoint
    from hpcinfer.testing.tiny_pooling import build_tiny_pooling_checkpoint
    llama = build_tiny_checkpoint("llama", work / "facebook" / "opt-125m")
    (work / "meta-llama").mkdir()
    (work / "meta-llama" / "Llama-3.2-1B-Instruct").symlink_to(llama)
    build_tiny_pooling_checkpoint("llama-cls", work / "jason9693" / "Qwen2.5-1.5B-apeach")
    build_tiny_pooling_checkpoint("llama-embed", work / "intfloat" / "e5-small")
    # embed_matryoshka_fy.py: jina-embeddings-v3 is an XLM-RoBERTa (its own code, which the
    # example trusts); a tiny sentence-transformers one stands in
    build_tiny_pooling_checkpoint("xlm-roberta", work / "jinaai" / "jina-embeddings-v3",
                                  sentence_transformers=True)
    build_tiny_pooling_checkpoint("xlm-roberta-cls", work / "BAAI" / "bge-reranker-v2-m3",
                                  num_labels=1)
    # reward.py asks for max_model_len=1024
    build_tiny_pooling_checkpoint("llama-cls", work / "internlm" / "internlm2-1_8b-reward",
                                  max_position_embeddings=2048)
    build_tiny_checkpoint("qwen2", work / "Qwen" / "Qwen2.5-3B-Instruct")
    build_tiny_checkpoint("qwen3", work / "Qwen" / "Qwen3-0.6B")
    # automatic_prefix_caching.py's markdown table is ~1,500 tiny-tokenizer tokens
    build_tiny_checkpoint("llama", work / "lmsys" / "longchat-13b-16k",
                          max_position_embeddings=4096)
    # qwen3_reranker.py: a causal LM made a reranker from its "no"/"yes" LM-head rows
    build_tiny_checkpoint("qwen3", work / "Qwen" / "Qwen3-Reranker-0.6B",
                          extra_tokens=("no", "yes"))
    llama2 = build_tiny_checkpoint("llama", work / "meta-llama" / "Llama-2-7b-hf")
    _hub_cache_adapter(work / "hf-cache", HUB_ADAPTER, llama2)
    # lora_with_quantization_inference.py: one tiny Llama under the three base names (the
    # bitsandbytes one unquantized: the example quantizes it in flight), each adapter of it
    (work / "huggyllama").mkdir()
    (work / "huggyllama" / "llama-7b").symlink_to(llama2)
    from hpcinfer.testing.quant import build_quantized
    for fmt, name in QUANT_LORA_BASES.items():
        quantized, _ = build_quantized(llama2, fmt, work / "quantized")
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).symlink_to(quantized)
    for repo_id in QUANT_LORA_ADAPTERS:
        _hub_cache_adapter(work / "hf-cache", repo_id, llama2)
    # vision_language.py: its image comes from vLLM's asset cache (VLLM_ASSETS_CACHE, set for
    # the run); its models ask for max_model_len 4096 / 2048
    from hpcinfer.testing.tiny_vision import (build_tiny_gemma3, build_tiny_llava,
                                              build_tiny_qwen2_vl, test_images)
    _longer(build_tiny_llava(work / "llava-hf" / "llava-1.5-7b-hf"), 4096)
    _longer(build_tiny_gemma3(work / "google" / "gemma-3-4b-it"), 4096)
    _longer(build_tiny_qwen2_vl(work / "Qwen" / "Qwen2-VL-7B-Instruct"), 4096)
    _longer(build_tiny_qwen2_vl(work / "Qwen" / "Qwen2.5-VL-3B-Instruct", version="2.5"), 4096)
    assets = work / "assets" / "vllm_public_assets"
    assets.mkdir(parents=True)
    test_images()[0].resize((160, 120)).save(assets / "cherry_blossom.jpg")


def _longer(checkpoint: Path, positions: int) -> None:
    """max_position_embeddings raised in config.json (top level and text_config): the tiny
    models' rope tables are computed, not stored, so nothing else changes."""
    path = checkpoint / "config.json"
    config = json.loads(path.read_text())
    for part in (config, config.get("text_config") or {}):
        if "max_position_embeddings" in part:
            part["max_position_embeddings"] = positions
    path.write_text(json.dumps(config, indent=2))


def _hub_cache_adapter(cache: Path, repo_id: str, base: Path) -> None:
    """A rank-8 PEFT adapter of ``base`` as the cached snapshot of ``repo_id`` in a Hugging
    Face hub cache (what snapshot_download returns offline)."""
    from hpcinfer.testing.tiny_lora import build_tiny_adapter
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    build_tiny_adapter(base, repo / "snapshots" / commit, rank=8)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm-examples")


@pytest.fixture(scope="module")
def outputs(work) -> dict[str, tuple[int, str]]:
    scripts = vllm_sdist.write_examples(work / "examples")
    _models(work)
    runs = [[str(scripts[name]), *argv] for name, *argv in RUNS]
    env = dict(os.environ, HF_HUB_CACHE=str(work / "hf-cache"), HF_HUB_OFFLINE="1",
               VLLM_ASSETS_CACHE=str(work / "assets"))
    proc = subprocess.run([sys.executable, str(HERE / "run_examples.py"), json.dumps(runs)],
                          cwd=work, env=env, capture_output=True, text=True, timeout=800)
    blocks = re.findall(r"=== BEGIN (\d+)\n(.*?)=== END \1 rc=(-?\d+)\n", proc.stdout, re.S)
    assert len(blocks) == len(RUNS), proc.stdout[-3000:] + proc.stderr[-3000:]
    return {_label(RUNS[int(i)]): (int(rc), text) for i, text, rc in blocks}


def _label(run: tuple) -> str:
    """A run's name in the results and test ids: the script, and its argv when it runs twice."""
    name, *argv = run
    return f"{name} {' '.join(argv)}" if [r[0] for r in RUNS].count(name) > 1 else name


def test_only_the_imports_differ_from_vllm(tmp_path):
    scripts = vllm_sdist.write_examples(tmp_path)
    for name, path in scripts.items():
        text = path.read_text()
        assert "import vllm" not in text and "from vllm" not in text, name
        assert vllm_sdist.swap_imports(text.replace("hpcinfer", "vllm")) == text


@pytest.mark.parametrize("example", [_label(run) for run in RUNS])
def test_vllm_example_runs_to_the_end(outputs, example):
    rc, text = outputs[example]
    assert rc == 0, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    marker, count = PRINTS[example.split()[0]]
    assert text.count(marker) >= count, text[-4000:]


def test_torchrun_example_runs_on_four_ranks(tmp_path):
    """torchrun_example.py (``distributed_executor_backend="external_launcher"``, TP=2 x PP=2)
    under ``torchrun --nproc-per-node=4``: each rank runs the script, rank 0 prints every
    answer. On CPU over gloo here (the model is a tiny Llama-3 under its hub name)."""
    from hpcinfer.testing.tiny import build_tiny_checkpoint
    script = vllm_sdist.write_examples(tmp_path / "examples")["torchrun_example.py"]
    # it asks for max_model_len=32768
    _longer(build_tiny_checkpoint("llama3", tmp_path / "meta-llama" / "Llama-3.1-8B"), 32768)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4",
                           str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("Generated text:") == 4, proc.stdout[-3000:]


def test_structured_outputs_example_obeys_its_constraints(outputs):
    """Sampled (vLLM's default temperature 1), yet the choice is one of the two and the
    grammar's SQL starts as the grammar says (its end may be cut by max_model_len=100)."""
    _, text = outputs["structured_outputs.py"]
    assert re.search(r"Structured outputs by Choice: (Positive|Negative)\n", text), text[-3000:]
    assert re.search(r"Structured outputs by Grammar: SELECT col_[12] ", text), text[-3000:]


def test_simple_profiling_example_wrote_a_trace(outputs, work):
    # the script sets VLLM_TORCH_PROFILER_DIR=./vllm_profile (relative to its cwd, ``work``)
    assert outputs["simple_profiling.py"][0] == 0
    assert list((work / "vllm_profile").glob("*.pt.trace.json"))


def test_qwen3_reranker_example_prints_two_probabilities(outputs):
    _, text = outputs["pooling/qwen3_reranker.py"]
    scores = json.loads(re.search(r"\n(\[[^\]]*\])\n", text).group(1))
    assert len(scores) == 2 and all(0 < s < 1 for s in scores), text[-2000:]
