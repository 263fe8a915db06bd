"""Golden files for the three script shapes x bare/container, each checked with bash -n and
shellcheck. Accept an intended change with: UPDATE_GOLDEN=1 pytest tests/login -k golden"""
from __future__ import annotations

import subprocess

import pytest

from hpcinfer.compile.render import render_container_def, render_script
from hpcinfer.testing.golden import check_golden
from hpcinfer.testing.plans import sample_plan
from hpcinfer.testing.tools import shellcheck_bin

CASES = [(shape, container) for shape in ("single", "array", "multinode") for container in (False, True)]


@pytest.mark.parametrize("shape,container", CASES, ids=[f"{s}-{'container' if c else 'bare'}" for s, c in CASES])
def test_script_matches_golden_and_passes_shellcheck(shape, container, tmp_path):
    text = render_script(sample_plan(shape, container=container))
    check_golden(f"{shape}-{'container' if container else 'bare'}.sbatch", text)
    script = tmp_path / "submit.sbatch"
    script.write_text(text)
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    lint = subprocess.run([shellcheck_bin(), "--severity=style", str(script)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_script_protocol_lines():
    """The flags and protocol every script must carry, whatever the golden files say."""
    for shape, container in CASES:
        text = render_script(sample_plan(shape, container=container))
        for needle in ("#SBATCH --signal=B:USR2@120", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                       'scontrol requeue "$requeue_id"', "trap 'forward_signal USR2' USR2",
                       '"${launch[@]}" "${worker[@]}" &', "-m hpcinfer.worker", "Resubmit as is"):
            assert needle in text, (shape, container, needle)
        flags = [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]
        assert flags == sorted(flags)
        assert ("logs/slurm-%A_%a.out" in text) == (shape == "array")
        assert ("--array=0-3%2" in text) == (shape == "array")
        assert ("apptainer exec --nv" in text) == container
        assert ("scontrol show hostnames" in text) == (shape == "multinode")
    array = render_script(sample_plan("array"))
    assert "requeue_id=${SLURM_ARRAY_JOB_ID:-local}_${SLURM_ARRAY_TASK_ID:-0}" in array


def test_mpirun_launcher_and_cpu_plan_render_clean(tmp_path):
    plan = sample_plan("multinode", launcher="mpirun", gpus_per_node=0)
    text = render_script(plan)
    assert "launch=(mpirun -np 8 --map-by ppr:4:node)" in text
    script = tmp_path / "s.sbatch"
    script.write_text(text)
    assert subprocess.run([shellcheck_bin(), str(script)]).returncode == 0


def test_container_definition_golden_and_parses(tmp_path):
    text = render_container_def(sample_plan("single", container=True))
    check_golden("container.def", text)
    from spython.main.parse.parsers import SingularityParser
    path = tmp_path / "container.def"
    path.write_text(text)
    recipe = SingularityParser(str(path)).recipe["spython-base"]
    assert recipe.fromHeader == "nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04"
    assert any("pip install --no-cache-dir hpcinfer==0.1.0" in line for line in recipe.install)
    assert "HF_HUB_OFFLINE=1" in recipe.environ
    assert recipe.cmd == 'exec hpcinfer "$@"'
