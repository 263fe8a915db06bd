"""The paged-KV inner loop shared by the decode and prefill attention kernels.

Both walk one sequence's keys in BLOCK_N tiles through its block table (token -> physical
block, offset: gathered per token, so BLOCK_N need not match the cache's block size) with
an online softmax in the log2 domain. Triton inlines the helper into each kernel.

P@V rounding. With 16-bit inputs the softmax probabilities P are rounded to the value
dtype for the P@V product by default (as FlashAttention does); the torch reference keeps P
in fp32. ``PV_FP32`` (kernel name -> input precision, e.g. {"decode": "tf32x3"}) keeps P
and V in fp32 for that kernel instead; env HPCINFER_PV_FP32="decode,prefill" and
HPCINFER_PV_PRECISION (tf32x3 | ieee, default tf32x3) set it at import, tests/gpu/
agreement_probe.py flips it in-process to compare. Off by default: on H100 it makes bf16
Triton as accurate as bf16 torch_ref against an fp32 run (98.3% teacher-forced, vs 97.85%
with P in bf16) but costs ~20% in decode and 5.6x in prefill with tf32x3 (docs/
performance.md, bf16 agreement).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

PV_FP32: dict[str, str] = {
    name: os.environ.get("HPCINFER_PV_PRECISION", "tf32x3")
    for name in os.environ.get("HPCINFER_PV_FP32", "").split(",") if name}


def pv_precision(kernel: str, dtype: torch.dtype) -> str | None:
    """PV_PRECISION for a launch: None = P rounded to the value dtype (fp32 models: P is
    fp32 already and DOT_PRECISION applies)."""
    return None if dtype == torch.float32 else PV_FP32.get(kernel)


@triton.jit
def query_for_cache(q, FP16_DOTS: tl.constexpr):
    # FP16_DOTS (fp16_dots(): an e4m3 cache, kv_cache_dtype="fp8", under a bf16 model): the
    # query goes to fp16, so attend_key_tiles converts keys and values to fp16 too: e4m3 ->
    # fp16 is one cvt per two values, while e4m3 -> bf16 goes through fp16 with a second cvt
    # per value. Compiled for sm_90 (Triton 3.9, 2026-12-05) the decode kernel over an e4m3
    # cache had 1,464 SASS instructions, 128 of them F2F, against 944 over a bf16 cache
    # (1,128 and no F2F with this and the V staging in attend_key_tiles): why an fp8 cache,
    # half the bytes, ran no faster on an H200. fp16 holds every e4m3 value exactly and a
    # bf16 query to all its bits (clamped to fp16's range; products accumulate in fp32).
    if FP16_DOTS:
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    return q


def fp16_dots(q_dtype: torch.dtype, cache_dtype: torch.dtype) -> bool:
    """Whether the attention kernels take the dots in fp16 (query_for_cache)."""
    return cache_dtype == torch.float8_e4m3fn and q_dtype == torch.bfloat16


@triton.jit
def attend_key_tiles(acc, l_i, m_i, q, K_CACHE, V_CACHE, table, kv_head, q_pos, lo, hi,
                      qk_scale, sliding_window, stride_cb, stride_cs, stride_ch, offs_d, mask_d,
                      BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, IS_MASKED: tl.constexpr,
                      IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, PV_PRECISION: tl.constexpr = None,
                      softcap_log2=0.0, HAS_SOFTCAP: tl.constexpr = False, q_last=0,
                      HAS_KEY_LIMITS: tl.constexpr = False):
    # Online softmax over keys [lo, hi) in BLOCK_N tiles. q: [rows, BLOCK_D] (query tokens
    # of one head for prefill, the query heads of one KV head for decode); q_pos: [rows]
    # absolute positions (read only when IS_CAUSAL or HAS_WINDOW). IS_MASKED=False is the
    # fast path for whole tiles that every row may see: no per-score masks.
    # Logits in the log2 domain: q.k * qk_scale with qk_scale = scale * log2(e); with
    # HAS_SOFTCAP (see softcap_args) tanh(q.k * scale / cap) * cap * log2(e) instead.
    # HAS_KEY_LIMITS (prefill only): the causal limit of each row is q_last [rows], the last
    # key it may see (Gemma 3's image spans), while the window still counts back from q_pos.
    for start in range(lo, hi, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        mask_n = k_pos < hi
        block = tl.load(table + k_pos // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
        kv_off = (block[:, None] * stride_cb + (k_pos % BLOCK_SIZE)[:, None] * stride_cs
                  + kv_head * stride_ch + offs_d[None, :])
        kv_mask = mask_n[:, None] & mask_d[None, :]
        # .to(q.dtype): a no-op unless the cache holds e4m3 (kv_cache_dtype="fp8")
        k = tl.load(K_CACHE + kv_off, mask=kv_mask, other=0.0).to(q.dtype)  # [BLOCK_N, BLOCK_D]
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if HAS_SOFTCAP:   # before the masks, as transformers' Gemma 2 does
            qk = tanh(qk) * softcap_log2
        if IS_MASKED:
            allowed = mask_n[None, :]                                       # [BLOCK_M, BLOCK_N]
            if IS_CAUSAL and HAS_KEY_LIMITS:
                allowed = allowed & (k_pos[None, :] <= q_last[:, None])
            elif IS_CAUSAL:
                allowed = allowed & (k_pos[None, :] <= q_pos[:, None])
            if HAS_WINDOW:
                allowed = allowed & (k_pos[None, :] > q_pos[:, None] - sliding_window)
            qk = tl.where(allowed, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: no NaN
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V_CACHE + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
        if V_CACHE.dtype.element_ty == tl.float8e4nv:
            # (the mask again: a no-op that makes Triton convert V in registers and stage the
            # 16-bit copy for the dot, read with ldmatrix.trans; staged as e4m3 instead, the
            # transposed operand was read from shared memory a byte at a time: 64
            # ld.shared.b8 in the sm_90 PTX of the decode kernel, none with this)
            v = tl.where(kv_mask, v, 0.0).to(q.dtype)
        if PV_PRECISION is None:
            pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        else:   # P kept in fp32 (see the module docstring)
            pv = tl.dot(p, v.to(tl.float32), input_precision=PV_PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def tanh(x):
    # libdevice's tanh does not run under TRITON_INTERPRET, so build it from exp2 of a
    # non-positive argument (no overflow); absolute error ~1e-7, i.e. ~cap * 1e-7 in a logit.
    e = tl.math.exp2(-2.8853900817779268 * tl.abs(x))    # exp(-2|x|), 2.885... = 2 log2(e)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def sink_denominator(l_i, m_i, sink):
    # The softmax denominator with a learned sink logit (natural log domain, [rows]) added
    # once: l_i is the sum of exp2(logit - m_i) over the keys, m_i = -inf when no key was seen.
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    return l_i + tl.math.exp2(sink * 1.4426950408889634 - m_safe)


def softcap_args(scale: float, logit_softcap: float | None) -> tuple[float, float]:
    """(qk_scale, softcap_log2) for attend_key_tiles: the log2(e) factor moves behind the tanh
    when there is a cap."""
    log2e = 1.4426950408889634
    if logit_softcap is None:
        return scale * log2e, 0.0
    if not logit_softcap > 0:
        raise ValueError(f"logit_softcap={logit_softcap} must be > 0, or None for no capping")
    return scale / logit_softcap, logit_softcap * log2e
