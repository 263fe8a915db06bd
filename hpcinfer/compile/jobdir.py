"""The job directory (DESIGN §5), written by the login side and read by the worker.

Everything is rendered in memory first, so a config or input error leaves no trace on disk;
each file is then written to a temporary name in the same directory and renamed into place.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hpcinfer.compile.errors import plan_error
from hpcinfer.compile.fingerprint import FINGERPRINT_FILE
from hpcinfer.compile.plan import JobPlan

SCRIPT_NAME = "submit.sbatch"
log = logging.getLogger("hpcinfer")


@dataclass(frozen=True)
class RenderedJob:
    """Everything that goes into a job dir, as text (nothing written yet)."""
    plan: JobPlan
    files: tuple[tuple[str, str], ...]   # (name relative to the job dir, content)
    restart: bool = False                # --restart: archive the old outputs when writing

    @property
    def job_dir(self) -> Path:
        return Path(self.plan.job_dir)

    @property
    def script_path(self) -> Path:
        return self.job_dir / SCRIPT_NAME


def compile_job(cfg, *, job_dir: str | None = None, container_def: bool = False,
                python: str | None = None, download: bool = False,
                restart: bool = False) -> RenderedJob:
    """Config -> plan -> rendered files, all in memory. Raises ConfigError on bad input.

    A hub model id is pinned to its downloaded snapshot first (compile/model.py); with
    `download` a missing model is downloaded then (the only step that writes: into the cache).
    """
    from hpcinfer.compile.compiler import build_plan
    from hpcinfer.compile.model import resolve_job_model
    from hpcinfer.compile.render import render_container_def, render_script
    cfg = resolve_job_model(cfg, download=download)
    plan = build_plan(cfg, job_dir=job_dir, python=python)
    fingerprint = _check_fingerprint(cfg, plan, restart)
    if not restart:                      # --restart moves the old shards away first
        _check_not_reused(cfg, plan)
    files = [("job.yaml", cfg.to_yaml()),
             ("plan.json", json.dumps(plan.to_dict(), indent=1) + "\n"),
             (FINGERPRINT_FILE, fingerprint.to_json()),
             (SCRIPT_NAME, render_script(plan))]
    if container_def:
        from hpcinfer.compile.container import source_commit
        files.append(("container.def", render_container_def(plan, commit=source_commit())))
    return RenderedJob(plan=plan, files=tuple(files), restart=restart)


def _check_fingerprint(cfg, plan: JobPlan, restart: bool):
    """The new config's fingerprint (compile/fingerprint.py); refuses a changed one into a
    job dir holding committed work, unless --restart."""
    from hpcinfer.compile import fingerprint
    new = fingerprint.compute(cfg, plan.input_files)
    old = fingerprint.load(plan.job_dir)
    if restart or old is None or old.digest == new.digest:
        return new
    if not fingerprint.has_committed_work(plan.job_dir):
        return new
    raise plan_error(cfg, "output.dir", fingerprint.changed_message(
        plan.job_dir, fingerprint.diff(old.values, new.values)),
        fingerprint.RESTART_HINT.format(job_dir=plan.job_dir))


def _check_not_reused(cfg, plan: JobPlan) -> None:
    """Refuse to point a new shard layout at a job dir holding results of another one:
    committed parts are addressed by shard index, so they would be attributed wrongly."""
    old_plan = Path(plan.job_dir) / "plan.json"
    shards_dir = Path(plan.job_dir) / "shards"
    if not old_plan.is_file() or not shards_dir.is_dir() or not any(shards_dir.iterdir()):
        return
    try:
        old_shards = json.loads(old_plan.read_text())["shards"]
    except (OSError, ValueError, KeyError):
        return
    new_shards = [s.__dict__ for s in plan.shards]
    if old_shards != new_shards:
        raise plan_error(cfg, "output.dir",
                         f"{plan.job_dir} holds results of a job with different input shards",
                         "choose a new output.dir (or --out), or pass --restart to move the "
                         "old results to JOBDIR/archive/<time>/")


def write_job_dir(job: RenderedJob) -> Path:
    """Create the job dir and write every file atomically; returns the job dir. With
    ``job.restart`` the old outputs are moved to JOBDIR/archive/<time>/ first."""
    root = job.job_dir
    if job.restart:
        from hpcinfer.compile.fingerprint import archive_outputs
        archived = archive_outputs(root)
        if archived is not None:
            log.warning("--restart: moved the old outputs to %s", archived)
    for sub in ("logs", "metrics"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name, text in job.files:
        atomic_write(root / name, text, mode=0o755 if name == SCRIPT_NAME else 0o644)
    if job.plan.container is not None and job.plan.container.site_dir:
        from hpcinfer.compile.site import copy_hpcinfer
        copy_hpcinfer(Path(job.plan.container.site_dir))
    return root


def atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    """Temp file in the same directory, fsync, rename: readers see old or new, never half."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_plan(job_dir: str | os.PathLike) -> JobPlan:
    """The plan a job dir was rendered with."""
    return JobPlan.from_dict(json.loads((Path(job_dir) / "plan.json").read_text()))
