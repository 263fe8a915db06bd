"""vLLM's offline pooling examples (tests/tasks/examples/) run unchanged but for the import."""
from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

from hpcinfer.testing.tiny_pooling import build_tiny_pooling_checkpoint, tiny_pooling_checkpoint

EXAMPLES = Path(__file__).parent / "examples"


def _run(name: str, model: Path, monkeypatch, capsys) -> str:
    monkeypatch.setenv("EXAMPLE_MODEL", str(model))
    source = (EXAMPLES / name).read_text()
    assert "from hpcinfer import LLM" in source and "vllm" not in source.replace(
        "vLLM's", "").split("import os", 1)[1]
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


@pytest.mark.parametrize("kind", ["bert", "qwen2-embed"])
def test_embed_example(kind, monkeypatch, capsys):
    out = _run("embed.py", tiny_pooling_checkpoint(kind), monkeypatch, capsys)
    lines = [ln for ln in out.splitlines() if ln.startswith("Prompt:")]
    assert len(lines) == 4 and all("(size=64)" in ln for ln in lines)


def test_classify_example(monkeypatch, capsys):
    out = _run("classify.py", tiny_pooling_checkpoint("qwen2-cls"), monkeypatch, capsys)
    probs = re.findall(r"Class Probabilities: \[([^\]]*)\] \(size=3\)", out)
    assert len(probs) == 4
    assert all(abs(sum(float(p) for p in row.split(",")) - 1) < 1e-5 for row in probs)


def test_score_example(tmp_path, monkeypatch, capsys):
    model = build_tiny_pooling_checkpoint("xlm-roberta-cls", tmp_path / "rr", num_labels=1)
    out = _run("score.py", model, monkeypatch, capsys)
    scores = [float(s) for s in re.findall(r"\| Score: ([0-9.eE+-]+)", out)]
    assert len(scores) == 2 and all(0 < s < 1 for s in scores)


def test_reward_example(monkeypatch, capsys):
    out = _run("reward.py", tiny_pooling_checkpoint("llama-cls"), monkeypatch, capsys)
    sizes = re.findall(r"Reward: .*?\(size=(\d+)\)", out, flags=re.S)
    assert len(sizes) == 4 and all(int(s) > 1 for s in sizes)  # one row per token
