"""Fixtures of the worker tests: one tiny llama checkpoint and one LLM over it per session."""
from __future__ import annotations

import pytest

from hpcinfer.testing.tiny_pooling import build_tiny_pooling_checkpoint
from hpcinfer.testing.worker_jobs import tiny_model_dir


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tiny_model_dir(str(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="session")
def embed_model(tmp_path_factory):
    """A tiny BERT with sentence-transformers' pooling files (the pooling job tests)."""
    return build_tiny_pooling_checkpoint("bert", tmp_path_factory.mktemp("embed") / "m",
                                         sentence_transformers=True)


@pytest.fixture(scope="session")
def llm(model_dir):
    """The Python API over the same checkpoint and engine settings as the test jobs."""
    from hpcinfer import LLM
    return LLM(str(model_dir), max_num_seqs=4, max_num_batched_tokens=256, device="cpu")


def greedy(max_tokens: int = 6):
    from hpcinfer import SamplingParams
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)
