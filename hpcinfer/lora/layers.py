"""The LoRA side of one linear layer: its slot weights and the forward hook adding the delta.

A ``LoRALayer`` wraps a target layer (qkv_proj, o_proj, gate_up_proj, down_proj) without
changing it: a forward hook adds ``(x @ A^T) @ B^T`` per token row to the layer's output,
with A and B taken from each row's slot (``StepSlots``; -1 rows get nothing). The pieces of a
merged layer (q/k/v, gate/up) are stacked along the rank in A, so one shrink serves all of
them, and B is one [slots, out, rank] tensor over the whole output, so one expand adds every
piece (piece p's columns take the shrink's rank block p): two launches per layer.

Where the base weight is plain (unquantized) and the slots' A rows are few beside it, the
shrink can ride on the base GEMM instead of a launch of its own ("stacked"; not the default
yet, see shrink_mode): the slots' A rows are stored under the base weight in one
[out + slots * pieces * rank, in] buffer (the layer's ``weight`` a view of its top rows), so
one GEMM gives the base output and every slot's shrink side by side, and the expand (``lora_expand_stacked``) writes base + each row's own
slot's delta into a fresh output. One launch per layer instead of two, and the GEMM reads
x once for both (on an H200, at decode sizes, each LoRA launch costs ~5-6 us above a trivial
one: docs/lora.md). The shrink then comes out in the model dtype (bf16 on the GPU) where the
separate shrink keeps fp32 partials. Quantized base layers keep the separate shrink.

Tensor parallelism follows the base layer: a column layer's B keeps this rank's output rows;
a row layer's A keeps this rank's input columns, so its shrink is a partial sum that is
all-reduced (the shrink's [splits, T, rank] fp32 partials, small; stacked: in the same
all-reduce as the base output) before the expand adds the delta to the already reduced
output on every rank.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hpcinfer.kernels import lora_reference
from hpcinfer.layers.linear import LinearBase, _shard
from hpcinfer.layers.quant.base import UNQUANTIZED
from hpcinfer.layers.transfer import copy_to


NULL_SLOT = -1   # a row without an adapter: the kernels load and add nothing for it
# Stack the slots' A under the base weight where they add at most 1 / STACK_MAX_SHARE of its
# rows (the GEMM computes every slot's shrink for every row, so many or large slots would
# cost more than the separate shrink, which reads only the slots a row tile has).
STACK_MAX_SHARE = 4
# HPCINFER_LORA_SHRINK: "auto" (that rule), "stacked" (every plain layer) or "separate"
# (none); tests and bench/lora.py run both ways (an environment variable, so spawned TP ranks
# agree). "auto" is the default since it ran on an H200: workload A with 4 rank-16 adapters at
# 86.4% of the no-LoRA output tok/s against 77.0% with the separate shrink, same process
# (2026-12-05, docs/lora.md).
SHRINK_MODES = ("auto", "stacked", "separate")
DEFAULT_SHRINK = "auto"


class StepSlots:
    """Each token row's slot this step, in one persistent buffer: its address never changes,
    so decode CUDA graphs read it as a static input. Written by the manager before the
    forward (and by DecodeGraphs for the rows it pads), read by the hooks."""

    def __init__(self, max_num_tokens: int, device: torch.device):
        self.buffer = torch.full((max_num_tokens,), NULL_SLOT, dtype=torch.int32, device=device)
        self.num_tokens = 0
        self.has_adapter = False   # whether any row this step has one (else the hooks skip)

    def set(self, token_slots) -> None:
        """token_slots: numpy int array [num_tokens]."""
        n = len(token_slots)
        if n > self.buffer.shape[0]:
            # Never reallocated: captured graphs hold this address. The scheduler's token
            # budget and max_num_seqs bound every step (LoRAManager sizes the buffer).
            raise RuntimeError(f"a step of {n} tokens but the LoRA slot buffer holds "
                               f"{self.buffer.shape[0]}; this is a bug: please report it")
        copy_to(self.buffer[:n], token_slots)   # pinned: no wait for the GPU (layers/transfer)
        self.num_tokens, self.has_adapter = n, bool((token_slots >= 0).any())

    def pad(self, start: int, stop: int) -> None:
        """Rows [start, stop) are padding of a graph batch: no adapter (stream-ordered)."""
        if stop > start:
            self.buffer[start:stop].fill_(NULL_SLOT)

    @contextlib.contextmanager
    def always_applied(self, num_rows: int):
        """For graph capture (and its warm-up): every hook launches its kernels, over
        ``num_rows`` null-slot rows (0: the rows are left as they are). A captured graph
        replays those launches on whatever the buffer holds then, so a replayed step needs
        no host-side flag."""
        self.pad(0, num_rows)
        saved, self.has_adapter = self.has_adapter, True
        try:
            yield
        finally:
            self.has_adapter = saved


class LoRALayer:
    """Slot weights of one target layer: lora_a [slots, pieces * rank, in_local] and lora_b
    [slots, out_local, rank] (every piece's output rows, in the layer's order; scaling
    folded in)."""

    def __init__(self, name: str, layer: LinearBase, max_loras: int, max_rank: int,
                 slots: StepSlots, dtype: torch.dtype, device: torch.device):
        self.name, self.layer, self.slots, self.rank = name, layer, slots, max_rank
        self.is_row_parallel = layer.splits_input
        self.pieces = list(layer.shard_ids)
        a_rows = max_loras * len(self.pieces) * max_rank
        mode = shrink_mode()
        self.stacked = (mode != "separate" and layer.quant_method is UNQUANTIZED
                        and layer.weight.dtype == dtype
                        and (mode == "stacked" or a_rows * STACK_MAX_SHARE <= layer.output_size))
        if self.stacked:
            self.lora_a = self._stack_under_weight(a_rows).view(
                max_loras, len(self.pieces) * max_rank, layer.input_size)
        else:
            self.lora_a = torch.zeros(
                (max_loras, len(self.pieces) * max_rank, layer.input_size), dtype=dtype,
                device=device)
        # (offset, rows) of each piece in this rank's output columns
        self.out_slices = [layer._out_slice(p)[:2] for p in self.pieces]
        # the pieces tile the output in order: piece p's columns are [bounds[p], bounds[p+1])
        self.bounds = (0, *(offset + rows for offset, rows in self.out_slices))
        if any(offset != lo for (offset, _), lo in zip(self.out_slices, self.bounds)):
            raise ValueError(f"{name}: LoRA needs the merged pieces contiguous in order, got "
                             f"(offset, rows) {self.out_slices}")
        self.lora_b = torch.zeros((max_loras, self.bounds[-1], max_rank), dtype=dtype,
                                  device=device)
        if self.stacked:   # the layer's forward is replaced: its GEMM makes the shrink
            layer.forward = self._forward_stacked
        else:
            self.handle = layer.register_forward_hook(self._add_delta)

    def _stack_under_weight(self, a_rows: int) -> torch.Tensor:
        """Move the base weight (and bias) into the top rows of one [out + a_rows, in]
        buffer; return the zeroed rows under it, where the slots' A go. The layer's
        ``weight`` becomes a view of the top rows (the loaded values, same address for
        every later use)."""
        layer = self.layer
        weight = layer.weight
        n = weight.shape[0]
        stacked = torch.zeros((n + a_rows, weight.shape[1]), dtype=weight.dtype,
                              device=weight.device)
        stacked[:n].copy_(weight.data)
        layer.weight = nn.Parameter(stacked[:n], requires_grad=False)
        self.stacked_weight = stacked
        self.stacked_bias = None
        if layer.bias is not None:
            bias = torch.zeros(n + a_rows, dtype=layer.bias.dtype, device=layer.bias.device)
            bias[:n].copy_(layer.bias.data)
            layer.bias = nn.Parameter(bias[:n], requires_grad=False)
            self.stacked_bias = bias
        return stacked[n:]

    def full_shapes(self, piece) -> tuple[int, int]:
        """(input features, output features) of the piece's HF tensor: what A and B must fit."""
        layer = self.layer
        full_in = layer.full_input_size if self.is_row_parallel else layer.input_size
        return full_in, layer._out_slice(piece)[3]

    def load(self, slot: int, piece, a: torch.Tensor, b: torch.Tensor) -> None:
        """Write one piece of an adapter (full HF tensors a: [r, in], b: [out, r], scaling
        already in b) into ``slot``, keeping this rank's part."""
        layer, i = self.layer, self.pieces.index(piece)
        r = a.shape[0]
        if self.is_row_parallel:
            a = _shard(a, 1, layer.tp, layer.full_input_size)
        else:
            _, _, tp, full = layer._out_slice(piece)
            b = _shard(b, 0, tp, full)
        offset, rows = self.out_slices[i]
        self.lora_a[slot, i * self.rank:i * self.rank + r].copy_(a)
        self.lora_b[slot, offset:offset + rows, :r].copy_(b)

    def clear(self, slot: int) -> None:
        """Zero a slot (a smaller rank or fewer targets must not see the previous adapter)."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()

    def _forward_stacked(self, x: torch.Tensor) -> torch.Tensor:
        layer, slots = self.layer, self.slots
        if not slots.has_adapter:   # the base GEMM alone (weight: the top rows)
            return type(layer).forward(layer, x)
        bias = self.stacked_bias
        if self.is_row_parallel and layer.tp.rank != 0:
            bias = None   # added once, on rank 0, as RowParallelLinear does
        y = F.linear(x, self.stacked_weight, bias)
        if self.is_row_parallel and layer.tp.size > 1:
            dist.all_reduce(y, group=layer.tp.group)   # base partials and shrink partials
        n = layer.output_size
        return _kernels(x).lora_expand_stacked(y[:, :n], y[:, n:], self.lora_b,
                                               slots.buffer[:x.shape[0]], self.bounds)

    def _add_delta(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        slots = self.slots
        if not slots.has_adapter:
            return out
        x = args[0]
        token_slots = slots.buffer[:x.shape[0]]
        kernels = _kernels(x)
        # [splits, T, pieces * rank]: partial sums over K, summed by the expand
        shrunk = kernels.lora_shrink_partials(x, self.lora_a, token_slots)
        if self.is_row_parallel and self.layer.tp.size > 1:
            dist.all_reduce(shrunk, group=self.layer.tp.group)
        kernels.lora_expand(out, shrunk, self.lora_b, token_slots, self.bounds)
        return out


def shrink_mode() -> str:
    mode = os.environ.get("HPCINFER_LORA_SHRINK", DEFAULT_SHRINK)
    if mode not in SHRINK_MODES:
        raise ValueError(f"HPCINFER_LORA_SHRINK={mode!r}: use one of {', '.join(SHRINK_MODES)} "
                         "(or leave it unset)")
    return mode


def _kernels(x: torch.Tensor):
    # The Triton kernels on a GPU, the torch reference elsewhere (as layers/moe.py does).
    if x.is_cuda:
        from hpcinfer.kernels import lora
        return lora
    return lora_reference
