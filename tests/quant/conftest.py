"""Quantized tiny checkpoints (hpcinfer.testing.quant), built once per session from the tiny
Llama-3 (GQA: 4 query heads, 2 KV heads) and their fp32 oracles."""
from __future__ import annotations

import pytest
import torch

from hpcinfer.testing.greedy import hf_greedy as _hf_greedy
from hpcinfer.testing.greedy import random_prompts

FAMILY = "llama3"
LENGTHS = (1, 9, 40)
MAX_NEW = 12


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)   # the CI box has 2 shared cores; tiny ops prefer one thread
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def base_dir():
    from hpcinfer.testing.tiny import tiny_checkpoint
    return tiny_checkpoint(FAMILY)


@pytest.fixture(scope="session")
def quantized(base_dir, tmp_path_factory):
    """fmt -> (quantized dir, oracle dir), built on first use."""
    from hpcinfer.testing.quant import BASE_OVERRIDES, build_quantized
    from hpcinfer.testing.tiny import build_tiny_checkpoint
    root, built = tmp_path_factory.mktemp("quant"), {}

    def get(fmt: str, family: str = FAMILY):
        if (fmt, family) not in built:
            from hpcinfer.testing.tiny import tiny_checkpoint
            base = base_dir if family == FAMILY else tiny_checkpoint(family)
            if fmt in BASE_OVERRIDES:
                base = build_tiny_checkpoint(family, root / f"{fmt}-{family}-base", seed=1,
                                             **BASE_OVERRIDES[fmt])
            built[fmt, family] = tuple(str(p) for p in build_quantized(base, fmt,
                                                                       root / family))
        return built[fmt, family]
    return get


@pytest.fixture(scope="session")
def bnb(base_dir, tmp_path_factory):
    """bitsandbytes fmt (hpcinfer.testing.quant.BNB_CONFIGS) -> (quantized dir, oracle dir),
    written by transformers + bitsandbytes on first use."""
    from hpcinfer.testing.quant import build_bnb
    root, built = tmp_path_factory.mktemp("bnb"), {}

    def get(fmt: str):
        if fmt not in built:
            built[fmt] = build_bnb(base_dir, fmt, root)
        return built[fmt]
    return get


@pytest.fixture(scope="session")
def prompts():
    return random_prompts(LENGTHS, seed=5)


@pytest.fixture(scope="session")
def oracle_tokens(prompts):
    cache = {}

    def get(oracle_dir: str):
        if oracle_dir not in cache:
            cache[oracle_dir] = _hf_greedy(oracle_dir, prompts, MAX_NEW)
        return cache[oracle_dir]
    return get


@pytest.fixture(scope="session")
def engine_tokens(prompts):
    def run(path: str, **kwargs):
        from hpcinfer import LLM, SamplingParams
        llm = LLM(path, max_model_len=128, **kwargs)
        params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], llm
    return run
