"""BERT encoders (embedding models and ``BertForSequenceClassification`` cross-encoders).

Bidirectional attention over whole sequences, no KV cache (the pooling engine passes
``kv_caches=[None] * num_layers``), token-type ids and learned absolute positions. Parameter
names follow transformers (``embeddings.word_embeddings.weight``,
``encoder.layer.N.attention.self.query.weight`` ...); the classifier keeps its ``bert.``
prefix. XLM-RoBERTa (``xlm_roberta.py``) reuses everything here.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hpcinfer.layers.attention import Attention, AttentionBackend, AttentionMetadata, KVCache
from hpcinfer.layers.linear import NO_TP, ReplicatedLinear, TensorParallel


def _check_tp(tp: TensorParallel) -> None:
    if tp.size != 1:
        raise ValueError("encoder models (BERT, XLM-RoBERTa) run on one GPU: use "
                         "tensor_parallel_size=1 (they are small; run one replica per GPU)")


class _IgnoredTensors(nn.Module):
    """Takes checkpoint tensors we do not use (``position_ids`` buffers, the unused pooler of
    an embedding model): ``checkpoint_name`` maps them here and the loader's weight_loader
    call drops them. ``shard_ids = ()`` tells the loader that nothing here is required."""
    shard_ids: tuple = ()

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(0), requires_grad=False)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        pass


IGNORED = "ignored_tensors.weight"


class BertEmbeddings(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        hidden = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, hidden)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, hidden)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor | None) -> torch.Tensor:
        # input_ids, positions, token_type_ids: [T] -> [T, hidden]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        hidden = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
                  + self.position_embeddings(positions))
        return self.LayerNorm(hidden)


class BertSelfAttention(nn.Module):
    def __init__(self, config: Any, backend: AttentionBackend):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        hidden = config.hidden_size
        self.query = ReplicatedLinear(hidden, hidden, True)
        self.key = ReplicatedLinear(hidden, hidden, True)
        self.value = ReplicatedLinear(hidden, hidden, True)
        self.attn = Attention(self.num_heads, self.num_heads, self.head_dim,
                              self.head_dim ** -0.5, backend=backend, causal=False)

    def forward(self, hidden: torch.Tensor, kv_cache: KVCache | None,
                meta: AttentionMetadata) -> torch.Tensor:
        shape = (-1, self.num_heads, self.head_dim)
        q = self.query(hidden).reshape(shape)
        k = self.key(hidden).reshape(shape)
        v = self.value(hidden).reshape(shape)
        return self.attn(q, k, v, kv_cache, meta)  # [T, hidden]


class BertDenseNorm(nn.Module):
    """``dense`` then LayerNorm over (output + residual): BERT's ``*.output`` blocks."""

    def __init__(self, in_size: int, config: Any):
        super().__init__()
        self.dense = ReplicatedLinear(in_size, config.hidden_size, True)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: Any, backend: AttentionBackend):
        super().__init__()
        self.self = BertSelfAttention(config, backend)
        self.output = BertDenseNorm(config.hidden_size, config)

    def forward(self, hidden, kv_cache, meta):
        return self.output(self.self(hidden, kv_cache, meta), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.dense = ReplicatedLinear(config.hidden_size, config.intermediate_size, True)
        self.act = _activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


def _activation(name: str):
    acts = {"gelu": F.gelu, "relu": F.relu,
            "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
            "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
    if name not in acts:
        raise ValueError(f"hidden_act={name!r} is not supported for encoder models; supported: "
                         f"{sorted(acts)}")
    return acts[name]


class BertLayer(nn.Module):
    def __init__(self, config: Any, backend: AttentionBackend):
        super().__init__()
        self.attention = BertAttention(config, backend)
        self.intermediate = BertIntermediate(config)
        self.output = BertDenseNorm(config.intermediate_size, config)

    def forward(self, hidden, kv_cache, meta):
        hidden = self.attention(hidden, kv_cache, meta)
        return self.output(self.intermediate(hidden), hidden)


class BertEncoder(nn.Module):
    def __init__(self, config: Any, backend: AttentionBackend):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config, backend)
                                   for _ in range(config.num_hidden_layers))


class BertPooler(nn.Module):
    """tanh(dense(hidden of the first token)): what BertForSequenceClassification classifies."""

    def __init__(self, config: Any):
        super().__init__()
        self.dense = ReplicatedLinear(config.hidden_size, config.hidden_size, True)

    def forward(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(cls_hidden))


class BertModel(nn.Module):
    """The encoder as an embedding model (``architectures: ["BertModel"]``)."""

    default_task = "embed"
    default_pooling_type = "CLS"     # vLLM's default; sentence-transformers files override it
    classifier_pooling_type = "CLS"
    is_encoder = True
    prefix = ""                      # where the body's tensors live in the checkpoint
    position_offset = 0              # XLM-R: positions start at padding_idx + 1

    def __init__(self, config: Any, *, attention_backend: AttentionBackend,
                 tp: TensorParallel = NO_TP):
        super().__init__()
        _check_tp(tp)
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config, attention_backend)
        self.ignored_tensors = _IgnoredTensors()

    def tie_weights(self) -> None:
        pass

    def checkpoint_name(self, name: str) -> str:
        # Older sentence-transformers checkpoints keep the "bert."/"roberta." prefix.
        for prefix in ("bert.", "roberta."):
            if name.startswith(prefix):
                name = name[len(prefix):]
        if name.endswith("position_ids") or name.startswith("pooler."):
            return IGNORED  # a buffer we recompute; the pooler is unused for embeddings
        return name

    def encode_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor,
                      kv_caches: list[KVCache | None], meta: AttentionMetadata,
                      token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embeddings(input_ids, positions + self.position_offset, token_type_ids)
        for layer, kv_cache in zip(self.encoder.layer, kv_caches, strict=True):
            hidden = layer(hidden, kv_cache, meta)
        return hidden

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache | None], meta: AttentionMetadata,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions (0-based per sequence), token_type_ids: [T] -> [T, hidden]."""
        return self.encode_hidden(input_ids, positions, kv_caches, meta, token_type_ids)


class BertForSequenceClassification(nn.Module):
    """A cross-encoder / classifier: ``classifier(pooler(hidden of [CLS]))``."""

    default_task = "classify"
    default_pooling_type = "CLS"
    classifier_pooling_type = "CLS"
    is_encoder = True
    body_class = BertModel
    body_prefix = "bert"

    def __init__(self, config: Any, *, attention_backend: AttentionBackend,
                 tp: TensorParallel = NO_TP):
        super().__init__()
        self.config = config
        setattr(self, self.body_prefix,
                self.body_class(config, attention_backend=attention_backend, tp=tp))
        self._make_head(config)

    def _make_head(self, config: Any) -> None:
        self.bert.pooler = BertPooler(config)
        self.classifier = ReplicatedLinear(config.hidden_size, config.num_labels, True)

    @property
    def body(self) -> BertModel:
        return getattr(self, self.body_prefix)

    def tie_weights(self) -> None:
        pass

    def checkpoint_name(self, name: str) -> str:
        if name.endswith("position_ids"):
            return f"{self.body_prefix}.{IGNORED}"
        return name

    def forward(self, input_ids, positions, kv_caches, meta, token_type_ids=None):
        return self.body.encode_hidden(input_ids, positions, kv_caches, meta, token_type_ids)

    def compute_scores(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled: [N, hidden] (the [CLS] rows) -> logits [N, num_labels] float32."""
        return self.classifier(self.bert.pooler(pooled)).float()
