"""One task of a job, end to end: preflight -> model -> engine -> shards -> exit code.

Phases, in order (docs/worker.md):
  1. preflight (preflight.py): config, plan, this task's shards, inputs readable, output
     writable, environment report (first metrics line); then this rank's place (ranks.py):
     its replica, driver or follower. A follower only replays its driver's engine calls
     (replica.run_follower); the steps below are the driver's, over its replica's shards;
  2. task check: generate and chat (loop.ShardLoop), embed/classify/score/reward
     (pooling_loop.PoolingShardLoop);
  3. model: HF offline variables set, then ``hub.offline.resolve_model`` (no network, no
     torch import yet, so a missing model fails in about a second);
  4. a job-level structured-outputs constraint is compiled (constraint_check.py: xgrammar
     is the final judge, and every row would use it); duplicate ids in this task's input
     files are refused (``find_duplicate_ids``);
  5. the engine is loaded once; each shard goes through ``loop.ShardLoop``.

Exit codes (the batch script acts on them): 0 every shard DONE; 2 something the user must
fix (config, model, input file, a job-level constraint that does not compile,
duplicate ids, on_bad_row: fail, more bad rows than
input.max_bad_rows); 3 stopped by the warning
signal or SIGTERM after committing ("requeue me"); 4 a rank of the replica was lost
(lifeline.py names it; requeue me); 1 an unexpected error (a bug: the traceback is in the
log). Every rank of a replica exits with its driver's code.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from pathlib import Path

from hpcinfer.compile.plan import EXIT_BAD_INPUT, EXIT_REQUEUE
from hpcinfer.worker import preflight, ranks
from hpcinfer.worker.constraint_check import check_job_constraint
from hpcinfer.worker.metrics import MetricsWriter
from hpcinfer.worker.replica import DriverSide, run_follower
from hpcinfer.worker.setup import TaskFailed
from hpcinfer.worker.signals import StopFlag

log = logging.getLogger("hpcinfer.worker")

PHASES_ENV = "HPCINFER_WORKER_PHASES"     # "preflight": stop after the checks (tests, dry runs)


def run(job_dir: Path, stop: StopFlag) -> int:
    if os.environ.get(PHASES_ENV, "").strip() == "preflight":
        return preflight.run(job_dir, stop)
    from hpcinfer.config import ConfigError
    started = time.time()
    record = preflight.new_record()
    try:
        cfg, plan, task_id, shards = preflight.check(job_dir, record)
    except (preflight.PreflightFailed, ConfigError, ValueError, OSError) as exc:
        return preflight.fail(job_dir, record, exc, started)
    stop.install(str(cfg.resilience.signal))
    record.update(status="starting")
    try:   # which replica, driver or follower (ranks.py); MPI starts here under srun --mpi
        place = ranks.detect_place(int(cfg.parallel.tensor), int(cfg.parallel.pipeline))
    except ranks.LayoutError as exc:
        return preflight.fail(job_dir, record, exc, started)
    record.update(replica=place.replica, num_replicas=place.num_replicas,
                  replica_rank=place.replica_rank)
    metrics = MetricsWriter(job_dir, task_id, record["rank"], base={
        k: record[k] for k in ("task", "rank", "host", "pid", "restart_count", "slurm_job_id",
                               "backend", "replica", "replica_rank", "fingerprint")})
    metrics.write(record)
    replica = ranks.join(place, str(cfg.resources.device))
    if not place.is_driver:
        return run_follower(cfg, replica, stop, metrics, lambda: _follower_config(cfg, place))
    mine = ranks.split_shards(shards, place.num_replicas)[place.replica]
    if place.num_replicas > 1:    # on every line: `hpcinfer status` shows each replica
        metrics.base.update(num_replicas=place.num_replicas,
                            replica_shards=[s.index for s in mine])
    driver = DriverSide(replica)
    reason = "the driver finished"
    try:
        code = _run_shards(job_dir, cfg, plan, mine, stop, metrics, started, driver)
    except TaskFailed as exc:
        reason = " ".join(str(exc).split())     # one line, whatever the cause's text
        log.error("%s", reason)
        metrics.write({"event": "finish", "status": "failed", "message": reason,
                       "seconds": round(time.time() - started, 3)})
        code = EXIT_BAD_INPUT
    except Exception as exc:
        code = driver.on_error(exc, metrics, started)   # a lost rank: named, exit 4
        if code is None:
            raise
        return code
    return driver.settle(code, stop, metrics, started, reason)


def _follower_config(cfg, place):
    from hpcinfer.worker import setup
    return setup.engine_config(cfg, setup.resolve(cfg), ranks.device_of(place, cfg))


def _run_shards(job_dir: Path, cfg, plan, shards, stop: StopFlag, metrics: MetricsWriter,
                started: float, driver: DriverSide) -> int:
    from hpcinfer.io import ledger
    from hpcinfer.worker import setup
    from hpcinfer.worker.progress import Progress
    setup.check_supported(cfg)
    todo = [s for s in shards if not ledger.is_done(ledger.shard_dir(job_dir, s.index))]
    if not todo:
        log.info("every shard of this task is DONE already; nothing to do" if shards else
                 "this replica has no shard (more replicas than shards: lower "
                 "input.shard_rows); nothing to do")
        metrics.write({"event": "finish", "status": "ok", "shards_failed": []})
        return 0
    spec = setup.input_spec(cfg)
    budget = _bad_row_budget(cfg, job_dir, shards)
    if budget.is_exceeded:              # an earlier run of this task stopped on its budget
        raise TaskFailed(budget.message())
    model = setup.resolve(cfg)          # before torch: a missing model fails in a second
    try:                                # a cuda job where torch has no CUDA: say what to write
        preflight.check_device(str(cfg.resources.device), preflight.gpus_seen())
    except preflight.PreflightFailed as exc:
        raise TaskFailed(str(exc)) from None
    # a job-level constraint xgrammar refuses would make every row bad: stop before the rows
    check_job_constraint(cfg, model.path)
    setup.refuse_duplicate_ids(spec, todo)
    engine = setup.load_engine(cfg, model, driver.make_engine,
                               ranks.device_of(driver.replica.place, cfg))
    pool = getattr(getattr(engine, "runner", None), "kv_pool", None)   # LLMEngine only
    if pool is not None:     # the chosen KV pool and what it was sized from (docs/worker.md)
        metrics.write({"event": "engine", "status": "running", **pool})
    builder = None if setup.is_pooling(cfg) else setup.request_builder(cfg, engine)
    options = dataclasses.replace(setup.loop_options(cfg, engine), bad_row_budget=budget,
                                  fingerprint=metrics.base.get("fingerprint"))
    rows_total = sum(s.num_rows for s in shards)
    rows_done = sum(s.num_rows for s in shards if s not in todo) + sum(
        _committed(ledger.shard_dir(job_dir, s.index)) for s in todo)
    progress = Progress(rows_total, rows_done, metrics)
    progress.engine = None if setup.is_pooling(cfg) else engine   # KV stats: LLMEngine only
    log.info("engine ready (%s); %d shard(s) to run, %d of %d rows already committed",
             model.path, len(todo), rows_done, rows_total)
    try:
        outcome, failed = _each_shard(job_dir, todo, spec, engine,
                                      lambda shard: setup.output_format(cfg, spec, shard),
                                      builder, stop, progress, options, _pooling_task(cfg))
    finally:
        progress.tick(force=True)
        progress.close()
    return _finish(stop, outcome, failed, metrics, started, progress.snapshot())


def _bad_row_budget(cfg, job_dir: Path, shards):
    """input.max_bad_rows over this task's (replica's) rows, counting committed bad rows."""
    from hpcinfer.io import ledger
    from hpcinfer.worker.budget import BadRowBudget
    return BadRowBudget.for_task(getattr(cfg.input, "max_bad_rows", 0.05),
                                 [ledger.shard_dir(job_dir, s.index) for s in shards],
                                 sum(s.num_rows for s in shards))


def _pooling_task(cfg) -> tuple[str, str] | None:
    """(task, on_long_prompt) for embed/classify/score/reward; None for generate/chat."""
    from hpcinfer.worker import setup
    return (str(cfg.task), str(cfg.resilience.on_long_prompt)) if setup.is_pooling(cfg) else None


def _each_shard(job_dir: Path, todo, spec, engine, output_format, builder, stop: StopFlag,
                progress, options, pooling=None) -> tuple[str, list[str]]:
    """Run the shards in order; ("stopped" | "done", failed shard names). A shard whose
    input file or directory is broken fails alone; the others still run. ``pooling``:
    (task, on_long_prompt) runs pooling_loop.PoolingShardLoop instead of loop.ShardLoop."""
    from hpcinfer.io import ledger
    from hpcinfer.io.readers import ShardReadError
    from hpcinfer.io.shard_loop import BadRowError
    from hpcinfer.worker.loop import ShardLoop
    failed: list[str] = []
    for shard in todo:
        progress.shard = shard.index
        directory = ledger.shard_dir(job_dir, shard.index)
        try:
            if pooling:
                from hpcinfer.worker.pooling_loop import PoolingShardLoop
                loop = PoolingShardLoop(engine, pooling[0], shard, spec, directory,
                                        output_format(shard), stop, progress, options,
                                        on_long_prompt=pooling[1])
            else:
                loop = ShardLoop(engine, shard, spec, directory, output_format(shard), builder,
                                 stop, progress, options)
            outcome = loop.run()
        except (ShardReadError, ledger.LedgerError) as exc:
            log.error("shard %05d FAILED: %s", shard.index, exc)
            failed.append(f"{shard.index:05d}")
            continue
        except BadRowError as exc:
            raise TaskFailed(str(exc)) from None
        if outcome == "stopped":
            return "stopped", failed
    return "done", failed


def _finish(stop: StopFlag, outcome: str, failed: list[str], metrics: MetricsWriter,
            started: float, last: dict) -> int:
    """Write the last metrics line (final progress numbers plus the status); the exit code."""
    line = {**last, "event": "finish", "seconds": round(time.time() - started, 3)}
    if outcome == "stopped":
        log.info("received %s: committed what finished; in-flight rows are redone after the "
                 "restart; exiting %d (requeue me)", stop.signal_name, EXIT_REQUEUE)
        metrics.write({**line, "status": "requeue", "message": stop.signal_name})
        return EXIT_REQUEUE
    if failed:
        message = (f"shard(s) {', '.join(failed)} FAILED (see above and shards/*/FAILED); "
                   "the other shards are done")
        log.error("%s", message)
        metrics.write({**line, "status": "failed", "message": message, "shards_failed": failed})
        return EXIT_BAD_INPUT
    log.info("all shards of this task are DONE (%.1f s)", line["seconds"])
    metrics.write({**line, "status": "ok", "shards_failed": []})
    return 0


def _committed(directory: Path) -> int:
    from hpcinfer.io import ledger
    if not directory.is_dir():
        return 0
    counts = ledger.progress(directory)
    return counts["num_results"] + counts["num_errors"]


def main(argv: list[str] | None = None, stop: StopFlag | None = None) -> int:
    """The worker's entry; ``stop`` is the flag __main__ installed before importing this
    module (a new one is installed when called directly)."""
    import sys
    argv = sys.argv[1:] if argv is None else argv
    # Every rank logs to the same job log: each line says which rank and host wrote it.
    label = f"rank {ranks.env_rank()}@{socket.gethostname()}"
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s hpcinfer.worker {label} %(levelname)s %(message)s")
    if len(argv) != 1:
        log.error("usage: python -m hpcinfer.worker JOBDIR")
        return EXIT_BAD_INPUT
    if stop is None:
        stop = StopFlag()
        stop.install()              # USR2 + TERM now; the configured signal once job.yaml is read
    try:
        return run(Path(argv[0]).resolve(), stop)
    except Exception:  # noqa: BLE001 - a bug: keep the traceback in the log, exit 1
        log.exception("worker crashed (a bug: please report it with this log)")
        return 1
