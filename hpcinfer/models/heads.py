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


def classifier_token_ids(config: Any) -> tuple[list[int], bool] | None:
    """vLLM's ``classifier_from_token`` (set through hf_overrides): a causal LM used as a
    classifier whose score head is made from LM-head rows of these tokens. Returns (their ids
    in the checkpoint's tokenizer, whether it is the two-way softmax form) or None.

    Two-way (``is_original_qwen3_reranker`` or ``method: "from_2_way_softmax"``; Qwen3-Reranker,
    mxbai-rerank-v2): tokens [false, true] give one label, weight row(true) - row(false), so
    its sigmoid is the softmax probability of the true token over the two. Otherwise
    (``no_post_processing``) one label per token, the rows as they are."""
    tokens = getattr(config, "classifier_from_token", None)
    if not tokens:
        return None
    two_way = bool(getattr(config, "is_original_qwen3_reranker", False)
                   or getattr(config, "method", None) == "from_2_way_softmax")
    if not isinstance(tokens, (list, tuple)) or not all(isinstance(t, str) for t in tokens):
        raise ValueError(f"classifier_from_token={tokens!r}: give a list of token strings, "
                         'e.g. ["no", "yes"]')
    if two_way and len(tokens) != 2:
        raise ValueError(f"classifier_from_token={tokens!r}: the two-way form "
                         "(is_original_qwen3_reranker) takes two tokens, [false, true]")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(config._name_or_path)
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        raise ValueError(f"classifier_from_token: {missing} are not tokens of the tokenizer in "
                         f"{config._name_or_path} (one vocabulary entry each, e.g. \"yes\")")
    return [vocab[t] for t in tokens], two_way


def sequence_classifier(base: type) -> type:
    """``<Family>ForSequenceClassification``: ``score(hidden of the last token)``, no bias.
    With ``classifier_from_token`` in the config the checkpoint is the family's causal LM and
    the score head is made from its LM head's rows after loading (classifier_token_ids)."""

    class ForSequenceClassification(_DecoderPoolingMixin, base):
        default_task = "classify"

        def __init__(self, config: Any, *, attention_backend: AttentionBackend,
                     tp: TensorParallel = NO_TP):
            base.__init__(self, config, attention_backend=attention_backend, tp=tp)
            self.from_tokens = classifier_token_ids(config)
            if self.from_tokens is None:
                _drop_lm_head(self)
                self.num_labels = config.num_labels
                self.score = ReplicatedLinear(config.hidden_size, config.num_labels, False)
            else:   # the LM head loads as usual; after_loading turns it into the score head
                ids, two_way = self.from_tokens
                self.num_labels = 1 if two_way else len(ids)

        def tie_weights(self) -> None:
            # (also called by the base constructor, before from_tokens is set: nothing yet)
            if getattr(self, "from_tokens", None) is not None:
                base.tie_weights(self)   # a tied checkpoint's LM head is its embedding

        def after_loading(self) -> None:
            if self.from_tokens is None:
                return
            ids, two_way = self.from_tokens
            rows = self.lm_head.weight[ids].float()
            weight = (rows[1] - rows[0])[None] if two_way else rows
            score = ReplicatedLinear(self.config.hidden_size, self.num_labels, False)
            self.score = score.to(device=rows.device, dtype=self.lm_head.weight.dtype)
            self.score.weight.copy_(weight)
            _drop_lm_head(self)
            self.from_tokens = None

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
