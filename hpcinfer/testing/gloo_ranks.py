"""Two real processes on CPU (gloo) running one test script, for the tensor/expert-parallel
equality tests that need no mpirun (tests/models/test_tensor_parallel.py, tests/moe/).

The script gets ``RANK PORT ARGS...`` on its command line, initialises the gloo group itself
on ``tcp://127.0.0.1:PORT`` and prints ``rank R ok`` when its checks pass.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(tmp_path: Path, script_text: str, args: list[str],
                  timeout_s: float = 180) -> list[str]:
    """Run ``script_text`` as ranks 0 and 1; fail with a rank's output tail unless both exit 0
    and say ``rank R ok``. Returns both outputs."""
    script = Path(tmp_path) / "rank.py"
    script.write_text(script_text)
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}   # two ranks on two cores
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), port, *args],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for rank in range(2)]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=timeout_s)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{out[-3000:]}"
        assert f"rank {rank} ok" in out, f"rank {rank} did not finish its checks:\n{out[-3000:]}"
    return outputs


# The MoE families' TP/EP equality script (tests/moe): each run is "CHECKPOINT@tp" or
# "CHECKPOINT@ep", optionally "@E,I" more: the experts and intermediate size each rank's layer 0
# must hold. Logits (prefill, then 3 greedy decode steps) and tokens equal one process's.
MOE_RANK_SCRIPT = textwrap.dedent("""
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
        return torch.cat(out), seqs, model
    for item in runs:
        path, mode, *layout = item.split("@")
        with torch.no_grad():
            sharded, tokens, model = run(path, TensorParallel(rank, 2), mode == "ep")
            full, full_tokens, _ = run(path, TensorParallel(0, 1), False)
        if layout:   # "E,I": this rank's experts and intermediate size in layer 0
            experts = model.model.layers[0].mlp.experts
            want = tuple(int(v) for v in layout[0].split(","))
            assert (experts.layout.num_local_experts, experts.layout.local_inter) == want, item
        torch.testing.assert_close(sharded, full, atol=1e-4, rtol=1e-4,
                                   msg=lambda m: f"{item}: {m}")
        assert tokens == full_tokens, f"{item}: greedy tokens differ"
    dist.destroy_process_group()
    print(f"rank {rank} ok")
""")
