"""The CPU KV pool is sized from the job's memory limit, tested under a real cgroup limit.

The worker runs in a child memory cgroup of this process's own, limited to 4 GiB (v1
memory.limit_in_bytes or v2 memory.max), with a model whose max_num_seqs x max_model_len
would want 8 GiB of cache. Sized from the machine's free memory (the old rule: a quarter of
MemAvailable) the pool alone passes the limit on any machine with > 16 GiB free and the kernel
kills the worker; sized from the limit, the job finishes. A second run asking for a 5 GiB pool
outright is killed, which shows the limit is real here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from hpcinfer.engine.memory import cgroup_memory_limit
from hpcinfer.testing.require import require
from hpcinfer.testing.worker_jobs import job_config, make_job, prompt_rows, worker_env, write_jsonl

pytestmark = pytest.mark.timeout(240)
LIMIT = 4 * 2**30


def _own_memory_cgroup() -> tuple[Path, str] | None:
    """(directory, limit file name) of this process's memory cgroup, found independently of
    hpcinfer.engine.memory (v1 first: a hybrid host's v2 tree often has no memory controller)."""
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        v1 = "memory" in controllers.split(",")
        if not v1 and not (hierarchy == "0" and controllers == ""):
            continue
        for m in mounts:
            fields, tail = m.split(" - ")
            fstype, options = tail.split()[0], tail.split()[2].split(",")
            if (v1 and fstype == "cgroup" and "memory" in options) or (not v1 and fstype == "cgroup2"):
                root, mount = fields.split()[3], Path(fields.split()[4])
                directory = mount / (path[len(root):] if path.startswith(root) else "").lstrip("/")
                name = "memory.limit_in_bytes" if v1 else "memory.max"
                if directory.is_dir() and (v1 or "memory" in
                                           (directory / "cgroup.subtree_control").read_text()):
                    return directory, name
    return None


@pytest.fixture
def memory_cgroup():
    """A child cgroup limited to 4 GiB (removed afterwards)."""
    own = _own_memory_cgroup() if os.geteuid() == 0 else None
    require(own is not None, "a writable memory cgroup (root, cgroup v1 memory or v2 with the "
                             "memory controller delegated) is needed to test a real limit")
    directory, name = own
    child = directory / f"hpcinfer-test-{uuid.uuid4().hex[:8]}"
    try:
        child.mkdir()
        (child / name).write_text(str(LIMIT))
    except OSError as exc:
        require(False, f"cannot create a limited cgroup under {directory}: {exc}")
    yield child
    child.rmdir()


def _run_in(cgroup: Path, job_dir: Path) -> tuple[int, str]:
    def enter():     # in the child, before exec: the worker starts inside the limit
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))
    proc = subprocess.run([sys.executable, "-m", "hpcinfer.worker", str(job_dir)],
                          env=worker_env(), preexec_fn=enter, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=200)
    return proc.returncode, proc.stdout.decode("utf-8", "replace")


def test_cpu_job_under_a_4g_cgroup_sizes_its_pool_from_the_limit(tmp_path, memory_cgroup):
    from hpcinfer.testing.tiny import build_tiny_checkpoint
    model = build_tiny_checkpoint("llama", tmp_path / "model", max_position_embeddings=32768)
    data = write_jsonl(tmp_path / "data" / "p.jsonl", prompt_rows(6))
    # 256 sequences x 32768 tokens x 1 KiB per token (2 layers x 4 KV heads x 16 x fp32 x K,V)
    config = job_config(model, str(data), model={"id": str(model), "max_model_len": 32768},
                        engine={"max_num_seqs": 256, "max_num_batched_tokens": 256},
                        resources={"device": "cpu", "time": "00:05:00", "mem": "4G"})
    job_dir = make_job(tmp_path / "sized", config)
    rc, out = _run_in(memory_cgroup, job_dir)
    assert rc == 0, out[-4000:]
    assert "memory limit 4.00 GiB (cgroup" in out, out[-4000:]
    lines = [json.loads(ln) for p in (job_dir / "metrics").glob("*.jsonl")
             for ln in p.read_text().splitlines()]
    [engine] = [ln for ln in lines if ln.get("event") == "engine"]
    assert engine["cpu_memory"]["limit_bytes"] == LIMIT
    assert engine["cpu_memory"]["limit_source"].startswith("cgroup")
    assert 0 < engine["kv_cache_bytes"] <= 0.25 * LIMIT
    assert lines[-1]["status"] == "ok" and lines[-1]["rows_done"] == 6

    # The same limit kills a worker whose pool does not fit: the limit is enforced here.
    config["engine"]["kv_cache_memory_bytes"] = 5 * 2**30
    rc, out = _run_in(memory_cgroup, make_job(tmp_path / "oversized", config))
    assert rc in (-9, 137), (rc, out[-4000:])


def test_slurm_memory_variables_bound_the_cpu_pool():
    from hpcinfer.engine.memory import CPU_KV_LIMIT_FRACTION, cpu_kv_budget
    sized = cpu_kv_budget({"SLURM_MEM_PER_NODE": "1024"})        # --mem=1G
    assert (sized.limit_bytes, sized.limit_source) == (2**30, "SLURM_MEM_PER_NODE=1024")
    assert sized.kv_budget == int(max(2**30 - sized.used_bytes, 0) * CPU_KV_LIMIT_FRACTION)
    per_cpu = cpu_kv_budget({"SLURM_MEM_PER_CPU": "512", "SLURM_CPUS_ON_NODE": "3"})
    assert per_cpu.limit_bytes == 3 * 512 * 2**20
    cgroup = cgroup_memory_limit()        # a tighter cgroup limit would win over --mem
    unlimited = cpu_kv_budget({})
    assert unlimited.limit_bytes == (cgroup[0] if cgroup else None)
    assert unlimited.kv_budget <= 4 * 2**30
