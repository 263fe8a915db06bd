"""Qwen2.5-VL (issue 24): window attention (2x2-block windows, cut at the image edges; full
attention in blocks 1 and 3), RMSNorm and gated MLPs in the vision transformer, then
Qwen2-VL's M-RoPE language model: greedy tokens equal to transformers (fp32, CPU) for images
whose grids span one to several windows, mixed with text rows and through chunked prefill.
The processor is transformers' Qwen2_5_VLProcessor without its torchvision-only video
attribute (see test_qwen2_vl.py), for both engines."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hpcinfer import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
ONE = f"<|im_start|>user\n{IMAGE}What is in the picture?<|im_end|>\n<|im_start|>assistant\n"
TWO = (f"<|im_start|>user\n{IMAGE} and {IMAGE}Are they the same?<|im_end|>\n"
       "<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def qwen_dir():
    from hpcinfer.testing.tiny_vision import tiny_qwen2_vl
    return str(tiny_qwen2_vl("2.5"))


@pytest.fixture(scope="module")
def processor(qwen_dir):
    from hpcinfer.testing.tiny_vision import qwen2_vl_image_processor
    return qwen2_vl_image_processor(qwen_dir, "2.5")


@pytest.fixture(autouse=True)
def image_only_processor(monkeypatch, qwen_dir, processor):
    from hpcinfer.testing.tiny_vision import use_processor
    use_processor(monkeypatch, qwen_dir, processor)


@pytest.fixture(scope="module")
def hf_qwen(qwen_dir, processor):
    from transformers import Qwen2_5_VLForConditionalGeneration
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None

    model.eval()

    def generate(text, images=None):
        from hpcinfer.testing.tiny_vision import hf_generate
        return hf_generate(model, processor, text, images)[0]
    return generate


@pytest.fixture(scope="module")
def big():
    # 80x100 pixels -> an 8x6 patch grid, 4x3 merge blocks: windows of 2x2, 2x1, 1x2... blocks
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (100, 80, 3), dtype=np.uint8), "RGB")


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("max_num_batched_tokens", [8192, 5])
def test_windows_match_transformers(qwen_dir, images, big, hf_qwen, max_num_batched_tokens):
    prompts = [{"prompt": ONE, "multi_modal_data": {"image": big}}, "Hello, world!",
               {"prompt": TWO, "multi_modal_data": {"image": [images[1], big]}},
               {"prompt": ONE, "multi_modal_data": {"image": images[3]}}]
    llm = LLM(qwen_dir, device="cpu", dtype="float32", max_model_len=256,
              max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=False)
    got = tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    assert got == [hf_qwen(ONE, [big]), hf_qwen("Hello, world!"),
                   hf_qwen(TWO, [images[1], big]), hf_qwen(ONE, [images[3]])]


def test_vision_mlp_padded_to_an_aligned_hidden_size_computes_the_same(qwen_dir):
    """GatedVisionMLP.pad_hidden (done on a GPU at load: Qwen2.5-VL's 3420 leaves the down
    projection's rows unaligned for cuBLAS): zero gate/up rows and down columns change
    nothing but the shapes."""
    from hpcinfer.models.registry import load_model
    model = load_model(qwen_dir, dtype=torch.float32, device="cpu")
    mlp = model.visual.blocks[0].mlp
    hidden = mlp.down_proj.input_size
    assert hidden % 64   # the tiny tower's 48 (as the real one's 3420): on the CPU load_model
    #                      keeps the checkpoint's shape (after_loading pads on a GPU only)
    x = torch.randn(37, mlp.gate_up_proj.input_size, generator=torch.Generator().manual_seed(0))
    want = mlp(x)
    mlp.pad_hidden(64)
    assert mlp.down_proj.weight.shape[1] == mlp.down_proj.input_size == 64
    assert mlp.gate_up_proj.weight.shape[0] == 128 and mlp.gate_up_proj.out_pieces == [64, 64]
    torch.testing.assert_close(mlp(x), want, rtol=1e-6, atol=1e-6)
