"""Torch references for every kernel: the CPU attention backend and the oracle for Triton.

The contract these functions fix (the Triton launchers take the same arguments):

* KV cache, per layer: ``k_cache`` and ``v_cache`` are ``[num_blocks, block_size,
  num_kv_heads, head_dim]``. Token ``t`` of a sequence lives in block
  ``block_table[t // block_size]`` at offset ``t % block_size``; its *slot* is
  ``block * block_size + offset``.
* A step's batch is flattened: ``num_tokens`` query tokens from ``num_seqs`` sequences,
  sequence ``i`` owning rows ``cu_seqlens_q[i]:cu_seqlens_q[i + 1]``. ``seq_lens[i]`` is the
  sequence's length *after* this step's tokens, so its queries sit at absolute positions
  ``seq_lens[i] - q_len_i … seq_lens[i] - 1`` (queries start mid-sequence after a prefix-cache
  hit or an earlier prefill chunk). Decode is the case ``q_len_i == 1``.
* Keys and values of this step are written to the cache (``reshape_and_cache``) *before*
  attention runs, so attention reads every key, old and new, from the cache.

Everything is plain torch and runs on any device; it is written for clarity, not speed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write this step's keys and values into the paged cache, in place.

    key, value: [num_tokens, num_kv_heads, head_dim]; slot_mapping: [num_tokens] (int),
    a negative slot means "padding, do not write" (CUDA-graph batches are padded).
    """
    num_blocks, block_size = k_cache.shape[:2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(num_blocks * block_size, *k_cache.shape[2:])[slots] = key[keep].to(k_cache.dtype)
    v_cache.view(num_blocks * block_size, *v_cache.shape[2:])[slots] = value[keep].to(v_cache.dtype)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first ``seq_len`` tokens of one sequence: [seq_len, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]  # [n, block_size, kv_heads, head_dim]
    return blocks.reshape(-1, *cache.shape[2:])[:seq_len]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                    block_tables: torch.Tensor, scale: float, *, causal: bool = True,
                    sliding_window: int | None = None, logit_softcap: float | None = None,
                    sinks: torch.Tensor | None = None, out: torch.Tensor | None = None,
                    last_key_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Varlen attention over paged KV (prefill chunks and decodes mixed in one batch).

    q: [num_tokens, num_heads, head_dim]; cu_seqlens_q: [num_seqs + 1]; seq_lens: [num_seqs];
    block_tables: [num_seqs, max_blocks_per_seq]. num_heads must be a multiple of
    num_kv_heads (GQA). ``sliding_window`` keeps only the last ``sliding_window`` keys of each
    query (Mistral semantics: key position > query position - window). ``logit_softcap`` and
    ``sinks`` ([num_heads]) are described in :func:`attend`. ``last_key_positions``
    ([num_tokens], causal only): the last key position each query may see instead of its own
    (Gemma 3's image tokens see their whole placeholder span); the window still counts back
    from the query's own position. Returns [num_tokens, num_heads, head_dim] in q's dtype;
    the math runs in fp32.
    """
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if last_key_positions is not None and not causal:
        raise ValueError("last_key_positions widens a causal mask: pass causal=True")
    out = torch.empty_like(q) if out is None else out
    starts, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        q_start, q_end = starts[i], starts[i + 1]
        if q_end == q_start:
            continue
        k = gather_kv(k_cache, block_tables[i], seq_len)
        v = gather_kv(v_cache, block_tables[i], seq_len)
        limits = None if last_key_positions is None else last_key_positions[q_start:q_end]
        mask = attention_mask(q_end - q_start, seq_len, causal, sliding_window, q.device, limits)
        o = attend(q[q_start:q_end], k, v, mask, scale, logit_softcap=logit_softcap,
                   sinks=sinks)
        out[q_start:q_end] = o.to(out.dtype)
    return out


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           *, sliding_window: int | None = None,
                           logit_softcap: float | None = None, sinks: torch.Tensor | None = None,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode: one query per sequence, at position seq_lens[i] - 1. q: [num_seqs, heads, dim]."""
    cu_seqlens_q = torch.arange(q.shape[0] + 1, device=q.device, dtype=torch.int32)
    return paged_attention(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale,
                           sliding_window=sliding_window, logit_softcap=logit_softcap,
                           sinks=sinks, out=out)


def attention_mask(q_len: int, kv_len: int, causal: bool, sliding_window: int | None,
                   device: torch.device, last_key_positions: torch.Tensor | None = None
                   ) -> torch.Tensor | None:
    """[q_len, kv_len] bool, True = may attend; None = everything. Query j sits at absolute
    position kv_len - q_len + j and, causal, sees keys up to its position, or up to
    ``last_key_positions[j]`` when given."""
    if not causal and sliding_window is None:
        return None
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    last = q_pos if last_key_positions is None else last_key_positions.to(device)[:, None]
    mask = k_pos <= last if causal else torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           scale: float, *, logit_softcap: float | None = None,
           sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Dense attention of one sequence, in fp32 (the formula every backend must match).

    q: [q_len, heads, dim]; k, v: [kv_len, kv_heads, dim]; mask: [q_len, kv_len] bool
    (True = may attend) or None -> [q_len, heads, dim] fp32. Logits are ``q.k * scale``;
    ``logit_softcap`` then caps them as Gemma 2 does (``cap * tanh(logits / cap)``, before
    masking); ``sinks`` ([heads], gpt-oss) adds one learned logit per head to the softmax
    denominator that carries no value, so a row's weights sum to less than one (a row that
    sees no key gives zeros instead of NaN).
    """
    group = q.shape[1] // k.shape[1]
    qh = q.float().transpose(0, 1)                                   # [heads, q_len, dim]
    kh = k.float().transpose(0, 1).repeat_interleave(group, dim=0)   # [heads, kv_len, dim]
    vh = v.float().transpose(0, 1).repeat_interleave(group, dim=0)
    if logit_softcap is None and sinks is None:
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
        return o.transpose(0, 1)
    logits = (qh @ kh.transpose(1, 2)) * scale                       # [heads, q_len, kv_len]
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        # transformers' GptOss eager_attention_forward: the sink is one more column of the
        # softmax, dropped afterwards.
        sink_col = sinks.float()[:, None, None].expand(-1, logits.shape[1], 1)
        logits = torch.cat([logits, sink_col], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        probs = torch.softmax(logits, dim=-1)[..., :-1]
    else:
        probs = torch.softmax(logits, dim=-1)
    return (probs @ vh).transpose(0, 1)


# --- elementwise and normalisation ops (fused on the GPU, plain here) ---

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None, *, weight_offset: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm, optionally fused with the residual add that precedes it.

    With ``residual``: ``x = x + residual`` first, and the sum is returned as the new residual.
    ``weight_offset=1.0`` gives Gemma's ``(1 + w)`` scaling. Math in fp32, as transformers does;
    Llama-style rounding (normalise in fp32, cast to x's dtype, then scale) when offset is 0,
    Gemma-style (scale in fp32, then cast) otherwise.
    """
    if residual is not None:
        x = x + residual
        residual = x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight_offset:
        out = (h * (weight_offset + weight.float())).to(x.dtype)
    else:
        out = weight * h.to(x.dtype)
    return out, residual


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding (rotate halves), as Llama/Qwen/Mistral/Gemma use it.

    positions: [num_tokens]; q: [num_tokens, num_heads, head_dim]; k: [num_tokens,
    num_kv_heads, head_dim]; cos_sin_cache: [max_position, rotary_dim] holding cos in the first
    half of the last dim and sin in the second. Only the first rotary_dim channels rotate.
    Returns new tensors (the Triton kernel writes in place).
    """
    cos, sin = cos_sin_cache[positions.long()].float().chunk(2, dim=-1)  # [T, rotary_dim/2]
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot_dim = cos.shape[-1] * 2
    x_rot, x_pass = x[..., :rot_dim].float(), x[..., rot_dim:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    return torch.cat((rotated, x_pass), dim=-1)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU: x = [gate | up] along the last dim -> silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """GeGLU as Gemma uses it: x = [gate | up] -> gelu(gate, tanh approximation) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up
