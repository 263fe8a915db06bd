"""The wheel carries templates and cluster profiles: build it, install it with its
dependencies into a fresh venv (no system site-packages), then render and run the quickstart
from outside the repo (so nothing can come from the source tree)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "examples" / "quickstart.yaml"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _run(args, **kw):
    proc = subprocess.run(args, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_wheel_installs_into_a_fresh_venv_and_renders_the_quickstart(tmp_path):
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(REPO), "-w", str(dist)])
    [wheel] = list(dist.glob("hpcinfer-*.whl"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    cfg = (venv / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in cfg
    _run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = _run([str(venv / "bin" / "python"), "-c",
                  "import hpcinfer, importlib.resources as r; print(hpcinfer.__file__); "
                  "print(r.files('hpcinfer.job_templates').joinpath('sbatch_base.j2').is_file())"],
                 cwd=tmp_path, env=env).stdout.split()
    assert where[0].startswith(str(venv)) and where[1] == "True"
    job_dir = tmp_path / "job"
    out = _run([str(venv / "bin" / "hpcinfer"), "render", str(QUICKSTART), "--out", str(job_dir)],
               cwd=tmp_path, env=env).stdout
    assert "job array of 2 tasks" in out
    script = (job_dir / "submit.sbatch").read_text()
    assert f"worker=({venv}/bin/python" in script
    run = _run([str(venv / "bin" / "hpcinfer"), "run", str(QUICKSTART), "--local", "--out",
                str(tmp_path / "ran")], cwd=tmp_path, env=env).stdout
    assert run.count("preflight ok") == 2 and "local run finished" in run
