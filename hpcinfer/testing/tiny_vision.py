"""Tiny random vision-language checkpoints for tests (issue 24): a LLaVA built with
transformers from a tiny CLIP vision config and the tiny Llama text config, saved with a
processor (the tiny tokenizer plus a CLIPImageProcessor and a chat template that takes image
parts), so tests never touch the hub; likewise Qwen2-VL / Qwen2.5-VL and Gemma 3.

``tiny_llava()`` builds one per process in a temporary directory removed at exit; tests
that edit a checkpoint build their own with ``build_tiny_llava``. ``test_images()`` gives
seeded PIL images of several sizes and aspect ratios (the processor resizes and crops).
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hpcinfer.testing.tiny import (BOS_ID, EOS_ID, PAD_ID, _COMMON, _tiny_tokenizer,
                                   redraw_weights)

IMAGE_TOKEN = "<image>"
# 28x28 pixels in 7x7 patches: 16 patches (+ CLS), so 16 placeholder tokens per image with
# the "default" strategy (CLS dropped), 17 with "full".
IMAGE_SIZE, PATCH_SIZE = 28, 7

# Content lists with {"type": "image"} / {"type": "text"} parts, as HF's LLaVA templates.
LLAVA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def build_tiny_llava(out_dir: str | Path, *, seed: int = 0, select_strategy: str = "default",
                     feature_layer: int | list[int] = -2, vision: str = "clip",
                     text: str = "llama", **text_overrides: Any) -> Path:
    """Write a random fp32 LlavaForConditionalGeneration (3-layer CLIP or SigLIP tower,
    2-layer Llama or Mistral) and its processor to ``out_dir``; returns it."""
    import torch
    from transformers import (AutoConfig, CLIPImageProcessor, CLIPVisionConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor,
                              SiglipImageProcessor, SiglipVisionConfig)

    out_dir = Path(out_dir)
    tokenizer = _tiny_tokenizer()
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE  # one template, as llava-hf checkpoints
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text_extra = {"sliding_window": 24, "head_dim": 16} if text == "mistral" else {}
    text_config = AutoConfig.for_model(text, **{
        **_COMMON, "num_key_value_heads": 2, "vocab_size": len(tokenizer),
        "pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, **text_extra,
        **text_overrides})
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                 num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    if vision == "siglip":  # no CLS token: one placeholder token fewer per image
        vision_config = SiglipVisionConfig(**tower, hidden_act="gelu_pytorch_tanh")
        image_processor = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    else:
        vision_config = CLIPVisionConfig(**tower, hidden_act="quick_gelu", projection_dim=32)
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE},
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_center_crop=True)
    config = LlavaConfig(vision_config=vision_config, text_config=text_config,
                         image_token_index=image_token_id, projector_hidden_act="gelu",
                         vision_feature_select_strategy=select_strategy,
                         vision_feature_layer=feature_layer,
                         image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).to(torch.float32)
    redraw_weights(model, seed)
    with torch.no_grad():  # CLIP's layer_norm1/2 miss redraw's "norm.weight": weights near 1
        for name, param in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                param.add_(1.0)
    model.eval().save_pretrained(out_dir)
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy=select_strategy, chat_template=LLAVA_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN, num_additional_image_tokens=0 if vision == "siglip" else 1)
    processor.save_pretrained(out_dir)  # with the tokenizer
    return out_dir


@functools.lru_cache(maxsize=None)
def tiny_llava(select_strategy: str = "default", feature_layer: int | tuple[int, ...] = -2,
               vision: str = "clip", text: str = "llama") -> Path:
    """``build_tiny_llava`` once per process per variant; treat the directory as read-only."""
    root = Path(tempfile.mkdtemp(prefix="hpcinfer-tiny-llava-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    layer = list(feature_layer) if isinstance(feature_layer, tuple) else feature_layer
    return build_tiny_llava(root / "llava", select_strategy=select_strategy,
                            feature_layer=layer, vision=vision, text=text)


def test_images(seed: int = 0) -> list:
    """Seeded RGB noise images: square, wide, tall and small (upscaled by the processor)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = [(40, 40), (64, 30), (25, 50), (12, 20)]  # (width, height)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
            for w, h in sizes]


