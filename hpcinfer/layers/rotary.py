"""Rotary position embedding (neox style): one cos/sin cache builder per rope type.

A model names its rope (``get_rope(config, head_dim, max_position, layer_type=...)``); it
never computes one. Each builder follows transformers' ``modeling_rope_utils`` (same float
order, so fp32 results are bit-identical) and fills one float32 ``cos_sin_cache [rows,
rotary_dim]`` (cos | sin, already multiplied by the rope's attention factor, as transformers
multiplies its cos/sin). ``rotary_dim = head_dim * partial_rotary_factor``: the remaining
channels of each head pass through unrotated (Phi-3/4, for every family alike).

Types whose frequencies change with the sequence length are fixed up front:

* ``dynamic`` (NTK): row ``p`` uses the base transformers uses when the sequence is ``p + 1``
  long (the original base up to ``max_position_embeddings``). Per position, so a key keeps the
  rotation it got when it was written, whatever the batch, chunking or prefix cache.
* ``longrope``: the cache holds the short-factor rows for positions below
  ``original_max_position_embeddings``, then the long-factor rows for every position; each
  sequence reads the long ones in a step where its length exceeds
  ``original_max_position_embeddings`` (transformers' per-forward switch, made per sequence).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hpcinfer.layers import ops
from hpcinfer.models.support import SUPPORTED_ROPE_TYPES  # one table: the login side reads it


def rope_parameters_of(config: Any, layer_type: str | None = None) -> dict:
    """The rope dict of an HF config: ``rope_parameters`` (transformers 5; ``layer_type``
    picks one of Gemma 3's per-layer-type dicts) or the older ``rope_theta`` + ``rope_scaling``
    pair (transformers 4), normalised to one dict that also carries the config's
    ``max_position_embeddings`` and ``original_max_position_embeddings`` where set."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and layer_type is not None and layer_type in params:
        params = dict(params[layer_type] or {})
    elif isinstance(params, dict) and "rope_theta" in params:
        params = dict(params)
    else:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    params.setdefault("max_position_embeddings", getattr(config, "max_position_embeddings", None))
    if params["rope_type"] in ("yarn", "longrope", "llama3"):
        original = getattr(config, "original_max_position_embeddings", None)
        if original is not None:
            # Phi-3 keeps it beside the rope dict; transformers gives that value priority.
            params["original_max_position_embeddings"] = original
        params.setdefault("original_max_position_embeddings", params["max_position_embeddings"])
    return params


def check_rope_type(params: dict) -> str:
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: "
                         f"{list(SUPPORTED_ROPE_TYPES)}")
    return rope_type


def rotary_dim_of(params: dict, head_dim: int) -> int:
    """Channels of each head that rotate (``partial_rotary_factor`` of them, as transformers
    rounds it)."""
    return int(head_dim * (params.get("partial_rotary_factor") or 1.0))


def _exponents(dim: int) -> torch.Tensor:
    # On the CPU explicitly: models are built under a meta-device context.
    return torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim


def inverse_frequencies(params: dict, head_dim: int, *, long: bool = False) -> torch.Tensor:
    """[rotary_dim // 2] float32 inverse frequencies for ``params`` (``rope_parameters_of``).
    ``long=True``: longrope's long factors (otherwise its short ones). ``dynamic`` gives its
    frequencies up to ``max_position_embeddings`` (``dynamic_inverse_frequencies`` beyond)."""
    rope_type = check_rope_type(params)
    dim = rotary_dim_of(params, head_dim)
    base = params["rope_theta"]
    if rope_type == "yarn":
        return _yarn_inverse_frequencies(params, dim)
    if rope_type == "longrope":
        factors = params["long_factor" if long else "short_factor"]
        ext_factors = torch.tensor(factors, dtype=torch.float32, device="cpu")
        return 1.0 / (ext_factors * base ** _exponents(dim))
    inv_freq = 1.0 / (base ** _exponents(dim))
    if rope_type == "linear":
        return inv_freq / params["factor"]
    if rope_type == "llama3":
        return _llama3_scaled(inv_freq, params)
    return inv_freq  # default, and dynamic within max_position_embeddings


def attention_factor_of(params: dict) -> float:
    """What transformers multiplies cos and sin by (yarn's mscale, longrope's factor)."""
    rope_type = params["rope_type"]
    given = params.get("attention_factor")
    if rope_type == "yarn":
        return given if given is not None else _yarn_mscale(params)
    if rope_type == "longrope":
        if given is not None:
            return given
        factor = _longrope_factor(params)
        original = params["original_max_position_embeddings"]
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return 1.0


