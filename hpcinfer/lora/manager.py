"""LoRAManager: the slot pool of one engine (rank) and its hooks into the engine.

Ownership: the manager alone writes the slot weights and the step's slot indices; the
scheduler (lora/scheduling.py) guarantees a step never names more adapters than slots.
Adapters are read and checked when a request arrives (``add``: a bad adapter is a
ValueError before anything changes), kept on the CPU (``max_cpu_loras``, least recently used
dropped, re-read from disk when needed again) and copied into a slot the first step that
needs them (``prepare_step``), evicting the least recently used adapter not in that step.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np
import torch

from hpcinfer.layers.linear import LinearBase
from hpcinfer.lora.adapter import AdapterWeights, load_adapter
from hpcinfer.lora.layers import LoRALayer, StepSlots
from hpcinfer.lora.request import LoRARequest

log = logging.getLogger(__name__)

# Our merged/plain projections that LoRA wraps; their HF pieces come from the model class's
# packed_modules_mapping (q_proj -> (qkv_proj, "q"), ...).
TARGET_LAYERS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class LoRAManager:
    def __init__(self, model, max_loras: int, max_lora_rank: int, max_cpu_loras: int,
                 max_num_tokens: int, device: torch.device, dtype: torch.dtype):
        self.max_loras, self.max_lora_rank, self.max_cpu_loras = (max_loras, max_lora_rank,
                                                                  max_cpu_loras)
        self.step_slots = StepSlots(max_num_tokens, device)
        self.targets = _wrap_targets(model, max_loras, max_lora_rank, self.step_slots, dtype,
                                     device)
        if not self.targets:
            raise ValueError(f"enable_lora=True but {type(model).__name__} has no layers "
                             f"LoRA can wrap ({', '.join(TARGET_LAYERS)}); LoRA is supported "
                             "on the Llama-style families (docs/lora.md)")
        self.layers = list({id(t[0]): t[0] for t in self.targets.values()}.values())
        self.requests: dict[int, LoRARequest] = {}      # lora_int_id -> its first request
        self.cpu_cache: OrderedDict[int, AdapterWeights] = OrderedDict()
        self.slot_ids: list[int | None] = [None] * max_loras   # adapter id held by each slot
        self.slot_last_step = [0] * max_loras
        self.num_steps = 0
        self.num_slot_loads = 0   # adapters copied into a slot (swaps included)

    # --- requests ---
    def add(self, request: LoRARequest, request_id: str) -> None:
        """Check ``request``'s adapter (reading it if new); ValueError names the request."""
        if not isinstance(request, LoRARequest):
            raise ValueError(f"request {request_id!r}: lora_request must be a LoRARequest "
                             f"(hpcinfer.lora.request), got {type(request).__name__}")
        known = self.requests.get(request.lora_int_id)
        if known is not None and known.lora_path != request.lora_path:
            raise ValueError(f"request {request_id!r}: lora_int_id {request.lora_int_id} is "
                             f"already adapter {known.lora_name!r} at {known.lora_path}, not "
                             f"{request.lora_path}: give each adapter its own lora_int_id")
        try:
            self._weights(request)
        except ValueError as e:
            raise ValueError(f"request {request_id!r}: {e}") from None
        self.requests.setdefault(request.lora_int_id, request)

    def _weights(self, request: LoRARequest) -> AdapterWeights:
        weights = self.cpu_cache.get(request.lora_int_id)
        if weights is None:
            weights = load_adapter(request, self.targets, self.max_lora_rank)
            self.cpu_cache[request.lora_int_id] = weights
            if len(self.cpu_cache) > self.max_cpu_loras:
                self.cpu_cache.popitem(last=False)
        self.cpu_cache.move_to_end(request.lora_int_id)
        return weights

    # --- steps ---
    def prepare_step(self, seqs, num_new_tokens: list[int]) -> None:
        """Put every adapter of this step in a slot and write each token row's slot."""
        self.num_steps += 1
        needed = {seq.lora_id: seq.lora_request for seq in seqs if seq.lora_id}
        slot_of = {lora_id: self._slot_for(lora_id, request, needed)
                   for lora_id, request in needed.items()}
        seq_slots = np.fromiter((slot_of.get(seq.lora_id, -1) for seq in seqs), np.int32,
                                len(seqs))
        self.step_slots.set(np.repeat(seq_slots, num_new_tokens))

    def _slot_for(self, lora_id: int, request: LoRARequest, needed: dict) -> int:
        if lora_id in self.slot_ids:
            slot = self.slot_ids.index(lora_id)
        else:
            free = [s for s, held in enumerate(self.slot_ids) if held is None or held not in needed]
            if not free:  # the scheduler keeps a step's adapters within the pool
                raise RuntimeError(f"a step needs {len(needed)} adapters but max_loras="
                                   f"{self.max_loras}; this is a bug: please report it")
            slot = min(free, key=lambda s: (self.slot_ids[s] is not None, self.slot_last_step[s]))
            self._load_slot(slot, lora_id, self._weights(request))
        self.slot_last_step[slot] = self.num_steps
        return slot

    def _load_slot(self, slot: int, lora_id: int, weights: AdapterWeights) -> None:
        for layer in self.layers:
            layer.clear(slot)
        with torch.no_grad():
            for module, (a, b) in weights.modules.items():
                layer, piece = self.targets[module]
                layer.load(slot, piece, a, b)
        log.debug("LoRA adapter %d -> slot %d (was %s)", lora_id, slot, self.slot_ids[slot])
        self.slot_ids[slot] = lora_id
        self.num_slot_loads += 1


