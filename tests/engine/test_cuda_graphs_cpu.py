"""The CUDA-graph bookkeeping of hpcinfer/engine/cuda_graphs.py, checked on the CPU.

Graph capture needs a GPU, but everything around it does not: the batch-size ladder, copying
a step into the static buffers, padding (slot -1, length 0), slicing the padded output, and
splitting a mixed step into decode rows + prefill chunks. Here each "graph" is a stand-in
whose replay runs the same eager forward over the same static buffers
(hpcinfer.testing.cpu_graphs.ReplayOnCpu, padded rows poisoned with NaN), so a bookkeeping
bug changes tokens exactly as a real replay would. Runs in CI (tiny model, CPU, torch_ref).
"""
from __future__ import annotations

import pytest
import torch

from hpcinfer.engine.cuda_graphs import (MIN_SPLIT_DECODES, aligned_offsets, batch_size_ladder,
                                         graph_safe)
from hpcinfer.testing.cpu_graphs import install_graphs


def test_ladder():
    assert batch_size_ladder(1) == [1]
    assert batch_size_ladder(6) == [1, 2, 4, 6]
    assert batch_size_ladder(16) == [1, 2, 4, 8, 16]
    assert batch_size_ladder(40) == [1, 2, 4, 8, 16, 24, 32, 40]
    assert batch_size_ladder(256)[-3:] == [240, 248, 256]


def test_aligned_offsets():
    # int32 pieces start on multiples of 4 elements, int64 on multiples of 2 (16 bytes).
    assert aligned_offsets([5, 4, 0, 3], 4) == ([0, 8, 12, 12], 16)
    assert aligned_offsets([3, 1, 2], 8) == ([0, 4, 6], 8)
    assert aligned_offsets([], 4) == ([], 0)


def test_graph_safe_needs_the_triton_backend():
    from hpcinfer.models.registry import load_model
    from hpcinfer.testing.tiny import tiny_checkpoint
    path = tiny_checkpoint("qwen2")
    assert not graph_safe(load_model(path, dtype=torch.float32, device="cpu",
                                     attention_backend="torch_ref"))
    assert graph_safe(load_model(path, dtype=torch.float32, device="cpu",
                                 attention_backend="triton"))


def _run(llm, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("graph_logits", ["1", "0"])
def test_padding_and_split_give_eager_tokens(monkeypatch, graph_logits):
    # graph_logits: the LM head in the graphs (the default for small batches) or after them
    monkeypatch.setenv("HPCINFER_GRAPH_LOGITS", graph_logits)
    from hpcinfer import LLM, SamplingParams
    from hpcinfer.testing.tiny import tiny_checkpoint
    path = str(tiny_checkpoint("llama3"))
    g = torch.Generator().manual_seed(7)
    lengths = torch.randint(2, 40, (40,), generator=g).tolist()
    prompts = [torch.randint(6, 380, (n,), generator=g).tolist() for n in lengths]
    # Varying lengths: the decode batch shrinks through padded sizes at the end.
    params = [SamplingParams(temperature=0, max_tokens=6 + i % 9, ignore_eos=True)
              for i in range(len(prompts))]
    kwargs = dict(device="cpu", dtype="float32", max_model_len=128, max_num_seqs=40,
                  max_num_batched_tokens=64)
    eager = _run(LLM(path, **kwargs), prompts, params)
    llm = LLM(path, **kwargs)
    graphs = install_graphs(llm)  # warm-up and capture: dummy steps that must write nothing
    assert all(not (k.any() or v.any()) for k, v in llm.llm_engine.runner.kv_caches)
    got = _run(llm, prompts, params)
    assert graphs.num_replays > 0
    assert graphs.num_splits > 0, f"no mixed step had {MIN_SPLIT_DECODES} decodes"
    assert (graphs.num_logits_replays > 0) == (graph_logits == "1")
    assert got == eager
