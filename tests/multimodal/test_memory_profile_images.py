"""The KV pool sizing of a vision-language model (hpcinfer/engine/memory.py): the profiled
step starts with the vision encoder over dummy images filling the encoder budget. Here, on
CPU: the dummy images are inputs the real tiny models (LLaVA, Qwen2-VL, Qwen2.5-VL, Gemma 3)
encode, to as many image tokens as the budget allows, and the budget arithmetic takes the
step's whole peak. The measurement itself (CUDA memory statistics) runs in
tests/gpu/test_vision_gpu.py."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from hpcinfer.engine import memory

GiB = 2 ** 30


def _model(family: str):
    from hpcinfer.models.registry import load_model
    from hpcinfer.testing import tiny_vision
    if family in ("llava", "gemma3"):
        path = getattr(tiny_vision, f"tiny_{family}")()
    else:
        path = tiny_vision.tiny_qwen2_vl("2.5" if family == "qwen2_5_vl" else "2")
    return load_model(path, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module", params=["llava", "qwen2_vl", "qwen2_5_vl", "gemma3"])
def model(request):
    return _model(request.param)


@pytest.mark.parametrize("budget", [8, 24, 100])
def test_dummy_images_fill_the_encoder_budget_and_encode(model, budget):
    inputs = memory.dummy_image_inputs(model, budget)
    counts = model.image_token_counts(inputs)
    per_image = max(counts)
    if per_image > budget:            # one image larger than the budget: it runs alone
        assert len(inputs) == 1
    else:                              # as much of the budget as whole images / grids fill
        assert sum(counts) <= budget
        is_grid = "image_grid_thw" in inputs[0]   # one square grid, else whole images
        slack = 2 * math.isqrt(budget) + 1 if is_grid else per_image
        assert sum(counts) > budget - slack, (counts, budget)
    with torch.inference_mode():
        outs = model.encode_images(inputs)
    hidden = model.language_model.model.embed_tokens.weight.shape[1]
    assert [tuple(o.shape) for o in outs] == [(c, hidden) for c in counts]


def test_qwen_dummy_grid_is_square_whole_merge_blocks():
    model = _model("qwen2_5_vl")
    [inputs] = memory.dummy_image_inputs(model, 100)
    t, h, w = inputs["image_grid_thw"][0].tolist()
    assert (t, h, w) == (1, 20, 20)   # 10 x 10 merge blocks of 2 x 2 patches = 100 tokens
    assert inputs["pixel_values"].shape == (400, 3 * 2 * 14 * 14)


def test_a_model_may_build_its_own_dummy_images():
    class Own:
        takes_images = True

        def dummy_image_inputs(self, max_image_tokens):
            return [{"pixel_values": torch.zeros(max_image_tokens)}]
    assert memory.dummy_image_inputs(Own(), 7)[0]["pixel_values"].shape == (7,)


def test_unknown_tower_profiles_text_only_with_a_warning(caplog):
    class Unknown:
        takes_images = True
    with pytest.raises(ValueError, match="dummy_image_inputs"):
        memory.dummy_image_inputs(Unknown(), 64)
    with caplog.at_level(logging.WARNING, logger="hpcinfer.engine.memory"):
        assert memory._profile_images(Unknown(), 64) is None
    assert "without the vision encoder" in caplog.text

    class TextOnly:
        pass
    assert memory._profile_images(TextOnly(), 64) is None


def test_budget_subtracts_the_whole_step_peak():
    # 80 GiB device, 1 GiB outside PyTorch, 16 GiB of weights; the image step's peak (encoder
    # output held through the text step) is what is subtracted, GiB for GiB.
    total, weights = 80 * GiB, 16 * GiB
    reserved = weights + GiB
    free = total - reserved - GiB
    text_only = memory.kv_budget_from(total, free, reserved, weights, 2 * GiB, 0.9)
    with_images = memory.kv_budget_from(total, free, reserved, weights, 5 * GiB, 0.9)
    assert text_only[0] == with_images[0] == GiB
    assert text_only[1] - with_images[1] == 3 * GiB
    assert with_images[1] == int(0.9 * total) - GiB - weights - 5 * GiB - \
        memory.GRAPH_POOL_RESERVE_BYTES
    assert memory.kv_budget_from(total, free, reserved, weights, 100 * GiB, 0.9)[1] == 0


def test_profile_describes_the_encoder_part():
    profile = memory.MemoryProfile(80 * GiB, GiB, 16 * GiB, 3 * GiB, 50 * GiB, 2 * GiB)
    assert "peak activations 3.00 GiB (vision encoder 2.00 GiB)" in profile.describe()
    assert "vision encoder" not in memory.MemoryProfile(1, 0, 0, 0, 0).describe()
