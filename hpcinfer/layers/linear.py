"""Linear layers that own their weight loading and are ready for tensor parallelism.

Each layer keeps the HF parameter names (``weight``, ``bias``) and has a
``weight_loader(param, loaded_weight[, shard_id])`` method that copies a checkpoint tensor
into its slice of the parameter, as nano-vllm's layers do. Merged layers (``qkv_proj``,
``gate_up_proj``) stack several HF tensors; ``shard_ids`` lists the pieces that must all be
loaded (the loader checks it). With ``tp.size > 1`` column layers keep this rank's rows and row
layers this rank's columns; the collectives run in ``forward``.

What the parameters are and how the matmul runs is the layer's quantization method
(hpcinfer.layers.quant; unquantized by default, swapped by ``set_quant_method`` before the
weights load). Every parameter carries a ParamSharding, so the one ``weight_loader`` below
slices packed, block- and group-scaled tensors as it slices plain weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hpcinfer.layers.quant.base import BIAS, UNQUANTIZED, ParamSharding, QuantMethod, add_param


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
    """y = x W^T + b with W: [output_size, input_size] (this rank's part), computed by
    ``quant_method``.

    Subclasses say how checkpoint tensors map onto this rank: ``_out_slice(shard_id)`` (column
    layers) and ``_in_slice()`` (row layers).
    """

    shard_ids: tuple = (None,)
    splits_output = False   # column layers: the output rows are this rank's / a merged piece's
    splits_input = False    # row layers: the input columns are this rank's

    def __init__(self, input_size: int, output_size: int, bias: bool):
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.params_dtype = torch.get_default_dtype()
        self.quant_method: QuantMethod = UNQUANTIZED
        self.quant_method.create_weights(self)
        if bias:
            add_param(self, "bias", (output_size,), self.params_dtype, BIAS)
        else:
            self.register_parameter("bias", None)

    @property
    def out_pieces(self) -> list[int]:
        """This rank's output features of each merged piece, in shard_ids order."""
        return [self.output_size]

    def set_quant_method(self, method: QuantMethod, params_dtype: torch.dtype) -> None:
        """Replace the plain weight by ``method``'s parameters (before loading; on meta)."""
        for name in list(self.shardings):   # the old method's parameters, bias kept
            if name != "bias":
                del self._parameters[name], self.shardings[name]
        self.params_dtype, self.quant_method = params_dtype, method
        method.create_weights(self)

    def _out_slice(self, shard_id) -> tuple[int, int, TensorParallel, int]:
        """(offset in this rank's rows, rows, the TP split of the source, the source's rows)."""
        return 0, self.output_size, NO_TP, self.output_size

    def _in_slice(self) -> tuple[TensorParallel, int]:
        return NO_TP, self.input_size

    def piece_index(self, shard_id) -> int:
        return self.shard_ids.index(shard_id)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id=None) -> None:
        """Copy a checkpoint tensor (or merged piece ``shard_id``) into this rank's part."""
        sharding: ParamSharding = self.shardings[self._name_of(param)]
        dst, src_shift = param.data, 0
        if sharding.per_piece:  # one entry per piece: [num_pieces, ...]
            dst, src_shift = dst.select(0, self.piece_index(shard_id)), 1
            if not isinstance(loaded_weight, torch.Tensor):   # a lazy slice: small, read it
                loaded_weight = loaded_weight.materialize()
            if loaded_weight.dim() > dst.dim():   # a scalar stored as [1]
                loaded_weight = loaded_weight.reshape(dst.shape)
        src = loaded_weight
        if self.splits_output and sharding.out_dim is not None:
            offset, rows, tp, full = self._out_slice(shard_id)
            # Whole blocks/groups/packs per piece and rank (hpcinfer.layers.quant.config checks
            # it); an unsplit, unmerged dim may end in a partial block, hence the ceilings.
            per, dim = sharding.out_per_element, sharding.out_dim - src_shift
            dst = dst.narrow(dim, offset // per, -(-rows // per))
            src = _shard(src, dim, tp, -(-full // per))
        if self.splits_input and sharding.in_dim is not None:
            tp, full = self._in_slice()
            src = _shard(src, sharding.in_dim - src_shift, tp, -(-full // sharding.in_per_element))
        with torch.no_grad():
            copy_checked(dst, src)

    def _name_of(self, param: nn.Parameter) -> str:
        return next(name for name, p in self._parameters.items() if p is param)

    def process_after_loading(self) -> None:
        self.quant_method.process_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


class ReplicatedLinear(LinearBase):
    """The full weight on every rank (small projections such as OPT's project_in/out)."""


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; the output stays split (no communication)."""

    splits_output = True

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp: TensorParallel = NO_TP):
        self.tp, self.full_output_size = tp, output_size
        super().__init__(input_size, _divide(output_size, tp.size, "output size"), bias)

    def _out_slice(self, shard_id) -> tuple[int, int, TensorParallel, int]:
        return 0, self.output_size, self.tp, self.full_output_size


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

    @property
    def out_pieces(self) -> list[int]:
        return [size // self.tp.size for size in self.output_sizes]

    def _out_slice(self, shard_id) -> tuple[int, int, TensorParallel, int]:
        full = self.output_sizes[shard_id]
        offset = sum(self.output_sizes[:shard_id]) // self.tp.size
        return offset, full // self.tp.size, self.tp, full


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
        q_size, kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        # shard -> (offset in this rank's rows, rows on this rank)
        self._slices = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}
        super().__init__(hidden_size, output_size, bias, tp)

    @property
    def out_pieces(self) -> list[int]:
        return [self._slices[s][1] for s in self.shard_ids]

    def _out_slice(self, shard_id) -> tuple[int, int, TensorParallel, int]:
        offset, size = self._slices[shard_id]
        tp = self.tp
        if shard_id != "q" and self.kv_replicas > 1:  # this rank's one KV head of all of them
            tp = TensorParallel(tp.rank // self.kv_replicas, self.total_kv_heads)
        return offset, size, tp, size * tp.size


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed with an all-reduce."""

    splits_input = True

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp: TensorParallel = NO_TP):
        self.tp, self.full_input_size = tp, input_size
        super().__init__(_divide(input_size, tp.size, "input size"), output_size, bias)

    def _in_slice(self) -> tuple[TensorParallel, int]:
        return self.tp, self.full_input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias is added once, on rank 0, so the all-reduce sums it exactly once.
        bias = self.bias if self.tp.rank == 0 else None
        y = self.quant_method.apply(self, x, bias)
        if self.tp.size > 1:
            torch.distributed.all_reduce(y, group=self.tp.group)
        return y
