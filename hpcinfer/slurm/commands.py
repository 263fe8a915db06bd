"""One function per Slurm command, each returning a typed result.

Parsers are separate pure functions (``parse_*``) tested on captured output. A missing
command raises ``SlurmMissing``; a command Slurm rejects raises ``SlurmError`` carrying
Slurm's own message. ``sacct`` is retried with backoff (slurmdbd hiccups are common).
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

# States after which a job (or array task) never runs again by itself.
FINISHED_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
    "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT"})


class SlurmMissing(RuntimeError):
    """The Slurm command is not on PATH (not a cluster, or no module loaded)."""

    def __init__(self, command: str):
        super().__init__(f"no Slurm here ({command} not on PATH): use `hpcinfer run JOB --local`")
        self.command = command


class SlurmError(RuntimeError):
    """Slurm refused a command; str() is Slurm's message plus what to do."""

    def __init__(self, command: str, message: str, hint: str = ""):
        # Slurm often prints two lines ("error: X" then "submission failed: Y"): keep both, on
        # one line, so the CLI's error stays a single line.
        message = " / ".join(ln.strip() for ln in message.strip().splitlines() if ln.strip())
        text = f"{command} failed: {message or '(no message)'}"
        super().__init__(text + (f"; {hint}" if hint else ""))
        self.command, self.message, self.hint = command, message.strip(), hint


@dataclass(frozen=True)
class Submission:
    job_id: str            # "123" (an array's tasks are "123_0", "123_1", ...)
    cluster: str | None    # set on multi-cluster sites ("123;cluster")


@dataclass(frozen=True)
class QueueEntry:
    job_id: str            # "123" or "123_4"; a pending array range stays "123_[5-9%2]"
    state: str             # PENDING, RUNNING, COMPLETING, REQUEUED, ...
    reason: str            # why pending ("JobArrayTaskLimit", "Priority", "None")


@dataclass(frozen=True)
class AcctEntry:
    job_id: str            # "123" or "123_4" (ranges expanded)
    state: str             # first word only: "CANCELLED by 0" -> "CANCELLED"
    exit_code: str         # "0:0" = exit status : signal


def _run(args: list[str], timeout_s: float = 60, cwd: str | None = None):
    if shutil.which(args[0]) is None:
        raise SlurmMissing(args[0])
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, cwd=cwd)


def _hint_for(message: str) -> str:
    lowered = message.lower()
    hints = [
        ("invalid account", "set resources.account to an account you belong to "
                            "(`sacctmgr show assoc user=$USER`)"),
        ("invalid partition", "set resources.partition to one `sinfo -s` lists"),
        ("qos", "set resources.qos to one your account may use (`sacctmgr show assoc user=$USER`)"),
        ("time limit", "lower resources.time below the partition's limit (`sinfo -o '%P %l'`)"),
        ("array size", "raise input.shard_rows so fewer array tasks are needed"),
        ("node configuration is not available", "ask for fewer GPUs/CPUs/memory per node, "
                                                 "or another partition"),
        ("gres", "check resources.gpus_per_node/gpu_type against `sinfo -o '%P %G'`"),
        ("memory", "lower resources.mem"),
    ]
    for needle, hint in hints:
        if needle in lowered:
            return hint
    return "fix the job's resources (or ask your cluster's support) and submit again"


def sbatch(script: str, cwd: str) -> Submission:
    """Submit a script with `sbatch --parsable` from cwd (the job dir)."""
    proc = _run(["sbatch", "--parsable", script], cwd=cwd)
    if proc.returncode != 0:
        raise SlurmError("sbatch", proc.stderr or proc.stdout, _hint_for(proc.stderr))
    return parse_sbatch(proc.stdout)


def parse_sbatch(out: str) -> Submission:
    """`sbatch --parsable` prints "jobid" or "jobid;cluster" (last line; sbatch may warn first)."""
    line = [ln for ln in out.strip().splitlines() if ln.strip()][-1].strip()
    job_id, _, cluster = line.partition(";")
    if not job_id.isdigit():
        raise SlurmError("sbatch", f"unexpected output {out!r}")
    return Submission(job_id=job_id, cluster=cluster or None)


SQUEUE_FORMAT = "%i|%T|%r"


