"""Hand-built JobPlans for tests (golden scripts, injection) that need no config or inputs."""
from __future__ import annotations

import dataclasses

from hpcinfer.compile.plan import ContainerPlan, JobPlan, Shard


def sample_plan(shape: str = "single", *, container: bool = False, job_dir: str = "/scratch/jobs/qa-eval",
                python: str = "/opt/venv/bin/python", **overrides) -> JobPlan:
    """A deterministic plan of the given shape (single | array | multinode)."""
    files = ("/data/in/part-0.jsonl", "/data/in/part-1.jsonl")
    shards = tuple(Shard(index=i, file=files[i // 2], start=(i % 2) * 500, stop=(i % 2) * 500 + 500)
                   for i in range(4 if shape != "single" else 1))
    nodes = 2 if shape == "multinode" else 1
    ntasks = 4 if shape == "multinode" else 1
    flags = {"chdir": job_dir, "cpus-per-task": "8", "job-name": "qa-eval", "mem": "64G", "nodes": str(nodes),
             "ntasks-per-node": str(ntasks), "open-mode": "append", "partition": "gpu",
             "requeue": "", "signal": "B:USR2@120", "time": "04:00:00",
             "output": "logs/slurm-%A_%a.out" if shape == "array" else "logs/slurm-%j.out",
             "gpus-per-node": "a100:4" if shape == "multinode" else "1"}
    if shape == "array":
        flags["array"] = "0-3%2"
    cplan = None
    if container:
        cplan = ContainerPlan(runtime="apptainer", image="/home/container/hpcinfer.sif",
                              binds=("/data/in", "/dev/shm", job_dir, "/models/llama"),
                              env=(("NCCL_DEBUG", "WARN"),), use_gpu=True)
    plan = JobPlan(
        name="qa-eval", config_file="/home/user/qa-eval.yaml", job_dir=job_dir, version="0.1.0",
        shape=shape, shards=shards, array_size=4 if shape == "array" else 0,
        array_throttle=2 if shape == "array" else None, nodes=nodes, ntasks_per_node=ntasks,
        gpus_per_node=ntasks, sbatch_flags=tuple(sorted(flags.items())),
        launcher="srun", mpi_plugin="pmix", python=python,
        env=(("HF_HUB_OFFLINE", "1"), ("PROMPT_STYLE", "short answers")),
        modules=("apptainer",) if container else (), container=cplan, signal="USR2",
        signal_seconds=120, max_requeues=5, total_rows=500 * len(shards), input_files=files,
        env_from_environment=("HF_TOKEN",) if container else ())
    return dataclasses.replace(plan, **overrides) if overrides else plan
