"""The worker's first phase: a real preflight of one task (task.py runs it, then the engine).

It loads job.yaml (the fully resolved config) and plan.json, picks this task's shards from
SLURM_ARRAY_TASK_ID, checks (on a replica's driver: the only rank that reads input and
writes output) every input is readable and the output dir writable, and reports
the environment (GPUs seen, ranks, restart count, /dev/shm) to the log and to
JOBDIR/metrics/task-TTTTT-rank-RRR.jsonl (one file per rank: one writer each).

Run alone (HPCINFER_WORKER_PHASES=preflight) it exits after the checks with
  0  checks passed
  2  a check failed (message says what to fix)
  3  stopped by the warning signal (USR2/TERM): "requeue me"

Test hook: HPCINFER_PREFLIGHT_SLEEP_S=N keeps the task alive N seconds after the checks, so
a test can deliver the warning signal while it runs.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from hpcinfer.compile.plan import EXIT_BAD_INPUT, EXIT_REQUEUE
from hpcinfer.worker.signals import StopFlag

log = logging.getLogger("hpcinfer.worker")

# Rank variables of the launchers we support, in order of preference.
_RANK_VARS = ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")
_SIZE_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


class PreflightFailed(Exception):
    """A check failed; str() says what to fix."""


def _first_env(names: tuple[str, ...], default: str) -> str:
    return next((os.environ[n] for n in names if os.environ.get(n)), default)


def gpus_seen() -> dict:
    """GPUs this process may use, without importing torch: CUDA_VISIBLE_DEVICES, and what
    nvidia-smi lists when it is installed."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names: list[str] = []
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
            names = [ln.strip() for ln in out.stdout.splitlines() if ln.startswith("GPU ")]
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("nvidia-smi -L failed: %s", exc)
    return {"cuda_visible_devices": visible, "nvidia_smi": names, "count":
            len(names) if names else (len([v for v in visible.split(",") if v]) if visible else 0)}


def shm_free_bytes() -> int | None:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def environment_report(task_id: int | None) -> dict:
    return {
        "host": socket.gethostname(), "pid": os.getpid(), "task": task_id,
        "rank": int(_first_env(_RANK_VARS, "0")), "world_size": int(_first_env(_SIZE_VARS, "1")),
        "local_rank": int(os.environ.get("SLURM_LOCALID", "0")),
        "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "backend": os.environ.get("HPCINFER_BACKEND", "slurm"),
        "master_addr": os.environ.get("MASTER_ADDR"), "gpus": gpus_seen(),
        "shm_free_bytes": shm_free_bytes(), "python": sys.version.split()[0],
    }


def check_inputs(shards) -> None:
    for path in sorted({s.file for s in shards}):
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as exc:
            raise PreflightFailed(f"input {path} is not readable here ({exc.strerror}): is its "
                                  "filesystem mounted on compute nodes (and bound into the "
                                  "container)?") from None


def check_writable(directory: Path) -> None:
    probe = directory / f".preflight-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PreflightFailed(f"output dir {directory} is not writable here ({exc.strerror}): "
                              "fix its permissions or choose another output.dir") from None


def _note_shm(cfg, record: dict) -> None:
    """Warn (not fail) when /dev/shm is smaller than the profile says NCCL needs."""
    wanted = getattr(cfg.profile, "shm_size", None)
    if not wanted or record.get("shm_free_bytes") is None:
        return
    from hpcinfer.config.units import mem_bytes
    record["shm_wanted_bytes"] = mem_bytes(str(wanted))
    if record["shm_free_bytes"] < record["shm_wanted_bytes"]:
        log.warning("/dev/shm has %.1f GiB free, the cluster profile asks for %s: NCCL may fail "
                    "between GPUs of this node", record["shm_free_bytes"] / 2**30, wanted)


def task_id_from_env(plan) -> int | None:
    if plan.shape != "array":
        return None
    raw = os.environ.get("SLURM_ARRAY_TASK_ID")
    if raw is None or not raw.isdigit():
        raise PreflightFailed(f"this job is an array of {plan.array_size} tasks but "
                              f"SLURM_ARRAY_TASK_ID is {raw!r}: start it with sbatch (or "
                              "`hpcinfer run JOB --local`), not by hand")
    return int(raw)


def write_metrics(job_dir: Path, record: dict) -> None:
    task = record["task"] if record["task"] is not None else 0
    path = job_dir / "metrics" / f"task-{task:05d}-rank-{record['rank']:03d}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def check(job_dir: Path, record: dict):
    """The preflight checks; fills `record` and returns (cfg, plan, task_id, shards).

    Raises PreflightFailed, ConfigError, ValueError or OSError with what to fix."""
    from hpcinfer.compile.jobdir import load_plan
    from hpcinfer.config import load_resolved
    cfg = load_resolved(job_dir / "job.yaml")
    plan = load_plan(job_dir)
    task_id = task_id_from_env(plan)
    shards = plan.shards_for_task(task_id)
    record.update(environment_report(task_id))
    record["fingerprint"] = check_fingerprint(job_dir, cfg, plan)
    record.update(shards=[s.index for s in shards], rows=sum(s.num_rows for s in shards))
    log.info("task %s rank %d/%d on %s: shards %s (%d rows), restart %d, GPUs %s",
             task_id, record["rank"], record["world_size"], record["host"], record["shards"],
             record["rows"], record["restart_count"], record["gpus"])
    _note_shm(cfg, record)
    if is_replica_driver(record["rank"], cfg):  # followers neither read input nor write output
        check_inputs(shards)
        check_writable(Path(str(cfg.output.dir)))
    check_writable(job_dir / "metrics")         # every rank writes its own metrics file
    return cfg, plan, task_id, shards


