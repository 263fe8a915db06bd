"""Pure helpers of the distributed layer: launcher detection, Slurm host lists, stage splits,
layout errors raised before any rank is started, and a spawned TP=2 x PP=2 in one process."""
from __future__ import annotations

import pytest

from hpcinfer.distributed.groups import split_layers
from hpcinfer.distributed.world import _expand_one, detect_launch, slurm_rank_hosts
from hpcinfer.testing.tiny import tiny_checkpoint


def test_detect_launch_from_each_launcher():
    assert detect_launch({}).launcher == "single"
    slurm = detect_launch({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1"})
    assert (slurm.rank, slurm.size, slurm.local_rank, slurm.launcher) == (3, 4, 1, "slurm")
    assert detect_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).launcher == "single"
    torchrun = detect_launch({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (torchrun.rank, torchrun.size, torchrun.launcher) == (1, 2, "torchrun")


def test_slurm_rank_hosts(monkeypatch):
    assert _expand_one("gpu[08-10]") == ["gpu08", "gpu09", "gpu10"]
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: our own expansion
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[01-02],cpu7")
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "2(x2),1")
    assert slurm_rank_hosts() == ["gpu01", "gpu01", "gpu02", "gpu02", "cpu7"]


def test_split_layers():
    assert split_layers(32, 4) == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert split_layers(10, 3) == [(0, 4), (4, 7), (7, 10)]  # earlier stages take the rest
    assert split_layers(10, 2, [3, 7]) == [(0, 3), (3, 10)]
    with pytest.raises(ValueError, match="summing to the model's 10 layers"):
        split_layers(10, 2, [3, 3])
    with pytest.raises(ValueError, match="more than the model's 2 layers"):
        split_layers(2, 3)


def test_bad_layouts_fail_before_spawning():
    from hpcinfer import LLM
    path = str(tiny_checkpoint("llama3"))  # 4 heads, 2 KV heads, 2 layers
    with pytest.raises(ValueError, match="does not divide the model's 4 attention heads"):
        LLM(path, tensor_parallel_size=3, device="cpu")
    with pytest.raises(ValueError, match="pipeline_parallel_size=3 is more than"):
        LLM(path, pipeline_parallel_size=3, device="cpu")
    with pytest.raises(ValueError, match="tensor_parallel_size=0 must be"):
        LLM(path, tensor_parallel_size=0, device="cpu")


def test_one_process_spawns_tp2_then_tp2_x_pp2_and_exits_cleanly():
    import json
    import os
    import subprocess
    import sys

    from hpcinfer import LLM, SamplingParams
    path = str(tiny_checkpoint("gemma"))  # 1 KV head: replicated on both TP ranks
    prompts = ["Hello, my name is", "Slurm schedules jobs", "The capital of France is"]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in
            LLM(path, device="cpu", dtype="float32").generate(prompts, params, use_tqdm=False)]
    script = (
        "import json, sys\n"
        "from hpcinfer import LLM, SamplingParams\n"
        f"for tp, pp in ((2, 1), (2, 2)):  # a second spawned LLM replaces the first\n"
        f"    llm = LLM({path!r}, device='cpu', dtype='float32', tensor_parallel_size=tp,\n"
        "              pipeline_parallel_size=pp)\n"
        f"    outs = llm.generate({prompts!r}, SamplingParams(temperature=0.0, max_tokens=10,\n"
        "                         ignore_eos=True), use_tqdm=False)\n"
        "    print('TOKENS ' + json.dumps([o.outputs[0].token_ids for o in outs]))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [x for x in proc.stdout.splitlines() if x.startswith("TOKENS ")]
    assert [json.loads(x[len("TOKENS "):]) for x in lines] == [want, want]


def test_lazy_slices_read_exactly_the_region(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    import hpcinfer.distributed.slices as slices
    monkeypatch.setattr(slices, "CHUNK_BYTES", 64)  # several row chunks per column slice
    gen = torch.Generator().manual_seed(0)
    tensors = {"w16": torch.randn(12, 10, generator=gen).to(torch.bfloat16),
               "h16": torch.randn(12, 10, generator=gen).to(torch.float16),
               "f32": torch.randn(7, 5, generator=gen), "bias": torch.randn(9, generator=gen)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    lazy = {name: t for name, t, _ in slices.iter_checkpoint_lazy({n: path for n in tensors})}
    for name, full in tensors.items():
        got = lazy[name]
        assert got.shape == full.shape and got.dtype == full.dtype
        assert torch.equal(got.materialize(), full)
        assert torch.equal(got.narrow(0, 2, 3).materialize(), full.narrow(0, 2, 3))
        assert torch.equal(got[1:4].materialize(), full[1:4])
        if full.dim() == 2:
            assert torch.equal(got.narrow(1, 1, 3).materialize(), full.narrow(1, 1, 3))
            assert torch.equal(got.narrow(0, 3, 4).narrow(1, 2, 2).materialize(),
                               full[3:7, 2:4])
