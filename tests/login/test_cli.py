"""CLI: the login side stays light, subcommands work end to end (local backend), errors are
one line with exit 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpcinfer.cli import main
from hpcinfer.testing.jobs import tree, write_job

HEAVY = ("torch", "transformers", "triton", "pyarrow", "numpy")


def _modules_after(argv: list[str], cwd: Path) -> set[str]:
    code = ("import sys, json, contextlib, io\n"
            "from hpcinfer.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    rc = main({argv!r})\n"
            "print(json.dumps([rc, sorted(sys.modules)]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    rc, modules = json.loads(proc.stdout.splitlines()[-1])
    assert rc == 0
    return set(modules)


def test_render_of_jsonl_job_imports_nothing_heavy(tmp_path):
    job = write_job(tmp_path)
    for argv in (["render", str(job)], ["validate", str(job)], ["status", str(tmp_path / "out")]):
        modules = _modules_after(argv, tmp_path)
        heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
        assert heavy == [], f"{argv[0]} imported {heavy}"


def test_render_of_a_local_model_leaves_the_hub_and_template_sandbox_out(tmp_path):
    job = write_job(tmp_path)
    modules = _modules_after(["render", str(job)], tmp_path)
    assert not {m for m in modules if m.startswith(("hpcinfer.hub", "huggingface_hub",
                                                     "jinja2.sandbox", "pyarrow"))}


def test_render_loads_neither_slurm_commands_nor_the_row_readers(tmp_path):
    # `hpcinfer render` has a 0.3 s budget (bench/cli_latency.py): what it does not need
    # stays unimported, and pydantic does not scan every distribution for plugins.
    job = write_job(tmp_path)
    code = ("import sys, json, contextlib, io\n"
            "from hpcinfer.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    rc = main(['render', {str(job)!r}])\n"
            "import pydantic.plugin._loader as loader\n"
            "print(json.dumps([rc, loader._plugins is None, sorted(sys.modules)]))\n")
    for env, scanned in (({}, False), ({"PYDANTIC_DISABLE_PLUGINS": ""}, True)):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              cwd=tmp_path, env={**os.environ, **env})
        assert proc.returncode == 0, proc.stderr
        rc, never_scanned, modules = json.loads(proc.stdout.splitlines()[-1])
        assert rc == 0 and never_scanned is not scanned
        assert not {"hpcinfer.slurm.commands", "hpcinfer.io.readers", "hpcinfer.io.rows",
                    "hpcinfer.io.ledger"} & set(modules)


def test_parquet_input_imports_pyarrow_only_then(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    job = write_job(tmp_path, rows=(), input={"path": "data/*.parquet"})
    (tmp_path / "data").mkdir(exist_ok=True)
    pq.write_table(pa.table({"id": [1, 2], "prompt": ["a", "b"]}), tmp_path / "data" / "a.parquet")
    modules = _modules_after(["validate", str(job)], tmp_path)
    assert "pyarrow" in modules and not {"torch", "transformers", "triton"} & modules


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("validate", "render", "submit", "run", "status", "cancel", "schema", "init"):
        assert command in out


def test_schema_and_init(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "resources" in schema["properties"]
    assert main(["init", "--cluster", "aau-ai-cloud"]) == 0
    assert "name:" in capsys.readouterr().out


def test_validate_writes_nothing_and_render_writes_the_job_dir(tmp_path, capsys):
    job = write_job(tmp_path, rows=(5, 5))
    before = tree(tmp_path)
    assert main(["validate", str(job)]) == 0
    assert tree(tmp_path) == before
    assert "job array of 2 tasks" in capsys.readouterr().out
    assert main(["render", str(job), "--out", str(tmp_path / "elsewhere")]) == 0
    out = capsys.readouterr().out
    assert "would submit: cd" in out and "sbatch submit.sbatch" in out
    assert (tmp_path / "elsewhere" / "submit.sbatch").is_file()
    assert not (tmp_path / "out").exists()


def test_run_local_runs_every_array_task_and_status_shows_them(tmp_path, capsys):
    job = write_job(tmp_path, rows=(5, 3))
    assert main(["run", str(job), "--local"]) == 0
    out = capsys.readouterr().out
    assert "running locally (local backend, no Slurm)" in out
    job_dir = tmp_path / "out"
    logs = sorted(p.name for p in (job_dir / "logs").iterdir())
    assert len(logs) == 2 and logs[0].endswith("_0.out") and logs[1].endswith("_1.out")
    for task in (0, 1):
        [record] = [json.loads(ln) for ln in (job_dir / "metrics" / f"task-{task:05d}-rank-000.jsonl")
                    .read_text().splitlines()]
        assert record["status"] == "ok" and record["task"] == task and record["backend"] == "local"
        assert record["rows"] == (5, 3)[task]
    assert main(["status", str(job_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] == "local" and info["summary"] == {"COMPLETED": 2}


def test_run_without_local_and_submit_without_slurm_say_what_to_do(tmp_path, capsys, monkeypatch):
    job = write_job(tmp_path)
    assert main(["run", str(job)]) == 2
    assert "--local" in capsys.readouterr().err
    monkeypatch.setenv("PATH", "/nonexistent")
    before = tree(tmp_path)
    assert main(["submit", str(job)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("hpcinfer: error: no Slurm here (sbatch not on PATH): use "
                   "`hpcinfer run JOB --local`")
    assert tree(tmp_path) == before


def test_status_of_a_non_job_dir(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert "not a job dir" in capsys.readouterr().err


def test_console_script_cold_start(tmp_path):
    """The installed `hpcinfer` entry point runs (timings live in bench/cli_latency.py)."""
    exe = Path(sys.executable).parent / "hpcinfer"
    if not exe.exists():
        pytest.skip("hpcinfer console script not installed in this env (pip install -e .)")
    job = write_job(tmp_path)
    proc = subprocess.run([str(exe), "render", str(job)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 0, proc.stderr


def test_multinode_script_runs_with_the_local_backend(tmp_path, capsys):
    job = write_job(tmp_path, rows=(3,), parallel={"tensor": 2, "nodes": 2})
    assert main(["run", str(job), "--local"]) == 0
    out = capsys.readouterr().out
    assert "preflight ok" in out
    script = (tmp_path / "out" / "submit.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and "scontrol show hostnames" in script
    [rec] = [json.loads(ln) for ln in (tmp_path / "out" / "metrics" / "task-00000-rank-000.jsonl")
             .read_text().splitlines()]
    assert rec["master_addr"] == "127.0.0.1" and rec["status"] == "ok"
