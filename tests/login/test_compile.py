"""Compiler: input discovery and shards, plan decisions, job dir writing (real configs)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hpcinfer.compile import inputs
from hpcinfer.compile.compiler import build_plan
from hpcinfer.compile.jobdir import compile_job, load_plan, write_job_dir
from hpcinfer.compile.plan import JobPlan
from hpcinfer.config import ConfigError, load_job
from hpcinfer.testing.jobs import tree, write_job, write_rows


def test_count_jsonl_rows_streams_newlines(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_bytes(b'{"a":1}\n{"a":2}\n{"a":3}')          # last line without newline
    assert inputs.count_jsonl_rows(str(f)) == 3
    f.write_bytes(b"")
    assert inputs.count_jsonl_rows(str(f)) == 0
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"x\n" * 1_500_000)                 # spans several 1 MiB chunks
    assert inputs.count_jsonl_rows(str(big)) == 1_500_000


def test_shards_split_each_file_and_never_span_files():
    files = [inputs.InputFile("/a", "jsonl", 7), inputs.InputFile("/b", "jsonl", 0),
             inputs.InputFile("/c", "jsonl", 3)]
    shards = inputs.make_shards(files, 3)
    assert [(s.index, s.file, s.start, s.stop) for s in shards] == [
        (0, "/a", 0, 3), (1, "/a", 3, 6), (2, "/a", 6, 7), (3, "/c", 0, 3)]


def test_array_plan_from_config(tmp_path):
    job = write_job(tmp_path, rows=(5, 3), input={"shard_rows": 4},
                    resources={"array_parallelism": 2, "partition": "debug"})
    plan = build_plan(load_job(job), python="/usr/bin/python3")
    assert plan.shape == "array" and plan.array_size == 3 and plan.array_throttle == 2
    assert [(Path(s.file).name, s.start, s.stop) for s in plan.shards] == [
        ("part-0.jsonl", 0, 4), ("part-0.jsonl", 4, 5), ("part-1.jsonl", 0, 3)]
    flags = dict(plan.sbatch_flags)
    assert flags["array"] == "0-2%2" and flags["partition"] == "debug"
    assert "gpus-per-node" not in flags                 # device: cpu asks for no GPU
    assert flags["signal"] == "B:USR2@120" and flags["output"] == "logs/slurm-%A_%a.out"
    assert plan.job_dir == str(tmp_path / "out") and plan.config_file == str(job)
    assert plan.total_rows == 8 and plan.python == "/usr/bin/python3"


def test_single_and_multinode_shapes(tmp_path):
    job = write_job(tmp_path, rows=(3,))
    assert build_plan(load_job(job)).shape == "single"
    job = write_job(tmp_path / "mn", rows=(3,), parallel={"tensor": 2, "pipeline": 2, "nodes": 2},
                    resources={"device": "cuda", "gpus_per_node": 2, "gpu_type": "a100"})
    plan = build_plan(load_job(job, check_environment=False))
    assert plan.shape == "multinode" and plan.nodes == 2 and plan.ntasks_per_node == 2
    assert dict(plan.sbatch_flags)["gpus-per-node"] == "a100:2"


def test_parquet_rows_from_metadata_and_id_column(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    job = write_job(tmp_path, rows=(), input={"path": "data/*.parquet"})
    (tmp_path / "data").mkdir(exist_ok=True)
    pq.write_table(pa.table({"id": list(range(12)), "prompt": ["p"] * 12}), tmp_path / "data" / "a.parquet")
    plan = build_plan(load_job(job))
    assert plan.total_rows == 12 and plan.array_size == 3
    pq.write_table(pa.table({"key": [1], "prompt": ["p"]}), tmp_path / "data" / "b.parquet")
    with pytest.raises(ConfigError) as err:
        build_plan(load_job(job))
    assert err.value.key_path == "input.id_field" and err.value.line is not None
    assert "has no column 'id'" in str(err.value)


def test_array_larger_than_max_array_size(tmp_path):
    job = write_job(tmp_path, rows=(30,), input={"shard_rows": 1})
    profile = tmp_path / "site.yaml"
    profile.write_text("slurm: {max_array_size: 10}\n")
    with pytest.raises(ConfigError) as err:
        build_plan(load_job(job, overrides=(f"cluster={profile}",)))
    assert "MaxArraySize (10)" in str(err.value) and "at least 3" in str(err.value)
    assert str(job) in str(err.value)


def test_sbatch_values_with_newlines_are_refused(tmp_path):
    job = write_job(tmp_path, resources={"partition": "gpu\necho pwned"})
    with pytest.raises(ConfigError, match="resources.partition"):
        build_plan(load_job(job))


def test_job_dir_written_atomically_and_plan_round_trips(tmp_path):
    job = write_job(tmp_path)
    rendered = compile_job(load_job(job), container_def=True)
    assert not (tmp_path / "out").exists()            # compiling writes nothing
    root = write_job_dir(rendered)
    assert {"job.yaml", "plan.json", "submit.sbatch", "container.def", "logs", "metrics"} <= set(os.listdir(root))
    assert os.access(root / "submit.sbatch", os.X_OK)
    assert not [n for n in os.listdir(root) if n.endswith(".tmp")]
    assert load_plan(root) == rendered.plan
    assert JobPlan.from_dict(json.loads((root / "plan.json").read_text())) == rendered.plan
    from hpcinfer.config import load_resolved
    assert load_resolved(root / "job.yaml").name == "t"


def test_job_dir_with_results_of_other_shards_is_refused(tmp_path):
    job = write_job(tmp_path)
    root = write_job_dir(compile_job(load_job(job)))
    (root / "shards" / "00000").mkdir(parents=True)
    write_job_dir(compile_job(load_job(job)))          # same layout: fine
    before = tree(tmp_path)
    with pytest.raises(ConfigError, match="different input shards"):
        write_job_dir(compile_job(load_job(job, overrides=("input.shard_rows=2",))))
    assert tree(tmp_path) == before


def test_container_job_from_a_site_profile(tmp_path, monkeypatch):
    """aau-ai-cloud: singularity exec --nv, binds for job dir, inputs, model, HF cache, shm."""
    import subprocess
    from hpcinfer.compile.render import render_script
    hf_home = tmp_path / "hf"
    hf_home.mkdir()
    monkeypatch.setenv("HF_HOME", str(hf_home))
    image = tmp_path / "img.sif"
    image.write_text("")
    job = write_job(tmp_path, rows=(3,), cluster="aau-ai-cloud",
                    container={"image": str(image), "binds": ["/ceph/data"], "env": {"NCCL_DEBUG": "WARN"}},
                    resources={"device": "cuda", "gpus_per_node": 1})
    plan = build_plan(load_job(job))
    c = plan.container
    assert c.runtime == "singularity" and c.use_gpu and c.image == str(image)
    assert set(c.binds) == {str(tmp_path / "out"), str(tmp_path / "data"), str(tmp_path / "model"),
                            str(hf_home), "/dev/shm", "/ceph/data"}
    assert plan.env_from_environment == ("HF_TOKEN",)
    text = render_script(plan)
    assert "worker=(singularity exec --nv" in text and "--env NCCL_DEBUG=WARN" in text
    assert '[ -n "${HF_TOKEN:-}" ]' in text
    script = tmp_path / "s.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    from hpcinfer.testing.tools import shellcheck_bin
    assert subprocess.run([shellcheck_bin(), str(script)], capture_output=True).returncode == 0


def test_alliance_profile_modules_account_and_offline_env(tmp_path):
    from hpcinfer.compile.render import render_script
    job = write_job(tmp_path, rows=(3,), cluster="alliance-canada",
                    resources={"account": "def-someone"})
    plan = build_plan(load_job(job))
    assert plan.modules == ("StdEnv/2023", "python/3.12")      # no container: no apptainer
    assert ("HF_HUB_OFFLINE", "1") in plan.env and dict(plan.sbatch_flags)["account"] == "def-someone"
    text = render_script(plan)
    assert "module load StdEnv/2023\nmodule load python/3.12\n" in text
    assert "#SBATCH --account=def-someone" in text
