"""LLM.classify / score / reward against transformers, fp32 CPU: BERT, XLM-RoBERTa and the
decoder families' *ForSequenceClassification heads."""
from __future__ import annotations

import pytest
import torch

from hpcinfer import LLM
from hpcinfer.engine.pooling import PoolingParams
from hpcinfer.testing.tiny_pooling import (TEXTS, build_tiny_pooling_checkpoint, hf_embeddings,
                                           hf_logits, hf_token_scores, tiny_pooling_checkpoint)

CLASSIFIERS = ["bert-cls", "xlm-roberta-cls", "llama-cls", "mistral-cls", "qwen2-cls",
               "qwen3-cls", "gemma-cls"]
PAIRS_1 = "what is the capital of france"
PAIRS_2 = ["paris is the capital of france", "the quick brown fox", "hello world"]


def close(ours, theirs, atol=1e-5) -> bool:
    return torch.allclose(torch.as_tensor(ours, dtype=torch.float32), theirs.float(),
                          atol=atol, rtol=0)


@pytest.mark.parametrize("kind", CLASSIFIERS)
def test_classify_probs_match_transformers_softmax(kind):
    path = tiny_pooling_checkpoint(kind)
    llm = LLM(str(path), device="cpu")
    assert llm.task == "classify"
    outs = llm.classify(TEXTS)
    for out, logits in zip(outs, hf_logits(path, TEXTS)):
        assert out.outputs.num_classes == 3
        assert close(out.outputs.probs, torch.softmax(logits, -1))
    raw = llm.classify(TEXTS[:2], pooling_params=PoolingParams(activation=False))
    assert close(raw[1].outputs.probs, hf_logits(path, TEXTS[1:2])[0])


@pytest.fixture(scope="module", params=["bert-cls", "xlm-roberta-cls", "qwen2-cls", "llama-cls"])
def cross_encoder(request, tmp_path_factory):
    kind = request.param
    return build_tiny_pooling_checkpoint(kind, tmp_path_factory.mktemp(kind), num_labels=1)


def test_score_one_to_many_and_one_to_one_match_transformers(cross_encoder):
    llm = LLM(str(cross_encoder), task="score", device="cpu")
    want = [torch.sigmoid(x[0]) for x in
            hf_logits(cross_encoder, [(PAIRS_1, t) for t in PAIRS_2], pairs=True)]
    many = llm.score(PAIRS_1, PAIRS_2)
    assert len(many) == 3
    for out, ref in zip(many, want):
        assert isinstance(out.outputs.score, float)
        assert abs(out.outputs.score - float(ref)) <= 1e-5
    one = llm.score([PAIRS_1] * 3, PAIRS_2)
    assert [o.outputs.score for o in one] == pytest.approx([o.outputs.score for o in many],
                                                           abs=1e-6)
    single = llm.score(PAIRS_1, PAIRS_2[0])
    assert len(single) == 1 and abs(single[0].outputs.score - float(want[0])) <= 1e-5
    with pytest.raises(ValueError, match="2 text_1 and 3 text_2"):
        llm.score(PAIRS_2[:2], PAIRS_2)


def test_bert_pair_token_types_matter(tmp_path):
    # BERT pairs carry token types 0/1; dropping them changes the score, so the match with
    # transformers above depends on the engine passing them through.
    from hpcinfer.engine.pooling import _Input
    path = build_tiny_pooling_checkpoint("bert-cls", tmp_path / "b", num_labels=1)
    engine = LLM(str(path), device="cpu").llm_engine
    item = engine.tokenize_pair(PAIRS_1, PAIRS_2[0], 0)
    assert set(item.token_type_ids) == {0, 1}
    params = PoolingParams(activation=False)
    with_types = engine.run([item], "classify", params)[0]
    without = engine.run([_Input(item.token_ids)], "classify", params)[0]
    assert (with_types - without).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["bert", "qwen2-embed"])
def test_score_with_embedding_model_is_cosine(kind):
    path = tiny_pooling_checkpoint(kind)
    llm = LLM(str(path), task="score", device="cpu")
    pooling = "CLS" if kind == "bert" else "LAST"
    e1 = hf_embeddings(path, [PAIRS_1], pooling)[0]
    for out, e2 in zip(llm.score(PAIRS_1, PAIRS_2), hf_embeddings(path, PAIRS_2, pooling)):
        assert abs(out.outputs.score - float(torch.dot(e1, e2))) <= 1e-5


def test_score_needs_one_label_for_cross_encoders():
    llm = LLM(str(tiny_pooling_checkpoint("bert-cls")), device="cpu")
    with pytest.raises(ValueError, match="num_labels=1"):
        llm.score(PAIRS_1, PAIRS_2)


@pytest.mark.parametrize("kind", ["llama-cls", "qwen2-cls", "qwen3-cls"])
def test_reward_per_token_matches_transformers_score_head(kind):
    path = tiny_pooling_checkpoint(kind)
    llm = LLM(str(path), task="reward", device="cpu")
    outs = llm.reward(TEXTS)
    for out, ref in zip(outs, hf_token_scores(path, TEXTS)):
        assert out.outputs.data.shape == ref.shape == (len(out.prompt_token_ids), 3)
        assert close(out.outputs.data, ref)
    # the last row is the pooled value classify() reports before its softmax
    raw = llm.classify(TEXTS[:1], pooling_params=PoolingParams(activation=False))[0]
    assert close(raw.outputs.probs, outs[0].outputs.data[-1])


def test_encode_returns_tensors_per_task():
    bert = LLM(str(tiny_pooling_checkpoint("bert")), device="cpu")
    emb = bert.encode(TEXTS[:2])
    assert emb[0].outputs.data.shape == (64,)
    assert close(emb[0].outputs.data, torch.tensor(bert.embed(TEXTS[0])[0].outputs.embedding))
    tokens = bert.encode(TEXTS[:2], pooling_task="token_embed")
    assert tokens[1].outputs.data.shape == (len(tokens[1].prompt_token_ids), 64)
    with pytest.raises(ValueError, match="pooling_task='nope'"):
        bert.encode(TEXTS[:1], pooling_task="nope")