def squeue(job_ids: list[str]) -> list[QueueEntry]:
    """Queue entries of the given jobs (array tasks one per line); [] once they left the queue."""
    proc = _run(["squeue", "--noheader", "--array", "--format", SQUEUE_FORMAT,
                 "--jobs", ",".join(job_ids)])
    if proc.returncode != 0:
        # squeue exits 1 with "Invalid job id specified" for a job no longer in the queue.
        if "invalid job id" in proc.stderr.lower():
            return []
        raise SlurmError("squeue", proc.stderr)
    return parse_squeue(proc.stdout)


def parse_squeue(out: str) -> list[QueueEntry]:
    entries = []
    for line in out.splitlines():
        if not line.strip():
            continue
        job_id, state, reason = (line.split("|") + ["", ""])[:3]
        entries.append(QueueEntry(job_id.strip(), state.strip(), reason.strip()))
    return entries


def scontrol_show_job(job_id: str) -> dict[str, str]:
    """`scontrol show job -o ID` as {Key: value}; an array yields its first task's record."""
    proc = _run(["scontrol", "show", "job", "-o", job_id])
    if proc.returncode != 0:
        raise SlurmError("scontrol show job", proc.stderr)
    records = parse_scontrol_show_job(proc.stdout)
    return records[0] if records else {}


def parse_scontrol_show_job(out: str) -> list[dict[str, str]]:
    """One dict per job record. Values run to the next ` Key=`; a value may contain spaces
    (Command=, WorkDir=) or '=' (TRES=cpu=1,mem=1G)."""
    import re
    records = []
    for block in re.split(r"\n\s*\n|\n(?=JobId=)", out.strip()):
        block = " ".join(block.split("\n"))
        if not block.strip():
            continue
        record = {}
        for m in re.finditer(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=(.*?)(?=\s+[A-Za-z][A-Za-z0-9_:/]*=|\s*$)",
                             block):
            record[m.group(1)] = m.group(2)
        records.append(record)
    return records


SACCT_FIELDS = "JobID,State,ExitCode"


def sacct(job_ids: list[str], retries: int = 3, backoff_s: float = 1.0) -> list[AcctEntry]:
    """Accounting records of the jobs' allocations (array ranges expanded)."""
    args = ["sacct", "--allocations", "--parsable2", "--format", SACCT_FIELDS,
            "--jobs", ",".join(job_ids)]
    for attempt in range(retries + 1):
        proc = _run(args)
        if proc.returncode == 0:
            return parse_sacct(proc.stdout)
        log.warning("sacct failed (attempt %d/%d): %s", attempt + 1, retries + 1,
                    proc.stderr.strip())
        if attempt < retries:
            time.sleep(backoff_s * 2 ** attempt)
    raise SlurmError("sacct", proc.stderr, "is slurmdbd up? `hpcinfer status` still shows "
                                           "running jobs from squeue")


def parse_sacct(out: str) -> list[AcctEntry]:
    """`sacct --parsable2` (header line first). Pending array ranges such as
    `20956421_[2-4%25]` expand to one entry per task (submitit's read_job_id)."""
    from submitit.slurm.slurm import read_job_id  # ~50 ms; only status/wait need it
    lines = [ln for ln in out.splitlines() if ln.strip()]
    if not lines:
        return []
    names = lines[0].split("|")
    entries = []
    for line in lines[1:]:
        row = dict(zip(names, line.split("|")))
        raw_id = row.get("JobID", "")
        if not raw_id or "." in raw_id:   # steps: 123.batch, 123.0
            continue
        state = (row.get("State", "").split() or ["UNKNOWN"])[0]
        for parts in read_job_id(raw_id):
            ids = ([parts[0]] if len(parts) == 1 else [f"{parts[0]}_{parts[1]}"] if len(parts) == 2
                   else [f"{parts[0]}_{i}" for i in range(int(parts[1]), int(parts[2]) + 1)])
            entries.extend(AcctEntry(i, state, row.get("ExitCode", "")) for i in ids)
    return entries


def scancel(job_id: str, signal: str | None = None, batch: bool = False) -> None:
    """Cancel a job (or just signal it: `signal="USR2", batch=True` signals the batch shell)."""
    args = ["scancel"]
    if signal:
        args.append(f"--signal={signal}")
    if batch:
        args.append("--batch")
    proc = _run(args + [job_id])
    if proc.returncode != 0:
        raise SlurmError("scancel", proc.stderr, "is the job id right? (`squeue --me`)")
