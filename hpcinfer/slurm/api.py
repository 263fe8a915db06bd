"""Python API: ``hpcinfer.submit(path_or_config) -> Job``.

Submission goes through the same compile + sbatch path as the CLI (the job dir is the
contract, so no pickled callables tie the login Python to the compute Python): submitit's
pickling executor does not fit that, but its Slurm job-id parser (array ranges such as
``123_[2-4%2]``) is reused by the squeue/sacct parsers. A state poll is one squeue call, plus
one sacct call for tasks that already left the queue.
"""
from __future__ import annotations

import time
from pathlib import Path

from hpcinfer.slurm import commands
from hpcinfer.slurm.records import last_submission


class Job:
    """A submitted job (all of its array tasks), addressed by its job dir."""

    def __init__(self, job_dir: str | Path, job_id: str | None = None):
        self.job_dir = Path(job_dir).resolve()
        sub = last_submission(self.job_dir)
        if sub is None and job_id is None:
            raise ValueError(f"{self.job_dir} was never submitted")
        self.job_id = job_id or sub["job_id"]
        self.backend = sub["backend"] if sub else "slurm"

    def __repr__(self) -> str:
        return f"Job(job_id={self.job_id!r}, job_dir={str(self.job_dir)!r})"

    def task_states(self) -> dict[str, str]:
        """{"123" or "123_4": state} for every task."""
        from hpcinfer.slurm.status import gather
        return {t["slurm_id"]: t["state"] for t in gather(self.job_dir)["tasks"]}

    def state(self) -> str:
        """One word for the whole job: the least advanced task state wins
        (PENDING < RUNNING < ... < a failure < COMPLETED)."""
        states = set(self.task_states().values())
        for state in ("UNKNOWN", "PENDING", "REQUEUED", "CONFIGURING", "RUNNING", "COMPLETING"):
            if state in states:
                return state
        failed = sorted(states - {"COMPLETED"})
        return failed[0] if failed else "COMPLETED"

    def done(self) -> bool:
        from hpcinfer.slurm.status import FINISHED_STATES   # Slurm's, plus a dead local run's
        return all(s in FINISHED_STATES for s in self.task_states().values())

    def wait(self, timeout_s: float | None = None, poll_s: float = 2.0) -> str:
        """Block until every task finished; returns state(). Raises TimeoutError."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.done():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self} still {self.state()} after {timeout_s} s")
            time.sleep(poll_s)
        return self.state()

    def cancel(self) -> None:
        """scancel the job (every array task)."""
        if self.backend != "slurm":
            raise RuntimeError("a local run cannot be cancelled from here: it runs in the "
                               "foreground of its own command (press Ctrl-C there)")
        commands.scancel(self.job_id)


def submit(path_or_config, overrides=(), *, job_dir: str | None = None,
           restart: bool = False) -> Job:
    """Validate, render and sbatch a job file (path) or a loaded JobConfig; returns the Job.
    ``restart``: as the CLI's --restart (the old outputs of another config are archived)."""
    from hpcinfer.compile.jobdir import compile_job, write_job_dir
    from hpcinfer.slurm.slurm import submit_job_dir
    if isinstance(path_or_config, (str, Path)):
        from hpcinfer.config import load_job
        cfg = load_job(path_or_config, overrides=tuple(overrides))
    else:
        cfg = path_or_config
    rendered = compile_job(cfg, job_dir=job_dir, restart=restart)
    write_job_dir(rendered)
    job_id = submit_job_dir(rendered.job_dir)
    return Job(rendered.job_dir, job_id)
