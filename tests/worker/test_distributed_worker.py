"""The worker at TP=2 / PP=2 on the real single-host Slurm (CPU, gloo).

- A rendered `--ntasks=2`, `srun --mpi=pmix` job equals the TP=1 run row for row; so does a
  local TP=2 run (one process that spawns its second rank).
- `kill -9` of the follower: the driver names the lost rank and host and exits within 60 s;
  the job requeues and finishes with every row exactly once.
- `scancel --batch --signal=USR2`: both ranks stop at the driver's step boundary, the job
  requeues once, every row comes exactly once.
- Two data-parallel replicas (`parallel.replicas: 2`, tensor 1) take a shard each and equal
  one run; `hpcinfer status` shows each replica.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcinfer.testing.slurm_jobs import job_logs, submit, wait_finished, wait_log
from hpcinfer.testing.worker_jobs import (
    job_config,
    make_job,
    prompt_rows,
    read_results,
    run_worker,
    worker_env,
    write_jsonl,
)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(240)]
NUM_ROWS = 24


@pytest.fixture(scope="module")
def tp1_rows(tmp_path_factory, model_dir):
    """The TP=1 worker's records for the NUM_ROWS prompts (run locally, one process)."""
    root = tmp_path_factory.mktemp("tp1")
    job_dir = make_job(root, _config(root, model_dir, tensor=1, partition="debug"))
    code, log = run_worker(job_dir, OMP_NUM_THREADS="1")
    assert code == 0, log[-3000:]
    [records] = read_results(job_dir).values()
    return records


def _config(root: Path, model_dir: Path, tensor: int, partition: str, delay_s: float = 0.0,
            **sections) -> dict:
    write_jsonl(root / "data" / "a.jsonl", prompt_rows(NUM_ROWS))
    env = {"OMP_NUM_THREADS": "1", "HPCINFER_PROGRESS_EVERY_S": "1"}
    if delay_s:   # slow the first run only, so the kill/signal lands while rows are in flight
        env.update(HPCINFER_WORKER_STEP_DELAY_S=str(delay_s), HPCINFER_WORKER_STEP_DELAY_RUNS="1")
    sections.setdefault("parallel", {"tensor": tensor})
    return job_config(model_dir, str(root / "data" / "a.jsonl"), env=env,
                      resources={"partition": partition, "cpus_per_task": 1}, **sections)


def _first_record(job_dir: Path, rank: int) -> dict:
    path = job_dir / "metrics" / f"task-00000-rank-{rank:03d}.jsonl"
    return json.loads(path.read_text().splitlines()[0])


def _is_alive(pid: int) -> bool:
    # A zombie still answers kill(pid, 0), so read its state; the process may be
    # reaped between any two looks, which is "not alive" too.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _assert_exactly_once_equal(job_dir: Path, tp1_rows: list[dict]) -> None:
    [records] = read_results(job_dir).values()
    assert [r["row_index"] for r in records] == list(range(NUM_ROWS))
    assert [(r["id"], r["text"], r["num_output_tokens"]) for r in records] == \
        [(r["id"], r["text"], r["num_output_tokens"]) for r in tp1_rows]


def test_shards_split_between_replicas_by_rows():
    from hpcinfer.compile.plan import Shard
    from hpcinfer.worker.ranks import place_of, split_shards
    shards = [Shard(i, "f", 0, n) for i, n in enumerate([10, 40, 10, 30, 10])]
    split = split_shards(shards, 2)
    assert [[s.index for s in part] for part in split] == [[1, 2], [0, 3, 4]]
    assert [sum(s.num_rows for s in part) for part in split] == [50, 50]
    assert split_shards(shards[:1], 3)[1:] == [(), ()]      # more replicas than shards
    place = place_of(5, 8, 1, 4)
    assert (place.replica, place.replica_rank, place.num_replicas, place.is_driver) == (1, 1, 2,
                                                                                          False)
    with pytest.raises(ValueError, match="start a multiple of 4 ranks"):
        place_of(0, 6, 0, 4)


def test_array_task_gets_one_shard_per_replica(tmp_path):
    from hpcinfer.compile.compiler import build_plan
    from hpcinfer.compile.render import render_script
    from hpcinfer.config import load_job
    from hpcinfer.testing.jobs import write_job
    job = write_job(tmp_path, rows=(5, 5, 5, 5, 5),
                    parallel={"replicas": 2})
    plan = build_plan(load_job(job))
    assert (plan.shape, plan.array_size, plan.shards_per_task, plan.ntasks_per_node) == \
        ("array", 3, 2, 2)
    assert [[s.index for s in plan.shards_for_task(t)] for t in range(3)] == [[0, 1], [2, 3], [4]]
    assert "#SBATCH --array=0-2" in render_script(plan)


