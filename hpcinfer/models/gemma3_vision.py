"""Gemma 3 with images (``Gemma3ForConditionalGeneration``): a SigLIP tower, Gemma 3's
multimodal projector and the Gemma 3 language model (models/gemma3.py).

What transformers does, and so do we:

- **Image features**: the tower's last hidden state (after ``post_layernorm``), average-pooled
  from its patch grid to ``mm_tokens_per_image`` tokens (``sqrt(mm_tokens_per_image)`` per
  side), normed by ``mm_soft_emb_norm`` (Gemma's RMSNorm, ``x * (1 + w)``), then multiplied
  by ``mm_input_projection_weight`` [vision hidden, text hidden].
- **Embeddings**: text tokens are scaled by sqrt(hidden_size) as in Gemma; the image
  features replace the placeholder rows *unscaled* (transformers scatters them into the
  already scaled embeddings).
- **Attention**: an image token attends to every token of its own image, later ones too
  (transformers' ``token_type_ids`` mask: ``causal or same image``, and inside the window on
  sliding layers); text stays causal. Every language-model layer's spec has
  ``bidirectional_spans`` and the engine hands each step's per-query limits in the
  metadata (multimodal/step.py); the scheduler never ends a chunk inside an image's span
  (``bidirectional_image_spans``, docs/vision.md).

The prompt holds ``<start_of_image>`` once per image; the processor (transformers'
``Gemma3Processor``) expands it to ``\\n\\n<start_of_image>`` + ``mm_tokens_per_image`` x
``<image_soft_token>`` + ``<end_of_image>\\n\\n``; the soft tokens are the placeholder span.

Checkpoint names: Google's releases and transformers 5's ``save_pretrained`` write
``language_model.model.*``, ``vision_tower.vision_model.*`` or ``vision_tower.*`` and
``multi_modal_projector.*``; transformers 5 in memory says ``model.language_model.*``,
``model.vision_tower.*``, ``model.multi_modal_projector.*`` and ``lm_head.weight`` (tied to the
embedding in released checkpoints, so usually absent): ``checkpoint_name`` maps them all.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hpcinfer.layers.attention import Attention, AttentionBackend, AttentionMetadata, KVCache
from hpcinfer.layers.linear import NO_TP, TensorParallel
from hpcinfer.layers.norm import RMSNorm
from hpcinfer.models.gemma2 import gemma_sliding_window_for
from hpcinfer.models.gemma3 import Gemma3ForCausalLM
from hpcinfer.models.loader import rename_prefix
from hpcinfer.models.siglip import SiglipVisionModel

# (checkpoint prefix, ours), first match wins: LLaVA's layouts, which Gemma 3's share
_RENAMES = (("model.language_model.", "language_model.model."),
            ("model.vision_tower.vision_model.", "vision_tower."),
            ("model.vision_tower.", "vision_tower."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
            ("vision_tower.vision_model.", "vision_tower."),
            ("lm_head.", "language_model.lm_head."))


class Gemma3MultiModalProjector(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        vision, text = config.vision_config, config.text_config
        self.mm_input_projection_weight = nn.Parameter(
            torch.empty(vision.hidden_size, text.hidden_size))
        self.mm_soft_emb_norm = RMSNorm(vision.hidden_size, vision.layer_norm_eps,
                                        weight_offset=1.0)
        self.patches_per_side = vision.image_size // vision.patch_size
        tokens_per_side = round(config.mm_tokens_per_image ** 0.5)
        if (tokens_per_side ** 2 != config.mm_tokens_per_image
                or self.patches_per_side % tokens_per_side):
            raise ValueError(f"mm_tokens_per_image={config.mm_tokens_per_image} must be a "
                             f"square whose side divides the tower's {self.patches_per_side} "
                             "patches per side (Gemma 3 average-pools the patch grid to it)")
        self.kernel_size = self.patches_per_side // tokens_per_side

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # features: [N, patches, vision hidden] -> [N, mm_tokens_per_image, text hidden]
        n, _, dim = features.shape
        side = self.patches_per_side
        grid = features.transpose(1, 2).reshape(n, dim, side, side)
        # contiguous: for one image reshape would keep the transposed strides, and the Triton
        # norm needs stride 1 in the last dim (KernelArgumentError on the GPU)
        pooled = F.avg_pool2d(grid, self.kernel_size).flatten(2).transpose(1, 2).contiguous()
        normed = self.mm_soft_emb_norm(pooled.view(-1, dim)).view(n, -1, dim)
        return torch.matmul(normed, self.mm_input_projection_weight).to(features.dtype)


class Gemma3ForConditionalGeneration(nn.Module):
    """The multimodal model protocol (hpcinfer/multimodal/__init__.py), plus
    ``bidirectional_image_spans``: each image's placeholder tokens attend to each other."""

    takes_images = True
    bidirectional_image_spans = True
    packed_modules_mapping = Gemma3ForCausalLM.packed_modules_mapping

    def __init__(self, config: Any, *, attention_backend: AttentionBackend,
                 tp: TensorParallel = NO_TP):
        super().__init__()
        if tp.size > 1:
            raise ValueError("Gemma 3 with images runs on one GPU for now (images with tensor "
                             "parallelism are not built yet, docs/vision.md): set "
                             "tensor_parallel_size=1")
        text_type, vision_type = config.text_config.model_type, config.vision_config.model_type
        if text_type != "gemma3_text" or vision_type != "siglip_vision_model":
            raise ValueError(f"Gemma3ForConditionalGeneration with a {vision_type} tower and a "
                             f"{text_type} language model is not supported: the tower must be "
                             "siglip_vision_model and the language model gemma3_text")
        self.config = config
        self.language_model = Gemma3ForCausalLM(config.text_config,
                                                attention_backend=attention_backend, tp=tp)
        # The text model fills its specs; with images every causal layer, sliding or full,
        # also lets an image's tokens see each other (transformers' token_type_ids mask).
        for module in self.language_model.modules():
            if isinstance(module, Attention) and module.spec.causal:
                module.spec = dataclasses.replace(module.spec, bidirectional_spans=True)
        self.vision_tower = SiglipVisionModel(config.vision_config)
        self.multi_modal_projector = Gemma3MultiModalProjector(config)
        self.image_token_id = config.image_token_id
        # Tensors we never use: SigLIP's pooling head; the LM head when it is the embedding.
        self.unused_checkpoint_suffixes = self.vision_tower.unused_checkpoint_suffixes + (
            ("lm_head.weight",) if config.text_config.tie_word_embeddings else ())

    @staticmethod
    def sliding_window_for(config: Any, layer_idx: int) -> int | None:
        return gemma_sliding_window_for(config, layer_idx)

    def tie_weights(self) -> None:
        self.language_model.tie_weights()

    @staticmethod
    def checkpoint_name(name: str) -> str:
        return rename_prefix(name, _RENAMES)

    # --- images ---
    def split_image_inputs(self, out: Any, num_images: int) -> list[dict[str, torch.Tensor]]:
        """The processor output as one {"pixel_values": [1, C, H, W]} per image the model
        sees, in prompt order. With pan-and-scan (do_pan_and_scan) the processor adds each
        image's crops after it, each a 256-token image of its own with its own placeholder
        in the text ("num_crops" per image: processor.py hashes them apart)."""
        pixels = out["pixel_values"]
        return [{"pixel_values": pixels[i:i + 1]} for i in range(pixels.shape[0])]

    @property
    def pixel_dtype(self) -> torch.dtype:
        return self.vision_tower.embeddings.patch_embedding.weight.dtype  # its first op casts

    def image_token_counts(self, image_inputs: list[dict[str, torch.Tensor]]) -> list[int]:
        return [self.config.mm_tokens_per_image] * len(image_inputs)

    def encode_images(self, image_inputs: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """One {"pixel_values": [1, C, H, W]} per image -> one [mm_tokens_per_image, text
        hidden] embedding per image; all images in one tower batch."""
        pixels = torch.cat([inputs["pixel_values"] for inputs in image_inputs])
        features = self.vision_tower.last_hidden_state(pixels)
        return list(self.multi_modal_projector(features))

    # --- language model ---
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], meta: AttentionMetadata,
                intermediate: tuple[torch.Tensor, ...] | None = None,
                image_embeds: tuple[torch.Tensor, torch.Tensor] | None = None):
        """As Gemma3ForCausalLM.forward; ``image_embeds`` = (rows [R] int64, embeddings
        [R, hidden]) replaces those rows' embeddings, after the text's scaling."""
        if image_embeds is None:
            return self.language_model(input_ids, positions, kv_caches, meta, intermediate)
        rows, embeds = image_embeds
        model = self.language_model.model
        if self.image_token_id >= self.config.text_config.vocab_size:
            # A placeholder id past the vocabulary (transformers maps it to 0 too): its row
            # is replaced below anyway.
            input_ids = input_ids.masked_fill(input_ids == self.image_token_id, 0)
        hidden = model.embed_tokens(input_ids)   # [T, hidden]
        hidden = hidden * torch.tensor(model.embed_scale, dtype=hidden.dtype)
        hidden = hidden.index_copy(0, rows, embeds.to(hidden.dtype))
        # Embeddings enter the layers as a first stage's hand-over: (hidden, no residual yet).
        return model(input_ids, positions, kv_caches, meta, intermediate=(hidden, None))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)
