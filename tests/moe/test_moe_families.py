"""Mixtral, Qwen2-MoE, Qwen3-MoE and gpt-oss against transformers (fp32, CPU, tiny random
checkpoints): logits through the paged cache, greedy tokens through LLM, and load errors.

The tiny configs (hpcinfer/testing/tiny.py, TINY_MOE_FAMILIES) cover odd expert counts, top-k
1, 2 and 4, a shared expert with its sigmoid gate, norm_topk_prob on and off, a dense first
layer (mlp_only_layers), decoder_sparse_step 2, and for gpt-oss attention sinks, alternating
8-token windows, yarn, router and expert biases and a swiglu_limit low enough to clamp.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from hpcinfer import LLM, SamplingParams
from hpcinfer.models.registry import load_model
from hpcinfer.testing.batch import (allocate_kv_caches, assign_block_tables, build_batch,
                                    num_blocks_needed)
from hpcinfer.testing.greedy import hf_greedy, random_prompts
from hpcinfer.testing.tiny import TINY_MOE_FAMILIES, build_tiny_checkpoint, tiny_checkpoint

PROMPT_LENS = (1, 5, 33, 70)      # crosses 4-token blocks and gpt-oss's 8-token window


def _hf_logits(hf, tokens):
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


def _close(ours, ref, what):
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("family", TINY_MOE_FAMILIES)
def test_prefill_and_decode_logits_match_transformers(family):
    from transformers import AutoModelForCausalLM
    path = tiny_checkpoint(family)
    model = load_model(path, dtype=torch.float32, device="cpu", attention_backend="torch_ref")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    spec = model.spec
    seqs = random_prompts(PROMPT_LENS, seed=3, high=spec.vocab_size)
    tables = assign_block_tables([len(s) + 2 for s in seqs], 4)
    caches = allocate_kv_caches(spec.num_layers, num_blocks_needed(tables), 4,
                                spec.num_kv_heads, spec.head_dim)
    batch = build_batch(seqs, tables, 4)
    with torch.no_grad():
        logits = model.compute_logits(model(batch.input_ids, batch.positions, caches, batch.meta))
    cu = batch.meta.cu_seqlens_q.tolist()
    for i, seq in enumerate(seqs):
        _close(logits[cu[i]:cu[i + 1]], _hf_logits(hf, seq), f"prefill of {len(seq)}")
    for step in range(2):
        computed = [len(s) for s in seqs]
        seqs = [s + [7 + step + i] for i, s in enumerate(seqs)]
        batch = build_batch(seqs, tables, 4, num_computed=computed)
        with torch.no_grad():
            logits = model.compute_logits(model(batch.input_ids, batch.positions, caches,
                                                batch.meta))
        for i, seq in enumerate(seqs):
            _close(logits[i], _hf_logits(hf, seq)[-1], f"decode {step}, length {len(seq)}")


@pytest.mark.parametrize("family", TINY_MOE_FAMILIES)
def test_greedy_tokens_match_transformers(family):
    path = str(tiny_checkpoint(family))
    prompts = random_prompts((1, 9, 17, 40, 77), seed=5)
    llm = LLM(path, device="cpu", dtype="float32", max_model_len=256, block_size=4,
              max_num_batched_tokens=64)   # chunked prefill of the 77-token prompt
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                        use_tqdm=False)
    want = hf_greedy(path, prompts, max_new=16)
    for i, (out, w) in enumerate(zip(outs, want)):
        assert list(out.outputs[0].token_ids) == w, f"{family}, prompt {i} ({len(prompts[i])})"


def test_moe_layers_follow_sparse_step_and_mlp_only_layers():
    from hpcinfer.layers.moe import SparseMoE
    from hpcinfer.models.qwen2_moe import SharedExpertMoE
    q2 = load_model(tiny_checkpoint("qwen2_moe"), dtype=torch.float32, device="cpu")
    assert [type(layer.mlp).__name__ for layer in q2.model.layers] == \
        ["LlamaMLP", "SharedExpertMoE", "SharedExpertMoE"]
    assert isinstance(q2.model.layers[1].mlp, SharedExpertMoE)
    q3 = load_model(tiny_checkpoint("qwen3_moe"), dtype=torch.float32, device="cpu")
    assert [isinstance(layer.mlp, SparseMoE) for layer in q3.model.layers] == [False, True]


def _copy(family, tmp_path):
    dst = tmp_path / family
    shutil.copytree(tiny_checkpoint(family), dst)
    return dst


def test_missing_expert_tensor_is_named(tmp_path):
    path = _copy("mixtral", tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.experts\.gate_up_proj\.weight "
                                         r"\(\(3, 'up'\)\)"):
        load_model(path, dtype=torch.float32, device="cpu")


def test_expert_layout_that_does_not_divide_is_refused_before_loading(tmp_path):
    from hpcinfer.layers.linear import TensorParallel
    # Mixtral tiny: 5 experts, so EP=2 cannot place them; with intermediate 45, TP=2 cannot
    # split each expert (and the message names expert parallelism as the way out). The
    # shards are deleted first: the refusal must come before any weight is read.
    path = build_tiny_checkpoint("mixtral", tmp_path / "m", intermediate_size=45)
    for shard in path.glob("*.safetensors"):
        shard.unlink()
    with pytest.raises(ValueError, match="num_experts=5 is not divisible by the "
                                         "expert-parallel size 2"):
        load_model(path, dtype=torch.float32, device="cpu", tp=TensorParallel(0, 2),
                   expert_parallel=True)
    with pytest.raises(ValueError, match="intermediate size=45 is not divisible by the "
                                         "tensor-parallel size 2.*enable_expert_parallel"):
        load_model(path, dtype=torch.float32, device="cpu", tp=TensorParallel(0, 2))


def test_gpt_oss_expert_tensor_of_the_wrong_layout_is_refused(tmp_path):
    # A checkpoint whose stacked experts are [E, 2I, H] instead of gpt-oss's [E, H, 2I].
    from safetensors.torch import load_file, save_file
    path = _copy("gpt_oss", tmp_path)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = path / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = tensors[name].transpose(1, 2).contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=name.replace(".", r"\.") + ".*wrong shape"):
        load_model(path, dtype=torch.float32, device="cpu")
