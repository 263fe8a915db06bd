"""CLIP's vision transformer (the image tower of LLaVA): patch embedding, a CLS token, learned
positions, pre-norm encoder layers with bidirectional attention.

Parameter names follow transformers' ``CLIPVisionModel`` without its ``vision_model.`` level
(``embeddings.patch_embedding.weight``, ``encoder.layers.N.self_attn.q_proj.weight``, ...), except
that ``qkv_proj`` stacks q/k/v_proj as in the language models (``packed_modules_mapping``).
The encoder sees whole images, never the KV cache: attention is plain
``scaled_dot_product_attention`` over each image's patches, no causal mask.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hpcinfer.layers.activation import PlainActivation
from hpcinfer.layers.linear import NO_TP, ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from hpcinfer.layers.norm import LayerNorm


def image_patches(embeddings: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """pixel_values [N, C, H, W] -> [N, num_patches, dim] through ``embeddings``'
    patch_embedding (a conv with stride = kernel = patch size); CLIP's and SigLIP's towers
    take exactly their configured image size."""
    height, width = pixel_values.shape[-2:]
    if height != embeddings.image_size or width != embeddings.image_size:
        raise ValueError(f"the image processor gave {height}x{width} pixels but the vision "
                         f"tower takes {embeddings.image_size}x{embeddings.image_size}: use "
                         "the checkpoint's own preprocessor_config.json")
    weight = embeddings.patch_embedding.weight
    return embeddings.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        dim = config.hidden_size
        self.image_size, self.patch_size = config.image_size, config.patch_size
        self.class_embedding = nn.Parameter(torch.empty(dim))
        self.patch_embedding = nn.Conv2d(config.num_channels, dim, kernel_size=self.patch_size,
                                         stride=self.patch_size, bias=False)
        self.num_positions = (self.image_size // self.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(self.num_positions, dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [N, C, H, W] -> [N, 1 + num_patches, dim]
        patches = image_patches(self, pixel_values)
        cls = self.class_embedding.expand(pixel_values.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPAttention(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        dim, self.num_heads = config.hidden_size, config.num_attention_heads
        self.head_dim = dim // self.num_heads
        self.qkv_proj = QKVParallelLinear(dim, self.head_dim, self.num_heads, self.num_heads,
                                          bias=True, tp=NO_TP)
        self.out_proj = RowParallelLinear(dim, dim, bias=True, tp=NO_TP)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, S, dim] -> q, k, v [N, heads, S, head_dim]
        n, s, dim = x.shape
        q, k, v = (t.view(n, s, self.num_heads, self.head_dim).transpose(1, 2)
                   for t in self.qkv_proj(x).split(dim, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5)
        return self.out_proj(out.transpose(1, 2).reshape(n, s, dim))


class CLIPMLP(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.fc1 = ColumnParallelLinear(config.hidden_size, config.intermediate_size, True, NO_TP)
        self.fc2 = RowParallelLinear(config.intermediate_size, config.hidden_size, True, NO_TP)
        self.act = PlainActivation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config)
                                    for _ in range(config.num_hidden_layers))


class CLIPVisionModel(nn.Module):
    """``hidden_states(pixel_values, indices)``: transformers' ``hidden_states`` tuple entries
    ``indices`` (0: the pre-norm embeddings, i: the output of layer i), running only the layers
    the deepest index needs. post_layernorm is loaded (checkpoints carry it) but LLaVA, which
    takes inner hidden states, never applies it."""

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # HF's typo
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    has_cls = True  # a CLS token precedes the patches
    unused_checkpoint_suffixes: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        """Tokens per image in each hidden state: the patches (+ CLS)."""
        return (self.config.image_size // self.config.patch_size) ** 2 + self.has_cls

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.pre_layrnorm(self.embeddings(pixel_values))

    def hidden_states(self, pixel_values: torch.Tensor, indices: list[int]
                      ) -> list[torch.Tensor]:
        """pixel_values [N, C, H, W] -> one [N, num_tokens, dim] per index (indices as
        transformers takes them: negative ones count from num_hidden_layers + 1)."""
        num_states = len(self.encoder.layers) + 1
        wanted = [i % num_states for i in indices]
        hidden = self.embed(pixel_values)
        states = {0: hidden}
        for i, layer in enumerate(self.encoder.layers[:max(wanted)], start=1):
            hidden = layer(hidden)
            states[i] = hidden
        return [states[i] for i in wanted]
