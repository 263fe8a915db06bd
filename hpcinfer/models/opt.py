"""OPT: learned positions (offset 2), LayerNorm, ReLU MLP, optional project_in/out, pre- or
post-norm (``do_layer_norm_before``), q scaled before the attention product."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hpcinfer.layers.activation import PlainActivation
from hpcinfer.layers.attention import Attention, AttentionBackend, AttentionMetadata, KVCache
from hpcinfer.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from hpcinfer.layers.linear import (NO_TP, ColumnParallelLinear, QKVParallelLinear,
                                    ReplicatedLinear, RowParallelLinear, TensorParallel)
from hpcinfer.layers.norm import LayerNorm

# OPT's learned position table is offset by 2 (a fairseq leftover: rows 0 and 1 are unused).
POSITION_OFFSET = 2


class OPTLearnedPositionalEmbedding(nn.Module):
    """``[max_position_embeddings + 2, hidden]`` table looked up at ``position + 2``."""

    def __init__(self, max_positions: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_positions + POSITION_OFFSET, hidden_size),
                                   requires_grad=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(positions + POSITION_OFFSET, self.weight)


class OPTAttention(nn.Module):
    def __init__(self, config: Any, backend: AttentionBackend, tp: TensorParallel):
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.head_dim = hidden // heads
        bias = config.enable_bias
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, heads, heads, bias, tp)
        self.out_proj = RowParallelLinear(hidden, hidden, bias, tp)
        self.num_heads = self.qkv_proj.num_heads
        # transformers multiplies q by the scale before q @ k^T and then attends with scale 1;
        # same order here so fp32 results agree to the last bits.
        self.scaling = self.head_dim ** -0.5
        self.attn = Attention(self.num_heads, self.num_heads, self.head_dim, 1.0, backend=backend)

    def forward(self, hidden: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
                ) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).chunk(3, dim=-1)
        shape = (-1, self.num_heads, self.head_dim)
        q = (q * self.scaling).reshape(shape)
        return self.out_proj(self.attn(q, k.reshape(shape), v.reshape(shape), kv_cache, meta))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: Any, backend: AttentionBackend, tp: TensorParallel):
        super().__init__()
        hidden, affine = config.hidden_size, config.layer_norm_elementwise_affine
        self.do_layer_norm_before = config.do_layer_norm_before
        self.self_attn = OPTAttention(config, backend, tp)
        self.self_attn_layer_norm = LayerNorm(hidden, elementwise_affine=affine)
        self.fc1 = ColumnParallelLinear(hidden, config.ffn_dim, config.enable_bias, tp)
        self.activation_fn = PlainActivation(config.activation_function)
        self.fc2 = RowParallelLinear(config.ffn_dim, hidden, config.enable_bias, tp)
        self.final_layer_norm = LayerNorm(hidden, elementwise_affine=affine)

    def forward(self, hidden: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
                ) -> torch.Tensor:
        # hidden: [T, hidden_size]. 125m..175B norm before each block; 350m after.
        residual = hidden
        if self.do_layer_norm_before:
            hidden = self.self_attn_layer_norm(hidden)
        hidden = residual + self.self_attn(hidden, kv_cache, meta)
        if not self.do_layer_norm_before:
            hidden = self.self_attn_layer_norm(hidden)
        residual = hidden
        if self.do_layer_norm_before:
            hidden = self.final_layer_norm(hidden)
        hidden = residual + self.fc2(self.activation_fn(self.fc1(hidden)))
        if not self.do_layer_norm_before:
            hidden = self.final_layer_norm(hidden)
        return hidden


class OPTDecoder(nn.Module):
    pp_num_intermediates = 1  # a pipeline stage hands on (hidden,)

    def __init__(self, config: Any, backend: AttentionBackend, tp: TensorParallel):
        super().__init__()
        hidden, word_dim = config.hidden_size, config.word_embed_proj_dim
        affine = config.layer_norm_elementwise_affine
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, word_dim, tp)
        self.embed_positions = OPTLearnedPositionalEmbedding(config.max_position_embeddings,
                                                             hidden)
        # Smaller word embeddings than the hidden size (opt-350m) are projected in and out.
        self.project_in = ReplicatedLinear(word_dim, hidden, False) if word_dim != hidden else None
        self.project_out = ReplicatedLinear(hidden, word_dim, False) if word_dim != hidden else None
        has_final_norm = (config.do_layer_norm_before
                          and not getattr(config, "_remove_final_layer_norm", False))
        self.final_layer_norm = (LayerNorm(hidden, elementwise_affine=affine)
                                 if has_final_norm else None)
        self.layers = nn.ModuleList(OPTDecoderLayer(config, backend, tp)
                                    for _ in range(config.num_hidden_layers))
        # Pipeline parallelism runs layers [start_layer, end_layer) (hpcinfer.distributed.pipeline)
        self.start_layer, self.end_layer = 0, config.num_hidden_layers

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], meta: AttentionMetadata,
                intermediate: tuple[torch.Tensor, ...] | None = None):
        if intermediate is None:
            hidden = self.embed_tokens(input_ids)
            if self.project_in is not None:
                hidden = self.project_in(hidden)
            hidden = hidden + self.embed_positions(positions)
        else:  # a later pipeline stage: the previous stage's (hidden,), [T, hidden_size]
            (hidden,) = intermediate
        for layer, kv_cache in zip(self.layers[self.start_layer:self.end_layer], kv_caches,
                                   strict=True):
            hidden = layer(hidden, kv_cache, meta)
        if self.end_layer < len(self.layers):  # not the last stage
            return (hidden,)
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden


class OPTModel(nn.Module):
    def __init__(self, config: Any, backend: AttentionBackend, tp: TensorParallel):
        super().__init__()
        self.decoder = OPTDecoder(config, backend, tp)


class OPTForCausalLM(nn.Module):
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
    }

    def __init__(self, config: Any, *, attention_backend: AttentionBackend,
                 tp: TensorParallel = NO_TP):
        super().__init__()
        self.config = config
        self.model = OPTModel(config, attention_backend, tp)
        self.lm_head = ParallelLMHead(config.vocab_size, config.word_embed_proj_dim, tp)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the LM head (see LlamaForCausalLM.tie_weights)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    @staticmethod
    def checkpoint_name(name: str) -> str:
        # The original facebook/opt-* files were saved from OPTModel: "decoder.…" without
        # the "model." prefix.
        return "model." + name if name.startswith("decoder.") else name

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], meta: AttentionMetadata,
                intermediate: tuple[torch.Tensor, ...] | None = None):
        """input_ids, positions: [T] int64 -> hidden [T, word_embed_proj_dim] (pipeline
        stages before the last return (hidden,) instead, and a later one takes it)."""
        return self.model.decoder(input_ids, positions, kv_caches, meta, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, word_embed_proj_dim] -> logits [N, vocab_size] float32."""
        return self.lm_head.compute_logits(hidden)
