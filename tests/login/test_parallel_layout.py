"""`hpcinfer validate`/`render` refuse a tensor/pipeline split the model cannot take (read from
the checkpoint's config.json on the login node), instead of failing after the job queued."""
from __future__ import annotations

import json

import pytest

from hpcinfer.cli import main
from hpcinfer.distributed.layout import layout_problem
from hpcinfer.testing.jobs import tree, write_job


def _job(tmp_path, tensor: int, pipeline: int = 1, heads: int = 8, kv_heads: int = 2):
    job = write_job(tmp_path, parallel={"tensor": tensor, "pipeline": pipeline})
    (tmp_path / "model" / "config.json").write_text(json.dumps(
        {"num_attention_heads": heads, "num_key_value_heads": kv_heads, "num_hidden_layers": 4}))
    return job


@pytest.mark.parametrize("command", ["validate", "render"])
@pytest.mark.parametrize("tensor, pipeline, heads, key, words", [
    (3, 1, 8, "parallel.tensor", "does not divide the model's 8 attention heads"),
    (6, 1, 12, "parallel.tensor", "tensor_parallel_size=6 and the model's 4 KV heads"),
    (1, 8, 8, "parallel.pipeline", "more than the model's 4 layers"),
])
def test_layout_the_model_cannot_take_is_refused(tmp_path, capsys, command, tensor, pipeline,
                                                  heads, key, words):
    job = _job(tmp_path, tensor, pipeline, heads=heads, kv_heads=4 if heads == 12 else 2)
    before = tree(tmp_path)
    assert main([command, str(job)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "job.yaml:" in err and key in err and words in err, err
    assert tree(tmp_path) == before  # nothing written


@pytest.mark.parametrize("tensor, pipeline", [(2, 1), (4, 1), (8, 1), (2, 2), (1, 4)])
def test_layouts_the_model_can_take_pass(tmp_path, tensor, pipeline):
    assert main(["validate", str(_job(tmp_path, tensor, pipeline))]) == 0


def test_rule_matches_the_engine_cases():
    assert layout_problem(4, 4, 2, 3, 1)[0] == "tensor"        # heads
    assert layout_problem(8, 6, 2, 4, 1)[0] == "tensor"        # neither divides the other
    assert layout_problem(8, 2, 2, 4, 1) is None               # KV heads replicated
    assert layout_problem(8, None, 2, 1, 3)[0] == "pipeline"   # more stages than layers


def _gpu_job(tmp_path, tensor: int, gpus_per_node: int = 4, nodes: int = 1, pipeline: int = 1,
             heads: int = 12, kv_heads: int = 12):
    job = write_job(tmp_path, rows=(40,), parallel={"tensor": tensor, "pipeline": pipeline,
                                                    "nodes": nodes},
                    resources={"device": "cuda", "gpus_per_node": gpus_per_node})
    (tmp_path / "model" / "config.json").write_text(json.dumps(
        {"num_attention_heads": heads, "num_key_value_heads": kv_heads, "num_hidden_layers": 4}))
    return job


@pytest.mark.parametrize("tensor, pipeline, nodes, replicas", [
    (2, 1, 1, 2), (1, 1, 1, 4), (4, 1, 1, 1), (2, 2, 2, 2), (4, 2, 2, 1)])
def test_gpu_replicas_are_gpus_over_tensor_times_pipeline(tmp_path, tensor, pipeline, nodes,
                                                          replicas):
    from hpcinfer.compile.compiler import build_plan
    from hpcinfer.compile.render import render_script
    from hpcinfer.config import load_job
    job = _gpu_job(tmp_path, tensor, nodes=nodes, pipeline=pipeline)
    assert main(["validate", str(job)]) == 0
    plan = build_plan(load_job(job))                  # 8 shards of 5 rows
    assert plan.ntasks_per_node == 4
    assert "#SBATCH --ntasks-per-node=4" in render_script(plan)
    if nodes == 1:                                    # an array task per `replicas` shards
        assert (plan.shape, plan.array_size, plan.shards_per_task) == \
            ("array", 8 // replicas, replicas)


@pytest.mark.parametrize("tensor, gpus, nodes, key, words", [
    (3, 4, 1, "parallel", "= 3 ranks per replica, which does not divide gpus_per_node (4) x "
                          "nodes (1) = 4 GPUs"),
    (8, 4, 1, "parallel", "= 8 ranks per replica"),
    (4, 2, 2, "parallel.tensor", "tensor (4) does not divide gpus_per_node (2)"),
])
def test_gpu_layout_that_does_not_divide_is_refused(tmp_path, capsys, tensor, gpus, nodes, key,
                                                    words):
    job = _gpu_job(tmp_path, tensor, gpus_per_node=gpus, nodes=nodes)
    assert main(["validate", str(job)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "job.yaml:" in err and f" {key}: " in err and words in err, err
    if key == "parallel":
        assert "data-parallel replicas" in err and "[1, 2, 4]" in err, err


def test_cpu_replicas_count_in_the_split_over_nodes(tmp_path, capsys):
    from hpcinfer.config import load_job
    ok = write_job(tmp_path / "ok", parallel={"tensor": 1, "replicas": 2, "nodes": 2})
    assert load_job(ok).ranks_per_node == 1 and main(["validate", str(ok)]) == 0
    bad = write_job(tmp_path / "bad", parallel={"tensor": 1, "replicas": 3, "nodes": 2})
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "parallel.nodes" in err and "x replicas (3) = 3 ranks do not split evenly" in err, err
