"""Tensor and expert parallelism of the MoE families on CPU: two real processes (gloo) each
load their part of a tiny checkpoint; logits (prefill, then decode) must equal one process's,
and so must the greedy tokens that follow from them.

TP=2 splits every expert's intermediate dimension (and the shared expert's, the dense
layers', the heads); EP=2 (expert_parallel=True) gives each rank half the experts whole.
EP needs an even expert count, so it runs on copies of the tiny configs with 6 or 8 experts.
"""
from __future__ import annotations

import textwrap

from hpcinfer.testing.gloo_ranks import run_two_ranks
from hpcinfer.testing.tiny import TINY_MOE_FAMILIES, build_tiny_checkpoint, tiny_checkpoint

_RANK_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from hpcinfer.layers.linear import TensorParallel
    from hpcinfer.models.registry import load_model
    from hpcinfer.testing.batch import (allocate_kv_caches, assign_block_tables, build_batch,
                                        num_blocks_needed)
    rank, port, runs = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    def run(path, tp, ep):
        model = load_model(path, dtype=torch.float32, device="cpu",
                           attention_backend="torch_ref", tp=tp, expert_parallel=ep)
        spec = model.spec
        gen = torch.Generator().manual_seed(0)
        seqs = [torch.randint(3, spec.vocab_size, (n,), generator=gen).tolist()
                for n in (4, 19, 30)]
        tables = assign_block_tables([len(s) + 3 for s in seqs], 4)
        caches = allocate_kv_caches(spec.num_layers, num_blocks_needed(tables), 4,
                                    spec.num_kv_heads, spec.head_dim)
        batch = build_batch(seqs, tables, 4)
        logits = model.compute_logits(model(batch.input_ids, batch.positions, caches, batch.meta))
        cu = batch.meta.cu_seqlens_q.tolist()
        out = [logits[[c - 1 for c in cu[1:]]]]
        for _ in range(3):   # greedy decode from the sharded model's own choices
            nc = [len(s) for s in seqs]
            seqs = [s + [int(t)] for s, t in zip(seqs, out[-1].argmax(-1))]
            batch = build_batch(seqs, tables, 4, num_computed=nc)
            out.append(model.compute_logits(model(batch.input_ids, batch.positions, caches,
                                                  batch.meta)))
        return torch.cat(out), seqs
    for item in runs:
        path, mode = item.rsplit("@", 1)
        with torch.no_grad():
            sharded, tokens = run(path, TensorParallel(rank, 2), mode == "ep")
            full, full_tokens = run(path, TensorParallel(0, 1), False)
        torch.testing.assert_close(sharded, full, atol=1e-4, rtol=1e-4,
                                   msg=lambda m: f"{item}: {m}")
        assert tokens == full_tokens, f"{item}: greedy tokens differ"
    dist.destroy_process_group()
    print(f"rank {rank} ok")
""")


def test_tensor_and_expert_parallel_equal_one_process(tmp_path):
    # One process pair for every case: interpreter start-up dominates.
    even = {"mixtral": dict(num_local_experts=6), "qwen2_moe": dict(num_experts=8),
            "gpt_oss": dict(num_local_experts=6)}
    ep_paths = [str(build_tiny_checkpoint(f, tmp_path / f, **kw)) for f, kw in even.items()]
    ep_paths.append(str(tiny_checkpoint("qwen3_moe")))            # 6 experts already
    runs = [f"{tiny_checkpoint(f)}@tp" for f in TINY_MOE_FAMILIES] + [f"{p}@ep" for p in ep_paths]
    run_two_ranks(tmp_path, _RANK_SCRIPT, runs)


def test_llm_with_expert_parallel_matches_transformers():
    # The vLLM-style entry point: one process asks for two ranks and expert parallelism.
    from hpcinfer import LLM, SamplingParams
    from hpcinfer.testing.greedy import hf_greedy, random_prompts
    path = str(tiny_checkpoint("qwen3_moe"))
    prompts = random_prompts((1, 9, 40), seed=5)
    llm = LLM(path, device="cpu", dtype="float32", tensor_parallel_size=2,
              enable_expert_parallel=True, max_model_len=128)
    experts = llm.llm_engine.runner.model.model.layers[1].mlp.experts
    assert experts.layout.num_local_experts == 3       # this rank holds 3 of the 6, whole
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)
    want = hf_greedy(path, prompts, max_new=12)
    assert [list(o.outputs[0].token_ids) for o in outs] == want
