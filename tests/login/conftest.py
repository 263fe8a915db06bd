"""The login-side tests check compiling, rendering, Slurm mechanics (submit, arrays, signals,
requeue, cancel) and the preflight checks. They run the worker's preflight phase only
(HPCINFER_WORKER_PHASES=preflight, a documented worker switch), so their job files can point at
a config-only model directory. Real inference through the same scripts, on the same real Slurm,
is tested in tests/worker/.
"""
import pytest


@pytest.fixture(autouse=True)
def _preflight_only_worker(monkeypatch):
    # Inherited by sbatch (--export=ALL is Slurm's default) and by the local backend.
    monkeypatch.setenv("HPCINFER_WORKER_PHASES", "preflight")
