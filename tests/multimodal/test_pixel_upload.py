"""Pixels leave the processor in the encoder's dtype (engine/multimodal: ``pixel_dtype``): the
cast moves to the preprocessing threads and halves what a bf16 step copies to the GPU; the
encoders' first op casts to that dtype anyway, so the tokens do not change. Integer inputs
(Qwen2-VL's image grids) stay int64 on the host."""
from __future__ import annotations

import pytest
import torch

from hpcinfer import LLM, SamplingParams
from hpcinfer.multimodal import processor as processor_module

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
    monkeypatch.setattr(processor_module, "_in_dtype", lambda per_image, dtype: per_image)
    uncast, tokens_uncast = _generate(qwen_dir, images, QWEN_PROMPT, "bfloat16")
    assert uncast["pixel_values"].dtype == torch.float32   # the cast above was the helper's
    assert tokens == tokens_uncast


def test_fp32_models_keep_fp32_pixels(llava_dir, images):
    inputs, _ = _generate(llava_dir, images[:1], "USER: <image>\nWhat is it? ASSISTANT:",
                          "float32")
    assert inputs["pixel_values"].dtype == torch.float32
