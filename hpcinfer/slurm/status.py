"""`hpcinfer status JOBDIR`: Slurm's view (squeue, then sacct) joined with the job dir's own
state: per shard the committed rows and bad rows (hpcinfer.io.ledger.progress: newline
counts and Parquet footers, no row parsing), DONE / FAILED markers, and the worker's last
metrics line per task (throughput, ETA)."""
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
        lines = [ln for ln in _tail(path).splitlines() if ln.strip()]
        if lines:
            records.append(json.loads(lines[-1]))
    return records


def _tail(path: Path, num_bytes: int = 1 << 16) -> str:
    """The end of a metrics file (progress lines make it grow over a long job)."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(max(0, size - num_bytes))
        return f.read().decode("utf-8", "replace")


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
        if sub is None:
            state, reason = "NOT_SUBMITTED", ""
        elif sid in states:
            state, reason = states[sid]
        else:
            state, reason = local_state(records, sub)
        if _is_failure(state):
            reason = _failure_reason(job_dir, sid, records, reason)
        throughput = _throughput(records)
        if throughput and state != "RUNNING":
            throughput["eta_s"] = None       # no ETA for a task that is not running
        shard_rows = [shard_progress(job_dir, s) for s in shards]
        tasks.append({
            "task": t, "slurm_id": sid, "state": state, "reason": reason,
            "shards": [s.index for s in shards], "rows": sum(s.num_rows for s in shards),
            "shards_done": sum(p["state"] == "done" for p in shard_rows),
            "rows_done": sum(p["rows_done"] for p in shard_rows),
            "rows_errors": sum(p["errors"] for p in shard_rows),
            "shard_progress": shard_rows,
            "restarts": max((r.get("restart_count", 0) for r in records), default=0),
            "worker": records[0].get("status") if records else None,
            "throughput": throughput,
            "replicas": replica_progress(records, shard_rows),
        })
    summary: dict[str, int] = {}
    for task in tasks:
        summary[task["state"]] = summary.get(task["state"], 0) + 1
    return {"job_dir": str(job_dir), "name": plan.name, "shape": plan.shape,
            "backend": sub["backend"] if sub else None, "job_id": sub["job_id"] if sub else None,
            "total_rows": plan.total_rows, "rows_done": sum(t["rows_done"] for t in tasks),
            "rows_errors": sum(t["rows_errors"] for t in tasks), "tasks": tasks,
            "summary": summary}


def shard_progress(job_dir: Path, shard) -> dict:
    """Rows committed (results + bad rows) of one shard, and done | failed | started | pending."""
    from hpcinfer.io import ledger
    directory = ledger.shard_dir(job_dir, shard.index)
    entry = {"shard": shard.index, "file": shard.file, "rows": shard.num_rows, "rows_done": 0,
             "results": 0, "errors": 0, "state": "pending", "failed_reason": None}
    if not directory.is_dir():
        return entry
    try:
        counts = ledger.progress(directory)
    except (OSError, ValueError) as exc:       # a part being renamed, a torn errors line
        entry["state"] = f"unreadable ({exc})"
        return entry
    entry.update(results=counts["num_results"], errors=counts["num_errors"],
                 rows_done=counts["num_results"] + counts["num_errors"],
                 failed_reason=counts["failed_reason"],
                 state="done" if counts["is_done"] else
                 "failed" if counts["failed_reason"] else "started")
    return entry


def replica_progress(records: list[dict], shard_rows: list[dict]) -> list[dict]:
    """Per data-parallel replica (worker/ranks.py), from its driver's last metrics line:
    its shards, rows committed of them, its worker status and rates. [] with one replica."""
    rows_of = {p["shard"]: p for p in shard_rows}
    replicas = []
    for r in records:
        if r.get("replica_rank", 0) != 0 or "replica_shards" not in r:
            continue
        mine = [rows_of[i] for i in r["replica_shards"] if i in rows_of]
        replicas.append({"replica": r.get("replica"), "rank": r.get("rank"),
                         "host": r.get("host"), "shards": r["replica_shards"],
                         "rows": sum(p["rows"] for p in mine),
                         "rows_done": sum(p["rows_done"] for p in mine),
                         "worker": r.get("status"), "throughput": _throughput([r])})
    return sorted(replicas, key=lambda x: x["replica"])


_THROUGHPUT_KEYS = ("rows_per_s", "in_tok_per_s", "out_tok_per_s", "kv_use", "preemptions",
                    "eta_s", "time")


def _throughput(records: list[dict]) -> dict | None:
    """Rates and ETA from the worker's last metrics line (rank 0), when it has them."""
    if not records or "rows_per_s" not in records[0]:
        return None
    return {k: records[0].get(k) for k in _THROUGHPUT_KEYS}


# A local run's task whose processes are gone without a last metrics line, and one the run
# never reached before it ended (the local backend runs array tasks one after another).
DIED, NOT_RUN = "DIED", "NOT_RUN"
FINISHED_STATES = commands.FINISHED_STATES | {DIED, NOT_RUN}
# With the worker on another host its pid cannot be checked: a heartbeat (metrics line)
# older than this says it may be gone. Model loading writes none for a while, so it is long.
STALE_HEARTBEAT_S = 900


