"""Decode CUDA graphs with LoRA, the parts a CPU can check.

A captured graph reads fixed addresses: the slot weights and the per-row slot indices must
never be reallocated, padded rows must carry the null slot, and a mixed step split into a
decode graph and an eager prefill must give each row its own adapter. ``ReplayOnCpu``
(hpcinfer/testing/cpu_graphs.py) is
DecodeGraphs with the one CUDA-only piece (capture) replaced by re-running the forward over
the static buffers with the hooks forced on, which is what a replay does; the real graphs
run in tests/gpu/test_lora_gpu.py.
"""
from __future__ import annotations

import pytest

from hpcinfer import LLM, SamplingParams
from hpcinfer.engine import cuda_graphs
from hpcinfer.lora.layers import NULL_SLOT
from hpcinfer.lora.request import LoRARequest
from hpcinfer.testing.cpu_graphs import install_graphs
from hpcinfer.testing.tiny_lora import ATTENTION, MLP

from .conftest import assert_shrink

MAX_NEW = 8
SPECS = {
    "qv-r4": dict(rank=4, alpha=8.0, targets=("q_proj", "v_proj"), seed=11),
    "all-r8-rs": dict(rank=8, alpha=4.0, use_rslora=True, targets=ATTENTION + MLP, seed=12),
    "mlp-r16": dict(rank=16, alpha=16.0, targets=("gate_proj", "down_proj"), seed=13),
}


def greedy():
    return SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


def slot_weight_pointers(manager):
    return [t.data_ptr() for layer in manager.layers for t in (layer.lora_a, layer.lora_b)]


def record_replays(graphs):
    """[(n, bs, slots of the bs rows the graph read)] for every replay."""
    seen, replay = [], graphs._replay

    def recorded(input_ids, *args):
        hidden = replay(input_ids, *args)
        n = input_ids.shape[0]
        bs = graphs.padded_size(n)
        seen.append((n, bs, graphs.lora_slots.buffer[:bs].tolist()))
        return hidden
    graphs._replay = recorded
    return seen


@pytest.fixture
def rows(adapter, prompts):
    """Each prompt under each adapter and the base: (prompt, adapter name or None)."""
    paths = {name: adapter("llama", name, **kw) for name, kw in SPECS.items()}
    requests = {name: LoRARequest(name, i + 1, paths[name]) for i, name in enumerate(SPECS)}
    return [(p, name) for p in prompts for name in (*SPECS, None)], paths, requests


def run_rows(llm, rows, requests):
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in rows], greedy(), use_tqdm=False,
                        lora_request=[requests[n] if n else None for _, n in rows])
    return [o.outputs[0].token_ids for o in outs]


def check_against_peft(got, rows, paths, oracle):
    for (prompt, name), tokens in zip(rows, got):
        want = oracle("llama", paths[name] if name else None, [prompt], MAX_NEW)[0]
        assert tokens == want, f"adapter {name}, prompt of {len(prompt)} tokens"


def test_swaps_copy_into_fixed_buffers(base, rows, shrink):
    rows, paths, requests = rows
    llm = LLM(base("llama"), device="cpu", enable_lora=True, max_model_len=128, max_loras=1,
              max_lora_rank=16, max_num_seqs=4)
    assert_shrink(llm, shrink)
    manager = llm.llm_engine.lora
    before = slot_weight_pointers(manager), manager.step_slots.buffer.data_ptr()
    run_rows(llm, rows, requests)
    assert manager.num_slot_loads >= 3          # one slot, three adapters: swapped
    assert (slot_weight_pointers(manager), manager.step_slots.buffer.data_ptr()) == before


def test_step_slots_refuse_to_grow(base):
    import numpy as np
    llm = LLM(base("llama"), device="cpu", enable_lora=True, max_model_len=128,
              max_num_seqs=4, max_num_batched_tokens=64)
    slots = llm.llm_engine.lora.step_slots
    assert slots.buffer.shape[0] == 64
    with pytest.raises(RuntimeError, match="bug"):
        slots.set(np.zeros(65, np.int32))


def test_replayed_decode_equals_peft_with_padded_rows_on_the_null_slot(base, rows, oracle,
                                                                       shrink):
    rows, paths, requests = rows
    llm = LLM(base("llama"), device="cpu", enable_lora=True, max_model_len=128, max_loras=2,
              max_lora_rank=16, max_num_seqs=6)
    assert_shrink(llm, shrink)
    graphs = install_graphs(llm)
    seen = record_replays(graphs)
    check_against_peft(run_rows(llm, rows, requests), rows, paths, oracle)
    padded = [(n, bs, slots) for n, bs, slots in seen if bs > n]
    assert padded, "no replay used a padded batch size"
    assert all(slots[n:] == [NULL_SLOT] * (bs - n) for n, bs, slots in padded)
    assert any(s >= 0 for _, _, slots in seen for s in slots)   # adapters ran in replays


def test_stale_slots_in_padded_rows_are_cleared(base, adapter, prompts):
    # A prefill step leaves its rows' slots in the buffer; a later decode batch of fewer
    # rows replays a padded size: the rows past it must read the null slot, not the leftovers.
    path = adapter("llama", "all-r8", rank=8, alpha=24.0)
    llm = LLM(base("llama"), device="cpu", enable_lora=True, max_model_len=128,
              max_num_seqs=8)
    graphs = install_graphs(llm)
    seen = record_replays(graphs)
    lora = LoRARequest("all-r8", 1, path)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:3]], greedy(),
                        use_tqdm=False, lora_request=lora)
    assert len(outs) == 3
    n, bs, slots = seen[0]
    assert (n, bs) == (3, 4) and slots == [0, 0, 0, NULL_SLOT]


def test_mixed_steps_split_into_graph_and_prefill_keep_each_rows_adapter(base, rows, oracle,
                                                                         monkeypatch, shrink):
    # Split from the first decode on: the prefill rows run eagerly after the replay has
    # padded the buffer, and must still find their own slots.
    monkeypatch.setattr(cuda_graphs, "MIN_SPLIT_DECODES", 1)
    rows, paths, requests = rows
    llm = LLM(base("llama"), device="cpu", enable_lora=True, max_model_len=128, max_loras=2,
              max_lora_rank=16, max_num_seqs=6, max_num_batched_tokens=32)
    graphs = install_graphs(llm)
    check_against_peft(run_rows(llm, rows, requests), rows, paths, oracle)
    assert graphs.num_splits > 0 and graphs.num_replays > graphs.num_splits


def test_base_only_model_rows_replay_with_lora_enabled(base, prompts, oracle):
    llm = LLM(base("llama"), device="cpu", enable_lora=True, max_model_len=128,
              max_num_seqs=4)
    graphs = install_graphs(llm)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == oracle("llama", None, prompts, MAX_NEW)
    assert graphs.num_replays >= MAX_NEW - 1
