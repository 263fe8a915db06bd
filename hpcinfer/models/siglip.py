"""SigLIP's vision transformer (LLaVA towers; Gemma 3's tower): CLIP's encoder layers
(models/clip.py, same names) after a patch embedding with a bias and learned positions, no
CLS token and no pre-norm. The attention-pooling ``head`` (SigLIP's image embedding for
contrastive training) is never used by vision-language models: its checkpoint tensors are
skipped. LLaVA takes an inner hidden state; Gemma 3 the last one after ``post_layernorm``
(``last_hidden_state``)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hpcinfer.layers.norm import LayerNorm
from hpcinfer.models.clip import CLIPEncoder, CLIPVisionModel, image_patches

_HEAD_TENSORS = tuple(f"head.{name}" for name in (
    "probe", "attention.in_proj_weight", "attention.in_proj_bias", "attention.out_proj.weight",
    "attention.out_proj.bias", "layernorm.weight", "layernorm.bias", "mlp.fc1.weight",
    "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"))


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.image_size, self.patch_size = config.image_size, config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size,
                                         kernel_size=self.patch_size, stride=self.patch_size)
        num_patches = (self.image_size // self.patch_size) ** 2
        self.position_embedding = nn.Embedding(num_patches, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [N, C, H, W] -> [N, num_patches, dim]
        return image_patches(self, pixel_values) + self.position_embedding.weight


class SiglipVisionModel(CLIPVisionModel):
    has_cls = False
    unused_checkpoint_suffixes = _HEAD_TENSORS

    def __init__(self, config: Any):
        nn.Module.__init__(self)
        self.config = config
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.embeddings(pixel_values)

    def last_hidden_state(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, C, H, W] -> transformers' ``last_hidden_state`` [N, num_patches,
        dim]: every layer, then post_layernorm."""
        return self.post_layernorm(self.hidden_states(pixel_values, [-1])[0])
