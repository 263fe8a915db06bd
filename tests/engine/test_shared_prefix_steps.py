"""Decode steps over a prefix every row shares (engine/shared_prefix.py): which steps qualify,
and that the engine's tokens do not change when it attends the prefix once.

The triton backend runs under the Triton interpreter (conftest sets TRITON_INTERPRET), so the
real shared-prefix kernel and the decode kernel's merge run inside a whole generate call."""
from __future__ import annotations

import numpy as np
import pytest

from hpcinfer import LLM, SamplingParams
from hpcinfer.engine import shared_prefix
from hpcinfer.engine.shared_prefix import shared_prefix_tokens
from hpcinfer.testing.step_spy import watch_prepared

PARAMS = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


@pytest.fixture
def low_thresholds(monkeypatch):
    # Tiny rows and prompts (the interpreter's pace); the real thresholds are for GPU steps.
    monkeypatch.setattr(shared_prefix, "MIN_ROWS", 2)
    monkeypatch.setattr(shared_prefix, "MIN_SHARED_TOKENS", 8)
    monkeypatch.setattr(shared_prefix, "MIN_SAVED_BYTES", 0)


def test_shared_blocks_are_counted_only_before_every_rows_last_key(low_thresholds):
    tables = np.array([[7, 8, 9, 1], [7, 8, 9, 2], [7, 8, 3, 4]], dtype=np.int32)
    # Rows 0-1 share 3 blocks, row 2 only 2: two blocks of 4 tokens.
    assert shared_prefix_tokens(tables, np.array([16, 15, 14]), 4, 64) == 8
    # A row whose last key lies in block 1 leaves one whole block (below the 8-token minimum).
    assert shared_prefix_tokens(tables, np.array([16, 15, 8]), 4, 64) == 0
    assert shared_prefix_tokens(tables[:2], np.array([16, 13]), 4, 64) == 12
    different_first = tables.copy()
    different_first[1, 0] = 5
    assert shared_prefix_tokens(different_first, np.array([16, 15, 14]), 4, 64) == 0


# KV bytes per token, all layers: Llama-3.2-1B (16 layers x 8 kv heads x 64 x K,V x bf16) and
# Llama-3.1-8B (32 layers x 8 x 128 x 2 x 2).
KV_1B, KV_8B = 16 * 8 * 64 * 2 * 2, 32 * 8 * 128 * 2 * 2


def test_thresholds_keep_small_steps_on_their_graphs():
    tables = np.zeros((shared_prefix.MIN_ROWS - 1, 128), dtype=np.int32)
    lens = np.full(tables.shape[0], 2000)
    assert shared_prefix_tokens(tables, lens, 16, KV_8B) == 0            # too few rows
    tables = np.zeros((1024, 128), dtype=np.int32)
    lens = np.full(tables.shape[0], 1100)
    assert shared_prefix_tokens(tables, lens, 16, KV_8B) == 1088          # workload P
    short = np.full(tables.shape[0], shared_prefix.MIN_SHARED_TOKENS)
    assert shared_prefix_tokens(tables, short, 16, KV_8B) == 0           # prefix too short
    # 1B, 256 rows behind 1,024 tokens: ~8 GiB saved, not worth its eager launches ...
    assert shared_prefix_tokens(tables[:256], lens[:256], 16, KV_1B) == 0
    # ... 8B with the same rows: ~32 GiB
    assert shared_prefix_tokens(tables[:256], lens[:256], 16, KV_8B) == 1088


def test_env_switch(monkeypatch):
    monkeypatch.setenv(shared_prefix.ENV, "0")
    assert not shared_prefix.enabled_by_env()
    monkeypatch.setenv(shared_prefix.ENV, "1")
    assert shared_prefix.enabled_by_env()
    monkeypatch.setenv(shared_prefix.ENV, "maybe")
    with pytest.raises(ValueError, match="use 1"):
        shared_prefix.enabled_by_env()


def _generate(path, prompts, backend, monkeypatch, enabled, params=PARAMS):
    monkeypatch.setenv(shared_prefix.ENV, "1" if enabled else "0")
    llm = LLM(path, max_model_len=128, attention_backend=backend, block_size=4,
              max_num_seqs=8, max_num_batched_tokens=256, enable_prefix_caching=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm.llm_engine.runner.num_shared_prefix_steps


def test_generate_with_a_shared_prompt_keeps_its_tokens(checkpoint, make_prompts,
                                                        low_thresholds, monkeypatch):
    path = checkpoint("llama3")
    system = make_prompts((26,), seed=7)[0]          # 6 whole blocks of 4 and a part
    prompts = make_prompts((3, 9, 5, 12, 1, 7), seed=8, prefix=system)
    shared, steps = _generate(path, prompts, "triton", monkeypatch, True)
    plain, none = _generate(path, prompts, "triton", monkeypatch, False)
    reference, _ = _generate(path, prompts, "torch_ref", monkeypatch, True)
    assert steps >= 3 and none == 0
    assert shared == plain == reference


def test_shared_prefix_steps_leave_the_graphs_and_others_replay(checkpoint, make_prompts,
                                                               low_thresholds, monkeypatch):
    # The decode graphs are captured without the shared-prefix launch: such steps run eager,
    # and the steps without one (here the last row alone, under MIN_ROWS) still replay. CPU
    # stand-in graphs (hpcinfer.testing.cpu_graphs) over the triton backend.
    from hpcinfer.testing.cpu_graphs import install_graphs
    path = checkpoint("llama3")
    system = make_prompts((26,), seed=7)[0]
    prompts = make_prompts((3, 9, 5, 12), seed=8, prefix=system)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (6, 14, 8, 9)]
    expected, _ = _generate(path, prompts, "torch_ref", monkeypatch, True, params)
    monkeypatch.setenv(shared_prefix.ENV, "1")
    llm = LLM(path, max_model_len=128, attention_backend="triton", block_size=4,
              max_num_seqs=4, max_num_batched_tokens=256, enable_prefix_caching=True)
    graphs = install_graphs(llm)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert graphs.num_shared_prefix >= 3 and graphs.num_replays >= 3
    assert graphs.num_shared_prefix == llm.llm_engine.runner.num_shared_prefix_steps


def test_mixed_steps_decode_rows_attend_their_shared_prefix_once(checkpoint, make_prompts,
                                                                 low_thresholds, monkeypatch):
    # A job's steady state: rows end at different times and new rows are admitted while the
    # others decode, so most steps are mixed. With the split (the default on a GPU) the
    # decode rows of such a step attend their shared prefix once too (DecodeSplit).
    path = checkpoint("llama3")
    system = make_prompts((26,), seed=7)[0]
    prompts = make_prompts((3, 9, 5, 12, 1, 7, 4, 10), seed=8, prefix=system)
    params = [SamplingParams(temperature=0, max_tokens=3 + 4 * (i % 3), ignore_eos=True)
              for i in range(len(prompts))]
    expected, _ = _generate(path, prompts, "torch_ref", monkeypatch, True, params)
    monkeypatch.setenv(shared_prefix.ENV, "1")
    llm = LLM(path, max_model_len=128, attention_backend="triton", block_size=4,
              max_num_seqs=4, max_num_batched_tokens=40, enable_prefix_caching=True)
    runner = llm.llm_engine.runner
    runner.split_mixed_attention = True   # on a GPU: set when the decode graphs are captured
    shared_splits = watch_prepared(runner, lambda batch: batch.meta.decode_split is not None
                                   and batch.meta.decode_split.shared_prefix_len > 0)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert sum(shared_splits) >= 2
