"""JobPlan: what one job will do, as pure data (no I/O, no Slurm, no templates).

The compiler builds it from a loaded config (``build_plan``); the renderer turns it into
text; ``plan.json`` in the job directory is its JSON form. Frozen so nothing downstream can
quietly change a decision the compiler made.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# Worker exit code meaning "I stopped on the warning signal and committed: requeue me".
EXIT_REQUEUE = 3
# Worker exit code for a failed preflight/config check (same as the CLI's user-error code).
EXIT_BAD_INPUT = 2
# Worker exit code of the ranks that outlived a lost rank (killed, out of memory, node gone):
# they named it in the log; the job script requeues (= hpcinfer.worker.lifeline.EXIT_LOST_RANK).
EXIT_LOST_RANK = 4

SHAPES = ("single", "array", "multinode")


@dataclass(frozen=True)
class Shard:
    """Rows [start, stop) of one input file; one array task per shard."""
    index: int
    file: str
    start: int
    stop: int

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ContainerPlan:
    runtime: str                      # apptainer | singularity (from the cluster profile)
    image: str
    binds: tuple[str, ...]            # "src" or "src:dst", already absolute
    env: tuple[tuple[str, str], ...]  # passed with --env, sorted by name
    use_gpu: bool                     # --nv
    python: str = "python3"           # the container's interpreter, not the login node's
    site_dir: str | None = None       # container.hpcinfer job-dir: JOBDIR/python, on PYTHONPATH


@dataclass(frozen=True)
class JobPlan:
    name: str
    config_file: str                  # the job file the user wrote (absolute)
    job_dir: str                      # absolute
    version: str                      # hpcinfer version that rendered
    shape: str                        # one of SHAPES
    shards: tuple[Shard, ...]
    array_size: int                   # number of array tasks (0 unless shape == "array")
    array_throttle: int | None        # the "%N" of --array
    nodes: int
    ntasks_per_node: int              # ranks per node (= GPUs per node, or tensor*pipeline on CPU)
    gpus_per_node: int                # 0 when resources.device is cpu
    sbatch_flags: tuple[tuple[str, str], ...]   # (flag, value) sorted by flag; value "" = bare flag
    launcher: str                     # srun | mpirun
    mpi_plugin: str                   # pmix | pmi2 | none (srun --mpi=)
    python: str                       # interpreter that runs the worker (bare jobs)
    env: tuple[tuple[str, str], ...]  # exported before the worker starts, sorted
    modules: tuple[str, ...]          # `module load` lines, in profile order
    container: ContainerPlan | None
    signal: str                       # warning signal name without SIG, e.g. USR2
    signal_seconds: int
    max_requeues: int
    total_rows: int = 0
    input_files: tuple[str, ...] = field(default_factory=tuple)
    env_from_environment: tuple[str, ...] = field(default_factory=tuple)  # passed from the submitting shell
    cuda: str | None = None           # CUDA of container.def's image (compile/container.py); None = default
    shards_per_task: int = 1          # = data-parallel replicas per task (worker/ranks.py)

    @property
    def log_pattern(self) -> str:
        """Log file, relative to the job dir (sbatch runs with the job dir as cwd)."""
        return "logs/slurm-%A_%a.out" if self.shape == "array" else "logs/slurm-%j.out"

    @property
    def num_tasks(self) -> int:
        """Number of independent Slurm jobs/array tasks (not ranks)."""
        return self.array_size if self.shape == "array" else 1

    def shards_for_task(self, task_id: int | None) -> tuple[Shard, ...]:
        """Shards one array task (or the only task) works on: ``shards_per_task``
        consecutive shards, one per data-parallel replica of the task."""
        if self.shape != "array":
            return self.shards
        if task_id is None or not 0 <= task_id < self.array_size:
            raise ValueError(f"array task id {task_id!r} outside 0..{self.array_size - 1}")
        n = self.shards_per_task
        return self.shards[task_id * n:(task_id + 1) * n]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "JobPlan":
        data = dict(data)
        data["shards"] = tuple(Shard(**s) for s in data["shards"])
        c = data.get("container")
        if c is not None:
            data["container"] = ContainerPlan(
                runtime=c["runtime"], image=c["image"], binds=tuple(c["binds"]),
                env=tuple(tuple(kv) for kv in c["env"]), use_gpu=c["use_gpu"],
                python=c.get("python", "python3"), site_dir=c.get("site_dir"))
        for key in ("sbatch_flags", "env"):
            data[key] = tuple(tuple(kv) for kv in data[key])
        data["modules"] = tuple(data["modules"])
        data["input_files"] = tuple(data.get("input_files", ()))
        data["env_from_environment"] = tuple(data.get("env_from_environment", ()))
        return cls(**data)
