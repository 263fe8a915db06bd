"""Multi-rank GPU jobs get NCCL settings in their script's environment: hpcinfer's defaults
(warnings in the log, errors instead of hangs when a peer dies), then the cluster profile's
`nccl_env`, then the job's own `env:`. Single-rank and CPU jobs get none."""
from __future__ import annotations

from pathlib import Path

from hpcinfer.compile.compiler import build_plan
from hpcinfer.config import load_job
from hpcinfer.testing.jobs import write_job

GENERIC = Path(__file__).resolve().parents[2] / "configs" / "clusters" / "generic.yaml"


def _plan_env(tmp_path, cluster="generic", **sections) -> dict:
    job = write_job(tmp_path, cluster=cluster, **sections)
    return dict(build_plan(load_job(job)).env)


def _gpu(tensor: int) -> dict:
    return {"resources": {"device": "cuda", "gpus_per_node": tensor},
            "parallel": {"tensor": tensor}}


def test_multi_rank_gpu_job_gets_nccl_defaults(tmp_path):
    env = _plan_env(tmp_path, **_gpu(2))
    assert env["NCCL_DEBUG"] == "WARN" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"


def test_single_rank_and_cpu_jobs_get_none(tmp_path):
    assert not any(k.startswith(("NCCL_", "TORCH_NCCL")) for k in _plan_env(tmp_path / "a", **_gpu(1)))
    cpu = _plan_env(tmp_path / "b", parallel={"tensor": 2})  # write_job's default device: cpu
    assert not any(k.startswith(("NCCL_", "TORCH_NCCL")) for k in cpu)


def test_profile_nccl_env_is_added_and_the_job_env_wins(tmp_path):
    profile = tmp_path / "site.yaml"
    profile.write_text(GENERIC.read_text().replace(
        "  nccl_env: {}", "  nccl_env: {NCCL_SOCKET_IFNAME: ib0, NCCL_DEBUG: INFO}"))
    env = _plan_env(tmp_path / "job", cluster=str(profile), env={"NCCL_DEBUG": "TRACE"}, **_gpu(2))
    assert env["NCCL_SOCKET_IFNAME"] == "ib0"       # from the profile
    assert env["NCCL_DEBUG"] == "TRACE"             # the job's env wins over profile and defaults
