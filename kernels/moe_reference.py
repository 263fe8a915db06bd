"""Torch reference for the fused mixture-of-experts kernel: the CPU path and the oracle.

The contract (``hpcinfer.kernels.fused_moe.fused_experts`` takes the same arguments):

* ``x``: [num_tokens, hidden]; each token goes to ``top_k`` experts, ``topk_ids`` [num_tokens,
  top_k] (int), with weights ``topk_weights`` [num_tokens, top_k] (float32).
* Experts are stacked: ``w_gate_up`` [num_experts, 2 * inter, hidden] holds each expert's gate
  rows then its up rows; ``w_down`` [num_experts, hidden, inter]. Optional biases
  ``b_gate_up`` [num_experts, 2 * inter] and ``b_down`` [num_experts, hidden] (gpt-oss).
* An id outside ``[0, num_experts)`` contributes nothing: with expert parallelism the caller
  maps global ids to this rank's experts and marks the others -1.
* out[t] = sum_j topk_weights[t, j] * down_e(act(gate_e(x[t])) * up_e(x[t])) with
  ``e = topk_ids[t, j]``; ``act`` is ``silu`` (SwiGLU) or ``swiglu_oai`` (gpt-oss's clamped
  SwiGLU: ``gate.clamp(max=limit) * sigmoid(alpha * gate) * (up.clamp(-limit, limit) + 1)``).

The per-expert loop below is the one transformers runs, so on CPU in fp32 the two agree to
the last bit wherever the matmul shapes agree.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "swiglu_oai")


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str,
                     alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """act(gate) * up for the MoE activations (gate, up: [rows, inter])."""
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "swiglu_oai":
        gate = gate.clamp(min=None, max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    raise ValueError(f"unknown MoE activation {activation!r}; choose one of {list(ACTIVATIONS)}")


def fused_experts(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
                  activation: str = "silu", b_gate_up: torch.Tensor | None = None,
                  b_down: torch.Tensor | None = None, alpha: float = 1.702,
                  limit: float = 7.0) -> torch.Tensor:
    """The routed experts' weighted sum per token: [num_tokens, hidden] in x's dtype."""
    num_experts, inter = w_gate_up.shape[0], w_down.shape[2]
    out = torch.zeros_like(x)
    for expert in range(num_experts):
        token_idx, slot = torch.where(topk_ids == expert)
        if token_idx.numel() == 0:
            continue
        gate_up = F.linear(x[token_idx], w_gate_up[expert],
                           None if b_gate_up is None else b_gate_up[expert])
        h = gated_activation(gate_up[:, :inter], gate_up[:, inter:], activation, alpha, limit)
        y = F.linear(h, w_down[expert], None if b_down is None else b_down[expert])
        y = y * topk_weights[token_idx, slot, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


def select_experts(router_logits: torch.Tensor, top_k: int, *, scoring: str,
                   renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights [T, top_k] float32, topk_ids [T, top_k] int64) from router logits [T, E].

    ``scoring="softmax_topk"``: softmax over all experts, then the top k (Mixtral, Qwen-MoE),
    renormalised to sum 1 when ``renormalize`` (Mixtral always; Qwen when norm_topk_prob).
    ``scoring="topk_softmax"``: the top k logits, then a softmax over those k (gpt-oss; the
    weights sum to 1 by construction).
    """
    logits = router_logits.float()
    if scoring == "softmax_topk":
        weights, ids = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids
    if scoring == "topk_softmax":
        top, ids = torch.topk(logits, top_k, dim=-1)
        return torch.softmax(top, dim=-1), ids
    raise ValueError(f"unknown router scoring {scoring!r}; choose softmax_topk or topk_softmax")
