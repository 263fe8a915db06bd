"""Fixtures for the engine tests: one thread, tiny checkpoints, cached transformers references.

Test modules cannot import each other (--import-mode=importlib), so shared helpers are
fixtures that return functions.
"""
from __future__ import annotations

import pytest
import torch

from hpcinfer.testing.pytest_fixtures import checkpoint, one_torch_thread  # noqa: F401

PROMPT_LENGTHS = (1, 3, 9, 17, 40, 77, 130, 200)
MAX_NEW = 32


@pytest.fixture(scope="session")
def make_prompts():
    """Random token-id prompts (ids 3..383 avoid pad/eos/bos) of the given lengths."""
    def make(lengths=PROMPT_LENGTHS, seed=0, prefix=()):
        g = torch.Generator().manual_seed(seed)
        return [list(prefix) + torch.randint(6, 380, (n,), generator=g).tolist() for n in lengths]
    return make


@pytest.fixture(scope="session")
def hf_greedy(checkpoint):
    """transformers generate(do_sample=False) continuations, per prompt, cached."""
    from transformers import AutoModelForCausalLM
    models, cache = {}, {}

    def reference(family: str, prompts: list[list[int]], max_new: int = MAX_NEW):
        if family not in models:
            model = AutoModelForCausalLM.from_pretrained(checkpoint(family),
                                                         dtype=torch.float32).eval()
            # ignore_eos: never stop at EOS, and never mask it either (min_new_tokens would).
            model.generation_config.eos_token_id = None
            models[family] = model
        model, results = models[family], []
        for prompt in prompts:
            key = (family, tuple(prompt), max_new)
            if key not in cache:
                with torch.no_grad():
                    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new,
                                         do_sample=False,
                                         pad_token_id=0, attention_mask=torch.ones(1, len(prompt),
                                                                                   dtype=torch.long))
                cache[key] = out[0, len(prompt):].tolist()
            results.append(cache[key])
        return results
    return reference


@pytest.fixture(scope="session")
def hf_model(checkpoint):
    from transformers import AutoModelForCausalLM
    models = {}

    def get(family: str):
        if family not in models:
            models[family] = AutoModelForCausalLM.from_pretrained(
                checkpoint(family), dtype=torch.float32).eval()
        return models[family]
    return get
