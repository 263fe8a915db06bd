"""Random-init Qwen2.5-VL checkpoints of real shapes for bench/vision.py (workload V, issue 24),
made offline: config, bf16 weights written shard by shard, a word-level tokenizer with Qwen's
special tokens at their real ids and a PIL image processor, plus seeded synthetic images.

Tensor names and shapes come from transformers' own model built on the meta device (nothing
is allocated), so the checkpoint is exactly what transformers saves and loads; the weights
are drawn one tensor at a time (on the GPU when there is one), so host memory holds one shard.
"""
from __future__ import annotations

import json
from pathlib import Path

GiB = 2 ** 30

# Qwen2.5-VL-7B-Instruct's config.json (the hub release), minus what transformers fills in.
QWEN2_5_VL_7B = {
    "text": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                 max_position_embeddings=128000, rms_norm_eps=1e-6, hidden_act="silu",
                 tie_word_embeddings=False,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                  "mrope_section": [16, 24, 24]}),
    "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                   out_hidden_size=3584, patch_size=14, spatial_merge_size=2,
                   temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                   hidden_act="silu"),
}
# A CPU-sized shape with the same structure (window attention over several windows, full
# attention in two blocks, M-RoPE): bench/vision.py's workload VT and its test.
QWEN2_5_VL_TINY = {
    "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=2048,
                 max_position_embeddings=2048, rms_norm_eps=1e-6, hidden_act="silu",
                 tie_word_embeddings=False,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                  "mrope_section": [2, 3, 3]}),
    "vision": dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=4,
                   out_hidden_size=64, patch_size=14, spatial_merge_size=2,
                   temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1, 3],
                   hidden_act="silu"),
}
SHAPES = {"qwen2.5-vl-7b": QWEN2_5_VL_7B, "qwen2.5-vl-tiny": QWEN2_5_VL_TINY}

# Qwen2's special tokens, counted from the top of the tokenizer's 151643 regular ids; the
# tiny vocabulary keeps the same order just below its own top.
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
           "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
           "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
           "<|image_pad|>", "<|video_pad|>"]
QWEN_FIRST_SPECIAL = 151643
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
# Words of the prompts, so they tokenize to real ids rather than the unknown token.
PROMPT_WORDS = ["system", "You", "are", "a", "helpful", "assistant.", "user", "assistant",
                "Describe", "picture", "in", "one", "sentence."]


def first_special_id(vocab_size: int) -> int:
    return min(QWEN_FIRST_SPECIAL, vocab_size - len(SPECIAL))


def special_ids(vocab_size: int) -> dict[str, int]:
    first = first_special_id(vocab_size)
    return {token: first + i for i, token in enumerate(SPECIAL)}


def prompt_for(index: int) -> str:
    """One image's prompt in Qwen2.5-VL's chat format (its default system message, the image
    placeholder, then a short question that differs per image)."""
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            f"<|im_start|>user\n{IMAGE}Describe picture {index} in one sentence.<|im_end|>\n"
            "<|im_start|>assistant\n")