def test_local_tp2_run_spawns_its_second_rank_and_equals_tp1(tmp_path, model_dir, tp1_rows):
    # `hpcinfer run --local` starts one process: the driver spawns the other rank (spawn.py)
    job_dir = make_job(tmp_path, _config(tmp_path, model_dir, 2, "debug"))
    code, log = run_worker(job_dir, OMP_NUM_THREADS="1")
    assert code == 0, log[-3000:]
    assert "spawned 1 worker ranks" in log
    _assert_exactly_once_equal(job_dir, tp1_rows)


@pytest.mark.parametrize("parallel", [{"tensor": 2}, {"pipeline": 2}], ids=["tp2", "pp2"])
def test_two_rank_job_equals_tp1_row_for_row(slurm_cluster, tmp_path, model_dir, tp1_rows,
                                             parallel):
    job_dir, _ = submit(tmp_path, _config(tmp_path, model_dir, 1, slurm_cluster,
                                           parallel=parallel))
    script = (job_dir / "submit.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script
    assert "launch=(srun --nodes=1 --ntasks=2 --kill-on-bad-exit=1 --mpi=pmix)" in script
    info = wait_finished(job_dir)
    assert info["summary"] == {"COMPLETED": 1}, job_logs(job_dir)[-3000:]
    _assert_exactly_once_equal(job_dir, tp1_rows)
    text = job_logs(job_dir)
    assert "rank 1@" in text and "follower 1 of replica 0 ready" in text
    follower = [json.loads(ln) for ln in
                (job_dir / "metrics" / "task-00000-rank-001.jsonl").read_text().splitlines()]
    assert follower[-1]["status"] == "follower" and follower[-1]["exit_code"] == 0


def test_kill_9_of_the_follower_is_named_requeued_and_finishes_exactly_once(
        slurm_cluster, tmp_path, model_dir, tp1_rows):
    job_dir, job_id = submit(tmp_path, _config(tmp_path, model_dir, 2, slurm_cluster, 0.3))
    wait_log(job_dir, "progress: rows 4/")            # committed rows, others in flight
    follower, driver = _first_record(job_dir, 1), _first_record(job_dir, 0)
    assert follower["replica_rank"] == 1 and driver["replica_rank"] == 0
    os.kill(follower["pid"], 9)
    killed = time.monotonic()
    named = wait_log(job_dir, f"lost rank 1 (host {follower['host']}, pid {follower['pid']})")
    assert named - killed < 60
    while _is_alive(driver["pid"]):
        assert time.monotonic() - killed < 60, "the driver outlived its lost follower by 60 s"
        time.sleep(0.1)
    info = wait_finished(job_dir)
    assert info["summary"] == {"COMPLETED": 1}, job_logs(job_dir)[-3000:]
    text = job_logs(job_dir)
    assert "a rank was lost (status" in text
    assert f"requeueing {job_id} (restart 1 of" in text
    assert "all shards of this task are DONE" in text
    _assert_exactly_once_equal(job_dir, tp1_rows)
    finishes = [json.loads(ln) for ln in
                (job_dir / "metrics" / "task-00000-rank-000.jsonl").read_text().splitlines()
                if '"finish"' in ln]
    # (srun's SIGTERM may stop the loop first: then a "requeue" line comes before it)
    [lost] = [f for f in finishes if f["status"] == "lost_rank"]
    assert finishes[-1]["status"] == "ok" and finishes.index(lost) == len(finishes) - 2
    assert lost["lost_rank"] == 1 and lost["lost_host"] == follower["host"]


def test_usr2_stops_every_rank_at_the_drivers_step_and_requeues_once(
        slurm_cluster, tmp_path, model_dir, tp1_rows):
    job_dir, job_id = submit(tmp_path, _config(tmp_path, model_dir, 2, slurm_cluster, 0.3))
    wait_log(job_dir, "progress: rows 4/")
    subprocess.run(["scancel", "--batch", "--signal=USR2", job_id], check=True)
    info = wait_finished(job_dir)
    assert info["summary"] == {"COMPLETED": 1}, job_logs(job_dir)[-3000:]
    text = job_logs(job_dir)
    assert "received SIGUSR2: committed what finished" in text
    assert "had received SIGUSR2; stopped at the driver's word (exit 3)" in text
    assert text.count(f"requeueing {job_id} (restart") == 1
    _assert_exactly_once_equal(job_dir, tp1_rows)
    for rank in (0, 1):
        finishes = [json.loads(ln) for ln in
                    (job_dir / "metrics" / f"task-00000-rank-{rank:03d}.jsonl").read_text()
                    .splitlines() if '"finish"' in ln]
        codes = [f.get("exit_code", {"requeue": 3, "ok": 0}.get(f["status"])) for f in finishes]
        assert codes == [3, 0], finishes


def test_two_replicas_take_a_shard_each_and_equal_one_run(slurm_cluster, tmp_path, model_dir,
                                                          tp1_rows):
    from hpcinfer.slurm.status import format_status
    config = _config(tmp_path, model_dir, 1, slurm_cluster, input={"shard_rows": 12},
                     parallel={"replicas": 2})
    job_dir, _ = submit(tmp_path, config)
    plan = json.loads((job_dir / "plan.json").read_text())
    assert plan["shape"] == "single" and len(plan["shards"]) == 2
    assert "launch=(srun --nodes=1 --ntasks=2 --kill-on-bad-exit=1 --mpi=pmix)" in \
        (job_dir / "submit.sbatch").read_text()
    info = wait_finished(job_dir)
    assert info["summary"] == {"COMPLETED": 1}, job_logs(job_dir)[-3000:]
    results = read_results(job_dir)
    assert sorted(results) == [0, 1]
    records = results[0] + results[1]
    assert [r["row_index"] for r in records] == list(range(NUM_ROWS))
    assert [(r["id"], r["text"]) for r in records] == [(r["id"], r["text"]) for r in tp1_rows]
    [task] = info["tasks"]
    assert [(r["replica"], r["rank"], r["shards"], r["rows_done"], r["worker"])
            for r in task["replicas"]] == [(0, 0, [0], 12, "ok"), (1, 1, [1], 12, "ok")]
    assert "replica 1 (rank 1@" in format_status(info)


def test_kill_9_of_the_driver_is_named_by_the_follower(mpirun, tmp_path, model_dir, tp1_rows):
    # Under mpirun (no Slurm): the follower names its lost driver, exits 4 within 60 s; a
    # rerun finishes the rows exactly once.
    job_dir = make_job(tmp_path, _config(tmp_path, model_dir, 2, "debug"))
    log_path = tmp_path / "mpirun.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*mpirun, "-n", "2", sys.executable, "-m", "hpcinfer.worker",
                                 str(job_dir)], stdout=log, stderr=subprocess.STDOUT,
                                env=worker_env(OMP_NUM_THREADS="1",
                                               HPCINFER_WORKER_STEP_DELAY_S="0.3"))
    try:
        deadline = time.monotonic() + 90
        while "progress: rows 4/" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        driver = _first_record(job_dir, 0)
        os.kill(driver["pid"], 9)
        killed = time.monotonic()
        proc.wait(timeout=60)
        text = log_path.read_text(errors="replace")
        assert f"rank 1 on {driver['host']}: lost rank 0 (host {driver['host']}, pid " \
               f"{driver['pid']}) of replica 0" in text
        assert time.monotonic() - killed < 60
    finally:
        proc.kill()
    follower = (job_dir / "metrics" / "task-00000-rank-001.jsonl").read_text().splitlines()
    assert json.loads(follower[-1])["status"] == "lost_rank"
    code, out = run_worker(job_dir, OMP_NUM_THREADS="1")      # one process: spawns rank 1
    assert code == 0, out[-3000:]
    _assert_exactly_once_equal(job_dir, tp1_rows)


def test_drivers_input_error_ends_every_rank_before_loading(mpirun, tmp_path, model_dir):
    rows = prompt_rows(6)
    rows[3]["id"] = rows[1]["id"]                       # a duplicate id: exit 2, fix the input
    write_jsonl(tmp_path / "data" / "a.jsonl", rows)
    job_dir = make_job(tmp_path, job_config(model_dir, str(tmp_path / "data" / "a.jsonl"),
                                            parallel={"tensor": 2}))
    proc = subprocess.run([*mpirun, "-n", "2", sys.executable, "-m", "hpcinfer.worker",
                           str(job_dir)], check=False, capture_output=True, text=True,
                          timeout=120, env=worker_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    follower = [ln for ln in proc.stderr.splitlines() if " rank 1@" in ln]
    assert any("the driver exits 2 before loading the model (input has duplicate id" in ln
               for ln in follower), proc.stderr[-3000:]
    assert not any("loaded" in ln for ln in follower)
    last = (job_dir / "metrics" / "task-00000-rank-001.jsonl").read_text().splitlines()[-1]
    assert (json.loads(last)["status"], json.loads(last)["exit_code"]) == ("follower", 2)