# Qwen2-VL: 14-pixel patches merged 2x2, so an image resized to H x W pixels (multiples of 28
# within [min_pixels, max_pixels]) fills (H / 28) * (W / 28) placeholder tokens.
QWEN2_VL_SPECIAL = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tiny_qwen2_vl(out_dir: str | Path, *, seed: int = 0, version: str = "2") -> Path:
    """Write a random fp32 Qwen2VLForConditionalGeneration (2-block vision transformer with
    the 2x2 patch merger, 2-layer Qwen2 with M-RoPE), or with ``version="2.5"`` a
    Qwen2_5_VLForConditionalGeneration (4 blocks, 2x2-block windows, full attention in blocks
    1 and 3), its image processor and tokenizer to ``out_dir``. No processor_config.json:
    transformers 5's Qwen2VLProcessor needs torchvision (its video processor);
    ``qwen2_vl_image_processor`` builds one without."""
    import torch
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2VLConfig, Qwen2VLForConditionalGeneration)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil)

    out_dir = Path(out_dir)
    tokenizer = _tiny_tokenizer()
    tokenizer.add_tokens(QWEN2_VL_SPECIAL, special_tokens=True)
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIAL}
    # head_dim 16: M-RoPE sections of 8 frequency pairs (temporal 2, height 3, width 3)
    text_config = {**_COMMON, "num_key_value_heads": 2, "vocab_size": len(tokenizer),
                   "pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                       "mrope_section": [2, 3, 3]}}
    vision_config = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 4,
                     "mlp_ratio": 2, "patch_size": 14, "spatial_merge_size": 2,
                     "temporal_patch_size": 2, "hidden_act": "quick_gelu"}
    config_cls, model_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    if version == "2.5":  # windows of 56 pixels = 2x2 merge blocks; images reach 4x3 blocks
        vision_config = {"depth": 4, "hidden_size": 32, "intermediate_size": 48,
                         "out_hidden_size": 64, "num_heads": 4, "patch_size": 14,
                         "spatial_merge_size": 2, "temporal_patch_size": 2,
                         "hidden_act": "silu", "window_size": 56,
                         "fullatt_block_indexes": [1, 3]}
        config_cls, model_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    config = config_cls(text_config=text_config, vision_config=vision_config,
                           image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"],
                           vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32)
    redraw_weights(model, seed)
    with torch.no_grad():  # the vision norms (norm1/2, ln_q) miss redraw's "norm.weight"
        for name, param in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "ln_q.weight")):
                param.add_(1.0)
    model.eval().save_pretrained(out_dir)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 2, max_pixels=28 * 28 * 12, patch_size=14,
                             merge_size=2, temporal_patch_size=2).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def qwen2_vl_image_processor(path: str | Path, version: str = "2"):
    """transformers' Qwen2VLProcessor (Qwen2_5_VLProcessor with ``version="2.5"``) for
    ``path`` with its video attribute removed: what the engine itself falls back to without
    torchvision (hpcinfer/multimodal/image_only.py)."""
    from hpcinfer.multimodal.image_only import image_only_processor
    return image_only_processor(path, "Qwen2_5_VLForConditionalGeneration" if version == "2.5"
                                else "Qwen2VLForConditionalGeneration")