def check_fingerprint(job_dir: Path, cfg, plan) -> str:
    """job.yaml against the fingerprint render stored (compile/fingerprint.py): a job dir
    with committed work must not go on under another config (job.yaml edited by hand, or a
    job dir copied over). Returns the fingerprint the outputs are recorded with."""
    from hpcinfer.compile import fingerprint
    stored = fingerprint.load(job_dir)
    if stored is None:                  # rendered before fingerprints existed
        return fingerprint.compute(cfg, plan.input_files).digest
    mine = fingerprint.compute(cfg, plan.input_files, with_files=False)
    changed = fingerprint.diff(stored.config_values(), mine.config_values())
    if not changed:
        return stored.digest
    if fingerprint.has_committed_work(job_dir):
        raise PreflightFailed(
            fingerprint.changed_message(job_dir, changed).replace("\n", " ") + ": do not edit "
            "job.yaml in a job dir; change the job file and render it again (render, run or "
            "submit), to a new output dir or with --restart")
    log.warning("job.yaml differs from the config it was rendered with (%s): it was edited "
                "after rendering; nothing is committed yet, so this run uses it as it is",
                "; ".join(changed))
    return fingerprint.compute(cfg, plan.input_files).digest


def check_device(device: str, gpus: dict) -> None:
    """A cuda job where this torch cannot use CUDA fails with what to write, rather than deep
    in model loading with torch's "Torch not compiled with CUDA enabled" (a crash that reads
    like a bug). It imports torch (for cuda jobs only), so the worker calls it after the
    torch-free checks (task.py: after the model is resolved, before it is loaded; and in the
    preflight-only run), which keeps a missing model a one-second error."""
    if device != "cuda":
        return
    import torch
    if torch.cuda.is_available():
        return
    if torch.version.cuda is None:
        why = f"this Python's torch {torch.__version__} is a CPU-only build"
    else:
        why = (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU here "
               f"(CUDA_VISIBLE_DEVICES={gpus.get('cuda_visible_devices')!r}, nvidia-smi lists "
               f"{len(gpus.get('nvidia_smi') or [])})")
    raise PreflightFailed(
        f"resources.device is cuda (the default) but {why}: to run on this machine's CPU write "
        "`device: cpu` under `resources:` in the job file (or --set resources.device=cpu) and "
        "render again; to use a GPU, run the job on a GPU node (a partition with GPUs, "
        "resources.gpus_per_node >= 1)")


def is_replica_driver(rank: int, cfg) -> bool:
    """Whether ``rank`` (the launcher's, before MPI starts) is rank 0 of its replica: replicas
    are consecutive blocks of tensor x pipeline ranks (ranks.place_of)."""
    return rank % (int(cfg.parallel.tensor) * int(cfg.parallel.pipeline)) == 0


def new_record() -> dict:
    return {"event": "preflight", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def fail(job_dir: Path, record: dict, exc: Exception, started: float) -> int:
    """Log and record a failed check; returns the exit code."""
    log.error("preflight failed: %s", exc)
    record.setdefault("task", None)
    record.setdefault("rank", int(_first_env(_RANK_VARS, "0")))
    _finish(job_dir, record, "failed", str(exc), started)
    return EXIT_BAD_INPUT


def run(job_dir: Path, stop: StopFlag) -> int:
    """Preflight only (HPCINFER_WORKER_PHASES=preflight): check, report, exit."""
    from hpcinfer.config import ConfigError
    started = time.time()
    record = new_record()
    try:
        cfg, _, _, _ = check(job_dir, record)
        check_device(str(cfg.resources.device), record["gpus"])
    except (PreflightFailed, ConfigError, ValueError, OSError) as exc:
        return fail(job_dir, record, exc, started)
    sleep_s = float(os.environ.get("HPCINFER_PREFLIGHT_SLEEP_S", "0") or 0)
    deadline = time.monotonic() + sleep_s
    while time.monotonic() < deadline and stop.signal_name is None:
        time.sleep(0.1)
    if stop.signal_name is not None:
        log.info("received %s: nothing in flight to commit; exiting %d so the job is requeued",
                 stop.signal_name, EXIT_REQUEUE)
        _finish(job_dir, record, "requeue", stop.signal_name, started)
        return EXIT_REQUEUE
    log.info("preflight ok: inputs readable, output dir writable")
    _finish(job_dir, record, "ok", "", started)
    return 0


def _finish(job_dir: Path, record: dict, status: str, message: str, started: float) -> None:
    record.update(status=status, message=message, seconds=round(time.time() - started, 3))
    try:
        write_metrics(job_dir, record)
    except OSError as exc:
        log.error("cannot write metrics to %s: %s", job_dir / "metrics", exc)