def local_state(records: list[dict], sub: dict) -> tuple[str, str]:
    """(state, reason) of a local run's task from its worker's last metrics line, the
    worker's pid and host on that line, and the runner's in submissions.jsonl."""
    from hpcinfer.slurm.local import process_state
    if not records:
        if process_state(sub.get("host"), sub.get("pid")) == "dead":
            return NOT_RUN, (f"the local run (pid {sub['pid']} on {sub['host']}) ended before "
                             "this task started: run the job again to run it")
        return ("PENDING" if sub.get("pid") else "UNKNOWN"), ""
    last = records[0]
    final = {"ok": "COMPLETED", "failed": "FAILED", "requeue": "REQUEUED"}.get(
        last.get("status"))
    if final:
        return final, ""
    age_s = _heartbeat_age_s(last)
    seen = f"last heartbeat {age_s:.0f} s ago" if age_s is not None else "no heartbeat time"
    alive = process_state(last.get("host"), last.get("pid"))
    if alive == "dead":
        return DIED, (f"worker pid {last.get('pid')} on {last.get('host')} is gone without "
                      f"its last metrics line (killed, e.g. kill -9 or out of memory; {seen}); "
                      "committed rows are kept: run the job again to resume")
    if alive == "unknown" and age_s is not None and age_s > STALE_HEARTBEAT_S:
        return "UNKNOWN", (f"no heartbeat from pid {last.get('pid')} on {last.get('host')} "
                           f"for {age_s:.0f} s: it may have died (check that host)")
    return "RUNNING", ""


def _heartbeat_age_s(record: dict) -> float | None:
    import calendar
    import time
    try:
        return time.time() - calendar.timegm(time.strptime(record["time"], "%Y-%m-%dT%H:%M:%SZ"))
    except (KeyError, TypeError, ValueError):
        return None


def _is_failure(state: str) -> bool:
    word = state.split()[0] if state else ""
    return word in FINISHED_STATES and word != "COMPLETED"


def _failure_reason(job_dir: Path, sid: str | None, records: list[dict], reason: str) -> str:
    """Why a task failed: its worker's message (metrics), else the last error line of its
    log; joined to what Slurm says (e.g. "exit 2")."""
    why = next((r.get("message") for r in records
                if r.get("status") == "failed" and r.get("message")), None)
    if why is None and sid is not None:
        why = last_error_line(job_dir / "logs" / f"slurm-{sid}.out")
    if not why:
        return reason
    return f"{reason}: {why}" if reason else why


def last_error_line(log_path: Path) -> str | None:
    """The last line of a task log that reports an error (the worker's ERROR lines, Slurm's
    "error:", a Python exception), without its timestamp prefix."""
    if not log_path.is_file():
        return None
    lines = _tail(log_path).splitlines()
    for line in reversed(lines):
        if " ERROR " in line:
            return line.split(" ERROR ", 1)[1].strip()
        low = line.lower()
        if "error:" in low or "killed" in low or line.startswith(("Traceback", "slurmstepd")):
            return line.strip()
    return None


def format_status(info: dict) -> str:
    """Human-readable table: one line per task, then one per shard."""
    head = (f"{info['name']}: {info['shape']} job, {info['total_rows']} rows "
            f"({info['rows_done']} done, {info['rows_errors']} bad), "
            f"{info['backend'] or 'not submitted'} job {info['job_id'] or '-'}  "
            f"({', '.join(f'{n} {s}' for s, n in sorted(info['summary'].items()))})")
    lines = [head, f"{'task':>6}  {'slurm id':<14} {'state':<12} {'rows':>9} {'shards done':>11}"
                   f"  {'restarts':>8}  reason"]
    for t in info["tasks"]:
        lines.append(f"{'-' if t['task'] is None else t['task']:>6}  {t['slurm_id'] or '-':<14} "
                     f"{t['state']:<12} {t['rows']:>9} {t['shards_done']:>5}/{len(t['shards']):<5}"
                     f"  {t['restarts']:>8}  {t['reason']}{_rates(t.get('throughput'))}")
        for r in t.get("replicas", ()):
            lines.append(f"{'':>6}  replica {r['replica']} (rank {r['rank']}@{r['host']}): "
                         f"shards {','.join(map(str, r['shards'])) or '-'}, rows "
                         f"{r['rows_done']}/{r['rows']}, worker {r['worker']}"
                         f"{_rates(r.get('throughput'))}")
    lines.append(f"{'shard':>6}  {'rows done/total':>17} {'bad':>6}  state")
    for t in info["tasks"]:
        for p in t.get("shard_progress", ()):
            reason = f": {p['failed_reason']}" if p["failed_reason"] else ""
            lines.append(f"{p['shard']:>6}  {p['rows_done']:>8}/{p['rows']:<8} {p['errors']:>6}  "
                         f"{p['state']}{reason}")
    return "\n".join(lines)


def _rates(throughput: dict | None) -> str:
    if not throughput:
        return ""
    eta = throughput.get("eta_s")
    text = f"  {throughput.get('rows_per_s') or 0:.1f} rows/s"
    if throughput.get("out_tok_per_s") is not None:
        text += (f", in {throughput['in_tok_per_s']:.0f} / out "
                 f"{throughput['out_tok_per_s']:.0f} tok/s")
    return text + (f", ETA {eta:.0f} s" if eta is not None else "")


def all_finished(info: dict) -> bool:
    return all(t["state"] in FINISHED_STATES for t in info["tasks"])
