"""Pixels leave the processor in the encoder's dtype (engine/multimodal: ``pixel_dtype``): the
cast moves to the preprocessing threads and halves what a bf16 step copies to the GPU; the
encoders' first op casts to that dtype anyway, so the tokens do not change. Integer inputs
(Qwen2-VL's image grids) stay int64 on the host. With the encoder on a GPU the pixels are also
pinned there (multimodal/pinned.py), within a budget of page-locked bytes."""
from __future__ import annotations

import gc

import pytest
import torch

from hpcinfer import LLM, SamplingParams
from hpcinfer.multimodal import processor as processor_module
from hpcinfer.multimodal.pinned import GiB, PinnedBudget, budget_bytes

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_PROMPT = f"<|im_start|>user\n{QWEN_IMAGE}What is it?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def qwen_dir():
    from hpcinfer.testing.tiny_vision import tiny_qwen2_vl
    return str(tiny_qwen2_vl())


@pytest.fixture(autouse=True)
def image_only_processor(monkeypatch, qwen_dir):
    from hpcinfer.testing.tiny_vision import qwen2_vl_image_processor, use_processor
    use_processor(monkeypatch, qwen_dir, qwen2_vl_image_processor(qwen_dir))


def _generate(path, images, prompt, dtype):
    llm = LLM(path, device="cpu", dtype=dtype, max_model_len=256, max_num_seqs=4)
    processed = llm.llm_engine.multimodal.process(
        {"prompt": prompt, "multi_modal_data": {"image": images[0]}}, "0")
    outs = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": im}}
                         for im in images], GREEDY, use_tqdm=False)
    return processed.mm_inputs.items[0].inputs, [o.outputs[0].token_ids for o in outs]


def test_bf16_pixels_cast_on_the_host_give_the_same_tokens(qwen_dir, images, monkeypatch):
    inputs, tokens = _generate(qwen_dir, images, QWEN_PROMPT, "bfloat16")
    assert inputs["pixel_values"].dtype == torch.bfloat16
    assert inputs["image_grid_thw"].dtype == torch.int64
    monkeypatch.setattr(processor_module, "_in_dtype", lambda per_image, dtype, pinned=None: per_image)
    uncast, tokens_uncast = _generate(qwen_dir, images, QWEN_PROMPT, "bfloat16")
    assert uncast["pixel_values"].dtype == torch.float32   # the cast above was the helper's
    assert tokens == tokens_uncast


def test_fp32_models_keep_fp32_pixels(llava_dir, images):
    inputs, _ = _generate(llava_dir, images[:1], "USER: <image>\nWhat is it? ASSISTANT:",
                          "float32")
    assert inputs["pixel_values"].dtype == torch.float32


class FakePin:
    """Stands in for Tensor.pin_memory on a machine without CUDA: a copy, counted."""

    def __init__(self):
        self.calls = 0

    def __call__(self, t):
        self.calls += 1
        return t.clone()


def test_pixels_are_pinned_on_the_preprocessing_thread_within_the_budget():
    pin = FakePin()
    one = 4 * 16 * 2    # bytes of a [4, 16] bf16 pixel tensor
    budget = PinnedBudget(2 * one, pin=pin)
    per_image = [{"pixel_values": torch.ones(4, 16), "image_grid_thw": torch.tensor([[1, 2, 2]])}
                 for _ in range(3)]
    out = processor_module._in_dtype(per_image, torch.bfloat16, budget)
    assert [x["pixel_values"].dtype for x in out] == [torch.bfloat16] * 3
    assert all(x["image_grid_thw"].dtype == torch.int64 for x in out)   # never pinned
    assert pin.calls == 2 and budget.used == 2 * one   # the third did not fit: left pageable
    del out
    gc.collect()
    assert budget.used == 0   # freed pixels give their bytes back
    processor_module._in_dtype(per_image[:1], torch.bfloat16, budget)
    assert pin.calls == 3


def test_a_failed_pin_leaves_the_pixels_pageable_and_the_budget_untouched():
    def refuse(t):
        raise RuntimeError("no CUDA driver")
    budget = PinnedBudget(GiB, pin=refuse)
    t = torch.ones(8)
    assert budget.pin(t) is t and budget.used == 0


def test_the_pinned_budget_is_read_from_the_environment(monkeypatch):
    monkeypatch.delenv("HPCINFER_PINNED_PIXELS_GIB", raising=False)
    assert budget_bytes() == 2 * GiB
    monkeypatch.setenv("HPCINFER_PINNED_PIXELS_GIB", "0.5")
    assert budget_bytes() == GiB // 2
    monkeypatch.setenv("HPCINFER_PINNED_PIXELS_GIB", "lots")
    with pytest.raises(ValueError, match="HPCINFER_PINNED_PIXELS_GIB='lots'.*number of GiB"):
        budget_bytes()


def test_pixels_are_not_pinned_for_a_cpu_engine(qwen_dir):
    llm = LLM(qwen_dir, device="cpu", max_model_len=256, max_num_seqs=4)
    assert llm.llm_engine.multimodal.pinned is None