@functools.lru_cache(maxsize=None)
def tiny_qwen2_vl(version: str = "2") -> Path:
    """``build_tiny_qwen2_vl`` once per process per version; treat it as read-only."""
    root = Path(tempfile.mkdtemp(prefix="hpcinfer-tiny-qwen2vl-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return build_tiny_qwen2_vl(root / "qwen2_vl", version=version)


# Gemma 3: 32x32 pixels in 4x4 patches = an 8x8 grid, average-pooled 2x2 to 16 tokens.
GEMMA3_IMAGE_SIZE, GEMMA3_PATCH_SIZE, GEMMA3_IMAGE_TOKENS = 32, 4, 16
GEMMA3_SPECIAL = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                  "image_token": "<image_soft_token>"}
# As Google's template: turns, "model" for the assistant, <start_of_image> per image part.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def build_tiny_gemma3(out_dir: str | Path, *, seed: int = 0, **text_overrides: Any) -> Path:
    """Write a random fp32 Gemma3ForConditionalGeneration (2-layer SigLIP tower, the
    projector, the tiny 2-layer Gemma 3 text model: a sliding layer of window 8 and a full
    one, tied embeddings) and its Gemma3Processor (16 image tokens per image) to ``out_dir``.
    transformers' AutoProcessor loads it without torchvision (its PIL image processor)."""
    import torch
    from transformers import (AutoTokenizer, Gemma3Config, Gemma3ForConditionalGeneration,
                              Gemma3Processor)
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from hpcinfer.testing.tiny import tiny_config

    out_dir = Path(out_dir)
    tokenizer = _tiny_tokenizer()
    tokenizer.add_tokens(list(GEMMA3_SPECIAL.values()), special_tokens=True)
    tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    # Gemma3Processor reads tokenizer.boi_token / eoi_token / image_token: named extra tokens.
    tokenizer = AutoTokenizer.from_pretrained(out_dir, extra_special_tokens=GEMMA3_SPECIAL)
    text_config = tiny_config("gemma3", len(tokenizer), **text_overrides).to_dict()
    vision_config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, image_size=GEMMA3_IMAGE_SIZE,
                         patch_size=GEMMA3_PATCH_SIZE, hidden_act="gelu_pytorch_tanh",
                         layer_norm_eps=1e-6, vision_use_head=False)
    config = Gemma3Config(text_config=text_config, vision_config=vision_config,
                          mm_tokens_per_image=GEMMA3_IMAGE_TOKENS,
                          image_token_index=tokenizer.image_token_id,
                          boi_token_index=tokenizer.boi_token_id,
                          eoi_token_index=tokenizer.eoi_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Gemma3ForConditionalGeneration(config).to(torch.float32)
    redraw_weights(model, seed, norm_offset=1.0)   # Gemma's norms (and mm_soft_emb_norm)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vision_tower" in name and "norm" in name and name.endswith("weight"):
                param.add_(1.0)   # SigLIP's LayerNorms scale by w, not 1 + w
            elif "embed_tokens" in name:
                # Tied to the LM head: N(0, 1) rows scaled by sqrt(64) would make each
                # position's logits echo its own token; small rows let attention decide.
                param.mul_(0.03)
    model.eval().save_pretrained(out_dir)
    image_processor = Gemma3ImageProcessorPil(
        size={"height": GEMMA3_IMAGE_SIZE, "width": GEMMA3_IMAGE_SIZE})
    Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                    image_seq_length=GEMMA3_IMAGE_TOKENS,
                    chat_template=GEMMA3_CHAT_TEMPLATE).save_pretrained(out_dir)
    return out_dir


@functools.lru_cache(maxsize=None)
def tiny_gemma3() -> Path:
    """``build_tiny_gemma3`` once per process; treat it as read-only."""
    root = Path(tempfile.mkdtemp(prefix="hpcinfer-tiny-gemma3-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return build_tiny_gemma3(root / "gemma3")


def hf_generate(model, processor, text=None, images=None, messages=None, max_new: int = 12
                ) -> tuple[list[int], list[int]]:
    """transformers' greedy continuation of one prompt (``text`` with ``images``) or one
    conversation (``messages``) and the prompt's token ids: the oracle of tests/multimodal."""
    import torch
    if messages is not None:
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=True, return_dict=True,
                                               return_tensors="pt")
    else:
        inputs = processor(text=[text], images=images or None, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
    num_prompt = inputs["input_ids"].shape[1]
    return out[0, num_prompt:].tolist(), inputs["input_ids"][0].tolist()


def use_processor(monkeypatch, path: str, processor) -> None:
    """Make AutoProcessor.from_pretrained(path) return ``processor`` (the Qwen processors
    without their torchvision-only video part), every other path as before."""
    import transformers
    original = transformers.AutoProcessor.from_pretrained

    def from_pretrained(where, *args, **kwargs):
        return processor if str(where) == path else original(where, *args, **kwargs)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", from_pretrained)
