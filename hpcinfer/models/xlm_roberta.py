"""XLM-RoBERTa (and RoBERTa): BERT with positions starting at ``pad_token_id + 1`` and a
two-layer classification head on the first token (``<s>``).

Inputs here are never padded (the pooling engine packs whole sequences), so transformers'
``create_position_ids_from_input_ids`` reduces to ``padding_idx + 1 + position``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hpcinfer.layers.linear import ReplicatedLinear
from hpcinfer.models.bert import BertForSequenceClassification, BertModel


class XLMRobertaModel(BertModel):
    """The encoder as an embedding model (``XLMRobertaModel``, ``RobertaModel``)."""

    def __init__(self, config: Any, **kwargs):
        super().__init__(config, **kwargs)
        self.position_offset = config.pad_token_id + 1


class RobertaClassificationHead(nn.Module):
    """out_proj(tanh(dense(hidden of <s>))), transformers' ``RobertaClassificationHead``."""

    def __init__(self, config: Any):
        super().__init__()
        self.dense = ReplicatedLinear(config.hidden_size, config.hidden_size, True)
        self.out_proj = ReplicatedLinear(config.hidden_size, config.num_labels, True)

    def forward(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(cls_hidden)))


class XLMRobertaForSequenceClassification(BertForSequenceClassification):
    """Cross-encoders such as BAAI/bge-reranker-v2-m3 (``num_labels = 1``)."""

    body_class = XLMRobertaModel
    body_prefix = "roberta"

    def _make_head(self, config: Any) -> None:
        self.classifier = RobertaClassificationHead(config)

    def compute_scores(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled: [N, hidden] (the <s> rows) -> logits [N, num_labels] float32."""
        return self.classifier(pooled).float()
