"""Slurm backend: submit a rendered job dir with sbatch."""
from __future__ import annotations

from pathlib import Path

from hpcinfer.compile.jobdir import SCRIPT_NAME, load_plan
from hpcinfer.slurm import commands
from hpcinfer.slurm.records import record_submission


def submit_job_dir(job_dir: str | Path) -> str:
    """`sbatch --parsable submit.sbatch` from inside the job dir (the script's #SBATCH paths
    are relative to it); records the job id in the job dir and returns it."""
    job_dir = Path(job_dir)
    plan = load_plan(job_dir)
    submission = commands.sbatch(SCRIPT_NAME, cwd=str(job_dir))
    record_submission(job_dir, "slurm", submission.job_id, plan.num_tasks)
    return submission.job_id
