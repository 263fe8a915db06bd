"""A causal LM as a reranker or classifier through ``classifier_from_token`` (vLLM's
hf_overrides for Qwen3-Reranker: the score head is made from LM-head rows), against the same
checkpoint run by transformers as a causal LM, fp32 CPU."""
from __future__ import annotations

import pytest
import torch

from hpcinfer import LLM
from hpcinfer.testing.tiny import build_tiny_checkpoint

QUERY = "what is the capital of france"
DOCS = ["paris is the capital of france", "the quick brown fox", "hello world"]


@pytest.fixture(scope="module", params=["qwen3", "qwen2"])   # untied and tied LM heads
def causal_lm(request, tmp_path_factory):
    return build_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


def _tokens(path, n=2):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    return tok.convert_ids_to_tokens([300, 311][:n] if n == 2 else [300, 311, 322])


def _last_logits(path, token_ids):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0, -1] for ids in token_ids]


def test_two_way_reranker_scores_are_the_true_tokens_softmax(causal_lm):
    false, true = _tokens(causal_lm)
    llm = LLM(str(causal_lm), runner="pooling", device="cpu", hf_overrides={
        "architectures": [_classifier_arch(causal_lm)],
        "classifier_from_token": [false, true], "is_original_qwen3_reranker": True})
    outs = llm.score(QUERY, DOCS)
    vocab = llm.llm_engine.tokenizer.get_vocab()
    for out, logits in zip(outs, _last_logits(causal_lm, [o.prompt_token_ids for o in outs])):
        want = torch.softmax(logits[[vocab[false], vocab[true]]], -1)[1]
        assert abs(out.outputs.score - float(want)) < 1e-5


def test_one_label_per_token_without_post_processing(causal_lm):
    toks = _tokens(causal_lm, 3)
    llm = LLM(str(causal_lm), task="classify", device="cpu", hf_overrides={
        "architectures": [_classifier_arch(causal_lm)], "classifier_from_token": toks})
    texts = [QUERY, *DOCS]
    outs = llm.classify(texts)
    vocab = llm.llm_engine.tokenizer.get_vocab()
    ids = [llm.llm_engine.tokenizer(t)["input_ids"] for t in texts]
    for out, logits in zip(outs, _last_logits(causal_lm, ids)):
        assert out.outputs.num_classes == 3
        want = torch.softmax(logits[[vocab[t] for t in toks]], -1)
        assert torch.allclose(torch.tensor(out.outputs.probs), want, atol=1e-5, rtol=0)


def test_a_token_outside_the_vocabulary_is_refused_before_loading(causal_lm):
    with pytest.raises(ValueError, match="are not tokens of the tokenizer"):
        LLM(str(causal_lm), runner="pooling", device="cpu", hf_overrides={
            "architectures": [_classifier_arch(causal_lm)],
            "classifier_from_token": ["no", "definitely-not-a-token"],
            "is_original_qwen3_reranker": True})


def _classifier_arch(path) -> str:
    import json
    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    return arch.replace("ForCausalLM", "ForSequenceClassification")
