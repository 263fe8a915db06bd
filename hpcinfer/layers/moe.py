"""The mixture-of-experts layer every MoE family configures: a router and fused experts.

``SparseMoE`` = ``gate`` (the router, a replicated linear) + ``experts`` (``FusedExperts``).
Families differ only in the ``MoESpec`` they fill (top-k, how the router scores, biases,
the activation) and in how their checkpoints name expert tensors, which
``expert_checkpoint_mapping`` turns into the loader's ``packed_modules_mapping`` entries.

Experts are stored stacked, as the fused kernel reads them: ``experts.gate_up_proj.weight``
[num_local_experts, 2 * local_inter, hidden] (each expert's gate rows, then its up rows) and
``experts.down_proj.weight`` [num_local_experts, hidden, local_inter].

Parallelism over the tensor-parallel group (``tp``):
* tensor parallel (default): every rank holds every expert, with 1/tp of each expert's
  intermediate dimension (like a column-parallel gate_up and a row-parallel down);
* expert parallel (``expert_parallel=True``): rank r holds experts
  [r * E / tp, (r + 1) * E / tp) whole, and computes only the pairs routed to them.
Either way each rank's output is a partial sum and one all-reduce completes it. Activations
are replicated on every rank (the attention is tensor parallel), so no token dispatch is
needed: the all-reduce is the combine.

On CUDA the router's top-k selection and the experts run Triton kernels
(``hpcinfer.kernels.moe_router``, ``hpcinfer.kernels.fused_moe``), elsewhere the torch
reference (``hpcinfer.kernels.moe_reference``); ``HPCINFER_TORCH_OPS=1`` keeps the reference
on CUDA too. The Triton path has no host sync and no data-dependent shapes, so
decode steps with MoE layers are captured in CUDA graphs.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from hpcinfer.kernels import moe_reference
from hpcinfer.layers.linear import (NO_TP, ReplicatedLinear, TensorParallel, WeightShapeError,
                                    copy_checked)


@dataclass(frozen=True)
class MoESpec:
    """What one MoE layer computes (see ``moe_reference`` for the formulas).

    ``scoring``: "softmax_topk" (Mixtral, Qwen-MoE) or "topk_softmax" (gpt-oss);
    ``renormalize``: top-k weights rescaled to sum 1 (Mixtral; Qwen's norm_topk_prob);
    ``activation``: "silu" or "swiglu_oai" (gpt-oss, with ``swiglu_alpha``/``swiglu_limit``);
    ``has_router_bias`` / ``has_expert_bias``: gpt-oss's biases.
    """
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    scoring: str = "softmax_topk"
    renormalize: bool = True
    activation: str = "silu"
    has_router_bias: bool = False
    has_expert_bias: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    def __post_init__(self):
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.top_k} must be in 1..num_experts "
                             f"({self.num_experts}): check config.json")
        if self.activation not in moe_reference.ACTIVATIONS:
            raise ValueError(f"unsupported MoE activation {self.activation!r}; supported: "
                             f"{list(moe_reference.ACTIVATIONS)}")


@dataclass(frozen=True)
class ExpertLayout:
    """Which experts and which slice of each this rank holds."""
    expert_start: int
    num_local_experts: int
    inter_start: int
    local_inter: int

    @staticmethod
    def of(spec: MoESpec, tp: TensorParallel, expert_parallel: bool) -> ExpertLayout:
        if expert_parallel:
            local = _divide(spec.num_experts, tp.size, "num_experts", "expert-parallel")
            return ExpertLayout(tp.rank * local, local, 0, spec.intermediate_size)
        inter = _divide(spec.intermediate_size, tp.size, "the experts' intermediate size",
                        "tensor-parallel")
        return ExpertLayout(0, spec.num_experts, tp.rank * inter, inter)


def _divide(total: int, parts: int, what: str, mode: str) -> int:
    if total % parts:
        hint = ("turn expert parallelism off or pick a tensor_parallel_size that divides it"
                if mode == "expert-parallel" else
                "pick a tensor_parallel_size that divides it, or enable_expert_parallel=True")
        raise ValueError(f"{what}={total} is not divisible by the {mode} size {parts}: {hint}")
    return total // parts


class StackedExpertWeight(nn.Module):
    """One stacked expert projection, ``weight`` [num_local_experts, rows, cols] (+ ``bias``
    [num_local_experts, rows]), that loads either per-expert checkpoint tensors or a whole
    stacked tensor.

    ``kind`` is "gate_up" (rows = [gate | up] of this rank's intermediate slice) or "down"
    (cols = this rank's intermediate slice). Per-expert tensors arrive as
    ``weight_loader(param, tensor, (expert, piece))`` with piece "gate", "up" or "down" (HF
    [out, in] layout); other ranks' experts are skipped, so with lazy slices they are never
    read. ``stacked_format="gpt_oss"`` takes gpt-oss's one tensor per layer instead:
    [E, in, out] (transposed), gate and up interleaved along out.
    """

    def __init__(self, kind: str, spec: MoESpec, layout: ExpertLayout, tp: TensorParallel,
                 stacked_format: str | None = None):
        super().__init__()
        self.kind, self.layout, self.tp, self.stacked_format = kind, layout, tp, stacked_format
        self.num_experts, self.full_inter = spec.num_experts, spec.intermediate_size
        inter, hidden = layout.local_inter, spec.hidden_size
        rows, cols = (2 * inter, hidden) if kind == "gate_up" else (hidden, inter)
        self.weight = nn.Parameter(torch.empty(layout.num_local_experts, rows, cols),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(layout.num_local_experts, rows),
                                  requires_grad=False) if spec.has_expert_bias else None)
        if stacked_format is None:
            pieces = ("gate", "up") if kind == "gate_up" else ("down",)
            first = layout.expert_start
            self.shard_ids = tuple((e, p) for e in range(first, first + layout.num_local_experts)
                                   for p in pieces)
        else:
            self.shard_ids = (None,)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: tuple[int, str] | None = None) -> None:
        with torch.no_grad():
            if shard_id is None:
                self._load_stacked(param, loaded)
            else:
                self._load_one_expert(param, loaded, *shard_id)

    def _load_one_expert(self, param: nn.Parameter, loaded, expert: int, piece: str) -> None:
        local = expert - self.layout.expert_start
        if not 0 <= local < self.layout.num_local_experts:
            return  # another rank's expert
        start, size = self.layout.inter_start, self.layout.local_inter
        if piece == "down":       # HF [hidden, inter]: this rank's columns
            copy_checked(param.data[local], _narrow(loaded, 1, start, size, self.full_inter))
            return
        offset = 0 if piece == "gate" else size
        dst = param.data[local].narrow(0, offset, size)
        copy_checked(dst, _narrow(loaded, 0, start, size, self.full_inter))

    def _load_stacked(self, param: nn.Parameter, loaded) -> None:
        if self.stacked_format != "gpt_oss":
            raise ValueError("a stacked expert tensor reached a layer built for per-expert "
                             "tensors: the model's checkpoint_name mapping is wrong")
        if loaded.shape[0] != self.num_experts:
            raise WeightShapeError((self.num_experts, *param.shape[1:]), tuple(loaded.shape))
        for local in range(self.layout.num_local_experts):
            one = _materialize(loaded.narrow(0, self.layout.expert_start + local, 1))[0]
            copy_checked(param.data[local], self._from_gpt_oss(one, is_bias=param.dim() == 2))

    def _from_gpt_oss(self, one: torch.Tensor, is_bias: bool) -> torch.Tensor:
        # one expert: weight [in, out] (bias [out]); ours is [out, in] with [gate | up] rows.
        t = one if is_bias else one.t()
        start, size = self.layout.inter_start, self.layout.local_inter
        if self.kind == "gate_up":
            if t.shape[0] != 2 * self.full_inter:
                raise WeightShapeError((2 * self.full_inter, *t.shape[1:]), tuple(t.shape))
            gate, up = t[0::2], t[1::2]          # interleaved in gpt-oss checkpoints
            return torch.cat([gate[start:start + size], up[start:start + size]])
        if is_bias:
            return t                             # down bias [hidden]: not split
        return t[:, start:start + size]


def _narrow(loaded, dim: int, start: int, size: int, full: int):
    if loaded.shape[dim] != full:
        expected = list(loaded.shape)
        expected[dim] = full
        raise WeightShapeError(tuple(expected), tuple(loaded.shape))
    return loaded.narrow(dim, start, size)


def _materialize(t) -> torch.Tensor:
    # A lazy slice (hpcinfer.distributed.slices) is read here, one expert at a time.
    return t if isinstance(t, torch.Tensor) else t.materialize()


@functools.lru_cache(maxsize=1)
def _triton_moe() -> ModuleType | None:
    # Imported lazily: CPU-only installs never load Triton.
    if os.environ.get("HPCINFER_TORCH_OPS") == "1":
        return None
    from hpcinfer.kernels import fused_moe
    return fused_moe


class FusedExperts(nn.Module):
    """The experts of one layer: ``forward(x, topk_weights, topk_ids)`` -> [T, hidden], summed
    over the tensor-parallel group."""

    def __init__(self, spec: MoESpec, tp: TensorParallel = NO_TP, *,
                 expert_parallel: bool = False, stacked_format: str | None = None):
        super().__init__()
        self.spec, self.tp, self.expert_parallel = spec, tp, expert_parallel
        self.layout = ExpertLayout.of(spec, tp, expert_parallel)
        self.gate_up_proj = StackedExpertWeight("gate_up", spec, self.layout, tp, stacked_format)
        self.down_proj = StackedExpertWeight("down", spec, self.layout, tp, stacked_format)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
                ) -> torch.Tensor:
        # x: [T, hidden]; topk_*: [T, top_k] with global expert ids
        if self.expert_parallel and self.tp.size > 1:
            local = topk_ids - self.layout.expert_start
            in_range = (local >= 0) & (local < self.layout.num_local_experts)
            topk_ids = torch.where(in_range, local, -1)   # -1: another rank's expert
        # The down bias is a row-parallel bias under TP: added on one rank only.
        b_down = self.down_proj.bias
        if b_down is not None and not self.expert_parallel and self.tp.rank != 0:
            b_down = None
        kernels = _triton_moe() if x.is_cuda else None
        run = (kernels or moe_reference).fused_experts
        out = run(x, self.gate_up_proj.weight, self.down_proj.weight, topk_weights,
                  topk_ids, activation=self.spec.activation, b_gate_up=self.gate_up_proj.bias,
                  b_down=b_down, alpha=self.spec.swiglu_alpha, limit=self.spec.swiglu_limit)
        if self.tp.size > 1:
            torch.distributed.all_reduce(out, group=self.tp.group)
        return out

    def extra_repr(self) -> str:
        return f"{self.spec}, {self.layout}, expert_parallel={self.expert_parallel}"


class SparseMoE(nn.Module):
    """Router + experts: ``forward(x [T, hidden]) -> [T, hidden]``.

    ``gate.weight`` [E, hidden] (and ``gate.bias`` with ``has_router_bias``) is replicated
    on every rank: routing must agree across ranks.
    """

    def __init__(self, spec: MoESpec, tp: TensorParallel = NO_TP, *,
                 expert_parallel: bool = False, stacked_format: str | None = None):
        super().__init__()
        self.spec = spec
        self.gate = ReplicatedLinear(spec.hidden_size, spec.num_experts, spec.has_router_bias)
        self.experts = FusedExperts(spec, tp, expert_parallel=expert_parallel,
                                    stacked_format=stacked_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        select = moe_reference.select_experts
        if x.is_cuda and _triton_moe() is not None:
            from hpcinfer.kernels import moe_router   # one launch instead of ~6 (decode)
            if moe_router.supports(self.spec.num_experts, self.spec.top_k):
                select = moe_router.select_experts
        weights, ids = select(logits, self.spec.top_k, scoring=self.spec.scoring,
                              renormalize=self.spec.renormalize)
        return self.experts(x, weights, ids)


def expert_checkpoint_mapping(prefix: str, num_experts: int, names: dict[str, str]
                              ) -> dict[str, tuple[str, tuple[int, str]]]:
    """``packed_modules_mapping`` entries that send per-expert checkpoint tensors to the
    stacked parameters: ``names`` maps the checkpoint's projection name to "gate", "up" or
    "down" (Mixtral: {"w1": "gate", "w3": "up", "w2": "down"}); ``prefix`` is the experts'
    module name inside the MoE block ("experts"). E.g. ``experts.3.w1`` -> (``experts.
    gate_up_proj``, (3, "gate"))."""
    mapping = {}
    for expert in range(num_experts):
        for hf_name, piece in names.items():
            target = f"{prefix}.{'down_proj' if piece == 'down' else 'gate_up_proj'}"
            mapping[f"{prefix}.{expert}.{hf_name}"] = (target, (expert, piece))
    return mapping
