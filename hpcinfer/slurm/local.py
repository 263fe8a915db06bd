"""Local backend: the same rendered script, run with bash, with the SLURM_* variables a task
would see. Array tasks run one after another; exit code 3 (requeue me) runs the task again
with SLURM_RESTART_COUNT + 1, up to resilience.max_requeues, like a Slurm requeue would."""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from hpcinfer.compile.jobdir import SCRIPT_NAME, load_plan
from hpcinfer.compile.plan import EXIT_REQUEUE, JobPlan
from hpcinfer.slurm.records import record_submission

log = logging.getLogger(__name__)


def task_env(plan: JobPlan, job_id: str, task_id: int | None, restart_count: int) -> dict[str, str]:
    """SLURM_* variables of one task, as sbatch would set them for the batch script."""
    host = socket.gethostname().split(".")[0]
    env = {
        "HPCINFER_BACKEND": "local", "SLURM_JOB_ID": job_id, "SLURM_JOB_NAME": plan.name,
        "SLURM_RESTART_COUNT": str(restart_count), "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1",
        "SLURM_JOB_NODELIST": host, "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
        "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_SUBMIT_DIR": plan.job_dir,
        "SLURM_CPUS_PER_TASK": str(os.cpu_count() or 1),
    }
    mem = dict(plan.sbatch_flags).get("mem")
    if mem:     # as sbatch --mem exports it (MiB): the worker sizes its CPU memory from it
        from hpcinfer.config.units import mem_bytes
        env["SLURM_MEM_PER_NODE"] = str(mem_bytes(mem) // 2**20)
    if task_id is not None:
        env.update(SLURM_ARRAY_JOB_ID=job_id, SLURM_ARRAY_TASK_ID=str(task_id),
                   SLURM_ARRAY_TASK_COUNT=str(plan.array_size), SLURM_ARRAY_TASK_MIN="0",
                   SLURM_ARRAY_TASK_MAX=str(plan.array_size - 1))
    return env


def run_job_dir(job_dir: str | Path, echo: bool = True) -> int:
    """Run every task of the job dir's script; returns 0 when all succeeded, else the first
    failing task's exit code."""
    job_dir = Path(job_dir)
    plan = load_plan(job_dir)
    # Unique per run (logs are opened in append mode, like Slurm's), numeric like Slurm's.
    job_id = f"{int(time.time()) % 10**8}{os.getpid() % 100:02d}"
    # pid + host: `hpcinfer status` tells a run whose processes are gone from a live one.
    record_submission(job_dir, "local", job_id, plan.num_tasks, pid=os.getpid(),
                      host=socket.gethostname())
    task_ids = list(range(plan.array_size)) if plan.shape == "array" else [None]
    first_failure = 0
    for task_id in task_ids:
        rc = _run_task(plan, job_dir, job_id, task_id, echo)
        if rc != 0 and first_failure == 0:
            first_failure = rc
    return first_failure


def _run_task(plan: JobPlan, job_dir: Path, job_id: str, task_id: int | None, echo: bool) -> int:
    log_name = f"slurm-{job_id}_{task_id}.out" if task_id is not None else f"slurm-{job_id}.out"
    log_path = job_dir / "logs" / log_name
    restart = 0
    while True:
        env = {**os.environ, **task_env(plan, job_id, task_id, restart)}
        with open(log_path, "ab") as out:   # open-mode append, like the sbatch script
            proc = subprocess.Popen(["bash", SCRIPT_NAME], cwd=job_dir, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for line in proc.stdout:
                out.write(line)
                if echo:
                    sys.stdout.write(line.decode("utf-8", "replace"))
            rc = proc.wait()
        if rc == EXIT_REQUEUE and restart < plan.max_requeues:
            restart += 1
            log.info("task %s asked to be requeued; running it again (restart %d)", task_id, restart)
            continue
        return rc


def process_state(host: str | None, pid: int | None) -> str:
    """"alive", "dead" or "unknown" (another host, or no pid recorded) for a local run's
    process. A pid reused by another program after the run died reads as dead: a worker's
    command line names hpcinfer."""
    if not pid or host != socket.gethostname():
        return "unknown"
    try:
        cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes()
    except FileNotFoundError:
        return "dead"
    except OSError:
        return "unknown"
    if b"hpcinfer" not in cmdline:
        return "dead"
    try:                          # a zombie (killed, not yet reaped by its parent) is dead
        state = Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "alive"
    return "dead" if state in ("Z", "X") else "alive"
