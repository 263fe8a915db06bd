"""Shared test set-up.

Real parts (Slurm, MPI, the Triton interpreter) are used, not faked. Locally a missing part
skips its tests with the reason; with CI=true the same tests fail loudly instead, so CI can
never pass by skipping them.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

# Triton kernels run in the interpreter on machines without a GPU. It must be set before
# any @triton.jit function is created, i.e. before test modules import hpcinfer.kernels.
# The GPU tests (HPCINFER_GPU_TESTS=1, tests/gpu/*.sh) run them compiled.
os.environ.setdefault("TRITON_INTERPRET",
                      "0" if os.environ.get("HPCINFER_GPU_TESTS") == "1" else "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hpcinfer.testing.require import require  # noqa: E402  (after the env set-up above)

REPO = Path(__file__).resolve().parents[1]

# tests/gpu runs on a GPU through tests/gpu/run_gpu_checks.sh (which sets this variable), not
# in the CPU suite: there is nothing for it to do here, and 90-odd skips would hide real ones.
collect_ignore = [] if os.environ.get("HPCINFER_GPU_TESTS") == "1" else ["gpu"]


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real single-host Slurm 22.05, started once per session by dev/slurm-single-host.sh.

    Yields the partition name. The cluster is left running at the end (a later session or CI
    step may reuse it; `dev/slurm-single-host.sh stop` stops it).
    """
    script = REPO / "dev" / "slurm-single-host.sh"
    require(os.geteuid() == 0, "starting the single-host Slurm needs root")
    proc = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True,
                          timeout=600)
    require(proc.returncode == 0 and shutil.which("sbatch") is not None,
            f"single-host Slurm did not start (exit {proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    yield "debug"


@pytest.fixture(scope="session")
def mpirun():
    """Path of Open MPI's mpirun plus the flags a root, oversubscribed test run needs."""
    path = shutil.which("mpirun")
    require(path is not None, "mpirun (Open MPI) is not installed: run dev/setup.sh")
    return [path, "--allow-run-as-root", "--oversubscribe"]


@pytest.fixture(params=[False, True], ids=["rows", "gqa_packed"])
def prefill_pack(request, monkeypatch):
    """Runs a prefill-kernel test (tests/kernels, and tests/gpu on a GPU) with each tile
    layout: one query head per tile (the default) and PACK_GQA (the query heads of one KV
    head packed into a tile's rows)."""
    from hpcinfer.kernels import prefill_attention
    monkeypatch.setattr(prefill_attention, "PACK_GQA", request.param)
    return request.param