def _llama3_scaled(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between
    # interpolated smoothly (transformers' _compute_llama3_parameters, same float order).
    factor = params["factor"]
    low_freq_factor, high_freq_factor = params["low_freq_factor"], params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_factor(params: dict) -> float:
    # DeepSeek-style configs leave `factor` out: the ratio of the two lengths stands for it.
    factor = params.get("factor")
    if factor is None:
        factor = params["max_position_embeddings"] / params["original_max_position_embeddings"]
    return factor


def _yarn_mscale(params: dict) -> float:
    def mscale_of(scale: float, mscale: float = 1) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    factor = _yarn_factor(params)
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(mscale_of(factor, mscale) / mscale_of(factor, mscale_all_dim))
    return mscale_of(factor)


def _yarn_inverse_frequencies(params: dict, dim: int) -> torch.Tensor:
    # YaRN: high frequencies (more than beta_fast turns over the original context) are kept,
    # low ones (fewer than beta_slow turns) interpolated by `factor`, a linear ramp between.
    base, factor = params["rope_theta"], _yarn_factor(params)
    original = params["original_max_position_embeddings"]
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the ramp below would divide by zero
    channel = torch.arange(dim // 2, dtype=torch.float32, device="cpu")
    ramp = torch.clamp((channel - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    return interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor


def _longrope_factor(params: dict) -> float:
    factor = params.get("factor")
    if factor is None:  # Phi-3: the ratio of the extended to the pretraining length
        factor = params["max_position_embeddings"] / params["original_max_position_embeddings"]
    return factor


def dynamic_inverse_frequencies(params: dict, head_dim: int, max_position: int) -> torch.Tensor:
    """[max_position, rotary_dim // 2]: row p holds the frequencies transformers' dynamic NTK
    uses in a forward whose longest sequence is p + 1 tokens (the original ones up to
    ``max_position_embeddings``)."""
    dim = rotary_dim_of(params, head_dim)
    factor, limit = params["factor"], params["max_position_embeddings"]
    inv_freq = inverse_frequencies(params, head_dim).expand(max_position, -1).clone()
    exponents = _exponents(dim)
    for position in range(limit, max_position):
        # One row at a time with 0-d tensors, as transformers computes it per forward: a
        # vectorised pow over all rows rounds some rows 1 ulp differently.
        seq_len = torch.tensor(position + 1, device="cpu")
        base = params["rope_theta"] * ((factor * seq_len / limit) - (factor - 1)) ** (
            dim / (dim - 2))
        inv_freq[position] = 1.0 / (base ** exponents)
    return inv_freq


def max_position_of(config: Any) -> int:
    """The longest sequence the config's rope covers: ``max_position_embeddings``, extended by
    yarn (original length x factor) and dynamic NTK (x factor), whose configs keep the
    pretraining length there."""
    params = rope_parameters_of(config)
    limit = config.max_position_embeddings
    if params["rope_type"] == "yarn":
        return max(limit, int(params["original_max_position_embeddings"] * _yarn_factor(params)))
    if params["rope_type"] == "dynamic":
        return int(limit * params["factor"])
    return limit


def _cos_sin(freqs: torch.Tensor, scale: float) -> torch.Tensor:
    # freqs: [rows, rotary_dim / 2] angles -> [rows, rotary_dim] (cos | sin), times the factor
    return torch.cat((freqs.cos() * scale, freqs.sin() * scale), dim=-1)


def build_cos_sin_cache(params: dict, head_dim: int, max_position: int,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """The float32 cache for ``params``: ``[max_position, rotary_dim]``, or for longrope
    ``[original + max_position, rotary_dim]``: short-factor rows for the positions a sequence
    of at most ``original_max_position_embeddings`` tokens has, then long-factor rows."""
    rope_type = check_rope_type(params)
    t = torch.arange(max_position, device=device, dtype=torch.int64).float()
    scale = attention_factor_of(params)
    if rope_type == "dynamic":
        inv_freq = dynamic_inverse_frequencies(params, head_dim, max_position).to(device)
        return _cos_sin(t[:, None] * inv_freq, scale)
    if rope_type == "longrope":
        short = t[:min(params["original_max_position_embeddings"], max_position), None]
        tables = [rows * inverse_frequencies(params, head_dim, long=long).to(device)[None]
                  for rows, long in ((short, False), (t[:, None], True))]
        return _cos_sin(torch.cat(tables), scale)
    return _cos_sin(t[:, None] * inverse_frequencies(params, head_dim).to(device)[None], scale)


def _longrope_rows(positions: torch.Tensor, meta: Any, original: int) -> torch.Tensor:
    # Per token: its row in the longrope cache. A token reads the long rows (from row
    # `original` on) when its sequence is longer than `original` after this step (transformers:
    # the forward's seq_len); a shorter sequence only has positions below `original`.
    token = torch.arange(positions.shape[0], device=positions.device, dtype=torch.int32)
    ends = meta.cu_seqlens_q[1:].to(torch.int32)
    seq = torch.searchsorted(ends, token, right=True).clamp_(max=meta.seq_lens.shape[0] - 1)
    is_long = meta.seq_lens[seq] > original
    return positions + is_long.to(positions.dtype) * original


class RotaryEmbedding(nn.Module):
    """Applies rotary embedding to q [T, H, D] and k [T, KVH, D] at ``positions`` [T].

    ``build(device)`` makes the float32 cos/sin cache (see ``build_cos_sin_cache``);
    ``long_threshold`` (longrope only) is ``original_max_position_embeddings``: then the
    cache has ``long_threshold + max_position`` rows and ``forward`` needs the step's
    AttentionMetadata.
    """

    def __init__(self, head_dim: int, rotary_dim: int, max_position: int,
                 build: Callable[[torch.device], torch.Tensor], long_threshold: int | None = None):
        super().__init__()
        self.head_dim, self.rotary_dim, self.max_position = head_dim, rotary_dim, max_position
        self.long_threshold = long_threshold
        self._build = build
        rows = max_position + (min(long_threshold, max_position) if long_threshold else 0)
        # Non-persistent: never in a checkpoint. The model is built on the meta device, so
        # `init_buffers` fills it once the model has real storage.
        self.register_buffer("cos_sin_cache", torch.empty(rows, rotary_dim), persistent=False)

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Compute cos/sin for every position, on the buffer's device, in float32."""
        self.cos_sin_cache = self._build(self.cos_sin_cache.device)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                meta: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = positions
        if self.long_threshold is not None:
            if meta is None:
                raise ValueError("longrope needs the step's AttentionMetadata to pick short or "
                                 "long factors per sequence: pass meta to the rotary embedding")
            rows = _longrope_rows(positions, meta, self.long_threshold)
        return ops.rotary_embedding(rows, q, k, self.cos_sin_cache)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, "
                f"max_position={self.max_position}, long_threshold={self.long_threshold}")


def get_rope(config: Any, head_dim: int, max_position: int,
             layer_type: str | None = None) -> RotaryEmbedding:
    """The rotary embedding an HF config asks for (``layer_type``: the per-layer-type rope of
    configs that nest them, e.g. Gemma 3's ``sliding_attention``/``full_attention``)."""
    params = rope_parameters_of(config, layer_type)
    check_rope_type(params)
    inverse_frequencies(params, head_dim)  # fail at build time, not when buffers are filled
    threshold = (params["original_max_position_embeddings"]
                 if params["rope_type"] == "longrope" else None)
    return RotaryEmbedding(head_dim, rotary_dim_of(params, head_dim), max_position,
                           lambda device: build_cos_sin_cache(params, head_dim, max_position,
                                                              device),
                           long_threshold=threshold)


class MRotaryEmbedding(RotaryEmbedding):
    """Qwen2-VL's multimodal rope (M-RoPE): positions [3, T] (temporal, height, width); the
    rotary channel pairs are split into ``mrope_section`` (e.g. [16, 24, 24]) and section i
    rotates by the angle of position row i. Text tokens have three equal rows, which is
    plain rope; positions [T] are taken as such (text-only steps, memory profiling)."""

    def __init__(self, head_dim: int, rotary_dim: int, max_position: int,
                 build: Callable[[torch.device], torch.Tensor], mrope_section: list[int]):
        super().__init__(head_dim, rotary_dim, max_position, build)
        if sum(mrope_section) * 2 != rotary_dim:
            raise ValueError(f"mrope_section {mrope_section} covers {sum(mrope_section)} "
                             f"channel pairs but the rotary dim {rotary_dim} has "
                             f"{rotary_dim // 2}: check rope_parameters in config.json")
        self.mrope_section = list(mrope_section)
        # The position row each cache column reads (cos half | sin half), on the device once.
        self.register_buffer("channel_rows", torch.empty(rotary_dim, dtype=torch.int64),
                             persistent=False)

    @torch.no_grad()
    def init_buffers(self) -> None:
        super().init_buffers()
        pairs = [row for row, n in enumerate(self.mrope_section) for _ in range(n)]
        self.channel_rows = torch.tensor(pairs + pairs, device=self.channel_rows.device)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                meta: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return super().forward(positions, q, k, meta)
        # table: [3, T, rotary_dim] -> each channel from its section's row: [T, rotary_dim]
        table = self.cos_sin_cache[positions]
        index = self.channel_rows.view(1, 1, -1).expand(1, table.shape[1], -1)
        per_token = table.gather(0, index)[0]
        steps = torch.arange(per_token.shape[0], device=per_token.device)
        return ops.rotary_embedding(steps, q, k, per_token)


def get_mrope(config: Any, head_dim: int, max_position: int) -> MRotaryEmbedding:
    """The M-RoPE of a Qwen2-VL text config (``rope_parameters["mrope_section"]``)."""
    params = rope_parameters_of(config, None)
    check_rope_type(params)
    return MRotaryEmbedding(head_dim, rotary_dim_of(params, head_dim), max_position,
                            lambda device: build_cos_sin_cache(params, head_dim, max_position,
                                                               device),
                            list(params["mrope_section"]))
