"""LLM(pooler_config=...) (vLLM's PoolerConfig: pooling_type, dimensions, normalize,
use_activation) against transformers and per-call PoolingParams, and the checks of OpenAI
batch pooling request bodies (io.openai_batch.pooling_request)."""
from __future__ import annotations

import types

import pytest
import torch

from hpcinfer import LLM, PoolingParams
from hpcinfer.io.openai_batch import EMBEDDINGS_URL, SCORE_URL, pooling_request
from hpcinfer.testing.tiny_pooling import (
    TEXTS,
    hf_embeddings,
    hf_logits,
    tiny_pooling_checkpoint,
)


def _close(ours, theirs, atol=1e-5) -> bool:
    ours, theirs = torch.tensor(ours), torch.as_tensor(theirs).float()
    return ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=atol, rtol=0)


def test_pooling_type_override_matches_transformers():
    path = tiny_pooling_checkpoint("bert", sentence_transformers=True)   # its files say MEAN
    for pooling_type in ("CLS", "last"):
        llm = LLM(str(path), task="embed", device="cpu",
                  pooler_config={"pooling_type": pooling_type})
        want = hf_embeddings(path, TEXTS, pooling_type.upper(), normalize=True)
        for out, ref in zip(llm.embed(TEXTS, use_tqdm=False), want):
            assert _close(out.outputs.embedding, ref)


def test_pooler_defaults_equal_per_call_params_and_calls_override_them():
    path = tiny_pooling_checkpoint("bert", sentence_transformers=True)
    plain = LLM(str(path), task="embed", device="cpu")
    # vLLM's older name, and an object with PoolerConfig's attributes
    config = types.SimpleNamespace(pooling_type=None, dimensions=8, normalize=False,
                                   use_activation=None)
    short = LLM(str(path), task="embed", device="cpu", override_pooler_config=config)
    per_call = plain.embed(TEXTS, pooling_params=PoolingParams(dimensions=8, normalize=False))
    for a, b, ref in zip(short.embed(TEXTS), per_call,
                         hf_embeddings(path, TEXTS, "MEAN", normalize=False, dimensions=8)):
        assert len(a.outputs.embedding) == 8
        assert a.outputs.embedding == b.outputs.embedding
        assert _close(a.outputs.embedding, ref)
    [wide] = short.embed(TEXTS[:1], pooling_params=PoolingParams(dimensions=16, normalize=True))
    assert len(wide.outputs.embedding) == 16
    assert abs(sum(x * x for x in wide.outputs.embedding) - 1) < 1e-5


def test_use_activation_default_for_classify():
    path = tiny_pooling_checkpoint("bert-cls")
    raw = LLM(str(path), task="classify", device="cpu", pooler_config={"use_activation": False})
    logits = hf_logits(path, TEXTS[:3])
    for out, ref in zip(raw.classify(TEXTS[:3]), logits):
        assert _close(out.outputs.probs, ref)
    [probs] = raw.classify(TEXTS[:1], pooling_params=PoolingParams(activation=True))
    assert _close(probs.outputs.probs, torch.softmax(logits[0], -1))


def test_bad_pooler_configs_say_what_to_use():
    path = tiny_pooling_checkpoint("bert")
    with pytest.raises(ValueError, match=r"pooler_config keys \['dimension'\].*dimensions"):
        LLM(str(path), task="embed", device="cpu", pooler_config={"dimension": 8})
    with pytest.raises(ValueError, match="pooling_type='MAX'.*CLS"):
        LLM(str(path), task="embed", device="cpu", pooler_config={"pooling_type": "MAX"})
    with pytest.raises(ValueError, match="dimensions=0"):
        LLM(str(path), task="embed", device="cpu", pooler_config={"dimensions": 0})


def test_pooler_config_is_refused_for_generate(tmp_path):
    from hpcinfer.testing.tiny import build_tiny_checkpoint
    path = build_tiny_checkpoint("llama", tmp_path / "gen")
    with pytest.raises(ValueError, match="pooler_config is for pooling tasks"):
        LLM(str(path), device="cpu", pooler_config={"normalize": True})


@pytest.mark.parametrize("url, body, inputs", [
    (EMBEDDINGS_URL, {"input": "a"}, ("a",)),
    (EMBEDDINGS_URL, {"input": ["a", "b"], "model": "m", "user": "u"}, ("a", "b")),
    (EMBEDDINGS_URL, {"input": [1, 2, 3]}, ((1, 2, 3),)),
    (EMBEDDINGS_URL, {"input": [[1, 2], [3]]}, ((1, 2), (3,))),
    (SCORE_URL, {"text_1": "q", "text_2": ["a", "b"]}, (("q", "a"), ("q", "b"))),
    (SCORE_URL, {"text_1": ["q", "r"], "text_2": ["a", "b"]}, (("q", "a"), ("r", "b"))),
    (SCORE_URL, {"queries": "q", "documents": "a"}, (("q", "a"),)),
    (SCORE_URL, {"data_1": "q", "data_2": ["a"]}, (("q", "a"),)),
])
def test_pooling_requests_parse_like_vllm(url, body, inputs):
    request, problem = pooling_request(url, body)
    assert problem is None and request.inputs == inputs


@pytest.mark.parametrize("url, body, kind", [
    (EMBEDDINGS_URL, {}, "missing_prompt"),
    (EMBEDDINGS_URL, {"input": []}, "bad_prompt_type"),
    (EMBEDDINGS_URL, {"input": ["a", ""]}, "empty_prompt"),
    (EMBEDDINGS_URL, {"input": [[1], [-2]]}, "bad_prompt_type"),
    (EMBEDDINGS_URL, {"input": [True]}, "bad_prompt_type"),
    (EMBEDDINGS_URL, {"input": "a", "dimensions": 0}, "invalid_pooling"),
    (EMBEDDINGS_URL, {"input": "a", "dimensions": "8"}, "invalid_pooling"),
    (EMBEDDINGS_URL, {"input": "a", "normalize": "yes"}, "invalid_pooling"),
    (EMBEDDINGS_URL, {"input": "a", "truncate_prompt_tokens": -2}, "invalid_pooling"),
    (EMBEDDINGS_URL, {"input": "a", "add_special_tokens": False}, "invalid_pooling"),
    (EMBEDDINGS_URL, {"input": "a", "text_1": "b"}, "unsupported_body_key"),
    (SCORE_URL, {"text_1": "q"}, "missing_prompt"),
    (SCORE_URL, {"text_1": ["q", "r"], "text_2": ["a", "b", "c"]}, "score_length_mismatch"),
    (SCORE_URL, {"text_1": "q", "text_2": []}, "bad_prompt_type"),
    (SCORE_URL, {"text_1": "q", "text_2": ["a", ""]}, "empty_prompt"),
    (SCORE_URL, {"text_1": "q", "text_2": "a", "dimensions": 8}, "unsupported_body_key"),
])
def test_bad_pooling_requests(url, body, kind):
    request, problem = pooling_request(url, body)
    assert request is None and problem[0] == kind, problem
