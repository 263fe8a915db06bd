"""The MoE router's top-k selection in one launch: softmax, top k and renormalisation of a
batch of router logits.

Reference: :func:`hpcinfer.kernels.moe_reference.select_experts` (same arguments, same
contract). Why a kernel: the torch form is a cast, a softmax, a top-k, a sum and a division,
five or six small launches in every MoE layer of every decode step (~2 us each in a CUDA-graph
replay, ~0.5 ms a step over the 48 layers of Qwen3-30B-A3B); this is one.

Each program takes ROWS tokens with all their expert logits in registers (up to 256 experts),
picks the top k by k rounds of max (the lowest expert id among equal logits), and computes the
weights from the logits: with ``softmax_topk`` ``exp(l - max) / sum over all experts`` (over
the chosen ones when ``renormalize``: the renormalised softmax is the softmax of the chosen
logits), with ``topk_softmax`` the softmax of the chosen logits. The top k of the softmax are
the top k of the logits, as softmax is monotonic, so the choice equals the reference's; the
weights agree with it to rounding (the reference divides twice).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_checks import FLOAT_DTYPES, KernelArgumentError, check_dim, check_dtype

SCORINGS = ("softmax_topk", "topk_softmax")
MAX_EXPERTS = 256
MAX_TOP_K = 32


@triton.jit
def _select_experts_kernel(LOGITS, WEIGHTS, IDS, num_tokens, num_experts, stride_l,
                           TOP_K: tl.constexpr, K_P: tl.constexpr, E_P: tl.constexpr,
                           ROWS: tl.constexpr, SOFTMAX_ALL: tl.constexpr,
                           RENORMALIZE: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    experts = tl.arange(0, E_P)
    cols = tl.arange(0, K_P)
    row_ok = rows < num_tokens
    logits = tl.load(LOGITS + rows.to(tl.int64)[:, None] * stride_l + experts[None, :],
                     mask=row_ok[:, None] & (experts[None, :] < num_experts),
                     other=float("-inf")).to(tl.float32)
    logits = tl.where(row_ok[:, None], logits, 0.0)   # rows past the end: finite, not stored
    top = tl.max(logits, axis=1)
    chosen = tl.full((ROWS, K_P), float("-inf"), tl.float32)
    chosen_ids = tl.zeros((ROWS, K_P), dtype=tl.int32)
    left = logits
    for j in tl.static_range(TOP_K):
        best = tl.max(left, axis=1)
        # the lowest expert id holding the maximum (E_P where none is left: never chosen)
        best_id = tl.min(tl.where(left == best[:, None], experts[None, :], E_P), axis=1)
        chosen = tl.where(cols[None, :] == j, best[:, None], chosen)
        chosen_ids = tl.where(cols[None, :] == j, best_id[:, None], chosen_ids)
        left = tl.where(experts[None, :] == best_id[:, None], float("-inf"), left)
    kept = tl.exp(chosen - top[:, None])          # exp(-inf) = 0 in the padded columns
    if SOFTMAX_ALL and not RENORMALIZE:
        denominator = tl.sum(tl.exp(logits - top[:, None]), axis=1)
    else:
        denominator = tl.sum(kept, axis=1)
    weights = kept / denominator[:, None]
    out = rows.to(tl.int64)[:, None] * TOP_K + cols[None, :]
    mask = row_ok[:, None] & (cols[None, :] < TOP_K)
    tl.store(WEIGHTS + out, weights, mask=mask)
    tl.store(IDS + out, chosen_ids.to(tl.int64), mask=mask)


def select_experts(router_logits: torch.Tensor, top_k: int, *, scoring: str,
                   renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """See ``moe_reference.select_experts``: (topk_weights [T, top_k] float32, topk_ids
    [T, top_k] int64), sorted by weight, highest first."""
    check_dim("router_logits", router_logits, 2, "[num_tokens, num_experts]")
    check_dtype("router_logits", router_logits, FLOAT_DTYPES)
    num_tokens, num_experts = router_logits.shape
    if scoring not in SCORINGS:
        raise KernelArgumentError(f"unknown router scoring {scoring!r}; choose one of "
                                  f"{list(SCORINGS)}")
    if not supports(num_experts, top_k):
        raise KernelArgumentError(
            f"top_k={top_k} of {num_experts} experts: the router kernel takes 1 <= top_k <= "
            f"min(experts, {MAX_TOP_K}) and at most {MAX_EXPERTS} experts (use the torch "
            "reference, moe_reference.select_experts, beyond that)")
    if router_logits.stride(1) != 1:
        router_logits = router_logits.contiguous()
    device = router_logits.device
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=device)
    if num_tokens == 0:
        return weights, ids
    experts_p = max(16, triton.next_power_of_2(num_experts))
    rows = max(1, min(16, 2048 // experts_p))
    _select_experts_kernel[(triton.cdiv(num_tokens, rows),)](
        router_logits, weights, ids, num_tokens, num_experts, router_logits.stride(0),
        TOP_K=top_k, K_P=max(2, triton.next_power_of_2(top_k)), E_P=experts_p, ROWS=rows,
        SOFTMAX_ALL=scoring == "softmax_topk", RENORMALIZE=renormalize, num_warps=4)
    return weights, ids


def supports(num_experts: int, top_k: int) -> bool:
    """Whether select_experts takes this router (else the layer keeps the reference)."""
    return num_experts <= MAX_EXPERTS and 1 <= top_k <= min(num_experts, MAX_TOP_K)
