"""Llama (incl. Llama-3 rope scaling) and Mistral; the base the Qwen and Gemma files extend.

Parameter names follow transformers (``model.layers.N.self_attn.o_proj.weight`` ...), except
the merged projections: ``qkv_proj`` stacks HF's q/k/v_proj and ``gate_up_proj`` stacks
gate/up_proj; ``packed_modules_mapping`` tells the loader how.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hpcinfer.layers.activation import get_gated_activation
from hpcinfer.layers.attention import Attention, AttentionBackend, AttentionMetadata, KVCache
from hpcinfer.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from hpcinfer.layers.linear import (NO_TP, MergedColumnParallelLinear, QKVParallelLinear,
                                    RowParallelLinear, TensorParallel)
from hpcinfer.layers.norm import RMSNorm
from hpcinfer.layers.rotary import RotaryEmbedding, get_rope, max_position_of
from hpcinfer.models.spec import head_dim_of


class LlamaMLP(nn.Module):
    def __init__(self, config: Any, tp: TensorParallel,
                 gate_up_cls: type[MergedColumnParallelLinear] = MergedColumnParallelLinear):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        size = config.intermediate_size
        self.gate_up_proj = gate_up_cls(config.hidden_size, [size, size], bias, tp)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias, tp)
        # Gemma configs of transformers 4.x carry the real choice in `hidden_activation`.
        act = getattr(config, "hidden_activation", None) or config.hidden_act
        self.act_fn = get_gated_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, rotary_emb: RotaryEmbedding, backend: AttentionBackend,
                 tp: TensorParallel, *, qkv_bias: bool, o_bias: bool, has_qk_norm: bool,
                 sliding_window: int | None, norm_offset: float, scale: float | None = None,
                 logit_softcap: float | None = None,
                 qkv_cls: type[QKVParallelLinear] = QKVParallelLinear):
        super().__init__()
        head_dim = head_dim_of(config)
        self.qkv_proj = qkv_cls(config.hidden_size, head_dim, config.num_attention_heads,
                                config.num_key_value_heads, qkv_bias, tp)
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim,
                                        config.hidden_size, o_bias, tp)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = head_dim
        if has_qk_norm:  # Qwen3: RMSNorm over each head's channels, before rope
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps, weight_offset=norm_offset)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps, weight_offset=norm_offset)
        self.has_qk_norm = has_qk_norm
        # Shared by the layers of one rope type: one cos/sin cache per rope, not per layer.
        self.rotary_emb = rotary_emb
        causal = not getattr(config, "use_bidirectional_attention", False)
        self.attn = Attention(self.num_heads, self.num_kv_heads, head_dim,
                              head_dim ** -0.5 if scale is None else scale, backend=backend,
                              sliding_window=sliding_window, causal=causal,
                              logit_softcap=logit_softcap)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        # hidden: [T, hidden_size] -> q [T, H, D], k/v [T, KVH, D]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(hidden).split([q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.has_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k, meta)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, self_attn: LlamaAttention, mlp: nn.Module, config: Any,
                 norm_offset: float):
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, weight_offset=norm_offset)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, weight_offset=norm_offset)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None, kv_cache: KVCache, meta: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual stream is carried separately so each norm fuses the add before it.
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    pp_num_intermediates = 2  # a pipeline stage hands on (hidden, residual)

    def __init__(self, config: Any, layers: list[LlamaDecoderLayer], tp: TensorParallel,
                 norm_offset: float, embed_scale: float | None):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, weight_offset=norm_offset)
        self.embed_scale = embed_scale
        # Pipeline parallelism runs layers [start_layer, end_layer) (hpcinfer.distributed.pipeline)
        self.start_layer, self.end_layer = 0, len(layers)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], meta: AttentionMetadata,
                intermediate: tuple[torch.Tensor, ...] | None = None):
        if intermediate is None:
            hidden = self.embed_tokens(input_ids)  # [T, hidden_size]
            if self.embed_scale is not None:
                # Gemma: the scale is rounded to the model dtype first, as transformers does.
                hidden = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)
            residual = None
        else:  # a later pipeline stage: the previous stage's (hidden, residual), [T, hidden]
            hidden, residual = intermediate
        for layer, kv_cache in zip(self.layers[self.start_layer:self.end_layer], kv_caches,
                                   strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta)
        if self.end_layer < len(self.layers):  # not the last stage: hand both on
            return hidden, residual
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """Llama 1/2/3. Subclasses change the class attributes and ``sliding_window_for``."""

    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }
    qkv_bias = False        # Qwen2: True
    has_qk_norm = False     # Qwen3: True
    norm_offset = 0.0       # Gemma: 1.0, i.e. x * (1 + w)
    scales_embeddings = False  # Gemma: embeddings times sqrt(hidden_size)
    decoder_layer_cls: type[nn.Module] = LlamaDecoderLayer  # Gemma 2/3: four norms per layer
    # Phi-3: layers whose loaders also split the checkpoint's fused qkv/gate_up tensors.
    qkv_cls: type[QKVParallelLinear] = QKVParallelLinear
    gate_up_cls: type[MergedColumnParallelLinear] = MergedColumnParallelLinear

    def __init__(self, config: Any, *, attention_backend: AttentionBackend,
                 tp: TensorParallel = NO_TP):
        super().__init__()
        self.config = config
        ropes: dict[str | None, RotaryEmbedding] = {}
        layers = []
        for i in range(config.num_hidden_layers):
            kind = self.rope_layer_type(config, i)
            if kind not in ropes:
                ropes[kind] = get_rope(config, head_dim_of(config), max_position_of(config),
                                       layer_type=kind)
            layers.append(self._make_layer(config, i, ropes[kind], attention_backend, tp))
        embed_scale = config.hidden_size ** 0.5 if self.scales_embeddings else None
        self.model = LlamaModel(config, layers, tp, self.norm_offset, embed_scale)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the config says so. Call again after
        ``to_empty``/``to``: moving off the meta device gives each module its own tensor."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _make_layer(self, config: Any, layer_idx: int, rotary_emb: RotaryEmbedding,
                    backend: AttentionBackend, tp: TensorParallel) -> LlamaDecoderLayer:
        attention_bias = getattr(config, "attention_bias", False)
        self_attn = LlamaAttention(
            config, rotary_emb, backend, tp, qkv_bias=self.qkv_bias or attention_bias,
            o_bias=attention_bias, has_qk_norm=self.has_qk_norm,
            sliding_window=self.sliding_window_for(config, layer_idx),
            norm_offset=self.norm_offset, scale=self.attention_scale(config),
            logit_softcap=self.attention_logit_softcap(config), qkv_cls=self.qkv_cls)
        return self.decoder_layer_cls(self_attn, self.make_mlp(config, layer_idx, tp), config,
                                      self.norm_offset)

    def make_mlp(self, config: Any, layer_idx: int, tp: TensorParallel) -> nn.Module:
        """The feed-forward block of one layer (MoE families: a SparseMoE on sparse layers)."""
        return LlamaMLP(config, tp, self.gate_up_cls)

    @staticmethod
    def sliding_window_for(config: Any, layer_idx: int) -> int | None:
        """The attention window of one layer (None = full attention)."""
        return None

    @staticmethod
    def rope_layer_type(config: Any, layer_idx: int) -> str | None:
        """Which of the config's ropes a layer uses (None: the one rope of the config)."""
        return None

    @staticmethod
    def attention_scale(config: Any) -> float | None:
        """q.k scale (None: head_dim ** -0.5)."""
        return None

    @staticmethod
    def attention_logit_softcap(config: Any) -> float | None:
        """Attention logits become cap * tanh(logits / cap) (None: no capping)."""
        return None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], meta: AttentionMetadata,
                intermediate: tuple[torch.Tensor, ...] | None = None):
        """input_ids, positions: [T] int64 -> hidden [T, hidden_size] (a pipeline stage before
        the last returns its (hidden, residual) instead, and a later one takes them)."""
        return self.model(input_ids, positions, kv_caches, meta, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden_size] -> logits [N, vocab_size] float32."""
        return self.lm_head.compute_logits(hidden)


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral is Llama with a sliding window on every layer (``config.sliding_window``)."""

    @staticmethod
    def sliding_window_for(config: Any, layer_idx: int) -> int | None:
        return getattr(config, "sliding_window", None)
