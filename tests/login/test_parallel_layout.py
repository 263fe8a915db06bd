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
