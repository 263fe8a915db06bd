"""Linear layers that own their weight loading and are ready for tensor parallelism.

Each layer keeps the HF parameter names (``weight``, ``bias``) and has a
``weight_loader(param, loaded_weight[, shard_id])`` method that copies a checkpoint tensor
into its slice of the parameter, as nano-vllm's layers do. Merged layers (``qkv_proj``,
``gate_up_proj``) stack several HF tensors; ``shard_ids`` lists the pieces that must all be
loaded (the loader checks it). With ``tp.size > 1`` column layers keep this rank's rows and row
layers this rank's columns; the collectives run in ``forward``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in its tensor-parallel group (``group=None``: the default group)."""
    rank: int = 0
    size: int = 1
    group: Any = None


NO_TP = TensorParallel()


class WeightShapeError(ValueError):
    """A checkpoint tensor does not fit its parameter; the loader adds the tensor's name."""

    def __init__(self, expected: tuple[int, ...], found: tuple[int, ...]):
        super().__init__(f"expected shape {expected}, found {found}")
        self.expected, self.found = expected, found


def copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy src into dst (converting dtype and device once), refusing a shape mismatch."""
    if tuple(dst.shape) != tuple(src.shape):
        raise WeightShapeError(tuple(dst.shape), tuple(src.shape))
    if not isinstance(src, torch.Tensor):  # a lazy slice (hpcinfer.distributed.slices): read it now
        src = src.materialize()
    dst.copy_(src)


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
    """Whole-tensor copy: norms, replicated layers, anything not sharded."""
    with torch.no_grad():
        copy_checked(param.data, loaded_weight)


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what}={numerator} is not divisible by the tensor-parallel size "
                         f"{denominator}: pick a tensor_parallel_size that divides it")
    return numerator // denominator


def _shard(loaded: torch.Tensor, dim: int, tp: TensorParallel, full_size: int) -> torch.Tensor:
    # Take this rank's contiguous slice of `dim`; a wrong full size is a shape error, not a
    # silent mis-slice.
    if loaded.shape[dim] != full_size:
        expected = list(loaded.shape)
        expected[dim] = full_size
        raise WeightShapeError(tuple(expected), tuple(loaded.shape))
    part = full_size // tp.size
    return loaded.narrow(dim, tp.rank * part, part)


class LinearBase(nn.Module):
    """y = x W^T + b with W: [output_size, input_size] (this rank's part)."""

    shard_ids: tuple = (None,)

    def __init__(self, input_size: int, output_size: int, bias: bool):
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(output_size), requires_grad=False)
                     if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    """The full weight on every rank (small projections such as OPT's project_in/out)."""

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        default_weight_loader(param, loaded_weight)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; the output stays split (no communication)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp: TensorParallel = NO_TP):
        self.tp, self.full_output_size = tp, output_size
        super().__init__(input_size, _divide(output_size, tp.size, "output size"), bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        with torch.no_grad():
            copy_checked(param.data, _shard(loaded_weight, 0, self.tp, self.full_output_size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column layers on one input stacked along the output (``gate_up_proj``).

    ``weight_loader(param, loaded, shard_id)`` puts HF tensor ``shard_id`` (0 = gate,
    1 = up) into its rows.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 tp: TensorParallel = NO_TP):
        self.output_sizes = list(output_sizes)
        self.shard_ids = tuple(range(len(output_sizes)))
        super().__init__(input_size, sum(output_sizes), bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: int) -> None:
        full = self.output_sizes[shard_id]
        offset = sum(self.output_sizes[:shard_id]) // self.tp.size
        dst = param.data.narrow(0, offset, full // self.tp.size)
        with torch.no_grad():
            copy_checked(dst, _shard(loaded_weight, 0, self.tp, full))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul: output rows ``[q | k | v]``, split by heads.

    ``weight_loader(param, loaded, shard_id)`` with shard_id "q", "k" or "v" takes the HF
    ``q_proj``/``k_proj``/``v_proj`` tensor (weight or bias).
    """

    shard_ids = ("q", "k", "v")

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, tp: TensorParallel = NO_TP):
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp.size, "num_attention_heads")
        # More ranks than KV heads: each rank holds one KV head, shared by tp/num_kv_heads ranks.
        self.total_kv_heads = num_kv_heads
        if tp.size > num_kv_heads and tp.size % num_kv_heads:
            raise ValueError(f"tensor-parallel size {tp.size} is more than num_key_value_heads="
                             f"{num_kv_heads} but not a multiple of it: pick a size that "
                             "divides the KV heads or is a multiple of them")
        self.kv_replicas = tp.size // num_kv_heads if tp.size > num_kv_heads else 1
        self.num_kv_heads = (1 if self.kv_replicas > 1
                             else _divide(num_kv_heads, tp.size, "num_key_value_heads"))
        output_size = (num_heads + 2 * self.num_kv_heads * tp.size) * head_dim
        super().__init__(hidden_size, output_size, bias, tp)
        q_size, kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        # shard -> (offset in this rank's rows, rows on this rank)
        self._slices = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: str) -> None:
        offset, size = self._slices[shard_id]
        dst = param.data.narrow(0, offset, size)
        tp = self.tp
        if shard_id != "q" and self.kv_replicas > 1:  # this rank's one KV head of all of them
            tp = TensorParallel(tp.rank // self.kv_replicas, self.total_kv_heads)
        with torch.no_grad():
            copy_checked(dst, _shard(loaded_weight, 0, tp, size * tp.size))


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed with an all-reduce."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp: TensorParallel = NO_TP):
        self.tp, self.full_input_size = tp, input_size
        super().__init__(_divide(input_size, tp.size, "input size"), output_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        with torch.no_grad():
            if param.dim() == 1:  # the bias is not split: every rank holds all of it
                copy_checked(param.data, loaded_weight)
            else:
                copy_checked(param.data, _shard(loaded_weight, 1, self.tp, self.full_input_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias is added once, on rank 0, so the all-reduce sums it exactly once.
        bias = self.bias if self.tp.rank == 0 else None
        y = F.linear(x, self.weight, bias)
        if self.tp.size > 1:
            torch.distributed.all_reduce(y, group=self.tp.group)
        return y
