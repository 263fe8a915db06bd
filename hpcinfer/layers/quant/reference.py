"""Torch references: every quantized format back to float weights [out, in].

The CPU path runs these (so its weights equal what the test oracle hands transformers, bit for
bit), the GPU kernels are tested against them, and ``hpcinfer.testing.quant`` packs with the
inverse operations. Canonical 4-bit form: ``q`` [out, in] and ``zeros`` [out, groups] as
unsigned codes 0..15, ``scales`` [out, groups]; w = (q - zeros[:, g]) * scales[:, g] with g the
group of each input feature.
"""
from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)           # nibble i at bits 4i..4i+3
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)                        # nibble i holds feature AWQ_ORDER[i]


def dequant_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor,
                      block: tuple[int, int]) -> torch.Tensor:
    """e4m3 [out, in] times one scale per [B0, B1] block (the last ones may be partial)."""
    out, inp = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return weight.float() * scale[:out, :inp]


def dequant_fp8_rows(weight: torch.Tensor, row_scales: torch.Tensor) -> torch.Tensor:
    """e4m3 [out, in] times one scale per output row (per channel, or a per-tensor scale
    repeated over its piece's rows)."""
    return weight.float() * row_scales.float().reshape(-1, 1)


def quantize_fp8_rows(weight: torch.Tensor, amax: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel e4m3: (weight_fp8 [out, in], scales [out] fp32), amax / 448
    (``amax``: each row's absolute maximum when the rows are split over ranks)."""
    if amax is None:
        amax = weight.float().abs().amax(dim=1)
    scales = amax.clamp(min=1e-12) / FP8_MAX
    q = (weight.float() / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scales


def unpack_cols(packed: torch.Tensor) -> torch.Tensor:
    """int32 [r, c] -> codes [r, 8c]: nibble i of column j is column 8j + i."""
    codes = (packed.to(torch.int32).unsqueeze(-1) >> SHIFTS.to(packed.device)) & 0xF
    return codes.reshape(packed.shape[0], -1)


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [r, c] -> codes [8r, c]: nibble i of row j is row 8j + i."""
    return unpack_cols(packed.t().contiguous()).t()


def awq_canonical(qweight, qzeros, scales):
    """AutoAWQ GEMM: qweight [in, out/8], qzeros [groups, out/8] with nibble i holding output
    feature 8j + AWQ_ORDER[i]; scales [groups, out]."""
    order = torch.tensor(AWQ_ORDER, device=qweight.device)
    inverse = torch.argsort(order)       # feature k of a pack sits in nibble inverse[k]

    def unpack(packed):
        codes = unpack_cols(packed).reshape(packed.shape[0], -1, 8)
        return codes[:, :, inverse].reshape(packed.shape[0], -1)
    return unpack(qweight).t(), unpack(qzeros).t(), scales.t()


def gptq_canonical(qweight, qzeros, scales, zero_offset: int):
    """GPTQ: qweight [in/8, out] packed along the input, qzeros [groups, out/8] along the
    output; old checkpoints (checkpoint_format "gptq") store zero - 1."""
    return unpack_rows(qweight).t(), (unpack_cols(qzeros) + zero_offset).t(), scales.t()


def pack_quantized_canonical(weight_packed, weight_scale, weight_zero_point=None):
    """compressed-tensors pack-quantized: weight_packed [out, in/8] (signed values + 8,
    nibble i = input 8j + i), weight_scale [out, groups], weight_zero_point [out/8, groups]
    packed along the output (absent when symmetric: zero 0, code 8)."""
    q = unpack_cols(weight_packed)
    if weight_zero_point is None:
        zeros = torch.full(weight_scale.shape, 8, dtype=torch.int32, device=q.device)
    else:
        zeros = unpack_rows(weight_zero_point)[:q.shape[0]]
    return q, zeros, weight_scale


def group_index(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """Each input feature's group when groups are consecutive (no desc_act)."""
    size = in_features if group_size == -1 else group_size
    return torch.arange(in_features, device=device) // size


def dequant_int4(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: torch.Tensor) -> torch.Tensor:
    """Canonical 4-bit -> fp32 [out, in]: (q - zeros[:, g]) * scales[:, g]."""
    g = g_idx.long()
    return (q.to(torch.int32) - zeros.to(torch.int32)[:, g]).float() * scales.float()[:, g]
