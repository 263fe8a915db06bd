"""Fixtures for the image tests: one thread, tiny LLaVA checkpoints, transformers as the oracle."""
from __future__ import annotations

import pytest
import torch

from hpcinfer.testing.pytest_fixtures import one_torch_thread  # noqa: F401

MAX_NEW = 12


@pytest.fixture(scope="session")
def hf_llava():
    """hf_llava(path) -> generate(text | messages, images) giving transformers' greedy
    continuation (fp32, never stopping at EOS) and the prompt's token ids."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    loaded = {}

    def load(path):
        if path not in loaded:
            model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
            model.generation_config.eos_token_id = None
            loaded[path] = (AutoProcessor.from_pretrained(path), model.eval())
        return loaded[path]

    def generate(path, text=None, images=None, messages=None, max_new=MAX_NEW):
        from hpcinfer.testing.tiny_vision import hf_generate
        processor, model = load(str(path))
        return hf_generate(model, processor, text, images, messages, max_new)
    return generate


@pytest.fixture(scope="session")
def llava_dir():
    from hpcinfer.testing.tiny_vision import tiny_llava
    return str(tiny_llava())


@pytest.fixture(scope="session")
def images():
    from hpcinfer.testing.tiny_vision import test_images
    return test_images()
