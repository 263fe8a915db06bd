"""Pooling heads on the decoder families: ``*ForSequenceClassification`` (a ``score`` linear
on the last token) and the bare ``*Model`` bodies as last-token embedding models (e5-mistral
style).

Both reuse the family's CausalLM class unchanged and only swap its LM head, so every family
feature (rope scaling, qk-norm, sliding windows, Gemma's scaled embeddings) carries over.
Attention stays causal: these models were trained that way.
"""
from __future__ import annotations

from typing import Any

import torch

from hpcinfer.layers.attention import AttentionBackend
from hpcinfer.layers.linear import NO_TP, ReplicatedLinear, TensorParallel
from hpcinfer.models.gemma import GemmaForCausalLM
from hpcinfer.models.llama import LlamaForCausalLM, MistralForCausalLM
from hpcinfer.models.qwen2 import Qwen2ForCausalLM
from hpcinfer.models.qwen3 import Qwen3ForCausalLM


def _drop_lm_head(model) -> None:
    # The CausalLM constructor built (and maybe tied) an LM head we never use.
    del model.lm_head


class _DecoderPoolingMixin:
    is_encoder = False
    default_pooling_type = "LAST"
    classifier_pooling_type = "LAST"

    def tie_weights(self) -> None:
        pass

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{type(self).__name__} is a pooling model and cannot generate: use "
                         "LLM.embed/classify/score/reward (task='embed' or 'classify')")


def sequence_classifier(base: type) -> type:
    """``<Family>ForSequenceClassification``: ``score(hidden of the last token)``, no bias."""

    class ForSequenceClassification(_DecoderPoolingMixin, base):
        default_task = "classify"

        def __init__(self, config: Any, *, attention_backend: AttentionBackend,
                     tp: TensorParallel = NO_TP):
            base.__init__(self, config, attention_backend=attention_backend, tp=tp)
            _drop_lm_head(self)
            self.score = ReplicatedLinear(config.hidden_size, config.num_labels, False)

        def compute_scores(self, pooled: torch.Tensor) -> torch.Tensor:
            """pooled: [N, hidden] -> logits [N, num_labels] float32."""
            return self.score(pooled).float()

    name = base.__name__.replace("ForCausalLM", "ForSequenceClassification")
    ForSequenceClassification.__name__ = ForSequenceClassification.__qualname__ = name
    return ForSequenceClassification


def embedding_body(base: type) -> type:
    """``<Family>Model``: the decoder body alone; its checkpoint has no ``model.`` prefix."""

    class Model(_DecoderPoolingMixin, base):
        default_task = "embed"

        def __init__(self, config: Any, *, attention_backend: AttentionBackend,
                     tp: TensorParallel = NO_TP):
            base.__init__(self, config, attention_backend=attention_backend, tp=tp)
            _drop_lm_head(self)

        def checkpoint_name(self, name: str) -> str:
            return name if name.startswith("model.") else f"model.{name}"

    name = base.__name__.replace("ForCausalLM", "Model")
    Model.__name__ = Model.__qualname__ = name
    return Model


LlamaForSequenceClassification = sequence_classifier(LlamaForCausalLM)
MistralForSequenceClassification = sequence_classifier(MistralForCausalLM)
Qwen2ForSequenceClassification = sequence_classifier(Qwen2ForCausalLM)
Qwen3ForSequenceClassification = sequence_classifier(Qwen3ForCausalLM)
GemmaForSequenceClassification = sequence_classifier(GemmaForCausalLM)

LlamaModel = embedding_body(LlamaForCausalLM)
MistralModel = embedding_body(MistralForCausalLM)
Qwen2Model = embedding_body(Qwen2ForCausalLM)
Qwen3Model = embedding_body(Qwen3ForCausalLM)
GemmaModel = embedding_body(GemmaForCausalLM)

# architecture name -> class, for the registry
POOLING_ARCHITECTURES = {cls.__name__: cls for cls in (
    LlamaForSequenceClassification, MistralForSequenceClassification,
    Qwen2ForSequenceClassification, Qwen3ForSequenceClassification,
    GemmaForSequenceClassification, LlamaModel, MistralModel, Qwen2Model, Qwen3Model,
    GemmaModel)}
