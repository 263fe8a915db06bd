"""LLM.embed against transformers (same pooling) and sentence-transformers, fp32 CPU."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from hpcinfer import LLM
from hpcinfer.testing.require import require
from hpcinfer.testing.tiny_pooling import (
    TEXTS,
    build_tiny_pooling_checkpoint,
    hf_embeddings,
    tiny_pooling_checkpoint,
)


def assert_close(ours, theirs) -> None:
    ours, theirs = torch.tensor(ours), theirs.float()
    assert ours.shape == theirs.shape
    cos = torch.nn.functional.cosine_similarity(ours, theirs, dim=0)
    assert cos >= 0.99999, cos
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()


# kind -> the pooling vLLM uses when the checkpoint has no sentence-transformers files
DEFAULT_POOLING = {"bert": "CLS", "xlm-roberta": "CLS", "llama-embed": "LAST",
                   "qwen2-embed": "LAST", "mistral-embed": "LAST", "qwen3-embed": "LAST"}


@pytest.mark.parametrize("kind", sorted(DEFAULT_POOLING))
def test_embed_matches_transformers_default_pooling(kind):
    path = tiny_pooling_checkpoint(kind)
    llm = LLM(str(path), device="cpu")
    assert llm.task == "embed"
    outs = llm.embed(TEXTS)
    want = hf_embeddings(path, TEXTS, DEFAULT_POOLING[kind], normalize=True)
    assert [o.request_id for o in outs] == [str(i) for i in range(len(TEXTS))]
    for out, ref in zip(outs, want):
        assert out.outputs.hidden_size == 64
        assert_close(out.outputs.embedding, ref)


@pytest.fixture(scope="module", params=[("bert", "mean"), ("xlm-roberta", "cls"),
                                        ("qwen3-embed", "lasttoken"), ("llama-embed", "mean")])
def st_checkpoint(request, tmp_path_factory):
    kind, mode = request.param
    path = build_tiny_pooling_checkpoint(kind, tmp_path_factory.mktemp(kind),
                                         sentence_transformers=True, pooling_mode=mode)
    return path, {"mean": "MEAN", "cls": "CLS", "lasttoken": "LAST"}[mode]


def test_embed_reads_sentence_transformers_pooling(st_checkpoint):
    path, pooling = st_checkpoint
    outs = LLM(str(path), device="cpu").embed(TEXTS)
    for out, ref in zip(outs, hf_embeddings(path, TEXTS, pooling, normalize=True)):
        assert_close(out.outputs.embedding, ref)


def test_embed_matches_sentence_transformers_encode(st_checkpoint):
    require(importlib.util.find_spec("sentence_transformers") is not None,
            "sentence-transformers is not installed (pip install sentence-transformers)")
    from sentence_transformers import SentenceTransformer

    path, _ = st_checkpoint
    want = SentenceTransformer(str(path), device="cpu").encode(TEXTS, convert_to_tensor=True)
    outs = LLM(str(path), device="cpu").embed(TEXTS)
    for out, ref in zip(outs, want):
        assert_close(out.outputs.embedding, ref)


def test_no_normalize_module_means_raw_pooled_vectors(tmp_path):
    from hpcinfer.testing.tiny_pooling import write_sentence_transformers_files
    path = build_tiny_pooling_checkpoint("bert", tmp_path / "b")
    write_sentence_transformers_files(path, 64, "mean", normalize=False)
    outs = LLM(str(path), device="cpu").embed(TEXTS)
    for out, ref in zip(outs, hf_embeddings(path, TEXTS, "MEAN", normalize=False)):
        assert abs(ref.norm() - 1) > 1e-3  # really unnormalized
        assert_close(out.outputs.embedding, ref)


def test_matryoshka_dimensions_truncate_then_normalize():
    from hpcinfer.engine.pooling import PoolingParams
    path = tiny_pooling_checkpoint("bert")
    llm = LLM(str(path), device="cpu")
    outs = llm.embed(TEXTS, pooling_params=PoolingParams(dimensions=16))
    for out, ref in zip(outs, hf_embeddings(path, TEXTS, "CLS", dimensions=16)):
        assert out.outputs.hidden_size == 16
        assert_close(out.outputs.embedding, ref)
    with pytest.raises(ValueError, match="dimensions=65"):
        llm.embed("hello", pooling_params=PoolingParams(dimensions=65))


def test_token_ids_and_dict_prompts_equal_text():
    llm = LLM(str(tiny_pooling_checkpoint("bert")), device="cpu")
    ids = llm.get_tokenizer()("hello world").input_ids
    a, b, c = (llm.embed(p)[0].outputs.embedding
               for p in ("hello world", ids, {"prompt_token_ids": ids}))
    assert a == b == c


def test_sentence_transformers_dense_module_matches_encode(tmp_path):
    require(importlib.util.find_spec("sentence_transformers") is not None,
            "sentence-transformers is not installed (pip install sentence-transformers)")
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Dense, Normalize, Pooling, Transformer

    base = tiny_pooling_checkpoint("bert")
    torch.manual_seed(0)
    st = SentenceTransformer(modules=[Transformer(str(base)), Pooling(64, "mean"),
                                      Dense(64, 24, activation_function=torch.nn.Tanh()),
                                      Dense(24, 16, bias=False,
                                            activation_function=torch.nn.Identity()),
                                      Normalize()], device="cpu")
    st.save(str(tmp_path / "st"))
    want = st.encode(TEXTS, convert_to_tensor=True)
    outs = LLM(str(tmp_path / "st"), device="cpu").embed(TEXTS)
    for out, ref in zip(outs, want):
        assert out.outputs.hidden_size == 16
        assert_close(out.outputs.embedding, ref)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_causal_lm_as_last_token_embedding_model(family):
    # Qwen3-Embedding's config says Qwen3ForCausalLM: task="embed" pools the last token.
    from hpcinfer.testing.tiny import tiny_checkpoint
    path = tiny_checkpoint(family)
    llm = LLM(str(path), task="embed", device="cpu")
    for out, ref in zip(llm.embed(TEXTS), hf_embeddings(path, TEXTS, "LAST")):
        assert_close(out.outputs.embedding, ref)
