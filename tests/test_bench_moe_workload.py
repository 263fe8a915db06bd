"""Workload C's pieces of bench/throughput.py on CPU: the decode batches of an ideal engine,
the bound built on them, and a load_format="dummy" Qwen3-MoE model directory that our
engine runs (so the GPU run needs no 61 GB checkpoint for all 48 layers)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import moe_workload  # noqa: E402  (bench/ is not a package)
import throughput  # noqa: E402

RATES = {"copy_bytes_per_s": 4.0e12, "matmul_flops": 7.0e14}


def test_decode_batches_fill_slots_then_drain():
    requests = [([1], n) for n in (3, 1, 2, 5)]
    # two slots: 3 and 1 start; 2 takes the slot freed after step 0 (steps 1-2); 5 waits for
    # the slots freed after step 2 (steps 3-7, alone)
    assert moe_workload.decode_batch_sizes(requests, 2) == [2, 2, 2, 1, 1, 1, 1, 1]
    assert sum(moe_workload.decode_batch_sizes(requests, 2)) == 11     # every output token
    assert moe_workload.decode_batch_sizes(requests, 8) == [4, 3, 2, 1, 1]


@pytest.mark.parametrize("workload,layers", [("C", 4), ("B", None)])
def test_bound_of_a_draining_batch_is_below_the_flat_form(workload, layers):
    spec = throughput.WORKLOADS[workload]
    shape = throughput.shape_of(spec["shape"], layers)
    requests = throughput.make_requests(workload, 200)
    live = throughput.bound_output_tok_s(shape, requests, spec["max_num_seqs"], RATES)
    flat = throughput.bound_output_tok_s(shape, requests, spec["max_num_seqs"], RATES,
                                         flat=True)
    # outputs of 16-512 tokens all starting together: the ideal engine runs as many steps as
    # the longest one, with ever fewer sequences, so it cannot reach the flat form's rate
    assert 0.3 * flat < live < 0.9 * flat


@pytest.mark.parametrize("workload,layers", [("C", 4), ("A", None)])
def test_bound_of_equal_outputs_in_full_steps_is_the_flat_form(workload, layers):
    spec = throughput.WORKLOADS[workload]
    shape = throughput.shape_of(spec["shape"], layers)
    # as many requests as slots, one output length: every step is full, both forms agree
    requests = [([7] * 100, 64)] * spec["max_num_seqs"]
    live = throughput.bound_output_tok_s(shape, requests, spec["max_num_seqs"], RATES)
    flat = throughput.bound_output_tok_s(shape, requests, spec["max_num_seqs"], RATES,
                                         flat=True)
    assert live == pytest.approx(flat, rel=1e-12)


def test_dummy_moe_directory_runs_in_our_engine(tmp_path):
    import hpcinfer
    shape = dict(moe_workload.QWEN3_30B_A3B, vocab_size=512, hidden_size=64,
                 moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16)
    model_dir, load_format = throughput.model_dir_for("C", shape, tmp_path, None, "dummy")
    assert load_format == "dummy" and not list(model_dir.glob("*.safetensors"))
    llm = hpcinfer.LLM(str(model_dir), load_format="dummy", dtype="float32", device="cpu",
                       max_model_len=64, max_num_seqs=4)
    assert type(llm.llm_engine.runner.model).__name__ == "Qwen3MoeForCausalLM"
    params = hpcinfer.SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": [3, 4, 5]}, {"prompt_token_ids": [9, 8]}], params)
    assert [len(o.outputs[0].token_ids) for o in out] == [5, 5]


def test_w4a16_moe_is_refused_in_one_line(tmp_path):
    shape = throughput.shape_of("qwen3-30b-a3b", 2)
    with pytest.raises(SystemExit, match="workload C .MoE. runs bf16 or fp8 only"):
        throughput.model_dir_for("C", shape, tmp_path, "awq", "dummy")
