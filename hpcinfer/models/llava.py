"""LLaVA (``LlavaForConditionalGeneration``): a CLIP vision tower, a two-layer projector and a
Llama or Mistral language model. Image embeddings replace the placeholder tokens'
embeddings (hpcinfer/multimodal: the engine plans which batch rows they fill).

The image features are the tower's hidden states ``vision_feature_layer`` (an index into
transformers' ``hidden_states`` tuple, or a list of them concatenated on channels), without
their first token when ``vision_feature_select_strategy`` is "default" (CLIP's CLS; on a
SigLIP tower, which has none, the first patch, as transformers does), then projected.

Checkpoint names: llava-hf checkpoints write ``language_model.model.*``,
``language_model.lm_head.weight``, ``vision_tower.vision_model.*`` and
``multi_modal_projector.*``; transformers 5 saves ``vision_tower.*`` and may write
``model.language_model.*`` / ``model.vision_tower.*`` / ``lm_head.weight``:
``checkpoint_name`` maps them all onto ours.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hpcinfer.layers.activation import PlainActivation
from hpcinfer.layers.attention import AttentionBackend, AttentionMetadata, KVCache
from hpcinfer.layers.linear import NO_TP, ReplicatedLinear, TensorParallel
from hpcinfer.models.clip import CLIPVisionModel
from hpcinfer.models.llama import LlamaForCausalLM, MistralForCausalLM
from hpcinfer.models.loader import rename_prefix
from hpcinfer.models.siglip import SiglipVisionModel

_TEXT_MODELS = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM}
_VISION_TOWERS = {"clip_vision_model": CLIPVisionModel, "siglip_vision_model": SiglipVisionModel}
# (checkpoint prefix, ours), first match wins
_RENAMES = (("model.language_model.", "language_model.model."),
            ("model.vision_tower.vision_model.", "vision_tower."),
            ("model.vision_tower.", "vision_tower."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
            ("vision_tower.vision_model.", "vision_tower."),
            ("lm_head.", "language_model.lm_head."))


class LlavaMultiModalProjector(nn.Module):
    def __init__(self, config: Any, in_features: int):
        super().__init__()
        text_hidden, bias = config.text_config.hidden_size, config.multimodal_projector_bias
        self.linear_1 = ReplicatedLinear(in_features, text_hidden, bias)
        self.act = PlainActivation(config.projector_hidden_act)
        self.linear_2 = ReplicatedLinear(text_hidden, text_hidden, bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class LlavaForConditionalGeneration(nn.Module):
    """The multimodal model protocol (hpcinfer/multimodal/__init__.py): ``takes_images``,
    ``image_token_id``, ``image_token_counts``, ``encode_images`` and ``forward(...,
    image_embeds=)``."""

    takes_images = True
    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping

    def __init__(self, config: Any, *, attention_backend: AttentionBackend,
                 tp: TensorParallel = NO_TP):
        super().__init__()
        if tp.size > 1:
            raise ValueError("LLaVA runs on one GPU for now (images with tensor parallelism "
                             "are not built yet, docs/vision.md): set tensor_parallel_size=1")
        text_type, vision_type = config.text_config.model_type, config.vision_config.model_type
        if text_type not in _TEXT_MODELS or vision_type not in _VISION_TOWERS:
            raise ValueError(f"LLaVA with a {vision_type} tower and a {text_type} language "
                             f"model is not supported: towers {sorted(_VISION_TOWERS)}, "
                             f"language models {sorted(_TEXT_MODELS)}")
        self.config = config
        self.language_model = _TEXT_MODELS[text_type](config.text_config,
                                                      attention_backend=attention_backend, tp=tp)
        self.vision_tower = _VISION_TOWERS[vision_type](config.vision_config)
        layer = config.vision_feature_layer
        self.feature_layers = [layer] if isinstance(layer, int) else list(layer)
        self.drops_cls = config.vision_feature_select_strategy == "default"  # first token
        self.multi_modal_projector = LlavaMultiModalProjector(
            config, config.vision_config.hidden_size * len(self.feature_layers))
        self.image_token_id = config.image_token_index
        # Tensors we never use: SigLIP's pooling head; the LM head when it is the embedding.
        self.unused_checkpoint_suffixes = self.vision_tower.unused_checkpoint_suffixes + (
            ("lm_head.weight",) if config.text_config.tie_word_embeddings else ())

    def tie_weights(self) -> None:
        self.language_model.tie_weights()

    @staticmethod
    def checkpoint_name(name: str) -> str:
        return rename_prefix(name, _RENAMES)

    # --- images ---
    @property
    def pixel_dtype(self) -> torch.dtype:
        return self.vision_tower.embeddings.patch_embedding.weight.dtype  # its first op casts

    def image_token_counts(self, image_inputs: list[dict[str, torch.Tensor]]) -> list[int]:
        """Placeholder tokens each image fills: the tower's tokens, less the first with
        "default"."""
        return [self.vision_tower.num_tokens - self.drops_cls] * len(image_inputs)

    def encode_images(self, image_inputs: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """One processor output per image ({"pixel_values": [1, C, H, W]}) -> one
        [num_tokens, text hidden] embedding per image; all images in one tower batch."""
        pixels = torch.cat([inputs["pixel_values"] for inputs in image_inputs])
        states = self.vision_tower.hidden_states(pixels, self.feature_layers)
        if self.drops_cls:
            states = [s[:, 1:] for s in states]
        features = self.multi_modal_projector(torch.cat(states, dim=-1))
        return list(features)

    # --- language model ---
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], meta: AttentionMetadata,
                intermediate: tuple[torch.Tensor, ...] | None = None,
                image_embeds: tuple[torch.Tensor, torch.Tensor] | None = None):
        """As LlamaForCausalLM.forward; ``image_embeds`` = (rows [R] int64, embeddings
        [R, hidden]) replaces the token embeddings of those rows."""
        if image_embeds is None:
            return self.language_model(input_ids, positions, kv_caches, meta, intermediate)
        rows, embeds = image_embeds
        hidden = self.language_model.model.embed_tokens(input_ids)  # [T, hidden]
        hidden = hidden.index_copy(0, rows, embeds.to(hidden.dtype))
        # Embeddings enter the layers as a first stage's hand-over: (hidden, no residual yet).
        return self.language_model.model(input_ids, positions, kv_caches, meta,
                                         intermediate=(hidden, None))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)
