"""Batched equals unbatched for every task: mixed lengths, 1 to 64 inputs, several steps."""
from __future__ import annotations

import random

import pytest
import torch

from hpcinfer import LLM
from hpcinfer.testing.tiny_pooling import TEXTS, tiny_pooling_checkpoint

WORDS = " ".join(TEXTS).split()


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def _values(outs) -> list[torch.Tensor]:
    """The numbers of each output: embedding, probs or (reward) the per-token data."""
    fields = ("embedding", "probs", "data")
    return [torch.as_tensor(next(getattr(o.outputs, f) for f in fields
                                 if hasattr(o.outputs, f)), dtype=torch.float32)
            for o in outs]


CASES = [("bert", "embed"), ("xlm-roberta", "embed"), ("qwen3-embed", "embed"),
         ("bert-cls", "classify"), ("xlm-roberta-cls", "classify"), ("llama-cls", "classify"),
         ("qwen2-cls", "reward"), ("gemma-cls", "classify"), ("bert", "encode")]


def _call(llm, method: str, texts):
    if method == "encode":  # per-token rows: every position must match, not only the pooled
        return llm.encode(texts, pooling_task="token_embed")
    return getattr(llm, method)(texts)


@pytest.mark.parametrize("kind,method", CASES)
@pytest.mark.parametrize("n", [1, 7, 64])
def test_batched_equals_unbatched(kind, method, n):
    path = str(tiny_pooling_checkpoint(kind))
    texts = _texts(n, seed=n)
    task = "auto" if method == "encode" else method
    # A small token budget splits 64 inputs over many steps; max_num_seqs caps the others.
    batched = LLM(path, task=task, device="cpu", max_num_batched_tokens=256, max_num_seqs=16)
    got = _values(_call(batched, method, texts))
    engine = batched.llm_engine
    steps = list(engine.batches([engine.tokenize(t, i) for i, t in enumerate(texts)]))
    if n == 64:
        assert len(steps) > 4 and max(len(s) for s in steps) > 1
    single = LLM(path, task=task, device="cpu", max_num_seqs=1)
    want = _values(_call(single, method, texts))
    assert len(got) == len(want) == n
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert torch.allclose(g, w, atol=1e-5, rtol=0), (g - w).abs().max()


def test_score_batched_equals_unbatched(tmp_path):
    from hpcinfer.testing.tiny_pooling import build_tiny_pooling_checkpoint
    path = str(build_tiny_pooling_checkpoint("xlm-roberta-cls", tmp_path / "x", num_labels=1))
    a, b = _texts(64, 1), _texts(64, 2)
    got = LLM(path, task="score", device="cpu", max_num_batched_tokens=200).score(a, b)
    want = LLM(path, task="score", device="cpu", max_num_seqs=1).score(a, b)
    assert [o.outputs.score for o in got] == pytest.approx([o.outputs.score for o in want],
                                                           abs=1e-5)


def test_long_prompt_runs_alone_when_over_the_budget():
    path = str(tiny_pooling_checkpoint("bert"))
    texts = _texts(3, 5) + [" ".join(WORDS[:60])]
    llm = LLM(path, device="cpu", max_num_batched_tokens=32)
    engine = llm.llm_engine
    items = [engine.tokenize(t, i) for i, t in enumerate(texts)]
    assert len(items[-1].token_ids) > 32
    assert [len(items[i].token_ids) for i in list(engine.batches(items))[-1]] == \
        [len(items[-1].token_ids)]
    got = _values(llm.embed(texts))
    want = _values(LLM(path, device="cpu", max_num_seqs=1).embed(texts))
    assert all(torch.allclose(g, w, atol=1e-5, rtol=0) for g, w in zip(got, want))
