"""Tensor parallelism end to end on CPU: two real processes (gloo) each load their slice of a
tiny checkpoint; their logits must equal the unsharded model's."""
from __future__ import annotations

import textwrap

from hpcinfer.testing.gloo_ranks import run_two_ranks
from hpcinfer.testing.tiny import tiny_checkpoint

_RANK_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from hpcinfer.layers.linear import TensorParallel
    from hpcinfer.models.registry import load_model
    from hpcinfer.testing.batch import (allocate_kv_caches, assign_block_tables, build_batch,
                                        num_blocks_needed)
    rank, port, paths = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    def run(path, tp):
        model = load_model(path, dtype=torch.float32, device="cpu",
                           attention_backend="torch_ref", tp=tp)
        spec = model.spec
        gen = torch.Generator().manual_seed(0)
        seqs = [torch.randint(3, spec.vocab_size, (n,), generator=gen).tolist() for n in (4, 19)]
        tables = assign_block_tables([len(s) + 1 for s in seqs], 4)
        caches = allocate_kv_caches(spec.num_layers, num_blocks_needed(tables), 4,
                                    spec.num_kv_heads, spec.head_dim)
        batch = build_batch(seqs, tables, 4)
        out = [model.compute_logits(model(batch.input_ids, batch.positions, caches, batch.meta))]
        nc = [len(s) for s in seqs]
        seqs = [s + [7] for s in seqs]
        batch = build_batch(seqs, tables, 4, num_computed=nc)
        out.append(model.compute_logits(model(batch.input_ids, batch.positions, caches, batch.meta)))
        return torch.cat(out)
    for path in paths:
        with torch.no_grad():
            sharded = run(path, TensorParallel(rank, 2))
            full = run(path, TensorParallel(0, 1))
        torch.testing.assert_close(sharded, full, atol=1e-4, rtol=1e-4,
                                   msg=lambda m: f"{path}: {m}")
    dist.destroy_process_group()
    print(f"rank {rank} ok")
""")


def test_two_rank_tensor_parallel_equals_one_rank(tmp_path):
    # GQA + llama3 rope; qkv bias + tied head; OPT (biases, LayerNorm, project_in/out);
    # Phi-3's fused qkv/gate_up tensors split per rank (partial rotary, longrope); Gemma 2's
    # capped logits gathered across ranks; Gemma 3's single KV head on both ranks.
    # One process pair for all of them: interpreter start-up dominates.
    paths = [str(tiny_checkpoint(family))
             for family in ("llama3", "qwen2", "opt", "phi3", "gemma2", "gemma3")]
    run_two_ranks(tmp_path, _RANK_SCRIPT, paths, timeout_s=120)
