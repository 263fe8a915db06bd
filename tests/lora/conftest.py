"""Fixtures for the LoRA tests: tiny bases, PEFT adapters built once per session, and the
transformers + peft greedy oracle (cached per adapter and prompt set)."""
from __future__ import annotations

import pytest
import torch

from hpcinfer.testing.pytest_fixtures import checkpoint as base  # noqa: F401
from hpcinfer.testing.pytest_fixtures import one_torch_thread  # noqa: F401


@pytest.fixture(scope="session")
def adapter(tmp_path_factory, base):
    """adapter(family, name, **build_kwargs) -> path of a PEFT adapter, built once."""
    from hpcinfer.testing.tiny_lora import build_tiny_adapter
    built = {}

    def make(family, name, **kwargs):
        key = (family, name)
        if key not in built:
            built[key] = str(build_tiny_adapter(base(family),
                                                tmp_path_factory.mktemp(f"{family}-{name}"),
                                                **kwargs))
        return built[key]
    return make


@pytest.fixture(scope="session")
def oracle(base):
    """oracle(family, adapter_path_or_None, prompts, max_new) -> transformers(+peft) tokens."""
    from hpcinfer.testing.tiny_lora import peft_greedy
    cache = {}

    def run(family, adapter_path, prompts, max_new):
        key = (family, adapter_path, tuple(map(tuple, prompts)), max_new)
        if key not in cache:
            cache[key] = peft_greedy(base(family), adapter_path, prompts, max_new)
        return cache[key]
    return run


@pytest.fixture(scope="session")
def prompts():
    g = torch.Generator().manual_seed(3)
    # 1 token, a block boundary (16), > 2 blocks: prefill chunks and decode both see LoRA
    return [torch.randint(6, 380, (n,), generator=g).tolist() for n in (1, 16, 37)]


@pytest.fixture(params=["separate", "stacked"])
def shrink(request, monkeypatch):
    """Both ways the layers compute the shrink (hpcinfer/lora/layers.py): its own kernel, or
    rows of the base GEMM over the slots' A stacked under the weight. Through the environment,
    so ranks spawned by the test see the same."""
    monkeypatch.setenv("HPCINFER_LORA_SHRINK", request.param)
    return request.param


def assert_shrink(llm, mode: str) -> None:
    """Every wrapped layer of ``llm`` computes its shrink the ``mode`` way."""
    layers = llm.llm_engine.lora.layers
    assert layers and all(layer.stacked == (mode == "stacked") for layer in layers), \
        [(layer.name, layer.stacked) for layer in layers]
