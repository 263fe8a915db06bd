"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): a vision transformer over 14-pixel patches
(two frames deep: ``temporal_patch_size``) with 2-D rope, a patch merger that joins each 2x2
block of patches into one token, and Qwen2 with M-RoPE (positions [3, T]: temporal, height,
width; layers/rotary.py MRotaryEmbedding).

Each image of ``image_grid_thw`` (t, h, w) patches fills t*h*w / merge**2 placeholder tokens
(``<|image_pad|>``). Its tokens get 3-D positions (t, row, column) from the text position
before it; text after it continues from the largest of those + 1, so a prompt's positions end
below its length: the difference (``rope_delta``) shifts every generated token's position.
``rope_positions`` computes a prompt's table once, at processing time (hpcinfer/multimodal).

Checkpoint names: Qwen's releases write ``visual.*``, ``model.*`` (the language model) and
``lm_head.weight``; transformers 5 may write ``model.visual.*`` and ``model.language_model.*``.
"""
from __future__ import annotations

import functools
import itertools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hpcinfer.layers import ops
from hpcinfer.layers.activation import PlainActivation
from hpcinfer.layers.attention import AttentionBackend, AttentionMetadata, KVCache
from hpcinfer.layers.linear import NO_TP, ReplicatedLinear, TensorParallel
from hpcinfer.layers.norm import LayerNorm
from hpcinfer.layers.rotary import get_mrope, max_position_of
from hpcinfer.layers.transfer import to_device
from hpcinfer.models.loader import rename_prefix
from hpcinfer.models.qwen2 import Qwen2ForCausalLM
from hpcinfer.models.spec import head_dim_of

_RENAMES = (("model.language_model.", "language_model.model."),
            ("model.visual.", "visual."),
            ("lm_head.", "language_model.lm_head."),
            ("model.", "language_model.model."))


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = ReplicatedLinear(dim, 3 * dim, True)
        self.proj = ReplicatedLinear(dim, dim, True)

    def forward(self, x: torch.Tensor, cos_sin: torch.Tensor, lengths: list[int]
                ) -> torch.Tensor:
        # x: [N, dim] patches of several images -> q, k, v [N, heads, head_dim]
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        # (contiguous: the GPU rope kernel rotates in place and wants dense rows)
        q, k = ops.rotary_embedding(torch.arange(n, device=x.device), q.contiguous(),
                                    k.contiguous(), cos_sin)
        return self.proj(segment_attention(q, k, v, lengths).reshape(n, -1))


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      lengths: list[int]) -> torch.Tensor:
    """Full attention within each consecutive segment of ``lengths`` rows (an image, or a
    window of Qwen2.5-VL), none across: q, k, v [N, heads, head_dim] -> [N, heads, head_dim].

    Consecutive segments of one length go through one batched 4-D SDPA call: a 448x448 image
    has 16 windows of 64 patches, and a step's images are mostly of one size, so a step makes
    a few calls instead of one per window (hundreds per layer, host-bound: workload V ran at
    1,301 output tok/s on an H200 that way, 2026-12-03); 4-D inputs also let SDPA pick its
    flash / memory-efficient kernels, where 3-D ones fell back to the math kernel and its
    [heads, L, L] scores (62 GiB for the memory profile's 32,768-patch image)."""
    outs, start = [], 0
    heads, dim = q.shape[1], q.shape[2]
    for length, run in itertools.groupby(lengths):
        count = len(list(run))
        end = start + count * length

        def batched(t):   # [count * length, H, D] -> [count, H, length, D]
            return t[start:end].view(count, length, heads, dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(batched(q), batched(k), batched(v))
        outs.append(out.transpose(1, 2).reshape(end - start, heads, dim))
        start = end
    return outs[0] if len(outs) == 1 else torch.cat(outs)


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = ReplicatedLinear(dim, hidden, True)
        self.fc2 = ReplicatedLinear(hidden, dim, True)
        self.act = PlainActivation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-norm block; Qwen2-VL: LayerNorm and a plain MLP (Qwen2.5-VL passes RMSNorm and a
    gated MLP)."""

    def __init__(self, dim: int, num_heads: int, mlp: nn.Module, norm_cls: type = LayerNorm):
        super().__init__()
        self.norm1 = norm_cls(dim, eps=1e-6)
        self.norm2 = norm_cls(dim, eps=1e-6)
        self.attn = VisionAttention(dim, num_heads)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, cos_sin: torch.Tensor, lengths: list[int]
                ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos_sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, out_dim: int, context_dim: int, merge_size: int,
                 norm_cls: type = LayerNorm):
        super().__init__()
        self.hidden = context_dim * merge_size ** 2
        self.ln_q = norm_cls(context_dim, eps=1e-6)
        self.mlp = nn.Sequential(ReplicatedLinear(self.hidden, self.hidden, True),
                                 PlainActivation("gelu"),
                                 ReplicatedLinear(self.hidden, out_dim, True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, context_dim], each merge_size**2 consecutive patches one block -> [N / m^2, out]
        return self.mlp(self.ln_q(x).view(-1, self.hidden))


class Qwen2VisionTransformer(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.config, self.merge_size = config, config.spatial_merge_size
        self.width, self.num_heads = self.vision_width(config), config.num_heads
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(config.in_channels, self.width, kernel,
                                          stride=kernel, bias=False)
        self.blocks = nn.ModuleList(self.make_block(config) for _ in range(config.depth))
        self.merger = self.make_merger(config)
        rope = getattr(config, "rope_parameters", None) or {}
        self.rope_theta = float(rope.get("rope_theta", 10000.0))

    @staticmethod
    def vision_width(config: Any) -> int:
        return config.embed_dim

    def make_block(self, config: Any) -> VisionBlock:
        mlp = VisionMLP(self.width, int(self.width * config.mlp_ratio), config.hidden_act)
        return VisionBlock(self.width, config.num_heads, mlp)

    def make_merger(self, config: Any) -> PatchMerger:
        return PatchMerger(config.hidden_size, self.width, self.merge_size)

    def forward(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """pixels: [num_patches, C * T * P * P] in the processor's order, grids: (t, h, w)
        per image -> [num_patches / merge**2, text hidden]."""
        weight = self.patch_embed.proj.weight  # the conv over a whole patch is a matmul
        x = F.linear(pixels.to(weight.dtype), weight.reshape(weight.shape[0], -1))
        cos_sin = self._rope_table(grids, x.device)
        lengths = [h * w for t, h, w in grids for _ in range(t)]  # attention within a frame
        for block in self.blocks:
            x = block(x, cos_sin, lengths)
        return self.merger(x)

    def _rope_table(self, grids, device) -> torch.Tensor:
        # Each patch's (row, column) rotates a quarter of the head's channels each. The
        # coordinates are built on the host, per distinct grid once (patch_coords), and sent
        # in one copy: per image on the device they were ~10 tiny launches an image, a few
        # hundred per tower call of a step with many images.
        head_dim = self.width // self.num_heads
        quarter = head_dim // 2
        inv_freq = 1.0 / self.rope_theta ** (torch.arange(0, quarter, 2, dtype=torch.float32,
                                                          device=device) / quarter)
        coords = np.concatenate([patch_coords(*grid, self.merge_size) for grid in grids])
        coords = to_device(coords, device)   # (pinned: a pageable copy waits for the GPU)
        angles = coords.float()[..., None] * inv_freq  # [N, 2, quarter / 2]
        angles = angles.flatten(1)                     # [N, head_dim / 2]
        return torch.cat([angles.cos(), angles.sin()], dim=-1)


@functools.lru_cache(maxsize=256)
def patch_coords(t: int, h: int, w: int, m: int) -> np.ndarray:
    """Per patch of a (t, h, w) grid its (row, column) [t * h * w, 2], block-major over
    m x m merge blocks as the processor orders patches (read-only: cached)."""
    rows = np.broadcast_to(np.arange(h).reshape(h // m, m, 1, 1), (h // m, m, w // m, m))
    cols = np.broadcast_to(np.arange(w).reshape(1, 1, w // m, m), (h // m, m, w // m, m))
    block_major = [a.transpose(0, 2, 1, 3).reshape(-1) for a in (rows, cols)]
    coords = np.tile(np.stack(block_major, axis=-1), (t, 1))
    coords.setflags(write=False)
    return coords


class Qwen2VLForConditionalGeneration(nn.Module):
    """The multimodal model protocol (hpcinfer/multimodal/__init__.py), plus ``uses_mrope``
    (the runner gives it [3, T] positions) and ``rope_positions``."""

    takes_images = True
    uses_mrope = True
    packed_modules_mapping = Qwen2ForCausalLM.packed_modules_mapping
    vision_cls: type[nn.Module] = Qwen2VisionTransformer

    def __init__(self, config: Any, *, attention_backend: AttentionBackend,
                 tp: TensorParallel = NO_TP):
        super().__init__()
        if tp.size > 1:
            raise ValueError("Qwen2-VL runs on one GPU for now (images with tensor "
                             "parallelism are not built yet, docs/vision.md): set "
                             "tensor_parallel_size=1")
        self.config, text = config, config.text_config
        self.language_model = Qwen2ForCausalLM(text, attention_backend=attention_backend, tp=tp)
        mrope = get_mrope(text, head_dim_of(text), max_position_of(text))
        for layer in self.language_model.model.layers:  # one M-RoPE, shared like the ropes
            layer.self_attn.rotary_emb = mrope
        self.visual = self.vision_cls(config.vision_config)
        self.image_token_id = config.image_token_id
        self.merge_size = config.vision_config.spatial_merge_size
        if text.tie_word_embeddings:
            self.unused_checkpoint_suffixes = ("lm_head.weight",)

    def tie_weights(self) -> None:
        self.language_model.tie_weights()

    @property
    def pixel_dtype(self) -> torch.dtype:
        return self.visual.patch_embed.proj.weight.dtype  # the tower's first op casts to it

    @staticmethod
    def checkpoint_name(name: str) -> str:
        return rename_prefix(name, _RENAMES)

    # --- images ---
    def split_image_inputs(self, out: Any, num_images: int) -> list[dict[str, torch.Tensor]]:
        """The processor's flat patches [sum of t*h*w, dim] and grids [num_images, 3] as one
        dict per image."""
        grids = out["image_grid_thw"]
        sizes = grids.prod(dim=-1).tolist()
        return [{"pixel_values": pixels, "image_grid_thw": grids[i:i + 1]}
                for i, pixels in enumerate(out["pixel_values"].split(sizes))]

    def image_token_counts(self, image_inputs: list[dict[str, torch.Tensor]]) -> list[int]:
        return [int(x["image_grid_thw"].prod()) // self.merge_size ** 2 for x in image_inputs]

    def encode_images(self, image_inputs: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        grids = [tuple(int(v) for v in x["image_grid_thw"][0]) for x in image_inputs]
        merged = self.visual(torch.cat([x["pixel_values"] for x in image_inputs]), grids)
        return list(merged.split(self.image_token_counts(image_inputs)))

    def rope_positions(self, num_tokens: int, items: list) -> tuple[np.ndarray, int]:
        """(positions [3, num_tokens] of a prompt whose images are ``items``, rope delta)."""
        table, pos, done = np.zeros((3, num_tokens), np.int64), 0, 0
        for item in items:
            text = item.offset - done
            table[:, done:item.offset] = np.arange(pos, pos + text)
            pos += text
            t, h, w = (int(v) for v in item.inputs["image_grid_thw"][0])
            h, w = h // self.merge_size, w // self.merge_size
            grid = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w),
                                        indexing="ij")).reshape(3, -1)
            table[:, item.offset:item.end] = grid + pos
            pos += max(h, w)
            done = item.end
        table[:, done:] = np.arange(pos, pos + num_tokens - done)
        return table, int(table.max()) + 1 - num_tokens

    # --- language model ---
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], meta: AttentionMetadata,
                intermediate: tuple[torch.Tensor, ...] | None = None,
                image_embeds: tuple[torch.Tensor, torch.Tensor] | None = None):
        """positions: [3, T] M-RoPE positions (or [T] for text-only work)."""
        if image_embeds is None:
            return self.language_model(input_ids, positions, kv_caches, meta, intermediate)
        rows, embeds = image_embeds
        hidden = self.language_model.model.embed_tokens(input_ids)
        hidden = hidden.index_copy(0, rows, embeds.to(hidden.dtype))
        return self.language_model.model(input_ids, positions, kv_caches, meta,
                                         intermediate=(hidden, None))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)