def synthetic_images(num: int, size: int, seed: int = 0) -> list:
    """``num`` seeded RGB images of size x size pixels: a colour gradient with a random
    direction under noise, so each image differs and none compresses to nothing."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    images = []
    for _ in range(num):
        a, b = rng.uniform(-1, 1, (2, 3))
        base = rng.uniform(0, 255, 3)
        grad = ramp[:, None, None] * a * 128 + ramp[None, :, None] * b * 128 + base
        noise = rng.normal(0, 24, (size, size, 3))
        images.append(Image.fromarray(np.clip(grad + noise, 0, 255).astype(np.uint8), "RGB"))
    return images


def qwen2_5_vl_config(shape: dict):
    from transformers import Qwen2_5_VLConfig
    ids = special_ids(shape["text"]["vocab_size"])
    text = dict(shape["text"], bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    return Qwen2_5_VLConfig(text_config=text, vision_config=dict(shape["vision"]),
                            image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"],
                            vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"],
                            tie_word_embeddings=shape["text"]["tie_word_embeddings"])


def write_qwen2_5_vl(out_dir: str | Path, shape_name: str, *, dtype: str = "bfloat16",
                     seed: int = 0, shard_bytes: int = 4 * GiB) -> Path:
    """A random Qwen2.5-VL checkpoint of SHAPES[shape_name] with its tokenizer and image
    processor in ``out_dir`` (reused when a marker says it was written with the same
    arguments); returns out_dir."""
    out_dir = Path(out_dir)
    marker = out_dir / "bench_shape.json"
    want = json.dumps({"shape": SHAPES[shape_name], "dtype": dtype, "seed": seed},
                      sort_keys=True)
    if marker.is_file() and marker.read_text() == want:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    config = qwen2_5_vl_config(SHAPES[shape_name])
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]   # what loaders dispatch on
    _write_weights(out_dir, config, dtype, seed, shard_bytes)
    config.save_pretrained(out_dir)
    _write_tokenizer(out_dir, SHAPES[shape_name]["text"]["vocab_size"])
    _write_image_processor(out_dir)
    marker.write_text(want)
    return out_dir


def _meta_tensors(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor transformers saves for ``config``, without allocating."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()
            if not (name == "lm_head.weight" and config.tie_word_embeddings)]


def _write_weights(out_dir: Path, config, dtype: str, seed: int, shard_bytes: int) -> None:
    """Linear and conv weights N(0, 1/fan_in), embeddings N(0, 1), norms around 1, biases
    small: activations stay O(1) through the depth, so bf16 does not overflow."""
    import torch
    from safetensors.torch import save_file
    torch_dtype = getattr(torch, dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(seed)

    def draw(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        x = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)
        if len(shape) == 1:
            x = 1.0 + 0.1 * x if "norm" in name or "ln_q" in name else 0.02 * x
        elif "embed_tokens" not in name:
            fan_in = x[0].numel()
            x = x * fan_in ** -0.5
        return x.to(torch_dtype).cpu()

    names, weight_map, shard, size, total = [], {}, {}, 0, 0

    def flush():
        nonlocal shard, size
        name = f"part-{len(names):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update({key: name for key in shard})
        shard, size = {}, 0

    for name, shape in _meta_tensors(config):
        shard[name] = draw(name, shape)
        nbytes = shard[name].numel() * shard[name].element_size()
        size, total = size + nbytes, total + nbytes
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    final = {old: f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
             for i, old in enumerate(names)}   # the HF pattern, now that the count is known
    for old, new in final.items():
        (out_dir / old).rename(out_dir / new)
    index = {"metadata": {"total_size": total},
             "weight_map": {k: final[v] for k, v in weight_map.items()}}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def _write_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """Word-level over the whole vocabulary ("w<id>", the prompt words and picture numbers at
    the low ids), Qwen's special tokens at their ids: detokenizing costs what a real one does
    per token and every id decodes."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from hpcinfer.testing.tiny_vision import QWEN2_VL_CHAT_TEMPLATE
    first = first_special_id(vocab_size)
    words = PROMPT_WORDS + [f"{i}" for i in range(1000)]
    vocab = {f"w{i}": i for i in range(first)}
    for i, word in enumerate(words, start=1):   # id 0 stays the unknown token
        del vocab[f"w{i}"]
        vocab[word] = i
    vocab.update(special_ids(vocab_size))   # in the vocabulary at their ids, then special
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0",
                                   pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   additional_special_tokens=SPECIAL)
    # Specials must land on their ids: the model's config names them (image_token_id, ...).
    got = {t: fast.convert_tokens_to_ids(t) for t in SPECIAL}
    if got != special_ids(vocab_size):
        raise RuntimeError(f"special token ids {got} differ from {special_ids(vocab_size)}")
    fast.chat_template = QWEN2_VL_CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))


def _write_image_processor(out_dir: Path) -> None:
    """Qwen2.5-VL's image preprocessing (14-pixel patches, 2x2 merge, its pixel bounds) in
    transformers' PIL implementation: no torchvision needed."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil)
    Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056, patch_size=14,
                             merge_size=2, temporal_patch_size=2).save_pretrained(out_dir)
