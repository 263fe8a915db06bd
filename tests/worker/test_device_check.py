"""A job left at the default resources.device (cuda) run where torch cannot use CUDA: one
clear preflight error naming what to write, before any model is loaded (was: "worker crashed
(a bug ...)" with torch's AssertionError)."""
from __future__ import annotations

import json

import pytest

from hpcinfer.testing.worker_jobs import job_config, make_job, prompt_rows, run_worker, write_jsonl

pytestmark = pytest.mark.timeout(120)


def test_cuda_job_without_cuda_says_write_device_cpu(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "data" / "p.jsonl", prompt_rows(3))
    config = job_config(model_dir, str(data))
    config["resources"] = {k: v for k, v in config["resources"].items() if k != "device"}
    job_dir = make_job(tmp_path, config)
    # An empty CUDA_VISIBLE_DEVICES hides every GPU from a CUDA build of torch too, so this
    # runs the same on a CPU-only machine and on a GPU one.
    rc, out = run_worker(job_dir, CUDA_VISIBLE_DEVICES="")
    assert rc == 2, out
    assert "worker crashed" not in out and "Traceback" not in out, out
    assert "resources.device is cuda (the default)" in out
    assert "`device: cpu` under `resources:`" in out
    assert "engine ready" not in out and "KV cache" not in out      # stopped before the model
    line = [json.loads(ln) for p in (job_dir / "metrics").glob("*.jsonl")
            for ln in p.read_text().splitlines()][-1]
    assert line["status"] == "failed" and "device: cpu" in line["message"]
    # the preflight-only run (a dry run) says the same
    rc, out = run_worker(job_dir, CUDA_VISIBLE_DEVICES="", HPCINFER_WORKER_PHASES="preflight")
    assert rc == 2 and "resources.device is cuda (the default)" in out, out
