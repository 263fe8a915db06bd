"""The LoRA side of one linear layer: its slot weights and the forward hook adding the delta.

A ``LoRALayer`` wraps a target layer (qkv_proj, o_proj, gate_up_proj, down_proj) without
changing it: a forward hook adds ``(x @ A^T) @ B^T`` per token row to the layer's output,
with A and B taken from each row's slot (``StepSlots``; -1 rows get nothing). The pieces of a
merged layer (q/k/v, gate/up) are stacked along the rank in A, so one shrink serves all of
them, and B is one [slots, out, rank] tensor over the whole output, so one expand adds every
piece (piece p's columns take the shrink's rank block p): two launches per layer.

Tensor parallelism follows the base layer: a column layer's B keeps this rank's output rows;
a row layer's A keeps this rank's input columns, so its shrink is a partial sum that is
all-reduced (the shrink's [splits, T, rank] fp32 partials, small) before the expand adds the
delta to the already reduced output on every rank.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from hpcinfer.kernels import lora_reference
from hpcinfer.layers.linear import LinearBase, _shard
from hpcinfer.layers.transfer import copy_to


NULL_SLOT = -1   # a row without an adapter: the kernels load and add nothing for it


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
        self.lora_a = torch.zeros((max_loras, len(self.pieces) * max_rank, layer.input_size),
                                  dtype=dtype, device=device)
        # (offset, rows) of each piece in this rank's output columns
        self.out_slices = [layer._out_slice(p)[:2] for p in self.pieces]
        # the pieces tile the output in order: piece p's columns are [bounds[p], bounds[p+1])
        self.bounds = (0, *(offset + rows for offset, rows in self.out_slices))
        if any(offset != lo for (offset, _), lo in zip(self.out_slices, self.bounds)):
            raise ValueError(f"{name}: LoRA needs the merged pieces contiguous in order, got "
                             f"(offset, rows) {self.out_slices}")
        self.lora_b = torch.zeros((max_loras, self.bounds[-1], max_rank), dtype=dtype,
                                  device=device)
        self.handle = layer.register_forward_hook(self._add_delta)

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


def _kernels(x: torch.Tensor):
    # The Triton kernels on a GPU, the torch reference elsewhere (as layers/moe.py does).
    if x.is_cuda:
        from hpcinfer.kernels import lora
        return lora
    return lora_reference