def _wrap_targets(model, max_loras: int, max_rank: int, slots: StepSlots, dtype, device
                  ) -> dict[str, tuple[LoRALayer, object]]:
    """Hook every target layer; return HF module path -> (its LoRALayer, the piece)."""
    packed = getattr(model, "packed_modules_mapping", {}) or {}
    hf_names = {ours: hf for hf, ours in packed.items()}   # ("qkv_proj", "q") -> "q_proj"
    targets = {}
    for name, module in model.named_modules():
        prefix, _, leaf = name.rpartition(".")
        if leaf not in TARGET_LAYERS or not isinstance(module, LinearBase):
            continue
        lora_layer = LoRALayer(name, module, max_loras, max_rank, slots, dtype, device)
        for piece in lora_layer.pieces:
            hf_leaf = leaf if piece is None else hf_names.get((leaf, piece))
            if hf_leaf is not None:
                targets[f"{prefix}.{hf_leaf}" if prefix else hf_leaf] = (lora_layer, piece)
    return targets


def attach_lora(config, runner) -> LoRAManager | None:
    """The engine's LoRA manager (None without enable_lora), hooked into ``runner``'s model."""
    if not config.enable_lora:
        return None
    manager = LoRAManager(runner.model, config.max_loras, config.max_lora_rank,
                          config.max_cpu_loras or config.max_loras,
                          # every step's rows, and every decode graph's (padded) batch
                          max(config.max_num_batched_tokens, config.max_num_seqs),
                          runner.device, runner.spec.dtype)
    runner.lora = manager
    return manager


def check_lora_request(manager: LoRAManager | None, lora_request, request_id: str):
    """The request's adapter, checked (None without one); ValueError names the request."""
    if lora_request is None:
        return None
    if manager is None:
        raise ValueError(f"request {request_id!r} has a lora_request but LoRA is off: create "
                         "the LLM with enable_lora=True (and max_loras, max_lora_rank)")
    manager.add(lora_request, request_id)
    return lora_request


def check_prompt_lora(manager: LoRAManager | None, lora_request, index: int):
    """check_lora_request for the index-th prompt of a generate()/beam_search() call: the
    error names the prompt."""
    try:
        return check_lora_request(manager, lora_request, str(index))
    except ValueError as e:
        raise ValueError(f"prompt {index}: {e}") from None


def lora_requests_per_prompt(lora_request, num_prompts: int) -> list:
    """generate()/chat()'s lora_request: one for all prompts, or a list with one per prompt."""
    if lora_request is None or isinstance(lora_request, LoRARequest):
        return [lora_request] * num_prompts
    loras = list(lora_request)
    if len(loras) != num_prompts:
        raise ValueError(f"got {len(loras)} lora_request entries for {num_prompts} prompts: "
                         "pass one LoRARequest for all prompts or exactly one (or None) per "
                         "prompt")
    return loras
