"""`hpcinfer status JOBDIR`: Slurm's view (squeue, then sacct) joined with the job dir's own
state (shard DONE markers, the worker's metrics lines)."""
from __future__ import annotations

import json
from pathlib import Path

from hpcinfer.compile.jobdir import load_plan
from hpcinfer.slurm import commands
from hpcinfer.slurm.records import last_submission


def task_slurm_id(job_id: str, task_id: int | None) -> str:
    return job_id if task_id is None else f"{job_id}_{task_id}"


def slurm_states(job_id: str, task_ids: list[int | None]) -> dict[str, tuple[str, str]]:
    """{task slurm id: (state, reason)} from squeue, falling back to sacct for tasks that
    already left the queue. Pending array ranges ("123_[2-3%2]") are expanded."""
    from submitit.slurm.slurm import read_job_id
    wanted = {task_slurm_id(job_id, t) for t in task_ids}
    states: dict[str, tuple[str, str]] = {}
    for entry in commands.squeue([job_id]):
        for parts in read_job_id(entry.job_id):
            ids = ([parts[0]] if len(parts) == 1 else [f"{parts[0]}_{parts[1]}"] if len(parts) == 2
                   else [f"{parts[0]}_{i}" for i in range(int(parts[1]), int(parts[2]) + 1)])
            for i in ids:
                states[i] = (entry.state, entry.reason)
    if wanted - states.keys():
        try:
            for entry in commands.sacct([job_id], retries=2, backoff_s=0.5):
                if entry.job_id in wanted and entry.job_id not in states:
                    states[entry.job_id] = (entry.state, f"exit {entry.exit_code}")
                elif entry.job_id == job_id:
                    # An array cancelled while tasks were pending has one record, "ID".
                    for task in wanted - states.keys():
                        states[task] = (entry.state, f"exit {entry.exit_code}")
        except commands.SlurmError:
            pass   # logged by sacct; the tasks show as UNKNOWN
    return {i: states.get(i, ("UNKNOWN", "")) for i in wanted}


def worker_records(job_dir: Path, task_id: int | None) -> list[dict]:
    """Last metrics line of every rank of one task (the worker writes one file per rank)."""
    label = f"task-{task_id if task_id is not None else 0:05d}-rank-"
    records = []
    for path in sorted((job_dir / "metrics").glob(label + "*.jsonl")):
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        if lines:
            records.append(json.loads(lines[-1]))
    return records


def gather(job_dir: str | Path) -> dict:
    """Everything `hpcinfer status` shows, as JSON-ready data."""
    job_dir = Path(job_dir).resolve()
    plan = load_plan(job_dir)
    sub = last_submission(job_dir)
    task_ids: list[int | None] = list(range(plan.array_size)) if plan.shape == "array" else [None]
    states = {}
    if sub and sub["backend"] == "slurm":
        states = slurm_states(sub["job_id"], task_ids)
    tasks = []
    for t in task_ids:
        shards = plan.shards_for_task(t)
        records = worker_records(job_dir, t)
        sid = task_slurm_id(sub["job_id"], t) if sub else None
        state, reason = states.get(sid, (_local_state(records) if sub else "NOT_SUBMITTED", ""))
        tasks.append({
            "task": t, "slurm_id": sid, "state": state, "reason": reason,
            "shards": [s.index for s in shards], "rows": sum(s.num_rows for s in shards),
            # shards/NNNNN/DONE: the layout of hpcinfer.io.ledger (not imported: login side stays light)
            "shards_done": sum((job_dir / "shards" / f"{s.index:05d}" / "DONE").exists() for s in shards),
            "restarts": max((r.get("restart_count", 0) for r in records), default=0),
            "worker": records[0].get("status") if records else None,
        })
    summary: dict[str, int] = {}
    for task in tasks:
        summary[task["state"]] = summary.get(task["state"], 0) + 1
    return {"job_dir": str(job_dir), "name": plan.name, "shape": plan.shape,
            "backend": sub["backend"] if sub else None, "job_id": sub["job_id"] if sub else None,
            "total_rows": plan.total_rows, "tasks": tasks, "summary": summary}


def _local_state(records: list[dict]) -> str:
    if not records:
        return "UNKNOWN"
    return {"ok": "COMPLETED", "failed": "FAILED", "requeue": "REQUEUED"}.get(
        records[0].get("status"), "RUNNING")


def format_status(info: dict) -> str:
    """Human-readable table."""
    head = (f"{info['name']}: {info['shape']} job, {info['total_rows']} rows, "
            f"{info['backend'] or 'not submitted'} job {info['job_id'] or '-'}  "
            f"({', '.join(f'{n} {s}' for s, n in sorted(info['summary'].items()))})")
    lines = [head, f"{'task':>6}  {'slurm id':<14} {'state':<12} {'rows':>9} {'shards done':>11}"
                   f"  {'restarts':>8}  reason"]
    for t in info["tasks"]:
        lines.append(f"{'-' if t['task'] is None else t['task']:>6}  {t['slurm_id'] or '-':<14} "
                     f"{t['state']:<12} {t['rows']:>9} {t['shards_done']:>5}/{len(t['shards']):<5}"
                     f"  {t['restarts']:>8}  {t['reason']}")
    return "\n".join(lines)


def all_finished(info: dict) -> bool:
    return all(t["state"] in commands.FINISHED_STATES for t in info["tasks"])
